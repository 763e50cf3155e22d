r"""
Influence functions with many right-hand sides
==============================================

The influence of a training sample :math:`z_i` on the loss at test data
(Cook & Weisberg; Koh & Liang 2017) is, for the mean training loss
:math:`L = \frac1B\sum_j \ell_j` at a minimum :math:`w^\star`,

.. math::

   \Delta L_{\text{test}}(\text{remove } z_i) \approx
   \frac1B\, \nabla L_{\text{test}}^\top H^{-1} \nabla \ell_i(w^\star),

because removing :math:`z_i` moves the minimum by
:math:`\Delta w \approx H^{-1}\nabla\ell_i / B` (with weight decay
:math:`\lambda`, :math:`H` becomes :math:`H + \lambda I`). It needs :math:`H^{-1}`
applied to one vector per training sample (or, by symmetry, once to
:math:`\nabla L_{\text{test}}`). blockops factors :math:`H` once and solves
all right-hand sides together (``Hinv @ G`` with ``G`` of shape ``(n, B)``),
exactly. We check the predictions against the dense solve and against
actually retraining without each sample (leave-one-out).
"""

import os
import sys
import time

import matplotlib.pyplot as plt
import numpy as np
from scipy.sparse.linalg import cg

from blockops import influence_scores, per_sample_gradients
from blockops.hessian import hessian
from blockops.inverse import inverse_hessian
from blockops.network import Dense, MSELoss, Pipeline

QUICK = os.environ.get("BLOCKOPS_EXAMPLE_QUICK", "0") == "1"
rng = np.random.default_rng(11)


# sphinx_gallery_start_ignore
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared _gallery helper
from _gallery import show_figures

# sphinx_gallery_end_ignore

B, width = 64, 4
net = Pipeline(
    [Dense(1, width, "tanh"), Dense(width, width, "tanh"), Dense(width, 1, "identity"), MSELoss()]
)
X = rng.uniform(-2, 2, (B, 1))
teacher = net.init(seed=12)


def outputs(w, X):
    return net.linearize(w, X, np.zeros((X.shape[0], 1))).zs[-2]


Y = outputs(teacher, X) + 0.1 * rng.standard_normal((B, 1))
X_test = np.linspace(-2, 2, 200)[:, None]
Y_test = outputs(teacher, X_test)
n = net.n_params


# Influence functions need a strict minimum. We add weight decay,
# :math:`L_\lambda = L + \tfrac{\lambda}{2}\lVert w\rVert^2`, whose Hessian is
# exactly blockops' damped :math:`H + \lambda I`.
lam = 1e-2


def newton_fit(w, X, Y, tol=1e-10, max_iter=100):
    """Damped Newton on L + λ/2 |w|² with exact (H + (λ + μ) I)⁻¹ steps."""
    mu = 1e-2

    def objective(p, w):
        return p.loss + 0.5 * lam * (w @ w), p.gradient + lam * w

    p = net.linearize(w, X, Y)
    f, g = objective(p, w)
    for _ in range(max_iter):
        if np.linalg.norm(g) < tol:
            return w, p
        w_new = w - inverse_hessian(p, damping=lam + mu, check=False) @ g
        p_new = net.linearize(w_new, X, Y)
        f_new, g_new = objective(p_new, w_new)
        if f_new <= f:
            w, p, f, g = w_new, p_new, f_new, g_new
            mu = mu / 10 if mu > 1e-12 else 0.0
        else:
            mu = max(10 * mu, 1e-6)
    raise RuntimeError("damped Newton did not converge")


w_star, pt = newton_fit(teacher.copy(), X, Y)
Hinv = inverse_hessian(pt, damping=lam)
print(f"fitted: loss {pt.loss:.4e}, inertia of H + λI {Hinv.inertia}")
assert Hinv.inertia[0] == 0  # a strict minimum: H + λI is positive definite

# %%
# All right-hand sides at once
# ----------------------------
# Per-sample gradients :math:`\nabla\ell_i` (a batch of one sample each) form
# the columns of ``G``. One factorisation, one multi-RHS solve.

G = np.stack([net.linearize(w_star, X[i : i + 1], Y[i : i + 1]).gradient for i in range(B)], axis=1)
assert np.allclose(G.mean(axis=1), pt.gradient, atol=1e-12)  # they average to the full gradient
# the regulariser is not a sample: ∇ℓ_i are the data terms only
g_test = net.linearize(w_star, X_test, Y_test).gradient

t0 = time.perf_counter()
Hinv = inverse_hessian(pt, damping=lam)
S = Hinv @ G  # (n, B): H⁻¹ ∇ℓ_i for every training sample
t_exact = time.perf_counter() - t0
influence = (g_test @ S) / B
# the "s_test" trick: one solve with ∇L_test, then dot products (H is symmetric)
s_test = Hinv @ g_test
influence_stest = (s_test @ G) / B

