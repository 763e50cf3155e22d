"""Benchmark: exact ``(H + λI)⁻¹ g`` vs the fused HVP, MINRES and a dense solve.

Width-16 tanh dense nets with an MSE loss, ``λ = 1e-3``, float64, one BLAS
thread. Per case: one fused HVP; the factorisation; one solve with one
refinement step (``refine=1, check=False``: two sweeps and one HVP); a
repeated solve with the stored factor (``refine=0``); ``(factor + solve) /
HVP``; the relative residual; bytes per layer the dense stages keep after
factoring; SciPy MINRES driven by the fused HVP to relative residual 1e-8
(iterations, time, true residual; capped); a dense ``numpy.linalg.solve`` on
the Hessian built column by column where it fits (depth 16).

The issue's table (depth 64 / 256 / 1024 / 4096 at batch 1, 256 / 1024 at
batch 4)::

    OMP_NUM_THREADS=1 python benchmarks/bench_inverse.py

Options: ``--quick`` (depths 64 / 256, short MINRES), ``--all`` (adds batch
32), ``--compare`` (each case by the array path and by the compiled sweeps
of :mod:`blockops.network.dense_stage_jit`, timed alternately in one run),
``--cold`` (also time a cold numba compile in a subprocess with an empty
cache), ``--no-minres``. The first factor and solve of the process (numba
compile, or a load from its cache) is timed once and reported, not counted.
``python -m pytest benchmarks/bench_inverse.py --benchmark-only`` runs the
pytest-benchmark cases.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from threadpoolctl import threadpool_limits

from blockops.hessian import hessian, hvp
from blockops.inverse import inverse_hessian
from blockops.network import Dense, MSELoss, Pipeline
from blockops.network.dense_stage import DenseSegment
from blockops.network.dense_stage_jit import available, compiled

WIDTH, DAMPING = 16, 1e-3
MAX_DEPTH_TIMES_BATCH = 32768
ISSUE_GRID = [(64, 1), (256, 1), (1024, 1), (4096, 1), (256, 4), (1024, 4)]
QUICK_GRID = [(64, 1), (256, 1), (64, 4), (256, 4)]


def make_point(depth, batch, width=WIDTH, seed=0):
    net = Pipeline([Dense(width, width, "tanh") for _ in range(depth)] + [MSELoss()])
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, width))
    y = rng.standard_normal((batch, width))
    return net, net.linearize(net.init(seed=seed), X, y)


def best_times(fns: dict, repeat: int, budget: float = 3.0) -> dict:
    """Best wall-clock time of each callable, the callables interleaved round by round."""
    best = dict.fromkeys(fns, math.inf)
    spent = 0.0
    for _ in range(max(1, repeat)):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
            best[key], spent = min(best[key], t), spent + t
        if spent >= budget:
            break
    return best


def stored_bytes(stage) -> int:
    """Bytes of the arrays a stage keeps (each buffer once, views count their base)."""
    seen, total = set(), 0

    def visit(obj, depth=0):
        nonlocal total
        if isinstance(obj, np.ndarray):
            root = obj
            while isinstance(root.base, np.ndarray):
                root = root.base
            if id(root) not in seen:
                seen.add(id(root))
                total += root.nbytes
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                visit(x, depth)
        elif isinstance(obj, dict):
            for x in obj.values():
                visit(x, depth)
        elif depth < 3 and type(obj).__module__.startswith("blockops") and hasattr(obj, "__dict__"):
            for key, x in vars(obj).items():
                if key != "layers":
                    visit(x, depth + 1)

    visit(stage)
    return total


def bytes_per_layer(Hi) -> float:
    segs = [st for st in Hi._factor.stages if isinstance(st, DenseSegment)]
    return sum(stored_bytes(s) for s in segs) / max(1, sum(s.nlayers for s in segs))


def first_call(depth=8, batch=1) -> float:
    """Seconds of the first factor + solve of the process (numba compile or cache load)."""
    net, pt = make_point(depth, batch)
    g = np.ones(net.n_params)
    t0 = time.perf_counter()
    for dt in (np.float64, np.float32):
        Hi = inverse_hessian(pt.astype(dt), damping=DAMPING, refine=0, check=False)
        Hi.solve(g.astype(dt))
    return time.perf_counter() - t0


def cold_compile() -> float:
    """First call in a fresh process with an empty numba cache (the once-per-machine cost)."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import bench_inverse; "
    code += "print(bench_inverse.first_call())"
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else float("nan")


