r"""
Pearlmutter's R-operator: feed-forward, recurrent, Boltzmann, perturbation
===========================================================================

Pearlmutter (1994), *Fast exact multiplication by the Hessian*, defines

.. math::

   R\{f(w)\} = \frac{\partial}{\partial r} f(w + r v)\Big|_{r=0},
   \qquad R\{w\} = v,

and applies it to the equations that compute a gradient, so that
:math:`R\{\nabla_w E\} = Hv` exactly, at about the cost of a gradient. This
example reproduces the four systems of the slides:

1. :math:`R\{\text{backprop}\}` written out by hand for a small
   feed-forward net equals blockops' fused HVP (eq. 54) and a
   finite-difference check;
2. the R-operator on a recurrent network relaxed to a fixed point
   (Almeida-Pineda recurrent backprop), checked against finite differences;
3. :math:`R\{p_{ij}\}` for a small Boltzmann machine by exact enumeration of
   the states, checked against finite differences;
4. weight perturbation with the symmetric rank-2 Hessian estimate, compared
   with the exact Hessian.
"""

import os
import sys

import matplotlib.pyplot as plt
import numpy as np

from blockops.hessian import hessian, hvp
from blockops.network import Dense, MSELoss, Pipeline

QUICK = os.environ.get("BLOCKOPS_EXAMPLE_QUICK", "0") == "1"
rng = np.random.default_rng(1)


# sphinx_gallery_start_ignore
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared _gallery helper
from _gallery import show_figures

# sphinx_gallery_end_ignore

# %%
# 1. R{backprop} for a feed-forward net
# -------------------------------------
# The net is :math:`h = \tanh(W_1 x + c_1)`, :math:`o = W_2 h + c_2`,
# :math:`E = \frac1B \sum_s \tfrac12 \lVert o_s - y_s\rVert^2`, in blockops'
# parameter layout ``concat(W1.ravel(), c1, W2.ravel(), c2)``. The forward and
# backward passes below are the slides' equations; the R-pass applies
# :math:`R\{\cdot\}` to every line, with :math:`R\{W\} = V`.

n_in, n_hid, n_out, B = 4, 6, 3, 10
net = Pipeline([Dense(n_in, n_hid, "tanh"), Dense(n_hid, n_out, "identity"), MSELoss()])
w = net.init(seed=3)
X = rng.standard_normal((B, n_in))
Y = rng.standard_normal((B, n_out))
v = rng.standard_normal(net.n_params)


def unpack(w):
    i = 0
    W1 = w[i : i + n_hid * n_in].reshape(n_hid, n_in)
    i += n_hid * n_in
    c1 = w[i : i + n_hid]
    i += n_hid
    W2 = w[i : i + n_out * n_hid].reshape(n_out, n_hid)
    i += n_out * n_hid
    return W1, c1, W2, w[i:]


def gradient(w):
    W1, c1, W2, c2 = unpack(w)
    a1 = X @ W1.T + c1
    h = np.tanh(a1)
    o = h @ W2.T + c2
    e = (o - Y) / B  # dE/do
    dh = e @ W2
    da1 = (1 - h**2) * dh
    return np.concatenate([(da1.T @ X).ravel(), da1.sum(0), (e.T @ h).ravel(), e.sum(0)])


def r_backprop(w, v):
    W1, c1, W2, c2 = unpack(w)
    V1, v1, V2, v2 = unpack(v)
    # forward pass and its R-image
    a1 = X @ W1.T + c1
    Ra1 = X @ V1.T + v1
    h = np.tanh(a1)
    s1 = 1 - h**2  # tanh'
    Rh = s1 * Ra1
    o = h @ W2.T + c2
    Ro = Rh @ W2.T + h @ V2.T + v2
    # backward pass and its R-image
    e = (o - Y) / B
    Re = Ro / B  # e'(o) R{o}
    dh = e @ W2
    Rdh = Re @ W2 + e @ V2
    Rda1 = s1 * Rdh + (-2 * h * s1) * Ra1 * dh  # tanh'' = -2 tanh tanh'
    return np.concatenate(
        [(Rda1.T @ X).ravel(), Rda1.sum(0), (Re.T @ h + e.T @ Rh).ravel(), Re.sum(0)]
    )


