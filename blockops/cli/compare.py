"""The demo's comparisons: Krylov solvers and optimisers against the exact inverse.

* :func:`krylov_comparison` (section 3 of :mod:`blockops.cli.demo`): MINRES on
  the indefinite ``H + λI``, plain and preconditioned by the exact
  ``(G + λI)⁻¹``; CG on the damped Gauss-Newton matrix; GMRES preconditioned
  by the exact ``(H + λI)⁻¹``; each with its true residual recomputed here.
* :func:`optimizer_comparison` (section 4): exact damped Newton and exact
  Gauss-Newton against gradient descent and Adam from the same start.
"""

from __future__ import annotations

import time

import numpy as np

from ..backend import to_numpy
from .optimizers import adam, damped_newton, gradient_descent
from .problem import (
    exact_inverse,
    hessian_operator,
    krylov,
    positive_preconditioner,
    relative_residual,
)
from .report import fmt_time

__all__ = ["krylov_comparison", "optimizer_comparison"]

KRYLOV_COLUMNS = [
    "solver",
    "operator",
    "iterations",
    "time",
    "true residual",
    "error vs exact",
    "time / exact",
]
KRYLOV_CAPTION = (
    "CG needs a positive definite operator and H + λI of a deep tanh net is "
    "indefinite (see the inertia), so CG solves the damped Gauss-Newton system instead. "
    "Residuals recomputed here with the fused products; 'time / exact' compares with "
    "factor + solve above. The Gauss-Newton matrix has rank <= batch x outputs, so its "
    "exact inverse is 1/λ on almost all directions and does not precondition H. "
)
NEWTON_RUNS = (("hessian", "exact damped Newton (LM)"), ("ggn", "exact Gauss-Newton (LM)"))


# -- 3. Krylov solvers ----------------------------------------------------------------------
def krylov_comparison(rep, x0, lam: float, tol: float, maxiter: int) -> dict:
    """MINRES, CG and GMRES (plain and with exact preconditioners) against the exact solve.

    ``x0`` carries the point, ``H + λI``, the exact inverse, ``g``, the exact
    solution and the exact factor and solve times (:class:`blockops.cli.demo.SecondOrder`).
    """
    Gl = hessian_operator(x0.point, damping=lam, kind="ggn")
    runs = [
        ("MINRES", "minres", x0.Hl, None, "H + λI (indefinite)", maxiter),
        ("CG", "cg", Gl, None, "G + λI (Gauss-Newton, PD)", maxiter),
        ("GMRES + exact (H+λI)^-1", "gmres", x0.Hl, x0.Hinv, "H + λI", 5),
    ]
    exact = {id(x0.Hl): x0.x_exact}  # the exact solution of each system, for the error column
    notes = [_add_gauss_newton_preconditioner(runs, exact, x0, Gl, lam, maxiter)]
    rows, out = [], {}
    for label, method, A, M, what, its in runs:
        row, out[label] = _krylov_run(method, A, M, what, its, x0, exact.get(id(A)), tol)
        rows.append([label, *row])
    rep.table(
        f"Krylov solvers through blockops.solvers (rtol {tol:g}, at most {maxiter} iterations)",
        KRYLOV_COLUMNS,
        rows,
        caption=KRYLOV_CAPTION + "; ".join(notes),
    )
    return out


def _add_gauss_newton_preconditioner(runs, exact, x0, Gl, lam, maxiter) -> str:
    """Add MINRES with the exact ``(G + λI)⁻¹`` to ``runs``; return the note for the caption.

    MINRES accepts only a positive definite preconditioner, hence G rather than H.
    """
    try:
        t0 = time.perf_counter()
        Pg = positive_preconditioner(x0.point, lam)
        exact[id(Gl)] = Pg.matvec(x0.g)
        its = min(20, maxiter)  # each iteration also solves with the factored (G + λI)
        runs.insert(
            1, ("MINRES + exact (G+λI)^-1", "minres", x0.Hl, Pg, "H + λI (indefinite)", its)
        )
        return f"exact (G+λI)^-1 factored in {fmt_time(time.perf_counter() - t0)}"
    except Exception as exc:  # an older build without the Gauss-Newton factorisation
        return f"no exact Gauss-Newton preconditioner ({type(exc).__name__}: {exc})"


