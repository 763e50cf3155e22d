r"""
Hessian with backprop: Rosenbrock, Hutchinson's diagonal, damped Newton
=======================================================================

P. Rastogi's note *Hessian with Backprop* (2021) computes
:math:`H_\theta v = \partial (J_\theta^\top v) / \partial\theta` in JAX,
checks it on the Rosenbrock function against SciPy, estimates the Hessian's
diagonal with Hutchinson's method, and points to second-order optimisers
(AdaHessian, trust-region methods). This example does the same with
blockops:

1. the HVP of Rosenbrock, written as a blockops pipeline, against
   :func:`scipy.optimize.rosen_hess_prod` (the note's float32 JAX run was off
   by :math:`5\times10^{-4}`; in float64 the difference is at rounding
   level);
2. Hutchinson's diagonal estimator with Rademacher probes against the exact
   diagonal of a network Hessian, error against probe count;
3. a damped-Newton (Levenberg-Marquardt-style trust-region) optimiser that
   takes exact :math:`(H + \lambda I)^{-1} g` steps, next to Adam, on a small
   regression.
"""

import itertools
import os
import sys
import time

import matplotlib.pyplot as plt
import numpy as np
from scipy.optimize import rosen, rosen_der, rosen_hess, rosen_hess_prod

from blockops.hessian import hessian, hvp
from blockops.network import Bias, CustomLoss, Dense, MSELoss, Pipeline

QUICK = os.environ.get("BLOCKOPS_EXAMPLE_QUICK", "0") == "1"
rng = np.random.default_rng(2)


# sphinx_gallery_start_ignore
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared _gallery helper
from _gallery import show_figures

# sphinx_gallery_end_ignore

# %%
# 1. Rosenbrock as a pipeline
# ---------------------------
# A parameter-only ``Bias`` layer (identity activation, zero input) outputs
# its parameters; a :class:`~blockops.network.CustomLoss` evaluates
# :math:`\sum_i 100(x_{i+1} - x_i^2)^2 + (1 - x_i)^2` on them. With one sample
# the pipeline's loss, gradient and Hessian are Rosenbrock's.


def rosen_rows(z, y):
    return 100.0 * ((z[:, 1:] - z[:, :-1] ** 2) ** 2).sum(1) + ((1 - z[:, :-1]) ** 2).sum(1)


def rosen_grad_rows(z, y):
    # written out by hand (not taken from SciPy, so the comparison below is independent)
    x0, x1 = z[:, :-1], z[:, 1:]
    g = np.zeros_like(z)
    g[:, :-1] += -400.0 * x0 * (x1 - x0**2) - 2.0 * (1.0 - x0)
    g[:, 1:] += 200.0 * (x1 - x0**2)
    return g


def rosen_hvp_rows(z, y, v):
    # H is tridiagonal: H_ii = 1200 x_i^2 - 400 x_{i+1} + 2 (+200 for i > 0), H_{i,i+1} = -400 x_i
    x0, x1 = z[:, :-1], z[:, 1:]
    hv = np.zeros_like(v)
    hv[:, :-1] += (1200.0 * x0**2 - 400.0 * x1 + 2.0) * v[:, :-1] - 400.0 * x0 * v[:, 1:]
    hv[:, 1:] += 200.0 * v[:, 1:] - 400.0 * x0 * v[:, :-1]
    return hv


def rosenbrock_pipeline(n):
    net = Pipeline(
        [Bias(n, "identity"), CustomLoss(rosen_rows, rosen_grad_rows, rosen_hvp_rows, "rosen")]
    )
    return net, np.zeros((1, n)), np.zeros((1, n))