def bench_case(
    depth, batch, minres_cap=2000, minres=True, dense=False, repeat=5, threads=1, paths=("",)
):
    """Rows for one case: one per path (``""``: default; ``"array"`` / ``"compiled"``)."""
    from scipy.sparse.linalg import minres as sp_minres

    net, pt = make_point(depth, batch)
    n = net.n_params
    g = np.random.default_rng(1).standard_normal(n)
    common = {"depth": depth, "batch": batch, "n": n}
    with threadpool_limits(1):
        common["hvp_s"] = best_times({"h": lambda: hvp(pt, g)}, repeat)["h"]
    ops = {}

    def factor(path, refine):
        def go():
            return inverse_hessian(pt, damping=DAMPING, refine=refine, check=False, threads=threads)

        if not path:
            return go()
        with compiled(path == "compiled"):
            return go()

    for path in paths:  # warm: the first factor of a shape pays page faults
        factor(path, 1).solve(g)
    reps = repeat if depth * batch <= 4096 else max(2, repeat // 2)
    # timed before the factors the solves use exist: at batch 32 each holds 1.7 GB, and
    # a factor made beside two others paid twice the page faults (depth 1024: 14 s vs 7 s)
    t_fac = best_times({p: (lambda p=p: factor(p, 1)) for p in paths}, reps)
    for path in paths:
        ops[path] = (factor(path, 1), factor(path, 0))
    t_sol = best_times({p: (lambda p=p: ops[p][0].solve(g)) for p in paths}, reps)
    t_sol0 = best_times({p: (lambda p=p: ops[p][1].solve(g)) for p in paths}, reps)
    rows = []
    for path in paths:
        Hi, Hi0 = ops[path]
        row = dict(common)
        row["path"] = path or ("compiled" if Hi._factor.stages[0]._jit is not None else "array")
        row["method"] = Hi.method
        row["factor_s"], row["solve_s"], row["solve0_s"] = t_fac[path], t_sol[path], t_sol0[path]
        row["total_s"] = row["factor_s"] + row["solve_s"]
        row["total_over_hvp"] = row["total_s"] / row["hvp_s"]
        row["solve0_over_hvp"] = row["solve0_s"] / row["hvp_s"]
        row["residual"] = float(Hi.residual(g, Hi.solve(g)))
        row["residual_unrefined"] = float(Hi0.residual(g, Hi0.solve(g)))
        row["bytes_per_layer"] = bytes_per_layer(Hi)
        rows.append(row)
    extra = {}
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
            extra["minres_s"] = time.perf_counter() - t
        extra["minres_iters"] = count[0]
        extra["minres_capped"] = count[0] >= minres_cap
        extra["minres_residual"] = float(ops[paths[0]][0].residual(g, xm))
    if dense:
        t = time.perf_counter()
        Hd = hvp(pt, np.eye(n)) + DAMPING * np.eye(n)
        xd = np.linalg.solve(Hd, g)
        extra["dense_s"] = time.perf_counter() - t
        extra["dense_residual"] = float(ops[paths[0]][0].residual(g, xd))
    for row in rows:
        row.update(extra)
        if "minres_s" in row:
            row["speedup_vs_minres"] = row["minres_s"] / row["total_s"]
    return rows


def run(
    quick: bool = False,
    full: bool = False,
    compare: bool = False,
    minres: bool = True,
    verbose: bool = False,
) -> list[dict]:
    """The issue's cases (``quick``: small depths, short MINRES; ``full``: also batch 32)."""
    rows = []
    paths = ("array", "compiled") if compare and available() else ("",)
    grid, cap = (QUICK_GRID, 300) if quick else (list(ISSUE_GRID), 2000)
    if full and not quick:
        grid += [(d, 32) for d in (64, 256, 1024, 4096)]
    for depth, batch in grid:
        if depth * batch > MAX_DEPTH_TIMES_BATCH:
            continue  # batch 32 at depth 4096 stores ~7 GB of stage gains: skipped
        big = depth * batch > 8192
        new = bench_case(
            depth,
            batch,
            minres_cap=cap,
            minres=minres and batch <= 4,
            repeat=3 if big else 7,
            paths=paths,
        )
        rows += new
        if verbose:
            for line in table(new).splitlines()[2:]:
                print(line, flush=True)
    for batch in (1, 4):
        rows += bench_case(16, batch, minres=False, dense=True, repeat=3, paths=paths)
    return rows


COLUMNS = [
    ("depth", "{}"),
    ("batch", "{}"),
    ("n", "{}"),
    ("path", "{}"),
    ("hvp_s", "{:.4f}"),
    ("factor_s", "{:.4f}"),
    ("solve_s", "{:.4f}"),
    ("total_s", "{:.4f}"),
    ("total_over_hvp", "{:.2f}"),
    ("solve0_over_hvp", "{:.2f}"),
    ("residual", "{:.1e}"),
    ("residual_unrefined", "{:.1e}"),
    ("bytes_per_layer", "{:.0f}"),
    ("minres_iters", "{}"),
    ("minres_s", "{:.2f}"),
    ("minres_residual", "{:.1e}"),
    ("speedup_vs_minres", "{:.0f}"),
    ("dense_s", "{:.2f}"),
    ("dense_residual", "{:.1e}"),
]


def table(rows, columns=COLUMNS) -> str:
    """Rows as a ``|``-separated table of ``(key, format)`` columns ("-" where absent)."""
    head = " | ".join(c for c, _ in columns)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(" | ".join(f.format(r[c]) if c in r else "-" for c, f in columns))
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


def test_repeated_solve_batch1_depth256(benchmark):
    _, pt = make_point(256, 1)
    g = np.random.default_rng(1).standard_normal(pt.gradient.shape[0])
    Hi = inverse_hessian(pt, damping=DAMPING, refine=0, check=False)
    benchmark(lambda: Hi.solve(g))


def main(argv) -> None:
    compare = "--compare" in argv
    print(f"numba sweeps: {'available' if available() else 'absent (array path)'}", flush=True)
    if available() and "--cold" in argv:
        print(f"cold compile (empty cache, float64 + float32): {cold_compile():.1f} s", flush=True)
    print(f"first factor + solve of this process (not counted): {first_call():.2f} s", flush=True)
    rows = run(
        quick="--quick" in argv,
        full="--all" in argv,
        compare=compare,
        minres="--no-minres" not in argv,
        verbose=True,
    )
    print()
    print(table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
