r"""
Influence of training points on a PyTorch classifier
====================================================

The influence of a training sample :math:`z_i` on the loss at a test point
:math:`z_{\text{test}}` (Koh & Liang 2017) is the derivative of the test loss
when :math:`z_i` is up-weighted by :math:`\varepsilon` and the model retrained,

.. math::

   \mathcal I(z_i, z_{\text{test}}) =
   \frac{d L_{\text{test}}(w_\varepsilon)}{d\varepsilon}\Big|_{\varepsilon=0}
   = -\nabla L_{\text{test}}^\top (H + \lambda I)^{-1} \nabla \ell_i,
   \qquad
   w_\varepsilon = \arg\min_w\ \underbrace{\tfrac1B \textstyle\sum_j \ell_j(w)}_{L(w)}
   + \tfrac\lambda2 \lVert w\rVert^2 + \varepsilon\, \ell_i(w),

with :math:`H` the Hessian of the **mean** training loss :math:`L` at the
stationary point :math:`w^\star = w_0` and :math:`\lambda` the weight decay.
Removing :math:`z_i` is :math:`\varepsilon = -1/B`, so leave-one-out
retraining changes the test loss by about :math:`-\mathcal I / B`.

Here the model is a ``torch.nn.Sequential`` classifier (``nn.CrossEntropyLoss``,
three classes in the plane). :func:`~blockops.interop.torch.from_torch` turns
it into a blockops point; :func:`~blockops.inverse.inverse_hessian` factors
:math:`H + \lambda I` exactly once, and **one batched solve** ``Hinv @ G``
handles all :math:`B` right-hand sides, ``G`` holding the per-sample
gradients as columns. The per-sample gradients come from ``torch.func``
(``vmap`` of ``grad`` over the samples, parameters in ``model.parameters()``
order, which is blockops' layout); a single-sample blockops point gives the
same column.

Checks: the batched solve against ``numpy.linalg.solve`` with the dense
Hessian from ``torch.func`` (``jacrev`` of ``grad``, independent of
blockops), the influence against the actual derivative (re-solving the
stationarity condition for :math:`\pm\varepsilon`), and against
leave-one-out retraining.
"""

import os
import sys
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.func import functional_call, grad, vmap

from blockops.interop.torch import from_torch, load_parameters_vector, parameters_vector
from blockops.inverse import inverse_hessian

QUICK = os.environ.get("BLOCKOPS_EXAMPLE_QUICK", "0") == "1"
F64 = torch.float64

# sphinx_gallery_start_ignore
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared _gallery helper
from _gallery import show_figures

# sphinx_gallery_end_ignore

# %%
# Data, model, brief training
# ---------------------------
# Three overlapping Gaussian clusters; a narrow tanh MLP 2-3-3-3-3
# (45 parameters). Adam's
# ``weight_decay`` adds :math:`\lambda w` to the gradient, i.e. it minimises
# :math:`L + \frac\lambda2\lVert w\rVert^2`, the objective above.
#
# Why this narrow: with weight decay, surplus hidden units of a wider layer
# settle into copies of each other (:math:`\pm` the same weights). Such minima
# sit next to saddle points; removing one sample can turn the minimum into a
# saddle, and leave-one-out retraining then stalls there (we saw it for a few
# samples at widths 8 and 4). Influence functions describe the smooth response
# of an isolated minimum; with width 3 (one unit per cluster direction) the
# minimum has no copies.

B = 48 if QUICK else 96
lam = 3e-2
gen = torch.Generator().manual_seed(0)
centres = torch.tensor([[0.0, 1.0], [-0.9, -0.5], [0.9, -0.5]], dtype=F64)
y = torch.arange(B) % 3
X = centres[y] + 0.55 * torch.randn(B, 2, generator=gen, dtype=F64)
x_test = torch.tensor([[0.05, 0.1]], dtype=F64)  # between the three clusters
y_test = torch.tensor([0])
ce = nn.CrossEntropyLoss()

torch.manual_seed(1)
width = 3
model = nn.Sequential(
    *(m for k in range(3) for m in (nn.Linear(2 if k == 0 else width, width), nn.Tanh())),
    nn.Linear(width, 3),
).to(F64)
n = sum(p.numel() for p in model.parameters())

opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=lam)
for _ in range(400):
    opt.zero_grad()
    ce(model(X), y).backward()
    opt.step()


# %%
# A stationary point first
# ------------------------
# The influence formula is a derivative *at a minimum*; a brief Adam run ends
# near one, not at one. A few exact Newton steps on
# :math:`L + \frac\lambda2\lVert w\rVert^2` (damped by an extra :math:`\mu`
# while far away or while the inertia of the factorisation shows negative
# eigenvalues) put the gradient at rounding level, and the inertia of
# :math:`H + \lambda I` confirms a strict local minimum.


def minimise(w, Xs, ys, lam_, tol=1e-10, max_iter=100):
    """Damped Newton on the mean loss over (Xs, ys) plus lam_/2 |w|²; exact (H + (lam_ + μ)I)⁻¹.

    μ ≥ 0 is an extra Levenberg-Marquardt damping, raised while the factorisation's
    inertia says H + (lam_ + μ)I is not positive definite (so the iteration heads
    for a minimum, not a saddle) and dropped to 0 near the minimum. Returns the
    minimiser, its point and the number of iterations.
    """

    def evaluate(w):
        load_parameters_vector(model, w)
        p = from_torch(model, ce, Xs, ys)
        return p, p.loss + 0.5 * lam_ * (w @ w), p.gradient + lam_ * w

    p, f, g = evaluate(w)
    mu = 1e-3
    for k in range(max_iter):
        if np.linalg.norm(g) < tol:
            return w, p, k
        Hi = inverse_hessian(p, damping=lam_ + mu)
        if Hi.inertia[:2] != (0, 0):  # not positive definite: no descent guarantee, damp more
            mu = max(10 * mu, 1e-8)
            continue
        w_new = w - Hi @ g
        p_new, f_new, g_new = evaluate(w_new)
        if f_new <= f + 1e-15 * abs(f):  # (a rounding-level slack for the last steps)
            w, p, f, g = w_new, p_new, f_new, g_new
            mu = mu / 10 if mu > 1e-10 else 0.0
        else:
            mu = max(10 * mu, 1e-8)
    raise RuntimeError("damped Newton did not converge")


w0 = parameters_vector(model)
g0 = from_torch(model, ce, X, y).gradient + lam * w0
print(f"after Adam: |∇(L + λ/2|w|²)| = {np.linalg.norm(g0):.1e}")
w_star, pt, it = minimise(w0, X, y, lam, tol=1e-12)
g = pt.gradient + lam * w_star
assert np.linalg.norm(g) < 1e-12, np.linalg.norm(g)
load_parameters_vector(model, w_star)
pt = from_torch(model, ce, X, y)
Hinv = inverse_hessian(pt, damping=lam)
print(
    f"stationary after {it} Newton iterations: loss {pt.loss:.4f}, |∇| = {np.linalg.norm(g):.1e}, "
    f"inertia of H + λI {Hinv.inertia} ({n} parameters)"
)
assert Hinv.inertia[:2] == (0, 0)  # a strict local minimum of L + λ/2|w|²

# %%
# Per-sample gradients and one batched solve
# ------------------------------------------
# ``torch.func``: ``grad`` of one sample's loss, ``vmap``-ed over the batch;
# columns in ``model.parameters()`` order. They average to the full gradient
# (blockops' ``pt.gradient``, without the weight decay), and a single-sample
# blockops point reproduces a column.

params = {k: v.detach() for k, v in model.named_parameters()}


def sample_loss(p, x, t):
    return ce(functional_call(model, p, (x[None],)), t[None])


per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, X, y)
G = torch.cat([per_sample[k].reshape(B, -1) for k in params], dim=1).T.numpy()  # (n, B)
assert np.allclose(G.mean(axis=1), pt.gradient, rtol=0, atol=1e-13)
g_3 = from_torch(model, ce, X[3:4], y[3:4]).gradient
assert np.allclose(G[:, 3], g_3, rtol=0, atol=1e-14)

