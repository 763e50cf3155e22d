r"""
Training a PyTorch model by exact Newton and Levenberg-Marquardt
================================================================

A deep, narrow ``torch.nn.Sequential`` (eight tanh layers of width 6, 313
parameters) fits :math:`y = \sin(3\pi x)` on 64 points of :math:`[-1, 1]` in
float64 under ``nn.MSELoss``. Four optimisers get the same **wall-clock
budget** each, from the same initial weights:

* **Newton** with the exact damped Hessian :math:`(H + \lambda I)^{-1}`:
  :math:`\lambda` is raised until the factorisation's inertia says
  :math:`H + \lambda I` is positive definite, then adapted by the trust-region
  ratio;
* **Levenberg-Marquardt (LM)** with the exact damped Gauss-Newton matrix
  :math:`(G + \lambda I)^{-1}` (``kind="ggn"``), positive definite for any
  :math:`\lambda > 0`;
* ``torch.optim.LBFGS`` with the strong-Wolfe line search;
* ``torch.optim.Adam``.

Each exact step converts the model with
:func:`~blockops.interop.torch.from_torch` (a linearised
:class:`~blockops.network.Point`: loss, gradient and everything the inverse
needs), factors with :func:`~blockops.inverse.inverse_hessian` and writes the
new weights back with :func:`~blockops.interop.torch.load_parameters_vector`.
Settings: LBFGS with the strong-Wolfe line search and its stopping
tolerances off (so that it uses its whole budget), otherwise torch's
defaults; Adam with ``lr=1e-2``; LM and Newton start from
:math:`\lambda = 10^{-3}`. Three random initialisations are run (the first
three seeds, not picked).

The network is of the kind blockops is built for: deep and narrow, with a
small batch. The exact factorisation is linear in depth, but each layer's
stage works on matrices of side about batch × width, so with wide layers or
large batches a factorisation gets expensive. Three tanh layers of width 16
(593 parameters) took about 0.15 s per factorisation on 64 samples and over
a second on 128 (on a loaded 2-core machine), against some tens of
milliseconds here; on that 64-sample problem LBFGS ended more than two
orders of magnitude below LM in our runs.

**What it shows.** LBFGS is far ahead for the first second or so: one of its
iterations costs a few milliseconds, one exact factorisation some tens. It
then creeps (the problem is ill-conditioned), while LM, once it has left the
initial plateau, converges quickly and usually ends one to two orders of
magnitude lower. Usually, not always: where the deadline falls relative to
LM's plateau depends on the seed and on the machine's speed and load, and in
some of our runs LBFGS was ahead at the deadline on one of the three seeds.
The exact Hessian variant spends factorisations on raising :math:`\lambda`
where :math:`H` is indefinite, and ends near Adam's level here.

The reduced run (``BLOCKOPS_EXAMPLE_QUICK=1``, which builds the gallery
page: four layers, 0.4 s, one seed) is too short for the comparison; it only
checks that everything runs. Run the script for the full one (about 45 s).
"""

import copy
import os
import sys
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from blockops.interop.torch import from_torch, load_parameters_vector
from blockops.inverse import inverse_hessian

QUICK = os.environ.get("BLOCKOPS_EXAMPLE_QUICK", "0") == "1"

# sphinx_gallery_start_ignore
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared _gallery helper
from _gallery import show_figures

# sphinx_gallery_end_ignore

B, width, depth = 64, 6, (4 if QUICK else 8)
BUDGET = 0.4 if QUICK else 3.0  # seconds of wall time per method and seed
SEEDS = [0] if QUICK else [0, 1, 2]
F64 = torch.float64

X = torch.linspace(-1, 1, B, dtype=F64)[:, None]
y = torch.sin(3 * np.pi * X)
mse = nn.MSELoss()


def make_model(seed):
    """``depth`` tanh layers of width ``width``; Xavier weights with the tanh gain."""
    torch.manual_seed(seed)
    mods = [nn.Linear(1, width), nn.Tanh()]
    for _ in range(depth - 1):
        mods += [nn.Linear(width, width), nn.Tanh()]
    model = nn.Sequential(*mods, nn.Linear(width, 1)).to(F64)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight, gain=nn.init.calculate_gain("tanh"))
            nn.init.normal_(m.bias, std=0.1)
    return model


n_params = sum(p.numel() for p in make_model(0).parameters())
print(f"{depth} tanh layers of width {width}, {B} samples: {n_params} parameters")


