"""The demo's comparisons: Krylov solvers and optimisers against the exact inverse.

* :func:`krylov_comparison` (section 3 of :mod:`blockops.cli.demo`): the rows
  of :func:`krylov_runs`, each a valid solver / preconditioner pair (MINRES and
  CG get positive definite preconditioners only), with its true residual
  recomputed here and the cost of building its preconditioner.
* :func:`optimizer_comparison` (section 4): inertia-controlled Newton, exact
  damped Newton and exact Gauss-Newton against gradient descent and Adam from
  the same start, compared at equal wall-clock time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import to_numpy
from .optimizers import (
    InertiaOptions,
    adam,
    damped_newton,
    gradient_descent,
    inertia_newton,
    positive_definite_shift,
)
from .problem import (
    exact_inverse,
    hessian_operator,
    krylov,
    positive_preconditioner,
    relative_residual,
)
from .report import fmt_time

__all__ = [
    "KrylovRun",
    "factorizations_per_iterate",
    "krylov_comparison",
    "krylov_runs",
    "loss_after_factorizations",
    "loss_at",
    "optimizer_comparison",
]

# a step of an optimiser needs no residual certificate: no refinement, no check
FAST = {"refine": 0, "check": False}
SHIFT_GROW = 10.0  # the tenfold ladder of the inertia search (as in the optimiser)
KRYLOV_COLUMNS = [
    "solver",
    "system",
    "preconditioner M",
    "setup",
    "iterations",
    "time",
    "true residual",
    "error vs exact",
    "(setup + time) / exact",
]


# -- 3. Krylov solvers ----------------------------------------------------------------------
@dataclass
class KrylovRun:
    """One row of the Krylov table: ``method`` on ``A x = g`` preconditioned by ``M``."""

    label: str
    method: str  # "minres" | "cg" | "gmres"
    A: Any
    M: Any  # None: no preconditioner
    system: str
    preconditioner: str
    maxiter: int
    setup: float  # seconds to build M (its factorisations); 0 without M
    x_ref: Any  # the exact solution of this system

    @property
    def needs_spd(self) -> bool:
        """MINRES and CG accept only a symmetric positive definite ``M``."""
        return self.M is not None and self.method in ("minres", "cg")


def krylov_runs(x0, lam: float, maxiter: int) -> tuple[list[KrylovRun], dict]:
    """The rows, and what the caption needs (``mu``, ``tried``, ``rank``).

    ``x0`` carries the point, ``H + λI``, the exact inverse, ``g``, the exact
    solution and the exact factor time (:class:`blockops.cli.demo.SecondOrder`).
    """
    Hl, g = x0.Hl, x0.g
    P, mu, tried, t_mu = _shifted_preconditioner(x0, lam)
    Gl = hessian_operator(x0.point, damping=lam, kind="ggn")
    t0 = time.perf_counter()
    Pg = positive_preconditioner(x0.point, lam)
    t_g = time.perf_counter() - t0
    xg = Pg.matvec(g)  # the exact solution of the Gauss-Newton system
    mu_its = min(20, maxiter)  # each iteration also solves with the factored H + μI
    specs = [  # label, method, A, M, system, M in words, iterations, setup, exact solution
        ("MINRES", "minres", Hl, None, "H + λI", "none", maxiter, 0.0, x0.x_exact),
        ("MINRES + (H+μI)^-1", "minres", Hl, P, "H + λI", f"(H + μI)^-1, μ = {mu:g}", mu_its,
         t_mu, x0.x_exact),
        ("GMRES + exact (H+λI)^-1", "gmres", Hl, x0.Hinv, "H + λI", "exact (H + λI)^-1", 5,
         x0.t_fac, x0.x_exact),
        ("CG", "cg", Gl, None, "G + λI", "none", maxiter, 0.0, xg),
        ("CG + exact (G+λI)^-1", "cg", Gl, Pg, "G + λI", "exact (G + λI)^-1", maxiter, t_g, xg),
    ]  # fmt: skip
    runs = [KrylovRun(*spec) for spec in specs]
    rank = int(x0.point.batch_size * x0.point.zs[-2].shape[1])  # B x (network outputs)
    return runs, {"mu": mu, "tried": tried, "rank": rank, "mu_iterations": mu_its}


def _shifted_preconditioner(x0, lam: float) -> tuple:
    """Exact ``(H + μI)⁻¹`` with ``μ ≥ λ`` raised tenfold until ``H + μI`` is PD.

    Returns ``(operator, μ, tried, seconds)``; ``tried`` lists ``[μ, inertia]``
    of every factorisation (the first, ``μ = λ``, is section 2's, free here).
    """
    inertia = [int(v) for v in x0.inertia]
    if inertia[0] == 0 and inertia[1] == 0:
        return x0.Hinv, lam, [[lam, inertia]], 0.0
    t0 = time.perf_counter()
    P, mu, tried = positive_definite_shift(
        lambda p, m: exact_inverse(p, m, **FAST), x0.point, lam * SHIFT_GROW, SHIFT_GROW, 1e12
    )
    return P, mu, [[lam, inertia], *tried], time.perf_counter() - t0


def krylov_comparison(rep, x0, lam: float, tol: float, maxiter: int) -> dict:
    """Run :func:`krylov_runs` and tabulate; return the JSON records by label."""
    runs, facts = krylov_runs(x0, lam, maxiter)
    rows, out = [], {}
    for run in runs:
        row, out[run.label] = _krylov_run(run, x0, tol)
        rows.append([run.label, *row])
    rep.table(
        f"Krylov solvers through blockops.solvers (rtol {tol:g}, at most {maxiter} iterations)",
        KRYLOV_COLUMNS,
        rows,
        caption=_krylov_caption(x0, lam, facts),
    )
    out["shift_search"] = {"mu": facts["mu"], "tried": facts["tried"]}
    return out


def _krylov_caption(x0, lam: float, facts: dict) -> str:
    mu, tried = facts["mu"], facts["tried"]
    below = [t for t in tried if t[1][0] > 0]
    neg = (
        f"H + {below[-1][0]:g}I still had {below[-1][1][0]} negative eigenvalues, so μ = {mu:g} "
        "is far above λ and (H + μI)^-1 (H + λI) keeps the small eigenvalues of H + λI near λ/μ: "
        "a valid preconditioner that helps only as much as μ is close to λ"
        if below
        else "H + λI is already positive definite, so μ = λ and M is the exact inverse"
    )
    rank = facts["rank"]
    return (
        "Rows. MINRES: the Newton system H + λI, indefinite (inertia "
        f"{tuple(x0.inertia)}), no preconditioner. MINRES + (H+μI)^-1: MINRES needs a "
        "positive definite M; μ was raised tenfold from λ until the inertia of the exact "
        f"factorisation of H + μI was (0, 0, n) ({len(tried) - 1} factorisations, in 'setup'; at "
        f"most {facts['mu_iterations']} iterations, each a solve with it); {neg}. "
        "GMRES + exact (H+λI)^-1: GMRES takes any M, and the exact inverse is the perfect one "
        "(setup: the factorisation of section 2). CG: the Gauss-Newton system G + λI, positive "
        "definite but a different system (its error is measured against its own exact solution)"
        + f"; rank G <= batch x outputs = {rank}, so CG needs at most {rank + 1} iterations"
        ". CG + exact (G+λI)^-1: 1 iteration by construction. Residuals |A x - g|/|g| "
        "recomputed here with the fused products; '(setup + time) / exact' compares with factor "
        "+ solve of section 2."
    )


def _krylov_run(run: KrylovRun, x0, tol: float) -> tuple[list, dict]:
    """One solve: its table row (after the label) and its JSON record."""
    t0 = time.perf_counter()
    res = krylov(run.method, run.A, x0.g, tol=tol, maxiter=run.maxiter, M=run.M)
    t = time.perf_counter() - t0
    r = relative_residual(run.A, res.x, x0.g)
    err = _rel_err(res.x, run.x_ref)
    row = [
        run.system,
        run.preconditioner,
        fmt_time(run.setup) if run.M is not None else "-",
        str(res.iterations),
        fmt_time(t),
        f"{r:.2e}",
        f"{err:.2e}",
        f"{(run.setup + t) / (x0.t_fac + x0.t_sol):.2f} x",
    ]
    record = {
        "system": run.system,
        "preconditioner": run.preconditioner,
        "setup": run.setup,
        "iterations": int(res.iterations),
        "time": t,
        "residual": r,
        "converged": bool(r <= tol),
        "error_vs_exact": err,
    }
    return row, record


def _rel_err(x, x_ref) -> float:
    return float(np.linalg.norm(to_numpy(x - x_ref)) / np.linalg.norm(to_numpy(x_ref)))


# -- 4. optimisers --------------------------------------------------------------------------
NEWTON_RUNS = (
    ("inertia", "inertia-controlled Newton"),
    ("hessian", "exact damped Newton (LM)"),
    ("ggn", "exact Gauss-Newton (LM)"),
)
UNCAPPED = 10**6  # --budget time without --steps: the Newton runs stop on time alone
ROUNDOFF = 1e-24  # a loss this far below the start is round-off: no ranking there


def optimizer_comparison(rep, prob, steps: int | None, newton_time: float, lam: float, args):
    """Run the optimisers from ``prob.x0``; return their JSON records and histories.

    With ``--budget time`` every Newton run stops after ``newton_time`` seconds
    (or ``steps``, when given), gradient descent and Adam get the longest
    Newton run's time, and the table compares the losses at the same instant
    ``T`` (the end of the shortest run: :func:`loss_at`).
    """
    with rep.progress(len(NEWTON_RUNS) + 2, "optimisers") as prog:
        hists = _newton_runs(rep, prog, prob, steps or UNCAPPED, newton_time, lam, args)
        if args.budget == "time":
            budget = {"max_steps": 10**7, "time_budget": max([h.time[-1] for h in hists] + [1e-3])}
        else:
            budget = {"max_steps": max([h.steps for h in hists], default=steps)}
        hists.append(gradient_descent(prob.point, prob.x0, args.lr_gd, **budget)[1])
        prog.advance("gradient descent")
        hists.append(adam(prob.point, prob.x0, args.lr_adam, **budget)[1])
        prog.advance("Adam")
    t_eq = min(h.time[-1] for h in hists) if args.budget == "time" else None
    n_eq = _equal_work(hists)
    _optimizer_table(rep, hists, lam, args, t_eq, n_eq)
    records = [h.as_dict() for h in hists]
    for rec, h in zip(records, hists):
        if t_eq is not None:
            rec["equal_time"], rec["loss_at_equal_time"] = t_eq, loss_at(h, t_eq)
        if n_eq is not None and factorizations_per_iterate(h) is not None:
            rec["equal_factorizations"] = n_eq
            rec["loss_at_equal_factorizations"] = loss_after_factorizations(h, n_eq)
    return records, hists


def _equal_work(hists) -> int | None:
    """The fewest factorisations any exact-Newton run made (``None`` without one)."""
    counts = [c[-1] for c in map(factorizations_per_iterate, hists) if c is not None]
    return min(counts) if counts else None


def loss_at(hist, t: float) -> float:
    """The loss of the last iterate that ``hist`` had reached by wall-clock time ``t``."""
    i = int(np.searchsorted(np.asarray(hist.time), t, side="right")) - 1
    return float(hist.loss[max(i, 0)])


def _exact_factor(kind: str):
    """``factor(point, λ)``: the exact ``(H + λI)⁻¹`` (or ``(G + λI)⁻¹``), no certificate."""
    kw = {"kind": kind} if kind == "ggn" else {}
    return lambda point, damping: exact_inverse(point, damping, **kw, **FAST)


def _newton_direction(kind: str):
    def solve(point, damping):
        # An indefinite H + λI shows as a non-positive predicted decrease, which the
        # optimiser handles; the inertia-controlled run asks the factorisation instead.
        return _exact_factor(kind)(point, damping).matvec(point.gradient)

    return solve


def _newton_run(kind: str, prob, steps: int, newton_time: float, lam: float, args):
    start = max(args.newton_damping, lam)
    if kind == "inertia":
        opts = InertiaOptions(damping=start, damping_floor=lam)
        _, h = inertia_newton(
            prob.point,
            _exact_factor("hessian"),
            prob.x0,
            steps,
            time_budget=newton_time,
            hvp=lambda point, v: hessian_operator(point).matvec(v),
            options=opts,
        )
        return h
    _, h = damped_newton(
        prob.point,
        _newton_direction(kind),
        prob.x0,
        start,
        steps,
        time_budget=newton_time,
        damping_bounds=(lam, 1e9),
    )
    return h


def _newton_runs(rep, prog, prob, steps, newton_time, lam, args) -> list:
    hists = []
    for kind, name in NEWTON_RUNS:
        try:
            h = _newton_run(kind, prob, steps, newton_time, lam, args)
        except TypeError as exc:  # a build whose inverse has no kind="ggn"
            rep.print(f"{name}: skipped ({exc})", style="dim")
            prog.advance(f"{name}: skipped")
            continue
        h.name = name
        hists.append(h)
        prog.advance(name)
    return hists


def factorizations_per_iterate(h) -> list[int] | None:
    """Factorisations made up to each iterate of ``h`` (``None`` for a first-order run)."""
    per_step = h.notes.get("factorizations")
    if per_step is None and "damping" in h.notes:
        per_step = [1] * len(h.notes["damping"])  # one per Levenberg-Marquardt trial
    return None if per_step is None else [0, *np.cumsum(per_step).tolist()]


def loss_after_factorizations(h, n: int) -> float | None:
    """The loss of the last iterate that ``h`` reached with at most ``n`` factorisations."""
    counts = factorizations_per_iterate(h)
    if counts is None:
        return None
    return float(h.loss[int(np.searchsorted(counts, n, side="right")) - 1])


def _optimizer_notes(h) -> str:
    n = h.notes
    if "factorizations" in n and n["damping"]:
        shifted = sum(k > 1 for k in n["factorizations"])
        backtracked = sum(0 < a < 1 for a in n["step_size"])
        stuck = sum(a == 0 for a in n["step_size"])
        return (
            f"λ {n['damping'][0]:.3g} -> {n['damping'][-1]:.3g} (min {min(n['damping']):.3g}); "
            f"of {h.steps} steps, inertia raised λ in {shifted}, Armijo backtracked in "
            f"{backtracked}" + (f", found no decrease (round-off) in {stuck}" if stuck else "")
        )
    if n.get("accepted"):
        acc = n["accepted"]
        return f"{sum(acc)} of {len(acc)} accepted, λ {n['damping'][0]:g} -> {n['damping'][-1]:.3g}"
    return f"lr {n['lr']:g}" if "lr" in n else ""


def _optimizer_row(h, l0: float, t_eq: float | None, n_eq: int | None) -> list[str]:
    counts = factorizations_per_iterate(h)
    at = loss_at(h, t_eq) if t_eq is not None else h.final_loss
    at_n = loss_after_factorizations(h, n_eq) if n_eq is not None else None
    return [
        h.name,
        str(h.steps),
        "-" if counts is None else str(counts[-1]),
        fmt_time(h.time[-1]),
        f"{at:.4g}",
        f"{l0 / at:.3g}" if at > 0 else "inf",
        "-" if at_n is None else f"{at_n:.4g}",
        _optimizer_notes(h),
    ]


def _optimizer_table(rep, hists, lam: float, args, t_eq: float | None, n_eq) -> None:
    l0 = hists[0].loss[0]
    at = f"loss at {t_eq:.3g} s" if t_eq is not None else "loss after the steps"
    ends = {h.name: loss_at(h, t_eq) if t_eq is not None else h.final_loss for h in hists}
    at_roundoff = [name for name, v in ends.items() if v <= ROUNDOFF * l0]
    verdict = (
        f"At round-off (loss <= {ROUNDOFF:g} x start) by then: {', '.join(at_roundoff)}."
        if len(at_roundoff) > 1
        else f"Lowest {at}: {min(ends, key=ends.get)}."
    )
    rep.table(
        f"Optimisers from the same start (loss {l0:.4g}); budget: same {args.budget}",
        [
            "method",
            "steps",
            "factorisations",
            "time",
            at,
            "reduction",
            f"loss after {n_eq} fact.",
            "notes",
        ],
        [_optimizer_row(h, l0, t_eq, n_eq) for h in hists],
        caption=_optimizer_caption(lam, args, t_eq)
        + f" 'loss after {n_eq} fact.': the exact methods at equal work (the fewest "
        "factorisations any of them made), which machine load does not change." + " " + verdict,
    )


def _optimizer_caption(lam: float, args, t_eq: float | None) -> str:
    start = max(args.newton_damping, lam)
    same = (
        "Gradient descent and Adam ran for the longest Newton run's wall-clock time; "
        f"'{t_eq:.3g} s' is the end of the shortest run, so every loss in that column is read "
        "at the same instant."
        if t_eq is not None
        else "Gradient descent and Adam ran as many steps as the longest Newton run."
    )
    return (
        "Every Newton step solves with an exact factorisation (no refinement: a step needs no "
        "certificate). Inertia-controlled Newton: factor H + λI and raise λ tenfold until its "
        "inertia is (0, 0, n) (positive definite, certified by the factorisation), then the step "
        "-(H + λI)^-1 g with Armijo backtracking; the next λ starts 10x lower after a step whose "
        "actual/predicted reduction ρ > 3/4 (predicted with one HVP), 10x higher after ρ < 1/4 or "
        "a backtrack. Damped Newton and Gauss-Newton (LM): one factorisation per trial, λ "
        "tenfold up after a rejected trial or an indefinite model, down by the gain ratio after "
        f"an accepted one. λ starts at {start:g} and never goes below {lam:g}. " + same
    )