g_test = from_torch(model, ce, x_test, y_test).gradient
t0 = time.perf_counter()
Hinv = inverse_hessian(pt, damping=lam)
S = Hinv @ G  # (n, B): (H + λI)⁻¹ ∇ℓ_i for all B samples
t_solve = time.perf_counter() - t0
influence = -(g_test @ S)  # I(z_i, z_test), i = 1..B
res = Hinv.residual(G, S)
print(
    f"factor + {B} right-hand sides: {t_solve * 1e3:.1f} ms; "
    f"worst residual certificate {res.max():.1e}"
)

# dense reference: the Hessian of the mean loss from torch.func (reverse over reverse),
# then numpy.linalg.solve
shapes = [p.shape for p in model.parameters()]


def unflatten(t):
    out, o = {}, 0
    for (k, _), shape in zip(model.named_parameters(), shapes):
        k_n = int(np.prod(shape))
        out[k] = t[o : o + k_n].reshape(shape)
        o += k_n
    return out


def mean_loss(t):
    return ce(functional_call(model, unflatten(t), (X,)), y)


H_dense = torch.func.jacrev(grad(mean_loss))(torch.from_numpy(w_star.copy())).numpy()
S_dense = np.linalg.solve(H_dense + lam * np.eye(n), G)
err_dense = np.linalg.norm(S - S_dense) / np.linalg.norm(S_dense)
print(f"batched exact solve vs dense numpy.linalg.solve: relative error {err_dense:.1e}")
assert err_dense < 1e-8

# %%
# Check 1: the derivative itself
# ------------------------------
# For a few samples, re-solve the stationarity condition
# :math:`\nabla L(w) + \lambda w + \varepsilon \nabla\ell_i(w) = 0` for
# :math:`\varepsilon = \pm 10^{-4}` and :math:`\pm 10^{-5}` (chord iterations
# with the factorisation at :math:`w^\star`; each contracts by
# :math:`O(\varepsilon)`) and compare the central difference of the test
# loss with :math:`\mathcal I`. The difference is :math:`O(\varepsilon^2)`:
# it drops a hundredfold from one :math:`\varepsilon` to the next.


def test_loss(w):
    load_parameters_vector(model, w)
    with torch.no_grad():
        return ce(model(x_test), y_test).item()


def upweighted_minimum(i, eps, tol=1e-13, max_iter=40):
    w = w_star.copy()
    for _ in range(max_iter):
        load_parameters_vector(model, w)
        g = (
            from_torch(model, ce, X, y).gradient
            + lam * w
            + eps * from_torch(model, ce, X[i : i + 1], y[i : i + 1]).gradient
        )
        if np.linalg.norm(g) < tol:
            return w
        w = w - Hinv @ g
    raise RuntimeError("chord iterations did not converge")


def derivative(i, eps):
    return (test_loss(upweighted_minimum(i, eps)) - test_loss(upweighted_minimum(i, -eps))) / (
        2 * eps
    )


