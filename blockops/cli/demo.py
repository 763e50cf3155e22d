"""``python -m blockops demo``: what blockops does, on a deep narrow network.

1. Loss and gradient (one forward + backward pass) and one fused ``H v``.
2. The exact damped ``(H + λI)⁻¹ g`` with its residual certificate and inertia.
3. The same system by MINRES (the exact, indefinite ``H + λI``), plain and
   preconditioned by the exact ``(G + λI)⁻¹`` (MINRES needs a positive
   definite preconditioner), by GMRES preconditioned by the exact
   ``(H + λI)⁻¹``, and by CG on the damped Gauss-Newton matrix ``G + λI``
   (CG needs a positive definite operator; ``H`` of a deep tanh net is
   indefinite), each with its true residual computed here.
4. Exact damped Newton and exact Gauss-Newton (Levenberg-Marquardt damping)
   against gradient descent and Adam from the same start, with the same
   wall-clock time (``--budget time``, default) or the same number of steps.
5. Exact factor + solve time against depth.

Tables go to the console; ``demo.json``, ``loss_curves.png`` and
``time_vs_depth.png`` to ``--out``.
"""

from __future__ import annotations

import os
import time

import numpy as np

from . import EXIT_OK
from .optimizers import adam, damped_newton, gradient_descent
from .problem import (
    best_time,
    exact_inverse,
    hessian_operator,
    krylov,
    make_problem,
    measure_case,
    positive_preconditioner,
    relative_residual,
)
from .report import (
    fit_slope,
    fmt_float,
    fmt_time,
    plot_loss_curves,
    plot_scaling,
    require_matplotlib,
    write_json,
)

FULL = {
    "depth": 256,
    "width": 16,
    "batch": 8,
    "steps": 8,
    "newton_time": 12.0,
    "krylov_maxiter": 100,
}
QUICK = {"depth": 24, "width": 8, "batch": 4, "steps": 6, "newton_time": 3.0, "krylov_maxiter": 100}