for x0, d in [
    (np.array([2.2, 0.21]), np.array([1.2, 3.1])),  # the note's example
    (rng.uniform(-2, 2, 12), rng.standard_normal(12)),
]:
    net, X, Y = rosenbrock_pipeline(x0.size)
    pt = net.linearize(x0, X, Y)
    assert np.isclose(pt.loss, rosen(x0), rtol=1e-14)
    hv = hvp(pt, d)
    gold = rosen_hess_prod(x0, d)
    gold_dense = rosen_hess(x0) @ d
    fd = (rosen_der(x0 + 1e-6 * d) - rosen_der(x0 - 1e-6 * d)) / 2e-6
    rel = np.linalg.norm(hv - gold) / np.linalg.norm(gold)
    print(
        f"Rosenbrock n={x0.size}: blockops HVP - rosen_hess_prod = "
        f"{hv - gold if x0.size == 2 else ''}"
    )
    print(
        f"   relative {rel:.1e}; "
        f"vs dense rosen_hess {np.linalg.norm(hv - gold_dense) / np.linalg.norm(gold):.1e}; "
        f"vs finite differences {np.linalg.norm(hv - fd) / np.linalg.norm(gold):.1e}"
    )
    assert rel < 1e-14
    assert np.linalg.norm(hv - fd) / np.linalg.norm(gold) < 1e-7

# %%
# 2. Hutchinson's diagonal estimator
# ----------------------------------
# For Rademacher probes :math:`z` (entries :math:`\pm1`),
# :math:`\mathbb E[z \odot Hz] = \operatorname{diag}(H)`, and entry :math:`i`
# of one sample has variance :math:`\sum_{j\ne i} H_{ij}^2`. blockops pushes
# all probes through the fused HVP at once (``hvp(point, Z)`` with
# ``Z`` of shape ``(n, k)``). First the note's 2-D example (exact diagonal
# ``[5726.0005, 200]``), then a network.

x_note = np.array([2.2, 0.21])
net, X, Y = rosenbrock_pipeline(2)
pt = net.linearize(x_note, X, Y)
Z = rng.choice([-1.0, 1.0], size=(2, 30))
diag_est = (Z * hvp(pt, Z)).mean(axis=1)
print("Rosenbrock exact diagonal", np.diag(rosen_hess(x_note)), " Hutchinson (30 probes)", diag_est)

width, B = (8, 16) if QUICK else (12, 32)
mlp = Pipeline(
    [Dense(3, width, "tanh"), Dense(width, width, "tanh"), Dense(width, 1, "identity"), MSELoss()]
)
w = mlp.init(seed=4)
Xn = rng.standard_normal((B, 3))
Yn = np.sin(Xn.sum(1, keepdims=True))
pt = mlp.linearize(w, Xn, Yn)
n = mlp.n_params
H = hessian(pt) @ np.eye(n)
d_exact = np.diag(H)
off2 = (H**2).sum(1) - d_exact**2  # per-entry variance of one probe

K = 256 if QUICK else 2048
repeats = 4
probes = np.unique(np.geomspace(1, K, 12).astype(int))
errs = np.zeros((repeats, probes.size))
for r in range(repeats):
    Zr = rng.choice([-1.0, 1.0], size=(n, K))
    samples = Zr * hvp(pt, Zr)  # (n, K): one estimate per probe
    csum = np.cumsum(samples, axis=1)
    for j, k in enumerate(probes):
        errs[r, j] = np.linalg.norm(csum[:, k - 1] / k - d_exact) / np.linalg.norm(d_exact)
theory = np.sqrt(off2.sum() / probes) / np.linalg.norm(d_exact)
mean_err = errs.mean(0)
print(
    f"network with {n} parameters: Hutchinson relative error {mean_err[0]:.2f} (1 probe) -> "
    f"{mean_err[-1]:.3f} ({probes[-1]} probes); theory {theory[-1]:.3f}"
)
assert mean_err[-1] < mean_err[0] / 5
assert 0.5 * theory[-1] < mean_err[-1] < 2.0 * theory[-1]  # the 1/sqrt(k) law

fig, ax = plt.subplots(figsize=(5, 3.4))
ax.loglog(probes, errs.T, color="C0", alpha=0.3, lw=1)
ax.loglog(probes, mean_err, "o-", color="C0", label="Hutchinson (mean of 4 runs)")
ax.loglog(
    probes,
    theory,
    "k--",
    label=r"theory $\sqrt{\sum_{i\neq j} H_{ij}^2 / k}\,/\,\|\mathrm{diag}\,H\|$, slope $-1/2$",
)
ax.set_xlabel("Rademacher probes k")
ax.set_ylabel("relative error of diag(H)")
ax.set_title(f"Hutchinson's estimator, {n} parameters")
ax.legend(fontsize=8, loc="lower left")  # the data run from upper left to lower right
fig.tight_layout()

