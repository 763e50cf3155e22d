"""``python -m blockops bench``: time against depth, width and batch.

For every width and batch, depths run in increasing order through
:func:`blockops.cli.problem.measure_case` (gradient, fused HVP, exact factor
and solve with the recomputed residual, MINRES to ``--minres-tol``). A depth
whose predicted time (the last measured time, scaled linearly in depth)
exceeds ``--case-time-cap`` is skipped and listed; MINRES gets at most
``--minres-time-cap`` seconds' worth of HVPs as iterations and stops at larger
depths once predicted to exceed that. A case whose memory estimate
(:func:`blockops.cli.preflight.case_memory`) exceeds ``--max-memory-gb`` is
skipped too; the run is refused before any work when no case fits, or when
a case that would run needs more than half of the machine's memory. Results: a table, slopes
of log time against log depth, ``bench.json`` and ``bench_scaling.png`` in
``--out``.
"""

from __future__ import annotations

import os
import time

from . import EXIT_OK
from .preflight import case_memory, fmt_bytes, memory_limit, memory_problem, out_folder_problem
from .problem import measure_case, warm_up_kernels
from .report import fit_slope, fmt_float, fmt_time, plot_scaling, require_matplotlib, write_json

FULL = {
    "depths": [64, 128, 256, 512, 1024, 2048, 4096],
    "widths": [8, 16, 32],
    "batches": [1, 32],
    "minres_maxiter": 2000,
    "minres_time_cap": 20.0,
    "case_time_cap": 60.0,
    "repeat": 3,
}
QUICK = {
    "depths": [64, 128, 256, 512],
    "widths": [8, 16],
    "batches": [1, 8],
    "minres_maxiter": 100,
    "minres_time_cap": 2.0,
    "case_time_cap": 4.0,
    "repeat": 1,
}
QUANTITIES = [
    ("gradient", "gradient"),
    ("hvp", "fused HVP"),
    ("factor", "factor"),
    ("solve", "solve"),
    ("minres", "MINRES"),
]
EXACT_KEYS = ("gradient", "hvp", "factor", "solve")
DEFAULT_MEMORY_GB = 8.0
SCALING_COLUMNS = [
    "width",
    "batch",
    "depth",
    "params",
    "gradient",
    "HVP",
    "factor",
    "solve",
    "residual",
    "MINRES",
    "its",
    "MINRES res",
]


def _settings(args) -> dict:
    base = QUICK if args.quick else FULL
    return {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}


def _cases(s: dict) -> list[tuple[int, int, int]]:
    """``(width, batch, depth)``, depths innermost: each depth's time predicts the next."""
    return [(w, b, d) for w in s["widths"] for b in s["batches"] for d in s["depths"]]


def memory_cap_gb(args) -> float:
    """``--max-memory-gb``, by default 8 GB or half of the machine's memory if less."""
    if args.max_memory_gb is not None:
        return args.max_memory_gb
    limit = memory_limit()
    return DEFAULT_MEMORY_GB if limit is None else min(DEFAULT_MEMORY_GB, limit / 2**30)


def preflight(args) -> str | None:
    """Why the bench cannot run as asked (bad ``--out``, no case fits), or ``None``."""
    problem = out_folder_problem(args.out)
    if problem:
        return problem
    cap = memory_cap_gb(args) * 2**30
    sizes = sorted((case_memory(d, w, b), w, b, d) for w, b, d in _cases(_settings(args)))
    fitting = [c for c in sizes if c[0] <= cap]
    if not fitting:
        need, w, b, d = sizes[0]
        return (
            f"no case fits in --max-memory-gb {cap / 2**30:.3g}: the smallest (width {w}, "
            f"batch {b}, depth {d}) needs about {fmt_bytes(need)}; pass smaller --depths "
            "or --batches"
        )
    need, w, b, d = fitting[-1]
    return memory_problem(
        need,
        f"the bench case width {w}, batch {b}, depth {d}",
        "pass smaller --depths or --batches, or a smaller --max-memory-gb to skip such cases",
    )


def _predicted(last: dict | None, depth: int, keys) -> float:
    """Time predicted at ``depth`` from the last measured case (linear in depth)."""
    if last is None:
        return 0.0
    total = sum(last.get(k) or 0.0 for k in keys)
    return total * depth / last["depth"]


def run(args, rep) -> int:
    s = _settings(args)
    if not args.no_figures:
        require_matplotlib()
    t_start = time.perf_counter()
    s["max_memory_gb"] = memory_cap_gb(args)
    cases = _cases(s)
    rep.rule("blockops bench")
    rep.print(
        f"{len(cases)} cases: depths {s['depths']}, widths {s['widths']}, "
        f"batches {s['batches']}, λ = {args.damping:g}, backend {args.backend}"
    )
    warm_up_kernels(rep)  # not inside the first case's factor time
    records, skipped = _measure_cases(rep, cases, s, args)
    _scaling_table(rep, records, s, args)
    slopes = _slopes(records, s)
    _slope_table(rep, slopes)
    _report_problems(rep, records, skipped)
    written = _write_outputs(args, s, records, slopes, skipped)
    rep.print(f"wrote {', '.join(written)}")
    rep.print(f"bench finished in {time.perf_counter() - t_start:.1f} s", style="good")
    return EXIT_OK


