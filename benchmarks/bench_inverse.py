"""Benchmark: exact ``(H + λI)⁻¹ g`` vs the fused HVP, MINRES and a dense solve.

Width-16 tanh dense nets with an MSE loss, batch 1 / 4 / 32, depth
64 / 256 / 1024 / 4096, ``λ = 1e-3``. Per case: factor time, solve time (one
solve including one refinement step), one fused HVP, the relative residual
certificate; SciPy MINRES driven by the fused HVP to relative residual 1e-8
(iterations, time, true residual; capped); a dense ``numpy.linalg.solve`` on
the Hessian built column by column where it fits (depth 16 only).

Run ``python benchmarks/bench_inverse.py [--quick]`` for the table, or
``python -m pytest benchmarks/bench_inverse.py --benchmark-only``.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

from blockops.cli.problem import best_time
from blockops.hessian import hessian, hvp
from blockops.inverse import inverse_hessian
from blockops.network import Dense, MSELoss, Pipeline

WIDTH, DAMPING = 16, 1e-3
MAX_DEPTH_TIMES_BATCH = 32768


def make_point(depth, batch, width=WIDTH, seed=0):
    net = Pipeline([Dense(width, width, "tanh") for _ in range(depth)] + [MSELoss()])
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, width))
    y = rng.standard_normal((batch, width))
    return net, net.linearize(net.init(seed=seed), X, y)


def bench_case(depth, batch, minres_cap=2000, minres=True, dense=False, repeat=3, threads=1):
    from scipy.sparse.linalg import minres as sp_minres

    net, pt = make_point(depth, batch)
    n = net.n_params
    g = np.random.default_rng(1).standard_normal(n)
    row = {"depth": depth, "batch": batch, "n": n}
    with threadpool_limits(1):
        row["hvp_s"], _ = best_time(lambda: hvp(pt, g), repeat)
    t_fac, Hi = best_time(
        lambda: inverse_hessian(pt, damping=DAMPING, refine=1, check=False, threads=threads),
        repeat if depth * batch <= 4096 else 1,
    )
    row["method"] = Hi.method
    row["factor_s"] = t_fac
    row["solve_s"], x = best_time(lambda: Hi.solve(g), repeat)
    row["total_s"] = row["factor_s"] + row["solve_s"]
    row["total_over_hvp"] = row["total_s"] / row["hvp_s"]
    row["residual"] = float(Hi.residual(g, x))
    Hi0 = inverse_hessian(pt, damping=DAMPING, refine=0, check=False, threads=threads)
    row["residual_unrefined"] = float(Hi0.residual(g, Hi0.solve(g)))
    if minres:
        A = hessian(pt, damping=DAMPING)
        count = [0]
        with threadpool_limits(1):
            t = time.perf_counter()
            xm, _ = sp_minres(
                A,
                g,
                rtol=1e-8,
                maxiter=minres_cap,
                callback=lambda xk: count.__setitem__(0, count[0] + 1),
            )
            row["minres_s"] = time.perf_counter() - t
        row["minres_iters"] = count[0]
        row["minres_capped"] = count[0] >= minres_cap
        row["minres_residual"] = float(Hi.residual(g, xm))
        row["speedup_vs_minres"] = row["minres_s"] / row["total_s"]
    if dense:
        t = time.perf_counter()
        Hd = hvp(pt, np.eye(n)) + DAMPING * np.eye(n)
        xd = np.linalg.solve(Hd, g)
        row["dense_s"] = time.perf_counter() - t
        row["dense_residual"] = float(Hi.residual(g, xd))
    return row


def run(quick: bool = False, verbose: bool = False) -> list[dict]:
    """All cases (``quick``: small depths, batch 1 and 4, short MINRES)."""
    rows = []
    if quick:
        grid = [(64, 1), (256, 1), (64, 4), (256, 4)]
        cap = 300
    else:
        grid = [(d, b) for b in (1, 4, 32) for d in (64, 256, 1024, 4096)]
        cap = 2000
    for depth, batch in grid:
        if depth * batch > MAX_DEPTH_TIMES_BATCH:
            continue  # batch 32 at depth 4096 stores ~7 GB of stage gains: skipped
        big = depth * batch > 8192
        rows.append(
            bench_case(
                depth,
                batch,
                minres_cap=cap,
                minres=depth <= 256 and batch <= 4,
                repeat=1 if big else 3,
            )
        )
        if verbose:
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    for batch in (1, 4):
        rows.append(bench_case(16, batch, minres=False, dense=True, repeat=1))
    return rows


COLUMNS = [
    ("depth", "{}"),
    ("batch", "{}"),
    ("n", "{}"),
    ("method", "{}"),
    ("hvp_s", "{:.4f}"),
    ("factor_s", "{:.4f}"),
    ("solve_s", "{:.4f}"),
    ("total_over_hvp", "{:.2f}"),
    ("residual", "{:.1e}"),
    ("residual_unrefined", "{:.1e}"),
    ("minres_iters", "{}"),
    ("minres_s", "{:.3f}"),
    ("minres_residual", "{:.1e}"),
    ("speedup_vs_minres", "{:.0f}"),
    ("dense_s", "{:.2f}"),
    ("dense_residual", "{:.1e}"),
]


def table(rows) -> str:
    head = " | ".join(c for c, _ in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(" | ".join(f.format(r[c]) if c in r else "-" for c, f in COLUMNS))
    return "\n".join(lines)


# -- pytest-benchmark -----------------------------------------------------------
def test_factor_solve_batch1_depth256(benchmark):
    _, pt = make_point(256, 1)
    g = np.random.default_rng(1).standard_normal(pt.gradient.shape[0])

    def go():
        return inverse_hessian(pt, damping=DAMPING, check=False).solve(g)

    x = benchmark(go)
    assert np.all(np.isfinite(x))


def test_fused_hvp_batch1_depth256(benchmark):
    _, pt = make_point(256, 1)
    g = np.random.default_rng(1).standard_normal(pt.gradient.shape[0])
    benchmark(lambda: hvp(pt, g))


def test_factor_solve_batch4_depth64(benchmark):
    _, pt = make_point(64, 4)
    g = np.random.default_rng(1).standard_normal(pt.gradient.shape[0])
    benchmark(lambda: inverse_hessian(pt, damping=DAMPING, check=False).solve(g))


if __name__ == "__main__":
    print(table(run(quick="--quick" in sys.argv, verbose=True)))