def _krylov_run(method, A, M, what, its, x0, x_ref, tol) -> tuple[list, dict]:
    """One solve: its table row (after the label) and its JSON record."""
    t0 = time.perf_counter()
    res = krylov(method, A, x0.g, tol=tol, maxiter=its, M=M)
    t = time.perf_counter() - t0
    r = relative_residual(A, res.x, x0.g)
    err = None if x_ref is None else _rel_err(res.x, x_ref)
    row = [
        what,
        str(res.iterations),
        fmt_time(t),
        f"{r:.2e}",
        "-" if err is None else f"{err:.2e}",
        f"{t / (x0.t_fac + x0.t_sol):.2f} x",
    ]
    record = {
        "operator": what,
        "iterations": int(res.iterations),
        "time": t,
        "residual": r,
        "error_vs_exact": err,
    }
    return row, record


def _rel_err(x, x_ref) -> float:
    return float(np.linalg.norm(to_numpy(x - x_ref)) / np.linalg.norm(to_numpy(x_ref)))


# -- 4. optimisers --------------------------------------------------------------------------
def optimizer_comparison(rep, prob, steps: int, newton_time: float, lam: float, args):
    """Run the four optimisers from ``prob.x0``; return their JSON records and histories."""
    with rep.progress(4, "optimisers") as prog:
        hists = _newton_runs(rep, prog, prob, steps, newton_time, lam, args)
        if args.budget == "time":
            budget = {"max_steps": 10**7, "time_budget": max([h.time[-1] for h in hists] + [1e-3])}
        else:
            budget = {"max_steps": max([h.steps for h in hists], default=steps)}
        hists.append(gradient_descent(prob.point, prob.x0, args.lr_gd, **budget)[1])
        prog.advance("gradient descent")
        hists.append(adam(prob.point, prob.x0, args.lr_adam, **budget)[1])
        prog.advance("Adam")
    _optimizer_table(rep, hists, lam, args)
    return [h.as_dict() for h in hists], hists


def _newton_direction(kind: str):
    def solve(point, damping):
        # An indefinite H + λI shows as a non-positive predicted decrease, which the
        # optimiser handles; asking the factorisation for its inertia would cost more.
        kw = {"kind": kind} if kind != "hessian" else {}
        return exact_inverse(point, damping, **kw).matvec(point.gradient)

    return solve


def _newton_runs(rep, prog, prob, steps, newton_time, lam, args) -> list:
    hists = []
    for kind, name in NEWTON_RUNS:
        try:
            _, h = damped_newton(
                prob.point,
                _newton_direction(kind),
                prob.x0,
                max(args.newton_damping, lam),
                steps,
                time_budget=newton_time,
                damping_bounds=(lam, 1e9),
            )
        except TypeError as exc:  # a build whose inverse has no kind="ggn"
            rep.print(f"{name}: skipped ({exc})", style="dim")
            prog.advance(f"{name}: skipped")
            continue
        h.name = name
        hists.append(h)
        prog.advance(name)
    return hists


def _optimizer_row(h, l0: float) -> list[str]:
    acc = h.notes.get("accepted")
    extra = (
        f"{sum(acc)} of {len(acc)} accepted, λ {h.notes['damping'][0]:g} -> "
        f"{h.notes['damping'][-1]:.3g}"
        if acc
        else f"lr {h.notes['lr']:g}"
    )
    return [
        h.name,
        str(h.steps),
        fmt_time(h.time[-1]),
        f"{h.final_loss:.4g}",
        f"{l0 / h.final_loss:.3g}" if h.final_loss > 0 else "inf",
        extra,
    ]


def _optimizer_table(rep, hists, lam: float, args) -> None:
    l0 = hists[0].loss[0]
    same = (
        "Gradient descent and Adam ran for the longer Newton run's wall-clock time."
        if args.budget == "time"
        else "Gradient descent and Adam ran as many steps as the longer Newton run."
    )
    rep.table(
        f"Optimisers from the same start (loss {l0:.4g}); budget: same {args.budget}",
        ["method", "steps", "time", "final loss", "reduction", "notes"],
        [_optimizer_row(h, l0) for h in hists],
        caption=(
            "Newton steps d = (H + λI)^-1 g and (G + λI)^-1 g are exact (factored each step); "
            f"λ starts at {max(args.newton_damping, lam):g} and adapts Levenberg-Marquardt style "
            "(tenfold up after a rejected step or an indefinite model, down by the gain ratio "
            f"after an accepted one, never below {lam:g}). " + same
        ),
    )