# -- measuring ------------------------------------------------------------------------------
def _skip_reason(prev: dict | None, w: int, b: int, d: int, s: dict) -> tuple[str, str] | None:
    """``(reason for the JSON, word for the progress line)`` when the case is skipped."""
    if case_memory(d, w, b) > s["max_memory_gb"] * 2**30:
        return f"memory estimate > {s['max_memory_gb']:g} GB", "memory"
    if _predicted(prev, d, EXACT_KEYS) > s["case_time_cap"]:
        return f"predicted > {s['case_time_cap']:g} s", "time cap"
    return None


def _measure_cases(rep, cases, s: dict, args) -> tuple[list, list]:
    records, skipped = [], []
    last: dict[tuple, dict] = {}  # last measured case per (width, batch)
    last_minres: dict[tuple, dict] = {}  # last case with MINRES; absent once MINRES stopped
    with rep.progress(len(cases), "benchmark") as prog:
        for w, b, d in cases:
            label = f"width {w}, batch {b}, depth {d}"
            skip = _skip_reason(last.get((w, b)), w, b, d, s)
            if skip:
                skipped.append({"width": w, "batch": b, "depth": d, "reason": skip[0]})
                prog.advance(f"{label}: skipped ({skip[1]})")
                continue
            rec = _measure(w, b, d, s, args, last, last_minres)
            records.append(rec)
            t_exact = (rec.get("factor") or 0.0) + (rec.get("solve") or 0.0)
            prog.advance(f"{label}: factor+solve {fmt_time(t_exact)}")
    return records, skipped


def _measure(w, b, d, s: dict, args, last: dict, last_minres: dict) -> dict:
    """One case; MINRES only while its predicted time stays under ``--minres-time-cap``."""
    prev, mprev = last.get((w, b)), last_minres.get((w, b))
    run_minres = (prev is None or mprev is not None) and (
        _predicted(mprev, d, ("minres",)) <= s["minres_time_cap"]
    )
    rec = measure_case(
        d,
        w,
        b,
        args.damping,
        seed=args.seed,
        backend=args.backend,
        repeat=s["repeat"],
        minres=run_minres,
        minres_tol=args.minres_tol,
        minres_maxiter=s["minres_maxiter"],
        minres_time=s["minres_time_cap"],
    )
    last[(w, b)] = rec
    if run_minres:
        last_minres[(w, b)] = rec
    else:
        rec["minres_skipped"] = f"predicted > {s['minres_time_cap']:g} s"
        last_minres.pop((w, b), None)
    return rec


# -- reporting --------------------------------------------------------------------------------
def _scaling_row(r: dict) -> list:
    return [
        r["width"],
        r["batch"],
        r["depth"],
        f"{r['n_params']:,}",
        fmt_time(r["gradient"]),
        fmt_time(r["hvp"]),
        fmt_time(r.get("factor")),
        fmt_time(r.get("solve")),
        fmt_float(r.get("residual")),
        fmt_time(r.get("minres")),
        str(r.get("minres_iterations", "-")),
        fmt_float(r.get("minres_residual")),
    ]


def _scaling_table(rep, records: list, s: dict, args) -> None:
    rep.table(
        f"Scaling (λ = {args.damping:g}, best of {s['repeat']}, backend {args.backend})",
        SCALING_COLUMNS,
        [_scaling_row(r) for r in records],
        caption=f"MINRES: relative tolerance {args.minres_tol:g}, at most "
        f"{s['minres_maxiter']} iterations or {s['minres_time_cap']:g} s of HVPs; 'solve' "
        "includes one refinement step and the residual check (2 HVPs); residuals "
        "recomputed here with the fused HVP.",
    )


def _slopes(records: list, s: dict) -> list[dict]:
    slopes = []
    for w in s["widths"]:
        for b in s["batches"]:
            rs = [r for r in records if r["width"] == w and r["batch"] == b]
            fits = {
                k: fit_slope([r["depth"] for r in rs], [r.get(k) for r in rs])
                for k, _ in QUANTITIES
            }
            slopes.append({"width": w, "batch": b, **fits})
    return slopes


def _slope_table(rep, slopes: list[dict]) -> None:
    rep.table(
        "Fitted slopes of log time against log depth (1 = linear)",
        ["width", "batch", *[lab for _, lab in QUANTITIES]],
        [
            [sl["width"], sl["batch"], *[fmt_float(sl[k], 2) for k, _ in QUANTITIES]]
            for sl in slopes
        ],
    )


def _report_problems(rep, records: list, skipped: list) -> None:
    if skipped:
        rep.print(
            "skipped: "
            + "; ".join(
                f"w{c['width']} b{c['batch']} d{c['depth']} ({c['reason']})" for c in skipped
            ),
            style="dim",
        )
    for r in records:
        if r.get("error"):
            rep.print(
                f"width {r['width']} batch {r['batch']} depth {r['depth']}: {r['error']}",
                style="bad",
            )


def _write_outputs(args, s: dict, records: list, slopes: list, skipped: list) -> list[str]:
    os.makedirs(args.out, exist_ok=True)
    payload = {
        "settings": {
            **s,
            "damping": args.damping,
            "minres_tol": args.minres_tol,
            "seed": args.seed,
            "backend": args.backend,
            "quick": args.quick,
        },
        "records": records,
        "slopes": slopes,
        "skipped": skipped,
    }
    written = [write_json(os.path.join(args.out, "bench.json"), payload)]
    if not args.no_figures and records:
        written.append(
            plot_scaling(
                records,
                QUANTITIES,
                os.path.join(args.out, "bench_scaling.png"),
                f"blockops scaling (λ = {args.damping:g}, {args.backend})",
            )
        )
    return written