# %%
# The exact second-order step
# ---------------------------
# With :math:`A = H + \lambda I` (or :math:`G + \lambda I`) the step solves
# :math:`A s = -g`, and the quadratic model predicts the decrease
# :math:`-(g^\top s + \tfrac12 s^\top H s) = \tfrac12(\lambda\lVert s\rVert^2 - g^\top s)`
# (no extra Hessian product needed). The ratio :math:`\rho` of actual to
# predicted decrease accepts or rejects the step and updates :math:`\lambda`
# (Nielsen's rule: :math:`\lambda \leftarrow \lambda\max(\tfrac13, 1-(2\rho-1)^3)`
# on success, doubling factors on failure). For ``kind="hessian"`` the
# inertia :math:`(n_-, n_0, n_+)` of :math:`H + \lambda I` comes with the
# factorisation; while :math:`n_- + n_0 > 0` the quadratic model has no
# minimum and the step need not descend, so :math:`\lambda` is multiplied by
# 10 first.


def exact_newton(model, kind, budget):
    """Damped Newton (kind="hessian") or Levenberg-Marquardt (kind="ggn") in place."""
    stats = {"steps": 0, "factorizations": 0, "raised": 0, "rejected": 0, "inertia": []}
    lam, nu = 1e-3, 2.0
    t0 = time.perf_counter()
    pt = from_torch(model, mse, X, y)
    hist = [(time.perf_counter() - t0, pt.loss)]
    while time.perf_counter() - t0 < budget:
        Hinv = inverse_hessian(pt, damping=lam, kind=kind, check=False)
        stats["factorizations"] += 1
        if kind == "hessian" and Hinv.inertia[:2] != (0, 0):  # H + λI not positive definite
            lam *= 10.0
            stats["raised"] += 1
            continue
        g = pt.gradient
        s = -(Hinv @ g)
        predicted = 0.5 * (lam * (s @ s) - g @ s)
        load_parameters_vector(model, pt.params + s)
        trial = from_torch(model, mse, X, y)
        rho = (pt.loss - trial.loss) / predicted
        if rho > 0:
            if kind == "hessian":
                stats["inertia"].append(Hinv.inertia)
            last = (pt, Hinv, g, s)
            pt = trial
            lam = max(lam * max(1 / 3, 1 - (2 * rho - 1) ** 3), 1e-12)
            nu = 2.0
            stats["steps"] += 1
        else:
            load_parameters_vector(model, pt.params)
            lam *= nu
            nu *= 2.0
            stats["rejected"] += 1
        hist.append((time.perf_counter() - t0, pt.loss))
    # the last accepted step's residual certificate ‖A s + g‖ / ‖g‖ (outside the clock)
    stats["residual"] = float(last[1].residual(-last[2], last[3])) if stats["steps"] else np.nan
    return np.array(hist), stats


def lbfgs(model, budget):
    """torch.optim.LBFGS, strong Wolfe; stopping tolerances off so it uses the whole budget."""
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=0.0,
        tolerance_change=0.0,
    )
    hist = []
    t0 = time.perf_counter()

    def closure():
        opt.zero_grad()
        loss = mse(model(X), y)
        loss.backward()
        hist.append((time.perf_counter() - t0, loss.item()))
        return loss

    while time.perf_counter() - t0 < budget:
        opt.step(closure)
    return np.array(hist), {"evaluations": len(hist)}


def adam(model, budget, lr=1e-2):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    hist = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < budget:
        opt.zero_grad()
        loss = mse(model(X), y)
        loss.backward()
        opt.step()
        hist.append((time.perf_counter() - t0, loss.item()))
    return np.array(hist), {"steps": len(hist)}


METHODS = {
    "Newton (exact H)": lambda m, T: exact_newton(m, "hessian", T),
    "LM (exact GGN)": lambda m, T: exact_newton(m, "ggn", T),
    "LBFGS": lbfgs,
    "Adam": adam,
}


def best_so_far(hist):
    """The lowest loss evaluated up to each time (the same definition for every method)."""
    return hist[:, 0], np.minimum.accumulate(hist[:, 1])


def loss_at(hist, t):
    times, best = best_so_far(hist)
    return best[times <= t][-1]


# %%
# Equal wall time
# ---------------
# A warm-up call of each code path first (torch's first backward, blockops'
# first factorisation), outside the clock. Then every method runs for
# ``BUDGET`` seconds from the same initial weights.

warm = make_model(99)
pt_warm = from_torch(warm, mse, X, y)
for kind in ("hessian", "ggn"):
    inverse_hessian(pt_warm, damping=1.0, kind=kind) @ pt_warm.gradient
lbfgs(copy.deepcopy(warm), 0.05)
adam(copy.deepcopy(warm), 0.05)

runs = {}  # (method, seed) -> (history, stats, model)
for seed in SEEDS:
    model0 = make_model(seed)
    for name, run in METHODS.items():
        model = copy.deepcopy(model0)
        hist, stats = run(model, BUDGET)
        runs[name, seed] = (hist, stats, model)

final = {key: loss_at(h, BUDGET) for key, (h, _, _) in runs.items()}
median = {name: float(np.median([final[name, s] for s in SEEDS])) for name in METHODS}
print(f"lowest loss within {BUDGET:g} s per method, seeds {SEEDS}:")
for name in METHODS:
    per_seed = "  ".join(f"{final[name, s]:.2e}" for s in SEEDS)
    print(f"  {name:17s} {per_seed}   median {median[name]:.2e}")