# %%
# 3. Damped Newton with the exact inverse, next to Adam
# -----------------------------------------------------
# Each Newton step solves :math:`(H + \lambda I)s = -g` exactly with
# :func:`blockops.inverse.inverse_hessian` (the lifted KKT / Riccati
# route; :math:`H` may be indefinite). The damping :math:`\lambda` plays the
# role of a trust-region radius: it shrinks when the quadratic model
# predicts the actual decrease well and grows when it does not
# (Levenberg-Marquardt / Moré's rule). Adam uses its usual settings and a
# tuned learning rate.

try:
    from blockops.inverse import inverse_hessian
except ImportError:  # the exact inverse is not installed: skip this part
    inverse_hessian = None

Bt = 64
Xt = np.linspace(-2, 2, Bt)[:, None]
reg = Pipeline([Dense(1, 5, "tanh"), Dense(5, 5, "tanh"), Dense(5, 1, "identity"), MSELoss()])
# a realizable regression: the targets come from a "teacher" network of the same shape
Yt = reg.linearize(reg.init(seed=11), Xt, np.zeros((Bt, 1))).zs[-2].copy()
w0 = reg.init(seed=5)
n_newton = 40 if QUICK else 60
n_adam = 1500 if QUICK else 6000


def damped_newton(w, iters, lam=1e-1):
    hist, times, t0 = [reg.loss(w, Xt, Yt)], [0.0], time.perf_counter()
    for _ in range(iters):
        p = reg.linearize(w, Xt, Yt)
        while lam < 1e10:
            s = -(inverse_hessian(p, damping=lam) @ p.gradient)
            pred = -(p.gradient @ s + 0.5 * s @ hvp(p, s))  # decrease predicted by the model
            new = reg.loss(w + s, Xt, Yt)
            rho = (p.loss - new) / pred if pred > 0 else -1.0
            if rho > 1e-4:  # accept the step
                w = w + s
                if rho > 0.75:  # the model is good: widen the trust region
                    lam = max(lam / 3.0, 1e-12)
                elif rho < 0.25:
                    lam *= 2.0
                break
            lam *= 4.0  # reject: shrink the trust region
        hist.append(reg.loss(w, Xt, Yt))
        times.append(time.perf_counter() - t0)
    return w, hist, times


def adam(w, iters, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8):
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    hist, times, t0 = [reg.loss(w, Xt, Yt)], [0.0], time.perf_counter()
    for t in range(1, iters + 1):
        g = reg.gradient(w, Xt, Yt)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        hist.append(reg.loss(w, Xt, Yt))
        times.append(time.perf_counter() - t0)
    return w, hist, times


if inverse_hessian is not None:
    w_n, hist_n, t_n = damped_newton(w0.copy(), n_newton)
    w_a, hist_a, t_a = adam(w0.copy(), n_adam)
    print(
        f"damped Newton: loss {hist_n[0]:.3e} -> {hist_n[-1]:.3e} "
        f"in {len(hist_n) - 1} steps ({t_n[-1]:.2f} s)"
    )
    print(
        f"Adam:          loss {hist_a[0]:.3e} -> {hist_a[-1]:.3e} "
        f"in {len(hist_a) - 1} steps ({t_a[-1]:.2f} s)"
    )
    assert hist_n[-1] < 0.1 * hist_a[-1]  # far lower loss in far fewer steps
    assert all(
        b <= a for a, b in itertools.pairwise(hist_n)
    )  # monotone: every accepted step decreases

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].semilogy(hist_n, "o-", ms=3, label="damped Newton (exact inverse)")
    ax[0].semilogy(
        np.linspace(0, len(hist_n) - 1, len(hist_a)),
        hist_a,
        label=f"Adam ({n_adam} steps, rescaled)",
    )
    ax[0].set_xlabel("Newton step (Adam steps rescaled to the same axis)")
    ax[0].set_ylabel("training loss")
    ax[0].legend(fontsize=8, loc="lower left")
    ax[1].semilogy(t_n, hist_n, "o-", ms=3, label="damped Newton")
    ax[1].semilogy(t_a, hist_a, label="Adam")
    ax[1].set_xlabel("seconds")
    ax[1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
# sphinx_gallery_start_ignore
show_figures("plot_hessian_with_backprop")  # plt.show(), or PNGs when headless (see the top)
# sphinx_gallery_end_ignore
