"""``python -m blockops bench``: time against depth, width and batch.

For every width and batch, depths run in increasing order through
:func:`blockops.cli.problem.measure_case` (gradient, fused HVP, exact factor
and solve with the recomputed residual, MINRES to ``--minres-tol``). A depth
whose predicted time (the last measured time, scaled linearly in depth)
exceeds ``--case-time-cap`` is skipped and listed; MINRES gets at most
``--minres-time-cap`` seconds' worth of HVPs as iterations and stops at larger
depths once predicted to exceed that. Results: a table, slopes
of log time against log depth, ``bench.json`` and ``bench_scaling.png`` in
``--out``.
"""

from __future__ import annotations

import os
import time

from . import EXIT_OK
from .problem import measure_case
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


def _settings(args) -> dict:
    base = QUICK if args.quick else FULL
    return {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}


def memory_estimate(depth: int, width: int, batch: int) -> float:
    """Bytes the exact factorisation keeps, roughly: one ``(B a + a)²`` float64 block per layer.

    (The stagewise sweep stores per-layer gains and value matrices of the size of
    the stage; batch 32 at width 16 and depth 4096 needs several GB.)
    """
    m = batch * width + width
    return 8.0 * depth * m * m


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
    cases = [(w, b, d) for w in s["widths"] for b in s["batches"] for d in s["depths"]]
    rep.rule("blockops bench")
    rep.print(
        f"{len(cases)} cases: depths {s['depths']}, widths {s['widths']}, "
        f"batches {s['batches']}, λ = {args.damping:g}, backend {args.backend}"
    )
    records, skipped = [], []
    last: dict[tuple, dict] = {}  # last measured case per (width, batch)
    last_minres: dict[tuple, dict] = {}  # last case with MINRES; absent once MINRES stopped
    with rep.progress(len(cases), "benchmark") as prog:
        for w, b, d in cases:
            prev = last.get((w, b))
            label = f"width {w}, batch {b}, depth {d}"
            if memory_estimate(d, w, b) > args.max_memory_gb * 2**30:
                skipped.append(
                    {
                        "width": w,
                        "batch": b,
                        "depth": d,
                        "reason": f"memory estimate > {args.max_memory_gb:g} GB",
                    }
                )
                prog.advance(f"{label}: skipped (memory)")
                continue
            if _predicted(prev, d, ("gradient", "hvp", "factor", "solve")) > s["case_time_cap"]:
                skipped.append(
                    {
                        "width": w,
                        "batch": b,
                        "depth": d,
                        "reason": f"predicted > {s['case_time_cap']:g} s",
                    }
                )
                prog.advance(f"{label}: skipped (time cap)")
                continue
            mprev = last_minres.get((w, b))
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
            if not run_minres:
                rec["minres_skipped"] = f"predicted > {s['minres_time_cap']:g} s"
            records.append(rec)
            last[(w, b)] = rec
            if run_minres:
                last_minres[(w, b)] = rec
            else:
                last_minres.pop((w, b), None)
            t_exact = (rec.get("factor") or 0.0) + (rec.get("solve") or 0.0)
            prog.advance(f"{label}: factor+solve {fmt_time(t_exact)}")

    rep.table(
        f"Scaling (λ = {args.damping:g}, best of {s['repeat']}, backend {args.backend})",
        [
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
        ],
        [
            [
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
            for r in records
        ],
        caption=f"MINRES: relative tolerance {args.minres_tol:g}, at most "
        f"{s['minres_maxiter']} iterations or {s['minres_time_cap']:g} s of HVPs; 'solve' "
        "includes one refinement step and the residual check (2 HVPs); residuals "
        "recomputed here with the fused HVP.",
    )
    slopes = []
    for w in s["widths"]:
        for b in s["batches"]:
            rs = [r for r in records if r["width"] == w and r["batch"] == b]
            slopes.append(
                {
                    "width": w,
                    "batch": b,
                    **{
                        k: fit_slope([r["depth"] for r in rs], [r.get(k) for r in rs])
                        for k, _ in QUANTITIES
                    },
                }
            )
    rep.table(
        "Fitted slopes of log time against log depth (1 = linear)",
        ["width", "batch", *[lab for _, lab in QUANTITIES]],
        [
            [sl["width"], sl["batch"], *[fmt_float(sl[k], 2) for k, _ in QUANTITIES]]
            for sl in slopes
        ],
    )
    if skipped:
        rep.print(
            "skipped: "
            + "; ".join(
                f"w{c['width']} b{c['batch']} d{c['depth']} ({c['reason']})" for c in skipped
            ),
            style="dim",
        )
    errors = [r for r in records if r.get("error")]
    for r in errors:
        rep.print(
            f"width {r['width']} batch {r['batch']} depth {r['depth']}: {r['error']}", style="bad"
        )

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
    rep.print(f"wrote {', '.join(written)}")
    rep.print(f"bench finished in {time.perf_counter() - t_start:.1f} s", style="good")
    return EXIT_OK