Hv_r = r_backprop(w, v)
pt = net.linearize(w, X, Y)
assert np.allclose(pt.gradient, gradient(w), rtol=1e-13, atol=1e-15)
Hv_fused = hvp(pt, v)
eps = 1e-5
Hv_fd = (gradient(w + eps * v) - gradient(w - eps * v)) / (2 * eps)
scale = np.linalg.norm(Hv_r)
err_fused = np.linalg.norm(Hv_fused - Hv_r) / scale
err_fd = np.linalg.norm(Hv_fd - Hv_r) / scale
print(f"R{{backprop}} vs blockops fused HVP: relative difference {err_fused:.1e}")
print(f"R{{backprop}} vs central differences of the gradient: {err_fd:.1e}")
assert err_fused < 1e-13
assert err_fd < 1e-8

# %%
# 2. Recurrent backprop (Almeida-Pineda) and its R-image
# ------------------------------------------------------
# A recurrent net relaxes :math:`dy/dt = -y + \sigma(Wy) + I` to its fixed
# point :math:`y = \sigma(x) + I`, :math:`x = Wy`. With the error
# :math:`E = \tfrac12 \sum_{i \in \text{out}} (y_i - d_i)^2` and
# :math:`e = \partial E / \partial y`, the adjoint relaxes
# :math:`d\lambda/dt = -\lambda + W^\top(\sigma'(x)\odot\lambda) + e`, and
# :math:`\partial E / \partial W = (\sigma'(x)\odot\lambda)\, y^\top`.
# Applying :math:`R\{\cdot\}` gives two more relaxations,
#
# .. math::
#
#    \frac{dR\{y\}}{dt} &= -R\{y\} + \sigma'(x)\odot R\{x\},\qquad
#    R\{x\} = W R\{y\} + V y,\\
#    \frac{dR\{\lambda\}}{dt} &= -R\{\lambda\} + V^\top(\sigma'\odot\lambda)
#    + W^\top\bigl(\sigma''\odot R\{x\}\odot\lambda + \sigma'\odot R\{\lambda\}\bigr)
#    + e'(y)\,R\{y\},
#
# and :math:`R\{\partial E/\partial W\} = (\sigma''\odot R\{x\}\odot\lambda +
# \sigma'\odot R\{\lambda\})\,y^\top + (\sigma'\odot\lambda)\,R\{y\}^\top`.
# We relax each with unit Euler steps (a fixed-point iteration; it converges
# because :math:`\lVert\operatorname{diag}(\sigma')W\rVert < 1`).

n_units = 8
W = 0.6 * rng.standard_normal((n_units, n_units)) / np.sqrt(n_units)
Iext = rng.standard_normal(n_units)
out = np.arange(n_units) >= n_units - 3  # the last three units are outputs
d = rng.standard_normal(n_units) * out
V = rng.standard_normal((n_units, n_units))


def relax(step, y0, tol=1e-15, max_iter=10_000):
    y = y0
    for k in range(max_iter):
        y_new = step(y)
        if np.abs(y_new - y).max() < tol:
            return y_new, k
        y = y_new
    raise RuntimeError("relaxation did not converge")


def ap_gradient(W):
    y, _ = relax(lambda y: np.tanh(W @ y) + Iext, np.zeros(n_units))
    x = W @ y
    s1 = 1 - np.tanh(x) ** 2
    e = (y - d) * out
    lam, _ = relax(lambda lam: W.T @ (s1 * lam) + e, np.zeros(n_units))
    return np.outer(s1 * lam, y), (y, x, s1, lam)


def ap_r_gradient(W, V):
    _, (y, x, s1, lam) = ap_gradient(W)
    s2 = -2 * np.tanh(x) * s1
    Ry, k_y = relax(lambda Ry: s1 * (W @ Ry + V @ y), np.zeros(n_units))
    Rx = W @ Ry + V @ y
    Re = Ry * out  # e'(y) R{y}
    Rlam, k_l = relax(
        lambda Rl: V.T @ (s1 * lam) + W.T @ (s2 * Rx * lam + s1 * Rl) + Re, np.zeros(n_units)
    )
    RG = np.outer(s2 * Rx * lam + s1 * Rlam, y) + np.outer(s1 * lam, Ry)
    return RG, (k_y, k_l)


def ap_error(W):
    y, _ = relax(lambda y: np.tanh(W @ y) + Iext, np.zeros(n_units))
    return 0.5 * (((y - d) * out) ** 2).sum()


G, _ = ap_gradient(W)
G_fd = np.zeros_like(W)
for i in range(n_units):
    for j in range(n_units):
        E_ = np.zeros_like(W)
        E_[i, j] = 1e-6
        G_fd[i, j] = (ap_error(W + E_) - ap_error(W - E_)) / 2e-6