H_dense = hessian(pt) @ np.eye(n)
S_dense = np.linalg.solve(H_dense + lam * np.eye(n), G)
err_dense = np.linalg.norm(S - S_dense) / np.linalg.norm(S_dense)
print(
    f"{B} right-hand sides: exact inverse {t_exact * 1e3:.1f} ms, "
    f"relative error vs dense solve {err_dense:.1e}"
)
print(
    f"cond(H + λI) = {np.linalg.cond(H_dense + lam * np.eye(n)):.1e}; "
    f"worst certificate {Hinv.residual(G, S).max():.1e}"
)
assert err_dense < 1e-8
assert np.allclose(influence, influence_stest, rtol=1e-8, atol=1e-12 * np.abs(influence).max())

# %%
# The same in two library calls: :func:`blockops.per_sample_gradients` builds
# the columns :math:`\nabla\ell_i` by one reverse sweep with one-hot
# cotangents (no per-sample re-linearisation), and
# :func:`blockops.influence_scores` returns
# :math:`-\nabla L_{\text{test}}^\top (H + \lambda I)^{-1}\nabla\ell_i` from one
# batched solve of the smaller side (here the single test gradient), with its
# residual certificate.

G_lib = per_sample_gradients(pt)
res = influence_scores(Hinv, G_lib, g_test)
err_lib = np.abs(-res.scores[0] / B - influence).max() / np.abs(influence).max()
print(
    f"per_sample_gradients vs per-sample points: {np.abs(G_lib - G).max():.1e}; "
    f"influence_scores (solved the {res.solved} side) vs the above: {err_lib:.1e}, "
    f"certificate {res.residual:.1e}"
)
assert np.allclose(G_lib, G, rtol=1e-10, atol=1e-12) and err_lib < 1e-8

# CG on the same systems, one right-hand side at a time, for comparison
A = hessian(pt, damping=lam)
t0 = time.perf_counter()
iters = []
S_cg = np.empty_like(S)
for i in range(B if not QUICK else 16):
    trace = []
    S_cg[:, i], _ = cg(A, G[:, i], rtol=1e-10, maxiter=20 * n, callback=trace.append)
    iters.append(len(trace))
k = len(iters)
err_cg = np.linalg.norm(S_cg[:, :k] - S[:, :k]) / np.linalg.norm(S[:, :k])
assert err_cg < 1e-7  # CG agrees with the exact solves, to its tolerance
t_cg = (time.perf_counter() - t0) * B / len(iters)
print(
    f"CG: {np.mean(iters):.0f} iterations per right-hand side on average, "
    f"~{t_cg * 1e3:.0f} ms for all {B}"
)

# %%
# Leave-one-out retraining
# ------------------------
# For a few samples, refit without them (Newton from :math:`w^\star`) and
# compare the actual change of the test loss with the prediction.

n_loo = 8 if QUICK else 24
idx = np.argsort(-np.abs(influence))[: n_loo // 2].tolist()  # the most influential ...
idx += rng.choice(
    np.setdiff1d(np.arange(B), idx), n_loo - len(idx), replace=False
).tolist()  # ... and random
L_test = net.loss(w_star, X_test, Y_test)
actual = []
for i in idx:
    keep = np.arange(B) != i
    w_i, _ = newton_fit(w_star.copy(), X[keep], Y[keep])
    actual.append(net.loss(w_i, X_test, Y_test) - L_test)
actual = np.array(actual)
predicted = influence[idx]
corr = np.corrcoef(actual, predicted)[0, 1]
rel = np.linalg.norm(actual - predicted) / np.linalg.norm(actual)
print(
    f"leave-one-out on {n_loo} samples: correlation {corr:.4f}, "
    f"relative error of the prediction {rel:.2f}"
)
assert corr > 0.95

fig, ax = plt.subplots(figsize=(4.6, 4))
lim = 1.1 * np.abs(np.concatenate([actual, predicted])).max()
ax.plot([-lim, lim], [-lim, lim], "k--", lw=1, label="prediction = actual")
ax.plot(actual, predicted, "o", label="left-out sample")
ax.ticklabel_format(style="sci", scilimits=(-2, 2))  # one ×10⁻ⁿ factor, not long tick labels
ax.set_xlabel("actual change of test loss (retrained)")
ax.set_ylabel("influence-function prediction")
ax.legend(fontsize=8, loc="upper left")  # the points lie on the diagonal
ax.set_title(f"leave-one-out, correlation {corr:.3f}")
fig.tight_layout()
# sphinx_gallery_start_ignore
show_figures("plot_influence_functions")  # plt.show(), or PNGs when headless (see the top)
# sphinx_gallery_end_ignore
