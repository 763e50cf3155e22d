"""Benchmark: ``solve_many`` on Dask against the serial ``Hinv @ G``.

Depth 256, batch 1, width-16 tanh dense net with an MSE loss (the points of
``bench_inverse.py``), ``λ = 1e-3``, float64, one BLAS thread per solve,
1000 right-hand sides. Times, best of ``--repeat``:

* serial ``Hinv @ G`` (one process, one thread);
* ``solve_many(scheduler="threads")`` with ``--workers`` threads;
* ``solve_many`` on a running ``LocalCluster`` of ``--workers``
  single-threaded processes (warm: the workers have imported blockops and
  solved once; each call ships the factor, scatters ``G`` and gathers ``X``);
* ``solve_many(client=None)`` once, cold: the cluster started, used and closed
  inside the call;

and the pickled size of the operator (what each worker receives once) and
of its factor alone. Every result is checked against the serial one
(largest relative column difference)::

    OMP_NUM_THREADS=1 python benchmarks/bench_dask.py [--depth 256 --batch 1 --k 1000]
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_inverse import DAMPING, make_point

from blockops.distributed import solve_many
from blockops.inverse import inverse_hessian


def best(fn, repeat):
    """Best wall time of ``repeat`` calls and the last result."""
    t, out = np.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        t = min(t, time.perf_counter() - t0)
    return t, out


def column_error(X, ref):
    """Largest relative difference of a column of ``X`` from ``ref``."""
    return float(np.max(np.linalg.norm(X - ref, axis=0) / np.linalg.norm(ref, axis=0)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--k", type=int, default=1000, help="right-hand sides")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    import distributed

    net, pt = make_point(args.depth, args.batch)
    Hi = inverse_hessian(pt, damping=DAMPING)
    G = np.random.default_rng(0).standard_normal((net.n_params, args.k))
    print(
        f"depth {args.depth}, batch {args.batch}, n = {net.n_params}, k = {args.k}, "
        f"{args.workers} workers, {os.cpu_count()} CPUs (load average "
        f"{os.getloadavg()[0]:.1f}), G {G.nbytes / 2**20:.0f} MiB"
    )
    print(
        f"pickled: operator {len(pickle.dumps(Hi)) / 2**20:.2f} MiB, factor "
        f"{len(pickle.dumps(Hi._factor)) / 2**20:.2f} MiB, point "
        f"{len(pickle.dumps(pt)) / 2**20:.2f} MiB; factor time {Hi.info['factor_time']:.3f} s"
    )
    rows = []
    with threadpool_limits(1):
        t, ref = best(lambda: Hi @ G, args.repeat)
    rows.append(("serial Hinv @ G", t, 0.0))
    t, X = best(
        lambda: solve_many(Hi, G, scheduler="threads", chunk=args.chunk, n_workers=args.workers),
        args.repeat,
    )
    rows.append((f"threads ({args.workers})", t, column_error(X, ref)))
    with (
        distributed.LocalCluster(
            n_workers=args.workers, threads_per_worker=1, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        solve_many(Hi, G[:, : args.workers], client=client, chunk=1)  # imports, numba load
        t, X = best(lambda: solve_many(Hi, G, client=client, chunk=args.chunk), args.repeat)
        rows.append((f"cluster ({args.workers} processes), warm", t, column_error(X, ref)))
    t, X = best(lambda: solve_many(Hi, G, chunk=args.chunk, n_workers=args.workers), 1)
    rows.append((f"client=None ({args.workers} processes), cold", t, column_error(X, ref)))
    for name, t, err in rows:
        print(f"{name:40s} {t:8.3f} s   max column rel. diff from serial {err:.1e}")


if __name__ == "__main__":
    main()