rng = np.random.default_rng(2)
order = np.argsort(-np.abs(influence))
n_check = 6 if QUICK else 16
idx = order[: n_check // 2].tolist()  # the most influential ...
idx += rng.choice(order[n_check // 2 :], n_check - len(idx), replace=False).tolist()  # ... random
scale = np.max(np.abs(influence))
fd, err_fd = {}, {}
for eps in (1e-4, 1e-5):
    fd[eps] = np.array([derivative(i, eps) for i in idx])
    err_fd[eps] = np.max(np.abs(fd[eps] - influence[idx])) / scale
    print(
        f"influence vs re-solved derivative, ε = {eps:.0e}, {n_check} samples: "
        f"max error {err_fd[eps]:.1e}"
    )
assert err_fd[1e-5] < 1e-6
assert err_fd[1e-4] > 30 * err_fd[1e-5]  # the O(ε²) of a central difference, not a coincidence


# %%
# Check 2: leave-one-out retraining
# ---------------------------------
# Remove :math:`z_i` and retrain to the new minimum: exact Newton steps from
# :math:`w^\star` on the remaining samples with the objective's form kept
# (each remaining sample weighted :math:`1/B`, i.e. a mean over :math:`B-1`
# samples with weight decay :math:`\lambda' = \lambda B/(B-1)`). The
# prediction is :math:`-\mathcal I/B`; the error is second order in
# :math:`1/B`.


def leave_one_out(i):
    keep = np.arange(B) != i
    lam_i = lam * B / (B - 1)
    w, p, _ = minimise(w_star.copy(), X[keep], y[keep], lam_i)
    assert inverse_hessian(p, damping=lam_i).inertia[:2] == (0, 0)  # a strict minimum again
    return w


n_loo = 8 if QUICK else 32
loo = order[: n_loo // 2].tolist()
loo += rng.choice(order[n_loo // 2 :], n_loo - len(loo), replace=False).tolist()
L0 = test_loss(w_star)
t0 = time.perf_counter()
actual = np.array([test_loss(leave_one_out(i)) - L0 for i in loo])
t_loo = time.perf_counter() - t0
predicted = -influence[loo] / B
corr = np.corrcoef(actual, predicted)[0, 1]
rank = spearmanr(actual, predicted).statistic
rel = np.linalg.norm(actual - predicted) / np.linalg.norm(actual)
print(
    f"leave-one-out on {n_loo} samples ({t_loo:.1f} s of retraining): Pearson {corr:.4f}, "
    f"Spearman {rank:.4f}, relative error {rel:.2f}"
)
assert corr > 0.9 and rank > 0.9
load_parameters_vector(model, w_star)

# %%
# Which training points matter
# ----------------------------
# Left: the training set, marker area proportional to :math:`|\mathcal I|`;
# red points raise the test loss when up-weighted (harmful), blue ones lower
# it (helpful). Middle and right: the two checks.

fig, axes = plt.subplots(1, 3, figsize=(13, 4.1))
ax = axes[0]
gx, gy = torch.meshgrid(
    torch.linspace(-2.3, 2.3, 200, dtype=F64),
    torch.linspace(-2.1, 2.6, 200, dtype=F64),
    indexing="xy",
)
with torch.no_grad():
    cls = model(torch.stack([gx.ravel(), gy.ravel()], 1)).argmax(1).reshape(gx.shape)
ax.contourf(gx, gy, cls, levels=[-0.5, 0.5, 1.5, 2.5], colors=["C0", "C1", "C2"], alpha=0.12)
size = 300 * np.abs(influence) / np.abs(influence).max()
ax.scatter(*X.T, s=size, c=np.where(influence > 0, "tab:red", "tab:blue"), alpha=0.7)
for k, m in enumerate("o^s"):
    sel = (y == k).numpy()
    ax.scatter(*X[sel].T, s=8, marker=m, color="k")
ax.plot(*x_test.T, "k*", ms=16, mfc="gold", label=f"test point (class {y_test.item()})")
ax.scatter([], [], s=60, color="tab:red", alpha=0.7, label="harmful: $\\mathcal{I} > 0$")
ax.scatter([], [], s=60, color="tab:blue", alpha=0.7, label="helpful: $\\mathcal{I} < 0$")
ax.set_title("influence on the test loss")
ax.legend(fontsize=8, loc="lower left")
ax.set_aspect("equal")

ax = axes[1]
lim = 1.1 * np.abs(np.concatenate([fd[1e-5], influence[idx]])).max()
ax.plot([-lim, lim], [-lim, lim], "k--", lw=1)
ax.plot(fd[1e-5], influence[idx], "o")
ax.set_xlabel(r"re-solved $dL_{test}/d\varepsilon$ (central difference)")
ax.set_ylabel(r"$-\nabla L_{test}^\top (H+\lambda I)^{-1}\nabla\ell_i$")
ax.set_title(f"up-weighting by ±1e-5, max error {err_fd[1e-5]:.0e}")

ax = axes[2]
lim = 1.1 * np.abs(np.concatenate([actual, predicted])).max()
ax.plot([-lim, lim], [-lim, lim], "k--", lw=1, label="prediction = actual")
ax.plot(actual, predicted, "o", label="left-out sample")
ax.ticklabel_format(style="sci", scilimits=(-2, 2))
ax.set_xlabel("actual change of test loss (retrained)")
ax.set_ylabel(r"predicted $-\mathcal{I}/B$")
ax.set_title(f"leave-one-out, Spearman {rank:.3f}")
ax.legend(fontsize=8, loc="upper left")
fig.tight_layout()
# sphinx_gallery_start_ignore
show_figures("plot_torch_influence")  # plt.show(), or PNGs when headless (see the top)
# sphinx_gallery_end_ignore
