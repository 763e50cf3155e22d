"""Benchmark: the depth-partitioned exact solve on 1, 2, 4 MPI ranks, and a weak-scaling model.

Depth 1024, width 8, batch 1, tanh + MSE, ``λ = 1e-2`` (indefinite ``H + λI``),
float64, one BLAS thread per rank. Needs the ``mpi`` extra
(``pip install ".[mpi]"``)::

    OMP_NUM_THREADS=1 python benchmarks/bench_mpi.py

Measured, by launching this script under ``mpiexec -n R`` for ``R = 1, 2, 4``
(``--ranks``): the factorisation (local interiors, Schur blocks, reduced
system), one solve (one refinement step and the residual certificate, i.e.
two partitioned solves and two distributed HVPs), one distributed HVP, the
residual, and the bytes each rank sends. Measured in this process: the
per-rank compute of one range of ``--layers-per-rank`` layers in the middle
of the net (interior factor, condense / expand, the range sweeps), and the
reduced interface system of ``R − 1`` separators for ``R`` up to 1024
(synthetic blocks of the real size). Modelled: the weak-scaling table to
1024 ranks, communication at latency ``--latency`` (2 µs) and bandwidth
``--bandwidth`` (10 GB/s); see ``docs/distributed.rst``.

Options: ``--quick`` (depth 256), ``--json PATH`` (write the numbers).
Internal: ``--rank-run`` (the measurement each MPI rank runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WIDTH, BATCH, DAMPING = 8, 1, 1e-2


def make_point(depth, width=WIDTH, batch=BATCH, seed=0):
    from blockops.network import Dense, MSELoss, Pipeline

    net = Pipeline([Dense(width, width, "tanh") for _ in range(depth)] + [MSELoss()])
    rng = np.random.default_rng(seed)
    X, y = rng.standard_normal((batch, width)), rng.standard_normal((batch, width))
    return net.linearize(net.init(seed=seed), X, y)


def best(fn, repeat=3):
    """Best wall time of ``fn()`` over ``repeat`` calls and its last result."""
    out, t = None, math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        t = min(t, time.perf_counter() - t0)
    return t, out


# -- the measurement on each rank (under mpiexec) --------------------------------
def rank_run(depth):
    from mpi4py import MPI

    from blockops.distributed.mpi import DistributedInverseHessian

    comm = MPI.COMM_WORLD
    pt = make_point(depth)
    g = np.random.default_rng(1).standard_normal(pt.n_params)

    def factor():
        comm.Barrier()
        return DistributedInverseHessian(pt, DAMPING, comm)

    t_factor, Hinv = best(factor, 2)
    H = Hinv.hessian
    gd = H.distribute(g)

    def solve():
        comm.Barrier()
        return Hinv.solve(gd)

    def hvp():
        comm.Barrier()
        return H.matvec(gd)

    t_solve, _ = best(solve)
    t_hvp, _ = best(hvp)
    stats = comm.gather(
        {k: Hinv.info[k] for k in ("factor_bytes", "solve_bytes_per_rhs", "hvp_bytes_per_rhs")},
        root=0,
    )
    times = comm.gather((t_factor, t_solve, t_hvp), root=0)  # the slowest rank counts
    if comm.Get_rank() == 0:
        times = np.max(times, axis=0)
        row = {
            "ranks": comm.Get_size(),
            "depth": depth,
            "n_params": pt.n_params,
            "ranges": H.ranges,
            "factor_s": times[0],
            "solve_s": times[1],
            "hvp_s": times[2],
            "residual": Hinv.info["residual"],
            "max_bytes": {k: max(s[k] for s in stats) for k in stats[0]},
        }
        print("RESULT " + json.dumps(row), flush=True)


def launch(ranks, depth):
    """Run :func:`rank_run` under ``mpiexec -n ranks``; its result row."""
    here = Path(sys.executable).with_name("mpiexec")
    mpiexec = str(here) if here.exists() else shutil.which("mpiexec")
    if mpiexec is None:
        raise SystemExit("bench_mpi: no mpiexec; pip install '.[mpi]' (mpich, mpi4py, pylops-mpi)")
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True).stdout
    flags = ["--oversubscribe"] if "open mpi" in version.lower() else []
    cmd = [mpiexec, *flags, "-n", str(ranks), sys.executable, __file__, "--rank-run"]
    cmd += ["--depth", str(depth)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    if run.returncode or not lines:
        raise SystemExit(f"bench_mpi: {' '.join(cmd)} failed:\n{run.stdout}\n{run.stderr}")
    return json.loads(lines[-1][len("RESULT ") :])


# -- per-rank compute and the reduced system, measured in this process ------------
def per_rank_compute(layers_per_rank):
    """Compute of one middle range (separators on both sides), one process."""
    from blockops.distributed.partition import LocalKKT, RangeSweep

    pt = make_point(3 * layers_per_rank)
    l0, l1 = layers_per_rank, 2 * layers_per_rank
    t_factor, kkt = best(lambda: LocalKKT(pt, l0, l1, DAMPING), 2)
    sw = RangeSweep(pt, l0, l1)
    G = np.random.default_rng(2).standard_normal((kkt.n_local, 1))
    t_condense, (Y, _) = best(lambda: kkt.condense(G))
    s = np.zeros((kkt.n_left + kkt.n_right, 1))
    t_expand, _ = best(lambda: kkt.expand(Y, s))
    W = np.ascontiguousarray(G.T)
    g_in = np.zeros((1, BATCH, WIDTH))
    t_fwd, (_, state) = best(lambda: sw.forward(W, g_in))
    t_bwd, _ = best(lambda: sw.backward(state, g_in, np.empty_like(W)))
    t_push, _ = best(lambda: sw.push_tangent(g_in))
    return {
        "layers": layers_per_rank,
        "factor_s": t_factor,
        "inverse_s": t_condense + t_expand,  # one partitioned solve, local part
        "sweeps_s": 2 * (t_fwd + t_bwd),  # one distributed HVP, local part (each sweep twice)
        "hop_s": t_push,  # one boundary product per chain hop
        "bn": kkt.n_right,
    }


def reduced_costs(bn, ranks=(2, 4, 16, 64, 256, 1024)):
    """Factor and solve time of the interface system of ``R − 1`` separators of ``bn`` rows."""
    from blockops.distributed.partition import ReducedSystem

    rng = np.random.default_rng(3)
    out = {}
    for R in ranks:
        sizes = [(bn if r > 0 else 0, bn if r < R - 1 else 0) for r in range(R)]
        schurs = []
        for nl, nr in sizes:  # symmetric indefinite blocks with the real sizes
            A = rng.standard_normal((nl + nr, nl + nr))
            schurs.append(A + A.T + 4 * (nl + nr) * np.diag(rng.choice([-1.0, 1.0], nl + nr)))
        ranges = [(r, r + 1) for r in range(R)]
        t_f, red = best(lambda s=schurs, z=sizes, rg=ranges: ReducedSystem(s, z, float, np, rg), 2)
        ts = [rng.standard_normal((nl + nr, 1)) for nl, nr in sizes]
        t_s, _ = best(lambda r=red, t=ts: r.solve(t))
        out[R] = (t_f, t_s)
    return out


def model(comp, red, latency, bandwidth, ranks=(1, 4, 16, 64, 256, 1024)):
    """Weak scaling: ``comp['layers']`` layers per rank on ``R`` ranks; seconds per phase.

    Collectives are binomial trees (``ceil(log2 R)`` latencies, ``(R − 1) m``
    bytes through the root); each hop of the two HVP chains costs one latency,
    one ``B n`` message and one boundary product; the reduced system is
    factored and solved on rank 0 (measured, :func:`reduced_costs`). A solve
    is two partitioned solves (``refine=1``) and two HVPs (refinement and
    certificate), plus three small allreduces (input check, norms).
    """
    item, bn = 8, comp["bn"]
    rows = []
    for R in ranks:
        tree = math.ceil(math.log2(R)) if R > 1 else 0

        def tree_comm(m, R=R, tree=tree):  # gather or scatter of R messages of m bytes
            return tree * latency + (R - 1) * m / bandwidth

        rf, rs = red.get(R, (0.0, 0.0)) if R > 1 else (0.0, 0.0)
        hop = latency + bn * item / bandwidth
        factor_comm = tree_comm((2 * bn) ** 2 * item) + 2 * tree * latency  # + error allgathers
        solve_comm = 2 * 2 * tree_comm(2 * bn * item) + 2 * 2 * (R - 1) * hop + 3 * tree * latency
        solve = (
            2 * (comp["inverse_s"] + rs)
            + 2 * (comp["sweeps_s"] + 2 * (R - 1) * comp["hop_s"])
            + solve_comm
        )
        rows.append(
            {
                "ranks": R,
                "depth": R * comp["layers"],
                "factor_s": comp["factor_s"] + rf + factor_comm,
                "reduced_factor_s": rf,
                "solve_s": solve,
                "reduced_solve_s": 2 * rs,
                "solve_comm_s": solve_comm,
            }
        )
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--depth", type=int, default=1024)
    ap.add_argument("--layers-per-rank", type=int, default=256)
    ap.add_argument("--latency", type=float, default=2e-6)
    ap.add_argument("--bandwidth", type=float, default=10e9)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--rank-run", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.depth, args.layers_per_rank = 256, 64
    if args.rank_run:
        rank_run(args.depth)
        return
    from threadpoolctl import threadpool_limits

    from blockops.inverse import inverse_hessian

    results = {"measured": [], "settings": vars(args)}
    print(f"depth {args.depth}, width {WIDTH}, batch {BATCH}, damping {DAMPING}, float64")
    print(
        f"{'ranks':>5} {'factor s':>9} {'solve s':>8} {'HVP ms':>7} {'residual':>9}  max bytes sent"
    )
    for R in args.ranks:
        row = launch(R, args.depth)
        results["measured"].append(row)
        print(
            f"{R:>5} {row['factor_s']:9.3f} {row['solve_s']:8.3f} {1e3 * row['hvp_s']:7.2f} "
            f"{row['residual']:9.1e}  {row['max_bytes']}"
        )
    with threadpool_limits(1):
        pt = make_point(args.depth)
        t_serial, Hinv = best(lambda: inverse_hessian(pt, damping=DAMPING), 2)
        t_ssolve, _ = best(lambda: Hinv @ pt.gradient)
        print(
            f"serial inverse_hessian (stagewise sweep, {Hinv.method}): factor {t_serial:.3f} s, "
            f"solve {t_ssolve:.4f} s, inertia {Hinv.inertia}"
        )
        comp = per_rank_compute(args.layers_per_rank)
        red = reduced_costs(comp["bn"])
    results.update(per_rank=comp, reduced={str(k): v for k, v in red.items()})
    print(f"per-rank compute, {comp['layers']} layers (one middle range): {comp}")
    print("reduced system (factor s, solve s) by ranks:", {k: red[k] for k in red})
    rows = model(comp, red, args.latency, args.bandwidth)
    results["model"] = rows
    print(
        f"weak scaling model, {comp['layers']} layers per rank, latency "
        f"{args.latency * 1e6:g} us, bandwidth {args.bandwidth / 1e9:g} GB/s"
    )
    head = ("ranks", "depth", "factor s", "reduced", "solve ms", "reduced", "comm")
    print("{:>5} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}".format(*head))
    for r in rows:
        print(
            f"{r['ranks']:>5} {r['depth']:>7} {r['factor_s']:9.3f} {r['reduced_factor_s']:9.4f} "
            f"{1e3 * r['solve_s']:9.2f} {1e3 * r['reduced_solve_s']:9.2f} "
            f"{1e3 * r['solve_comm_s']:9.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