RG, iters = ap_r_gradient(W, V)
h = 1e-5
RG_fd = (ap_gradient(W + h * V)[0] - ap_gradient(W - h * V)[0]) / (2 * h)
err_g = np.abs(G - G_fd).max() / np.abs(G).max()
err_rg = np.abs(RG - RG_fd).max() / np.abs(RG).max()
print(f"recurrent: relaxed gradient vs finite differences of E: {err_g:.1e}")
print(f"recurrent: relaxed R{{dE/dW}} vs finite differences of the gradient: {err_rg:.1e}")
print(f"recurrent: relaxation sweeps for R{{y}}, R{{lambda}}: {iters}")
assert err_g < 1e-7
assert err_rg < 1e-8

# %%
# 3. R{p_ij} for a Boltzmann machine
# ----------------------------------
# With states :math:`s \in \{-1, 1\}^n`, energy :math:`E_\alpha = \sum_{i<j}
# s_i s_j w_{ij}`, :math:`P(\alpha) \propto e^{-E_\alpha/T}` and
# :math:`p_{ij} = \langle s_i s_j \rangle`, the slides derive
#
# .. math::
#
#    R\{p_{ij}\} = \frac1T\bigl(p_{ij}\langle D\rangle - \langle s_i s_j D\rangle\bigr),
#    \qquad D_\alpha = \sum_{i<j} s_i s_j v_{ij}.
#
# For a few units all :math:`2^n` states can be enumerated exactly.

n_bm = 6 if QUICK else 8
T = 1.5
iu = np.triu_indices(n_bm, 1)
states = 1 - 2 * ((np.arange(2**n_bm)[:, None] >> np.arange(n_bm)) & 1)  # (2^n, n) of ±1
pairs = (states[:, :, None] * states[:, None, :])[:, iu[0], iu[1]]  # s_i s_j for i < j
w_bm = 0.5 * rng.standard_normal(len(iu[0]))
v_bm = rng.standard_normal(len(iu[0]))


def p_ij(w):
    logp = -(pairs @ w) / T
    P = np.exp(logp - logp.max())
    P /= P.sum()
    return P @ pairs, P


p, P = p_ij(w_bm)
D = pairs @ v_bm
R_p = (p * (P @ D) - P @ (pairs * D[:, None])) / T
h = 1e-5
R_fd = (p_ij(w_bm + h * v_bm)[0] - p_ij(w_bm - h * v_bm)[0]) / (2 * h)
err_bm = np.abs(R_p - R_fd).max() / np.abs(R_p).max()
print(f"Boltzmann ({n_bm} units, {2**n_bm} states): R{{p_ij}} vs finite differences: {err_bm:.1e}")
assert err_bm < 1e-8

# %%
# 4. Weight perturbation and the symmetric rank-2 Hessian estimate
# ----------------------------------------------------------------
# Weight perturbation estimates derivatives from the change in error under
# random perturbations :math:`\Delta w`, using only globally broadcast
# quantities. With a second-order model whose Hessian is the symmetric
# estimate
#
# .. math::
#
#    \hat H = \frac{1}{\lVert v\rVert^2}\Bigl(z v^\top + v z^\top
#    - \frac{v\cdot z}{\lVert v\rVert^2} v v^\top\Bigr),\qquad z = Hv,
#
# :math:`\Delta E` is linear in the unknown gradient :math:`g` and the unknown
# :math:`z` (the slides' final formula), so a least-squares fit over many
# perturbations estimates :math:`Hv` without any backward pass.
#
# One detail the slides leave out: :math:`\hat H = H - (I - P_v) H (I - P_v)`
# (checked below), so the model drops
# :math:`\tfrac12\Delta w^\top (I-P_v)H(I-P_v)\Delta w`, a "noise" term whose
# mean :math:`\tfrac12\sigma^2\operatorname{tr}((I-P_v)H)` is not zero and is
# correlated with the :math:`z` features. Without an intercept in the fit the
# estimate of :math:`z` is biased and stops improving; with one it converges
# like :math:`1/\sqrt{N}`. A tiny network keeps the number of unknowns small.