def _settings(args) -> dict:
    base = QUICK if args.quick else FULL
    s = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
    depth = s["depth"]
    s["depths"] = args.depths or sorted(
        {max(2, depth // 8), max(2, depth // 4), max(2, depth // 2), depth}
    )
    s["depths"] = sorted(set(s["depths"]) | {depth})  # the main network is always one point
    return s


def run(args, rep) -> int:
    s = _settings(args)
    if not args.no_figures:
        require_matplotlib()  # fail before the work, not after
    lam = args.damping
    t_start = time.perf_counter()
    prob = make_problem(
        s["depth"], s["width"], s["batch"], seed=args.seed, backend=args.backend, init=args.init
    )
    xp = prob.xp
    result: dict = {
        "settings": {
            **s,
            "damping": lam,
            "seed": args.seed,
            "backend": args.backend,
            "budget": args.budget,
            "quick": args.quick,
            "init": args.init,
        }
    }
    rep.rule("blockops demo")
    rep.print(f"network: {prob.describe()}")
    rep.print(f"task:    {prob.task.description}")
    rep.print(f"start:   {args.init} initialisation, seed {args.seed}")

    # 1. gradient and fused HVP ------------------------------------------------------
    t_grad, pt = best_time(prob.point, 3, xp)
    H = hessian_operator(pt)  # fused, undamped
    Hl = hessian_operator(pt, damping=lam)
    v = xp.asarray(np.random.default_rng(args.seed).standard_normal(prob.n_params), dtype=pt.dtype)
    t_hvp, _ = best_time(lambda: H.matvec(v), 3, xp)
    g = pt.gradient
    gnorm = float(np.linalg.norm(_np(g)))

    # 2. exact damped inverse ------------------------------------------------------------
    t_fac, Hinv = best_time(lambda: exact_inverse(pt, lam), 2, xp)
    t_sol, x_exact = best_time(lambda: Hinv.matvec(g), 3, xp)
    res_exact = relative_residual(Hl, x_exact, g)
    cert = _certificate(Hinv, g, x_exact)
    inertia = getattr(Hinv, "inertia", None)
    logdet = getattr(Hinv, "logdet", None)
    rows = [
        [
            "loss, gradient (forward + backward)",
            fmt_time(t_grad),
            f"loss {pt.loss:.4g}, |g| {gnorm:.3g}",
        ],
        ["fused H v", fmt_time(t_hvp), f"{t_hvp / t_grad:.2f} x gradient"],
        ["exact (H + λI)^-1: factor", fmt_time(t_fac), f"{t_fac / t_hvp:.1f} x HVP"],
        [
            "exact (H + λI)^-1 g: solve, 1 refinement, check",
            fmt_time(t_sol),
            f"{t_sol / t_hvp:.2f} x HVP",
        ],
        ["  residual |(H+λI)x - g|/|g|", "", f"{res_exact:.2e} (recomputed here)"],
        ["  certificate (operator's own)", "", fmt_float(cert)],
        ["  inertia (neg, zero, pos) of H + λI", "", str(inertia) if inertia is not None else "-"],
        ["  log|det(H + λI)|", "", fmt_float(_first(logdet), 6)],
    ]
    method = getattr(Hinv, "method", None)
    if method:
        fallback = (getattr(Hinv, "info", None) or {}).get("fallback")
        rows.append(
            ["  factorisation", "", method + (f" (fallback: {fallback})" if fallback else "")]
        )
    rep.table(
        f"Exact second order at x0 (λ = {lam:g}, {prob.n_params:,} parameters)",
        ["quantity", "time", "value"],
        rows,
    )
    result["point"] = {
        "loss": pt.loss,
        "grad_norm": gnorm,
        "gradient_time": t_grad,
        "hvp_time": t_hvp,
        "factor_time": t_fac,
        "solve_time": t_sol,
        "residual": res_exact,
        "certificate": cert,
        "inertia": None if inertia is None else list(inertia),
        "logdet": _first(logdet),
    }

    # 3. Krylov solvers ------------------------------------------------------------------
    result["krylov"] = _krylov_table(
        rep, pt, Hl, Hinv, g, x_exact, lam, args.krylov_tol, s["krylov_maxiter"], t_fac + t_sol
    )

    # 4. optimisers ----------------------------------------------------------------------
    result["optimizers"], histories = _optimizers(
        rep, prob, s["steps"], s["newton_time"], lam, args
    )

    # 5. time against depth ----------------------------------------------------------------
    main_rec = {
        "depth": prob.depth,
        "width": prob.width,
        "batch": prob.batch,
        "damping": lam,
        "n_params": prob.n_params,
        "backend": args.backend,
        "gradient": t_grad,
        "hvp": t_hvp,
        "factor": t_fac,
        "solve": t_sol,
        "residual": res_exact,
    }
    others = [d for d in s["depths"] if d != prob.depth]
    records = []
    with rep.progress(len(others), "exact solve against depth") as prog:
        for d in others:
            records.append(
                measure_case(
                    d,
                    s["width"],
                    s["batch"],
                    lam,
                    seed=args.seed,
                    backend=args.backend,
                    minres=False,
                    repeat=2,
                )
            )
            prog.advance(f"depth {d}")
    records = sorted([*records, main_rec], key=lambda r: r["depth"])
    keys = [
        ("gradient", "gradient"),
        ("hvp", "fused HVP"),
        ("factor", "factor"),
        ("solve", "solve"),
    ]
    slopes = {
        k: fit_slope([r["depth"] for r in records], [r.get(k) for r in records]) for k, _ in keys
    }
    rep.table(
        f"Time against depth (width {s['width']}, batch {s['batch']}, λ = {lam:g})",
        ["depth", "params", *[lab for _, lab in keys], "residual"],
        [
            [
                r["depth"],
                f"{r['n_params']:,}",
                *[fmt_time(r.get(k)) for k, _ in keys],
                fmt_float(r.get("residual")),
            ]
            for r in records
        ]
        + [["slope", "", *[fmt_float(slopes[k], 2) for k, _ in keys], ""]],
        caption="slope: least-squares exponent of time against depth (1 = linear)",
    )
    result["depth_scaling"] = {"records": records, "slopes": slopes}

    # outputs ----------------------------------------------------------------------------
    os.makedirs(args.out, exist_ok=True)
    written = [write_json(os.path.join(args.out, "demo.json"), result)]
    if not args.no_figures:
        written.append(
            plot_loss_curves(
                histories,
                os.path.join(args.out, "loss_curves.png"),
                f"{prob.describe()}; budget: same {args.budget}",
            )
        )
        written.append(
            plot_scaling(
                records,
                keys,
                os.path.join(args.out, "time_vs_depth.png"),
                f"time against depth (λ = {lam:g})",
            )
        )
    rep.print(f"wrote {', '.join(written)}")
    rep.print(f"demo finished in {time.perf_counter() - t_start:.1f} s", style="good")
    return EXIT_OK


def _np(a):
    from ..backend import to_numpy

    return to_numpy(a)


def _rel_err(x, x_ref) -> float:
    return float(np.linalg.norm(_np(x - x_ref)) / np.linalg.norm(_np(x_ref)))


def _first(v):
    """A float from a logdet that may come as ``(sign, value)``."""
    if v is None:
        return None
    if isinstance(v, tuple | list):
        return float(v[-1])
    return float(v)


def _certificate(Hinv, g, x):
    """The inverse operator's own residual certificate, when it offers one."""
    fn = getattr(Hinv, "residual", None)
    if fn is None:
        return None
    r = fn(g, x)
    return float(r) if np.ndim(r) == 0 else float(np.max(_np(r)))


def _krylov_table(rep, pt, Hl, Hinv, g, x_exact, lam, tol, maxiter, t_exact):
    """MINRES and CG (plain and with exact preconditioners) against the exact solve."""
    Gl = hessian_operator(pt, damping=lam, kind="ggn")
    runs = [
        ("MINRES", "minres", Hl, None, "H + λI (indefinite)", maxiter),
        ("CG", "cg", Gl, None, "G + λI (Gauss-Newton, PD)", maxiter),
        ("GMRES + exact (H+λI)^-1", "gmres", Hl, Hinv, "H + λI", 5),
    ]
    notes = []
    exact = {id(Hl): x_exact}  # the exact solution of each system, for the error column
    try:  # MINRES accepts only a positive definite preconditioner: the exact (G + λI)^-1
        t0 = time.perf_counter()
        Pg = positive_preconditioner(pt, lam)
        exact[id(Gl)] = Pg.matvec(g)
        its = min(20, maxiter)  # each iteration also solves with the factored (G + λI)
        runs.insert(1, ("MINRES + exact (G+λI)^-1", "minres", Hl, Pg, "H + λI (indefinite)", its))
        notes.append(f"exact (G+λI)^-1 factored in {fmt_time(time.perf_counter() - t0)}")
    except Exception as exc:  # an older build without the Gauss-Newton factorisation
        notes.append(f"no exact Gauss-Newton preconditioner ({type(exc).__name__}: {exc})")
    rows, out = [], {}
    for label, method, A, M, what, its in runs:
        t0 = time.perf_counter()
        res = krylov(method, A, g, tol=tol, maxiter=its, M=M)
        t = time.perf_counter() - t0
        r = relative_residual(A, res.x, g)
        xe = exact.get(id(A))
        err = None if xe is None else _rel_err(res.x, xe)
        rows.append(
            [
                label,
                what,
                str(res.iterations),
                fmt_time(t),
                f"{r:.2e}",
                "-" if err is None else f"{err:.2e}",
                f"{t / t_exact:.2f} x",
            ]
        )
        out[label] = {
            "operator": what,
            "iterations": int(res.iterations),
            "time": t,
            "residual": r,
            "error_vs_exact": err,
        }
    rep.table(
        f"Krylov solvers through blockops.solvers (rtol {tol:g}, at most {maxiter} iterations)",
        [
            "solver",
            "operator",
            "iterations",
            "time",
            "true residual",
            "error vs exact",
            "time / exact",
        ],
        rows,
        caption="CG needs a positive definite operator and H + λI of a deep tanh net is "
        "indefinite (see the inertia), so CG solves the damped Gauss-Newton system instead. "
        "Residuals recomputed here with the fused products; 'time / exact' compares with "
        "factor + solve above. The Gauss-Newton matrix has rank <= batch x outputs, so its "
        "exact inverse is 1/λ on almost all directions and does not precondition H. "
        + "; ".join(notes),
    )
    return out


def _optimizers(rep, prob, steps, newton_time, lam, args):
    def direction(kind):
        def solve(point, damping):
            # An indefinite H + λI shows as a non-positive predicted decrease, which the
            # optimiser handles; asking the factorisation for its inertia would cost more.
            kw = {"kind": kind} if kind != "hessian" else {}
            return exact_inverse(point, damping, **kw).matvec(point.gradient)

        return solve

    seconds = []
    hists = []
    with rep.progress(4, "optimisers") as prog:
        for kind, name in (
            ("hessian", "exact damped Newton (LM)"),
            ("ggn", "exact Gauss-Newton (LM)"),
        ):
            try:
                _, h = damped_newton(
                    prob.point,
                    direction(kind),
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
            seconds.append(h.time[-1])
            prog.advance(name)
        if args.budget == "time":
            budget = {"max_steps": 10**7, "time_budget": max([*seconds, 1e-3])}
        else:
            budget = {"max_steps": max([h.steps for h in hists], default=steps)}
        hists.append(gradient_descent(prob.point, prob.x0, args.lr_gd, **budget)[1])
        prog.advance("gradient descent")
        hists.append(adam(prob.point, prob.x0, args.lr_adam, **budget)[1])
        prog.advance("Adam")
    l0 = hists[0].loss[0]
    rows = []
    for h in hists:
        acc = h.notes.get("accepted")
        extra = (
            f"{sum(acc)} of {len(acc)} accepted, λ {h.notes['damping'][0]:g} -> "
            f"{h.notes['damping'][-1]:.3g}"
            if acc
            else f"lr {h.notes['lr']:g}"
        )
        rows.append(
            [
                h.name,
                str(h.steps),
                fmt_time(h.time[-1]),
                f"{h.final_loss:.4g}",
                f"{l0 / h.final_loss:.3g}" if h.final_loss > 0 else "inf",
                extra,
            ]
        )
    rep.table(
        f"Optimisers from the same start (loss {l0:.4g}); budget: same {args.budget}",
        ["method", "steps", "time", "final loss", "reduction", "notes"],
        rows,
        caption=(
            "Newton steps d = (H + λI)^-1 g and (G + λI)^-1 g are exact (factored each step); "
            f"λ starts at {max(args.newton_damping, lam):g} and adapts Levenberg-Marquardt style "
            "(tenfold up after a rejected step or an indefinite model, down by the gain ratio "
            f"after an accepted one, never below {lam:g}). "
            + (
                "Gradient descent and Adam ran for the longer Newton run's wall-clock time."
                if args.budget == "time"
                else "Gradient descent and Adam ran as many steps as the longer Newton run."
            )
        ),
    )
    return [h.as_dict() for h in hists], hists