for name in ("Newton (exact H)", "LM (exact GGN)"):
    st = [runs[name, s][1] for s in SEEDS]
    n_fac = sum(s["factorizations"] for s in st)
    print(
        f"  {name}: {sum(s['steps'] for s in st)} accepted steps, {n_fac} factorisations "
        f"({len(SEEDS) * BUDGET / n_fac * 1e3:.0f} ms each incl. conversion), "
        f"{sum(s['raised'] for s in st)} λ raises for inertia, "
        f"last-step residual ≤ {max(s['residual'] for s in st):.1e}"
    )
n_eval = sum(runs["LBFGS", s][1]["evaluations"] for s in SEEDS)
ms = len(SEEDS) * BUDGET / n_eval * 1e3
print(f"  LBFGS: {n_eval} loss+gradient evaluations ({ms:.2f} ms each)")

# Sanity of the exact methods (hold in every run): accepted steps only decrease
# the loss, every accepted Newton step had H + λI positive definite, the solves
# are exact to rounding, and no method made the loss worse.
for seed in SEEDS:
    for name in ("Newton (exact H)", "LM (exact GGN)"):
        hist, stats, _ = runs[name, seed]
        assert np.all(np.diff(hist[:, 1]) <= 0), name
        assert stats["steps"] > 0 and stats["residual"] < 1e-8, (name, stats)
    assert all(i[0] == 0 and i[1] == 0 for i in runs["Newton (exact H)", seed][1]["inertia"])
    for name in METHODS:
        assert final[name, seed] < runs[name, seed][0][0, 1], (name, seed)

# The comparison (full size only: the reduced run's budget is too short for the
# exact methods to get past the plateau, which is LBFGS's strength). Stated
# claim: LM's median over the seeds is below LBFGS's median, and LM ends below
# LBFGS on at least one seed. LBFGS is ahead at the start, and on some seeds at
# the end as well (printed above).
lm_wins = sum(final["LM (exact GGN)", s] < final["LBFGS", s] for s in SEEDS)
print(f"LM below LBFGS at {BUDGET:g} s on {lm_wins} of {len(SEEDS)} seeds")
if not QUICK:
    assert median["LM (exact GGN)"] < median["LBFGS"]
    assert lm_wins >= 1

# %%
# Loss against wall time
# ----------------------
# One panel per initialisation. Curves are the lowest loss evaluated so far
# (for LBFGS this includes line-search trial points; the exact methods' rejected
# trials are never lower).

colors = {"Newton (exact H)": "C3", "LM (exact GGN)": "C0", "LBFGS": "C2", "Adam": "C1"}
fig, axes = plt.subplots(1, len(SEEDS), figsize=(4.2 * len(SEEDS), 3.6), sharey=True, squeeze=False)
for ax, seed in zip(axes[0], SEEDS):
    for name in METHODS:
        t, best = best_so_far(runs[name, seed][0])
        ax.semilogy(t, best, color=colors[name], label=name)
    ax.axvline(BUDGET, color="k", lw=0.8, ls=":")
    ax.set_xlabel("wall time (s)")
    ax.set_title(f"seed {seed}")
    ax.grid(True, which="major", alpha=0.3)
axes[0, 0].set_ylabel("training loss (MSE)")
axes[0, 0].legend(fontsize=8, loc="lower left")
fig.tight_layout()

# %%
# Error of the fits between the samples
# -------------------------------------
# :math:`|f(x) - \sin(3\pi x)|` on a fine grid, for the first seed: how much
# of a lower training loss carries over to the fit between the 64 samples
# (the printed maxima; a training-loss ratio of :math:`r` is an RMS ratio of
# :math:`\sqrt r` at the samples).

xs = torch.linspace(-1, 1, 801, dtype=F64)[:, None]
fig2, ax = plt.subplots(figsize=(6.4, 3.4))
grid_err = {}
with torch.no_grad():
    for name in METHODS:
        model = runs[name, SEEDS[0]][2]
        err = (model(xs) - torch.sin(3 * np.pi * xs)).abs().numpy().ravel()
        ax.semilogy(xs.numpy().ravel(), err, color=colors[name], lw=1, label=name)
        grid_err[name] = float(err.max())
ax.set_xlabel("x")
ax.set_ylabel(r"$|f(x) - \sin(3\pi x)|$")
ax.legend(fontsize=8, ncol=2, loc="lower center")
ax.set_title(f"error of the fits after {BUDGET:g} s (seed {SEEDS[0]})")
fig2.tight_layout()
print("max error on the grid, seed 0: " + ", ".join(f"{k} {v:.1e}" for k, v in grid_err.items()))
# sphinx_gallery_start_ignore
show_figures("plot_torch_newton")  # plt.show(), or PNGs when headless (see the top)
# sphinx_gallery_end_ignore
