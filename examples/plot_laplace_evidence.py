r"""
Laplace evidence: choosing the prior precision exactly
======================================================

A Bayesian neural network with a Gaussian prior :math:`\theta \sim
\mathcal N(0, \delta^{-1} I)` and Gaussian noise :math:`\sigma` is
approximated around its MAP parameters :math:`\theta^\star` by the Laplace
posterior :math:`\mathcal N(\theta^\star, (G + \delta I)^{-1})`, :math:`G`
the generalized Gauss-Newton matrix. Its evidence (MacKay 1992)

.. math::

   \log p(\mathcal D \mid \delta) \approx -L(\theta^\star) - c
   - \tfrac\delta2 \lVert\theta^\star\rVert^2 + \tfrac P2 \log\delta
   - \tfrac12 \log\det(G + \delta I)

chooses :math:`\delta` without a validation set. blockops computes the
log-determinant from the exact factorisation of :math:`G + \delta I` and the
derivative

.. math::

   \frac{\partial \log p}{\partial\delta} = -\tfrac12 \lVert\theta^\star\rVert^2
   + \frac{P}{2\delta} - \tfrac12 \operatorname{tr} (G + \delta I)^{-1}

from the exact diagonal of the inverse (selected inversion), so the
optimiser gets exact values and gradients, not Hutchinson estimates. The
predictive band comes from the linearised predictive variance
:math:`J_x (G + \delta I)^{-1} J_x^\top`, all test points in one batched solve.

The loss is the negative log-likelihood: ``MSELoss(scale=B / sigma**2)`` is
:math:`\sum_i \tfrac{1}{2\sigma^2}(f(x_i) - y_i)^2` (see
:mod:`blockops.laplace` for the conventions).
"""

import os
import sys
import time

import matplotlib.pyplot as plt
import numpy as np
from scipy.optimize import minimize

from blockops import LaplaceGGN
from blockops.hessian import hessian
from blockops.inverse import inverse_hessian
from blockops.network import Dense, MSELoss, Pipeline

QUICK = os.environ.get("BLOCKOPS_EXAMPLE_QUICK", "0") == "1"
rng = np.random.default_rng(3)

# sphinx_gallery_start_ignore
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared _gallery helper
from _gallery import show_figures

# sphinx_gallery_end_ignore

# %%
# Data and model
# --------------
# Noisy samples of :math:`\sin 2x` on two intervals with a gap between them, a
# tanh MLP 1-16-16-1 (321 parameters).