wp_net = Pipeline([Dense(2, 3, "tanh"), Dense(3, 1, "identity"), MSELoss()])
w_wp = wp_net.init(seed=3)
X_wp = rng.standard_normal((8, 2))
Y_wp = rng.standard_normal((8, 1))
pt_wp = wp_net.linearize(w_wp, X_wp, Y_wp)
n_wp = wp_net.n_params
v_wp = rng.standard_normal(n_wp)
z_exact = hvp(pt_wp, v_wp)  # the exact Hv (fused R{backprop})
n_pert = 2000 if QUICK else 8000
sigma = 1e-2
E0 = pt_wp.loss
vv = v_wp @ v_wp
F = np.ones((n_pert, 2 * n_wp + 1))  # features: [Δw, z-features, intercept]
dE = np.empty(n_pert)
for k in range(n_pert):
    dw = sigma * rng.standard_normal(n_wp)
    dE[k] = wp_net.loss(w_wp + dw, X_wp, Y_wp) - E0
    a = (dw @ v_wp) / vv
    F[k, :n_wp] = dw
    F[k, n_wp : 2 * n_wp] = a * (dw - 0.5 * a * v_wp)

Ns = np.unique(np.geomspace(4 * n_wp, n_pert, 8).astype(int))
err_z = {True: [], False: []}
for N in Ns:
    for intercept in (True, False):
        cols = 2 * n_wp + (1 if intercept else 0)
        coef, *_ = np.linalg.lstsq(F[:N, :cols], dE[:N], rcond=None)
        err_z[intercept].append(
            np.linalg.norm(coef[n_wp : 2 * n_wp] - z_exact) / np.linalg.norm(z_exact)
        )
g_est = coef[:n_wp]  # last fit (all perturbations, no intercept) – the gradient is unaffected
err_g_wp = np.linalg.norm(g_est - pt_wp.gradient) / np.linalg.norm(pt_wp.gradient)
print(f"weight perturbation ({n_pert} perturbations, sigma={sigma}): gradient error {err_g_wp:.1e}")
print(f"   Hv error with intercept {err_z[True][-1]:.2f}, without {err_z[False][-1]:.2f}")
assert err_g_wp < 1e-2
assert err_z[True][-1] < 0.4 and err_z[True][-1] < 0.6 * err_z[False][-1]


def rank2(z, v):
    vv = v @ v
    return (np.outer(z, v) + np.outer(v, z) - (v @ z) / vv * np.outer(v, v)) / vv


H_exact = hessian(pt_wp) @ np.eye(n_wp)
H_hat = rank2(z_exact, v_wp)
Pv = np.outer(v_wp, v_wp) / vv
# H_hat keeps exactly the part of H that touches v: H - (I - Pv) H (I - Pv)
assert np.allclose(H_hat, H_hat.T)
assert np.allclose(H_hat @ v_wp, z_exact, rtol=1e-12)
assert np.allclose(H_hat, H_exact - (np.eye(n_wp) - Pv) @ H_exact @ (np.eye(n_wp) - Pv), atol=1e-12)
rel_F = np.linalg.norm(H_hat - H_exact) / np.linalg.norm(H_exact)
print(f"rank-2 estimate: H_hat v = Hv exactly; ||H_hat - H||_F / ||H||_F = {rel_F:.2f}")

fig, ax = plt.subplots(1, 3, figsize=(11, 3.4))
lim = np.abs(H_exact).max()
ax[0].imshow(H_exact, cmap="RdBu_r", vmin=-lim, vmax=lim)
ax[0].set_title("exact Hessian (blockops)")
ax[1].imshow(H_hat, cmap="RdBu_r", vmin=-lim, vmax=lim)
ax[1].set_title("rank-2 estimate from one Hv")
for a_ in ax[:2]:
    a_.set_xticks([])
    a_.set_yticks([])
ax[2].loglog(Ns, err_z[True], "o-", label="fit with intercept")
ax[2].loglog(Ns, err_z[False], "s--", label="fit without intercept")
# reference slope -1/2, through the last point of the fit with intercept
ref = err_z[True][-1] * np.sqrt(Ns[-1] / Ns)
ax[2].loglog(Ns, ref, ":", color="0.4", lw=1.5, label=r"$\propto N^{-1/2}$ (reference)")
ax[2].set_xlabel("perturbations N")
ax[2].set_ylabel("relative error of Hv")
ax[2].legend(fontsize=8, loc="lower left")
fig.tight_layout()
# sphinx_gallery_start_ignore
show_figures("plot_r_operator")  # plt.show(), or PNGs when headless (see the top)
# sphinx_gallery_end_ignore
