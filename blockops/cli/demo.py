"""``python -m blockops demo``: what blockops does, on a deep narrow network.

1. Loss and gradient (one forward + backward pass) and one fused ``H v``.
2. The exact damped ``(H + λI)⁻¹ g`` with its residual certificate and inertia.
3. The same system by Krylov solvers, each with a valid preconditioner and its
   true residual computed here: MINRES on the indefinite ``H + λI``, plain and
   preconditioned by the exact ``(H + μI)⁻¹`` with ``μ`` raised until the
   inertia says ``H + μI`` is positive definite (MINRES needs a positive
   definite preconditioner); GMRES preconditioned by the exact ``(H + λI)⁻¹``;
   CG on the damped Gauss-Newton matrix ``G + λI`` (CG needs a positive
   definite operator), plain and preconditioned by its exact inverse.
4. Inertia-controlled Newton (the shift ``λ`` raised until the factorisation's
   inertia certifies ``H + λI ≻ 0``), exact damped Newton and exact
   Gauss-Newton (Levenberg-Marquardt damping) against gradient descent and
   Adam from the same start, with the same wall-clock time (``--budget time``,
   default; losses compared at the same instant) or the same number of steps.
5. Exact factor + solve time against depth.

Tables go to the console; ``demo.json``, ``loss_curves.png`` and
``time_vs_depth.png`` to ``--out``. Sections 3 and 4 are in
:mod:`blockops.cli.compare`; :func:`preflight` refuses a ``--out`` that
cannot be written and sizes that would need more than half of the memory
before anything is computed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import to_numpy
from . import EXIT_OK
from .compare import krylov_comparison, optimizer_comparison
from .preflight import case_memory, layer_memory, memory_limit, memory_problem, out_folder_problem
from .problem import (
    best_time,
    exact_inverse,
    hessian_operator,
    make_problem,
    measure_case,
    relative_residual,
    warm_up_kernels,
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
DEPTH_KEYS = [
    ("gradient", "gradient"),
    ("hvp", "fused HVP"),
    ("factor", "factor"),
    ("solve", "solve"),
]


def _settings(args) -> dict:
    base = QUICK if args.quick else FULL
    s = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
    if args.steps is None and args.budget == "time":
        s["steps"] = None  # the Newton runs stop on --newton-time alone
    depth = s["depth"]
    s["depths"] = args.depths or sorted(
        {max(2, depth // 8), max(2, depth // 4), max(2, depth // 2), depth}
    )
    s["depths"] = sorted(set(s["depths"]) | {depth})  # the main network is always one point
    return s


def preflight(args) -> str | None:
    """Why the demo cannot run as asked (bad ``--out``, too big for memory), or ``None``."""
    problem = out_folder_problem(args.out)
    if problem:
        return problem
    s = _settings(args)
    d, w, b = s["depth"], s["width"], s["batch"]
    # two factorisations live at once at the main depth; the depth scan holds one
    needed = max(2 * case_memory(d, w, b), case_memory(max(s["depths"]), w, b))
    limit = memory_limit() or 0.0
    fits = max(1, int(limit / (2 * layer_memory(w, b))))
    return memory_problem(
        needed,
        f"demo at depth {max(s['depths'])}, width {w}, batch {b}",
        f"pass a smaller --depth (and --depths; about {fits:,} layers fit at this width "
        "and batch) or --batch",
    )


def run(args, rep) -> int:
    s = _settings(args)
    if not args.no_figures:
        require_matplotlib()  # fail before the work, not after
    t_start = time.perf_counter()
    prob = make_problem(
        s["depth"], s["width"], s["batch"], seed=args.seed, backend=args.backend, init=args.init
    )
    result: dict = {"settings": _settings_record(s, args)}
    _print_header(rep, prob, args)
    result["compile_time"] = warm_up_kernels(rep)  # not inside the first factor's time
    x0 = _second_order_at_x0(prob, args)
    _exact_table(rep, prob, x0, args.damping)
    result["point"] = x0.record()
    result["krylov"] = krylov_comparison(
        rep, x0, args.damping, args.krylov_tol, s["krylov_maxiter"]
    )
    result["optimizers"], histories = optimizer_comparison(
        rep, prob, s["steps"], s["newton_time"], args.damping, args
    )
    scaling = _depth_scaling(rep, prob, s, args, x0.case_record(prob, args))
    result["depth_scaling"] = scaling
    written = _write_outputs(args, prob, result, histories, scaling["records"])
    rep.print(f"wrote {', '.join(written)}")
    rep.print(f"demo finished in {time.perf_counter() - t_start:.1f} s", style="good")
    return EXIT_OK


def _settings_record(s: dict, args) -> dict:
    return {
        **s,
        "damping": args.damping,
        "seed": args.seed,
        "backend": args.backend,
        "budget": args.budget,
        "quick": args.quick,
        "init": args.init,
    }


def _print_header(rep, prob, args) -> None:
    rep.rule("blockops demo")
    rep.print(f"network: {prob.describe()}")
    rep.print(f"task:    {prob.task.description}")
    rep.print(f"start:   {args.init} initialisation, seed {args.seed}")


# -- 1. and 2.: gradient, fused HVP and the exact damped inverse at x0 -------------------------
@dataclass
class SecondOrder:
    """What the demo measures at the start ``x0``; the later sections reuse the operators."""

    point: Any
    Hl: Any  # H + λI, fused
    Hinv: Any  # exact (H + λI)^-1
    g: Any
    x_exact: Any
    t_grad: float
    t_hvp: float
    t_fac: float
    t_sol: float
    residual: float  # |(H + λI) x - g| / |g|, recomputed here with the fused HVP
    certificate: float | None  # the inverse operator's own, when it offers one

    @property
    def grad_norm(self) -> float:
        return float(np.linalg.norm(to_numpy(self.g)))

    @property
    def inertia(self):
        return getattr(self.Hinv, "inertia", None)

    @property
    def logdet(self) -> float | None:
        return _first(getattr(self.Hinv, "logdet", None))

    def record(self) -> dict:
        return {
            "loss": self.point.loss,
            "grad_norm": self.grad_norm,
            "gradient_time": self.t_grad,
            "hvp_time": self.t_hvp,
            "factor_time": self.t_fac,
            "solve_time": self.t_sol,
            "residual": self.residual,
            "certificate": self.certificate,
            "inertia": None if self.inertia is None else list(self.inertia),
            "logdet": self.logdet,
        }

    def case_record(self, prob, args) -> dict:
        """The main network as one point of the depth scan (the keys of ``measure_case``)."""
        return {
            "depth": prob.depth,
            "width": prob.width,
            "batch": prob.batch,
            "damping": args.damping,
            "n_params": prob.n_params,
            "backend": args.backend,
            "gradient": self.t_grad,
            "hvp": self.t_hvp,
            "factor": self.t_fac,
            "solve": self.t_sol,
            "residual": self.residual,
        }


def _second_order_at_x0(prob, args) -> SecondOrder:
    xp, lam = prob.xp, args.damping
    t_grad, pt = best_time(prob.point, 3, xp)
    H = hessian_operator(pt)  # fused, undamped
    Hl = hessian_operator(pt, damping=lam)
    v = xp.asarray(np.random.default_rng(args.seed).standard_normal(prob.n_params), dtype=pt.dtype)
    t_hvp, _ = best_time(lambda: H.matvec(v), 3, xp)
    g = pt.gradient
    t_fac, Hinv = best_time(lambda: exact_inverse(pt, lam), 2, xp)
    t_sol, x_exact = best_time(lambda: Hinv.matvec(g), 3, xp)
    residual = relative_residual(Hl, x_exact, g)
    cert = _certificate(Hinv, g, x_exact)
    return SecondOrder(pt, Hl, Hinv, g, x_exact, t_grad, t_hvp, t_fac, t_sol, residual, cert)


def _certificate(Hinv, g, x) -> float | None:
    fn = getattr(Hinv, "residual", None)
    if fn is None:
        return None
    r = fn(g, x)
    return float(r) if np.ndim(r) == 0 else float(np.max(to_numpy(r)))


def _exact_table(rep, prob, x0: SecondOrder, lam: float) -> None:
    inertia = x0.inertia
    rows = [
        [
            "loss, gradient (forward + backward)",
            fmt_time(x0.t_grad),
            f"loss {x0.point.loss:.4g}, |g| {x0.grad_norm:.3g}",
        ],
        ["fused H v", fmt_time(x0.t_hvp), f"{x0.t_hvp / x0.t_grad:.2f} x gradient"],
        ["exact (H + λI)^-1: factor", fmt_time(x0.t_fac), f"{x0.t_fac / x0.t_hvp:.1f} x HVP"],
        [
            "exact (H + λI)^-1 g: solve, 1 refinement, check",
            fmt_time(x0.t_sol),
            f"{x0.t_sol / x0.t_hvp:.2f} x HVP",
        ],
        ["  residual |(H+λI)x - g|/|g|", "", f"{x0.residual:.2e} (recomputed here)"],
        ["  certificate (operator's own)", "", fmt_float(x0.certificate)],
        ["  inertia (neg, zero, pos) of H + λI", "", str(inertia) if inertia is not None else "-"],
        ["  log|det(H + λI)|", "", fmt_float(x0.logdet, 6)],
    ]
    method = getattr(x0.Hinv, "method", None)
    if method:
        fallback = (getattr(x0.Hinv, "info", None) or {}).get("fallback")
        rows.append(
            ["  factorisation", "", method + (f" (fallback: {fallback})" if fallback else "")]
        )
    rep.table(
        f"Exact second order at x0 (λ = {lam:g}, {prob.n_params:,} parameters)",
        ["quantity", "time", "value"],
        rows,
    )


def _first(v):
    """A float from a logdet that may come as ``(sign, value)``."""
    if v is None:
        return None
    if isinstance(v, tuple | list):
        return float(v[-1])
    return float(v)


# -- 5. exact factor + solve time against depth ---------------------------------------------
def _depth_scaling(rep, prob, s: dict, args, main_rec: dict) -> dict:
    """Measure the other depths (the main network is already measured) and tabulate."""
    others = [d for d in s["depths"] if d != prob.depth]
    records = []
    with rep.progress(len(others), "exact solve against depth") as prog:
        for d in others:
            records.append(
                measure_case(
                    d,
                    s["width"],
                    s["batch"],
                    args.damping,
                    seed=args.seed,
                    backend=args.backend,
                    minres=False,
                    repeat=2,
                )
            )
            prog.advance(f"depth {d}")
    records = sorted([*records, main_rec], key=lambda r: r["depth"])
    slopes = {
        k: fit_slope([r["depth"] for r in records], [r.get(k) for r in records])
        for k, _ in DEPTH_KEYS
    }
    _depth_table(rep, records, slopes, s, args.damping)
    return {"records": records, "slopes": slopes}


def _depth_table(rep, records: list, slopes: dict, s: dict, lam: float) -> None:
    rep.table(
        f"Time against depth (width {s['width']}, batch {s['batch']}, λ = {lam:g})",
        ["depth", "params", *[lab for _, lab in DEPTH_KEYS], "residual"],
        [
            [
                r["depth"],
                f"{r['n_params']:,}",
                *[fmt_time(r.get(k)) for k, _ in DEPTH_KEYS],
                fmt_float(r.get("residual")),
            ]
            for r in records
        ]
        + [["slope", "", *[fmt_float(slopes[k], 2) for k, _ in DEPTH_KEYS], ""]],
        caption="slope: least-squares exponent of time against depth (1 = linear)",
    )


# -- outputs ------------------------------------------------------------------------------------
def _write_outputs(args, prob, result: dict, histories, records) -> list[str]:
    os.makedirs(args.out, exist_ok=True)
    written = [write_json(os.path.join(args.out, "demo.json"), result)]
    if args.no_figures:
        return written
    written.append(
        plot_loss_curves(
            histories,
            os.path.join(args.out, "loss_curves.png"),
            f"{prob.describe()}; budget: same {args.budget}",
            t_equal=(result["optimizers"] or [{}])[0].get("equal_time"),
        )
    )
    written.append(
        plot_scaling(
            records,
            DEPTH_KEYS,
            os.path.join(args.out, "time_vs_depth.png"),
            f"time against depth (λ = {args.damping:g})",
        )
    )
    return written
