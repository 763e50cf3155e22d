r"""
The exact inverse as a preconditioner for CG, MINRES and GMRES
==============================================================

Krylov solvers need only :math:`Hv`, but their iteration count grows with
the conditioning of :math:`H`, which is poor for deep nets. blockops' exact
inverse is a :class:`pylops.LinearOperator`, so it plugs into
:func:`scipy.sparse.linalg.cg`, :func:`~scipy.sparse.linalg.minres` and
:func:`~scipy.sparse.linalg.gmres` as the preconditioner ``M``. It pays
whenever the exact inverse is of a *nearby* matrix:

* a **more damped** :math:`(H + \lambda_p I)^{-1}`, :math:`\lambda_p \gg
  \lambda`, which is symmetric positive definite when :math:`H` is positive
  semi-definite (as at an interpolating minimum), so CG and MINRES may use it;
* a **float32 factorisation** of the same matrix, applied without
  refinement: the Krylov method supplies the float64 accuracy;
* the exact inverse at a **stale point**, e.g. factored at the previous
  Newton iterate and reused, for an indefinite :math:`H` with GMRES.

:mod:`blockops.solvers` wraps the same SciPy solvers with an iteration record;
here we call SciPy directly.

The network is deep and narrow: six tanh layers of width 6.
"""

import os
import sys

import matplotlib.pyplot as plt
import numpy as np
from scipy.sparse.linalg import cg, gmres, minres

from blockops.hessian import hessian
from blockops.inverse import inverse_hessian
from blockops.network import Dense, MSELoss, Pipeline

QUICK = os.environ.get("BLOCKOPS_EXAMPLE_QUICK", "0") == "1"
rng = np.random.default_rng(7)


# sphinx_gallery_start_ignore
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared _gallery helper
from _gallery import show_figures

# sphinx_gallery_end_ignore

width, depth, B = 6, (4 if QUICK else 6), 64
layers = [Dense(2, width, "tanh")] + [Dense(width, width, "tanh") for _ in range(depth - 2)]
net = Pipeline([*layers, Dense(width, 1, "identity"), MSELoss()])
X = rng.standard_normal((B, 2))
w_star = net.init(seed=8)
# targets from the network itself: w_star is an interpolating minimum, H there is PSD
Y = net.linearize(w_star, X, np.zeros((B, 1))).zs[-2].copy()
pt = net.linearize(w_star, X, Y)
n = net.n_params
g = rng.standard_normal(n)
maxiter = 600 if QUICK else 2000
print(f"{depth} dense layers of width {width}, batch {B}: {n} parameters")


def run(solver, A, b, M=None, **kw):
    """Solve A x = b; return x and the relative residual after every iteration."""
    hist = []

    def cb(xk):
        hist.append(np.linalg.norm(b - A @ xk) / np.linalg.norm(b))

    x, _ = solver(A, b, M=M, maxiter=maxiter, callback=cb, **kw)
    return x, np.array(hist)


# %%
# CG and MINRES on an SPD system at the minimum
# ---------------------------------------------
# :math:`A = H + \lambda I` with :math:`\lambda = 10^{-6}`: :math:`H` is
# positive semi-definite of rank at most :math:`B`, so :math:`A` is SPD with
# condition number near :math:`\lambda_{max}/\lambda`.

lam = 1e-6
A = hessian(pt, damping=lam)
M_damped = inverse_hessian(pt, damping=1e-3, check=False)
M_f32 = inverse_hessian(pt, damping=lam, precision="float32", refine=0, check=False)
assert (
    M_damped.inertia[0] == 0 and M_damped.inertia[1] == 0
)  # SPD: a valid CG/MINRES preconditioner

results = {}
for name, solver, kw in [("CG", cg, {"rtol": 1e-10}), ("MINRES", minres, {"rtol": 1e-15})]:
    for label, M in [
        ("none", None),
        ("exact inverse, λ_p = 1e-3", M_damped),
        ("float32 exact inverse", M_f32),
    ]:
        x, hist = run(solver, A, g, M=M, **kw)
        results[(name, label)] = hist
        print(
            f"{name:6s} preconditioner {label:28s}: {len(hist):5d} iterations, "
            f"residual {hist[-1]:.1e}"
        )