B, sigma, width = (32 if QUICK else 48), 0.1, 16
X = np.concatenate([rng.uniform(-2.5, -0.6, B // 2), rng.uniform(0.6, 2.5, B - B // 2)])[:, None]
Y = np.sin(2 * X) + sigma * rng.standard_normal((B, 1))
net = Pipeline(
    [
        Dense(1, width, "tanh"),
        Dense(width, width, "tanh"),
        Dense(width, 1, "identity"),
        MSELoss(scale=B / sigma**2),  # the Gaussian negative log-likelihood
    ]
)
n = net.n_params
X_plot = np.linspace(-3.5, 3.5, 200)[:, None]

# %%
# MAP: L-BFGS, then exact Newton
# ------------------------------
# Minimise :math:`L(\theta) + \tfrac\delta2\lVert\theta\rVert^2`: SciPy's L-BFGS
# with blockops' gradients (cheap steps), then a few exact Newton steps
# :math:`\theta \leftarrow \theta - (H + \delta I)^{-1}\nabla` to put the
# gradient at rounding level. The Laplace approximation is taken at a
# minimum, and the inertia of the factorisation of :math:`H + \delta I` says
# whether L-BFGS stopped at one: with weight decay, hidden units can settle
# into copies of each other, which are saddle points; there a small random
# kick and more L-BFGS steps descend further.


def fit_map(w, delta, max_newton=10):
    def objective(w):
        p = net.linearize(w, X, Y)
        return p.loss + 0.5 * delta * (w @ w), p.gradient + delta * w

    opts = {"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-8}
    for _ in range(10):
        w = minimize(objective, w, jac=True, method="L-BFGS-B", options=opts).x
        if inverse_hessian(net.linearize(w, X, Y), damping=delta).inertia[:2] == (0, 0):
            break
        w = w + 1e-2 * rng.standard_normal(n)  # a saddle point: kick it off
    for it in range(max_newton):
        p = net.linearize(w, X, Y)
        g = p.gradient + delta * w
        if np.linalg.norm(g) < 1e-9:
            return w, p, it
        Hinv = inverse_hessian(p, damping=delta)
        assert Hinv.inertia[:2] == (0, 0)  # positive definite: Newton heads for the minimum
        w = w - Hinv @ g
    raise RuntimeError("Newton did not converge")


# %%
# MacKay's loop: fit, optimise the evidence, refit
# ------------------------------------------------
# Each round fits the MAP at the current :math:`\delta`, then maximises the
# evidence in :math:`\delta` at that :math:`\theta^\star` (L-BFGS in
# :math:`\log\delta` with the exact gradient).

t0 = time.perf_counter()
w, delta = net.init(seed=4), 1.0
for _ in range(2 if QUICK else 4):
    w, pt, iters = fit_map(w, delta)
    la = LaplaceGGN(pt, delta)
    delta = la.optimize_prior_precision()
    print(f"MAP (then {iters} Newton steps); optimised prior precision δ = {delta:.4g}")
w, pt, _ = fit_map(w, delta)
la = LaplaceGGN(pt, delta)
delta = la.optimize_prior_precision()
t_fit = time.perf_counter() - t0
lml = la.log_marginal_likelihood()
print(f"final δ* = {delta:.4g}, log evidence {lml:.4f} ({t_fit:.1f} s in all)")

# %%
# Checks against a dense computation
# ----------------------------------
# The evidence against ``numpy.linalg.slogdet`` of the explicitly formed
# :math:`G + \delta I`, the exact derivative against central differences, and
# the optimum: the derivative vanishes there.

G_dense = hessian(pt, kind="ggn") @ np.eye(n)  # the fused GGN applied to the identity


def dense_lml(d):
    logdet = np.linalg.slogdet(G_dense + d * np.eye(n))[1]
    return -pt.loss - la.nll_constant - 0.5 * d * (w @ w) + 0.5 * n * np.log(d) - 0.5 * logdet


err_lml = abs(lml - dense_lml(delta)) / abs(lml)
d1 = 1.7 * delta  # a point away from the optimum, where the derivative is not small
h = 1e-5 * d1
fd = (dense_lml(d1 + h) - dense_lml(d1 - h)) / (2 * h)
err_grad = abs(la.log_marginal_likelihood_gradient(d1) - fd) / abs(fd)
grad_opt = abs(la.log_marginal_likelihood_gradient()) * delta  # ∂/∂log δ at δ*
print(
    f"evidence vs dense slogdet: {err_lml:.1e} relative; derivative vs central "
    f"differences: {err_grad:.1e}; δ ∂/∂δ at the optimum {grad_opt:.1e}"
)
assert err_lml < 1e-10 and err_grad < 1e-6 and grad_opt < 1e-5

# %%
# One precision per layer
# -----------------------
# The same evidence with :math:`D = \operatorname{diag}(\delta_\ell I_{p_\ell})`,
# one :math:`\delta_\ell` per layer (the loss layer's entry is unused).

la_layers = LaplaceGGN(pt, [delta] * len(net.layers))
delta_layers = la_layers.optimize_prior_precision()
lml_layers = la_layers.log_marginal_likelihood()
print(
    "per-layer δ* = "
    + ", ".join(f"{d:.3g}" for d in delta_layers[:-1])
    + f"; log evidence {lml_layers:.4f} (shared δ: {lml:.4f})"
)
assert lml_layers >= lml - 1e-9  # more freedom: at least as much evidence

# %%
# The evidence curve and the predictive band
# ------------------------------------------
# The exact evidence over a grid of :math:`\delta` (one factorisation each)
# at the final :math:`\theta^\star`, and the linearised predictive mean
# :math:`\pm 2` standard deviations (with the noise :math:`\sigma^2` added)
# on a grid of inputs, all 200 in one batched solve.

grid = np.logspace(-3, 3, 25 if QUICK else 61) * delta
curve = np.array([la.log_marginal_likelihood(d) for d in grid])
assert curve.max() <= lml + 1e-9  # no grid point beats the optimum

t0 = time.perf_counter()
mean, var = la.predict(X_plot)
t_pred = time.perf_counter() - t0
std = np.sqrt(var[:, 0] + la.noise_variance)
print(f"predictive variance at {len(X_plot)} inputs: {t_pred * 1e3:.0f} ms")
assert la.covariance.info["residual"].max() < 1e-10  # the batched solve's certificate
gap = np.abs(X_plot[:, 0]) < 0.3
assert var[gap, 0].mean() > var[~gap & (np.abs(X_plot[:, 0]) < 2.5), 0].mean()  # wider in the gap

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
ax1.semilogx(grid, curve, "-", color="C0")
ax1.axvline(delta, color="C3", ls="--", lw=1)
ax1.plot([delta], [lml], "o", color="C3", label=f"optimum δ* = {delta:.3g}")
ax1.set_xlabel("prior precision δ")
ax1.set_ylabel("log evidence")
ax1.set_ylim(curve.max() - 4 * (curve.max() - np.median(curve)), curve.max() + 5)
ax1.legend(fontsize=8, loc="lower center")
ax1.set_title("exact Laplace evidence")
ax2.fill_between(
    X_plot[:, 0],
    mean[:, 0] - 2 * std,
    mean[:, 0] + 2 * std,
    color="C0",
    alpha=0.25,
    label="mean ± 2σ",
)
ax2.plot(X_plot[:, 0], mean[:, 0], color="C0", label="predictive mean")
ax2.plot(X_plot[:, 0], np.sin(2 * X_plot[:, 0]), "k--", lw=1, label="sin 2x")
ax2.plot(X[:, 0], Y[:, 0], "o", ms=3, color="C1", label="data")
ax2.set_ylim(-2.5, 2.5)
ax2.legend(fontsize=7, loc="upper left", ncol=2)
ax2.set_title("linearised Laplace predictive")
fig.tight_layout()
# sphinx_gallery_start_ignore
show_figures("plot_laplace_evidence")  # plt.show(), or PNGs when headless (see the top)
# sphinx_gallery_end_ignore