# reference: the exact float64 inverse itself, with its certificate
Ainv = inverse_hessian(pt, damping=lam)
x_exact = Ainv @ g
res_exact = float(Ainv.residual(g, x_exact))
print(f"exact inverse (method {Ainv.method}): residual {res_exact:.1e}")
assert res_exact < 1e-8
for name in ("CG", "MINRES"):
    plain, f32 = results[(name, "none")], results[(name, "float32 exact inverse")]
    damped = results[(name, "exact inverse, λ_p = 1e-3")]
    assert len(f32) <= 10 and len(damped) < len(plain) / 2
assert results[("CG", "float32 exact inverse")][-1] < 1e-8
assert results[("MINRES", "float32 exact inverse")][-1] < 1e-6

# %%
# SciPy's MINRES stops on a backward-error test,
# :math:`\lVert r\rVert \le \text{rtol}\,(\lVert A\rVert\lVert x\rVert + \lVert b\rVert)`;
# with :math:`\lVert x\rVert \approx \lVert b\rVert/\lambda` that allows a relative
# residual far above ``rtol``, hence the tiny ``rtol`` above and the larger
# final residuals in its panel.

# %%
# GMRES on an indefinite system with a stale preconditioner
# ---------------------------------------------------------
# Away from the minimum :math:`H` is indefinite. We factor the exact inverse
# at a nearby point (the parameters of the "previous iterate") and use it to
# precondition GMRES at the current one.

w_now = net.init(seed=9)
Y2 = rng.standard_normal((B, 1))
pt_now = net.linearize(w_now, X, Y2)
pt_old = net.linearize(w_now + 1e-2 * rng.standard_normal(n) / np.sqrt(n), X, Y2)
lam2 = 1e-4
A2 = hessian(pt_now, damping=lam2)
M_stale = inverse_hessian(pt_old, damping=lam2, check=False)
inertia = inverse_hessian(pt_now, damping=lam2, check=False).inertia
print(f"H + λI at the current point: inertia (neg, zero, pos) = {inertia}")
assert inertia[0] > 0  # indefinite: CG does not apply, GMRES / MINRES without SPD preconditioner do

# Full (unrestarted) GMRES: at most n inner iterations; the callback receives
# the residual norm of the preconditioned system at every inner iteration.
final = {}
for label, M in [("none", None), ("exact inverse at the previous point", M_stale)]:
    hist = []
    x, info = gmres(
        A2, g, M=M, rtol=1e-12, restart=n, maxiter=1, callback=hist.append, callback_type="pr_norm"
    )
    results[("GMRES", label)] = np.array(hist)
    final[label] = np.linalg.norm(g - A2 @ x) / np.linalg.norm(g)
    print(
        f"GMRES  preconditioner {label:36s}: {len(hist):5d} iterations, residual {final[label]:.1e}"
    )
assert len(results[("GMRES", "exact inverse at the previous point")]) <= 20
assert final["exact inverse at the previous point"] < 1e-8
assert len(results[("GMRES", "none")]) > 5 * len(
    results[("GMRES", "exact inverse at the previous point")]
)

# every corner of these panels holds a curve, so the legends go under the axes
fig, axes = plt.subplots(1, 3, figsize=(12, 4.2), sharey=True, layout="constrained")
for ax, name in zip(axes, ("CG", "MINRES", "GMRES")):
    for (nm, label), hist in results.items():
        if nm == name:
            ax.semilogy(np.arange(1, len(hist) + 1), hist, label=label)
    ax.set_title(name if name != "GMRES" else "GMRES (preconditioned residual)")
    ax.set_xlabel("iteration")
    ax.set_xscale("log")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2))
axes[0].set_ylabel("relative residual")
# sphinx_gallery_start_ignore
show_figures("plot_preconditioning")  # plt.show(), or PNGs when headless (see the top)
# sphinx_gallery_end_ignore
