"""Hessian-vector product cost relative to a gradient, fused (Pearlmutter) and literal (eq. 24).

Deep, narrow dense tanh pipelines (width 16) with an MSE loss, float64, batch
1 and 32, depth 64 to 4096, one BLAS thread. For each size:

* ``gradient``: ``Pipeline.gradient`` (forward + backprop), the unit of cost;
* ``fused``: :func:`blockops.hessian.hvp` at a linearised point (one forward
  ``jvp`` sweep and one backward sweep; the point's forward pass is reused,
  as in any Newton-Krylov loop);
* ``literal``: ``literal_hessian(point) @ v``, eq. 24 as pylops operator
  algebra (operator built once; build time reported separately). Its
  ``vec ∇_x f`` space has ``B · 16 · 272`` entries per layer, so it is
  skipped at batch 32 beyond depth 256 (over 0.3 GB per vector, several
  vectors and the explicit ``D_x`` in flight).

Aims: fused HVP <= 4x a gradient; literal <= 3x the fused HVP. Ratios are
reported, never asserted.

Fused HVP before/after the fused layer steps (``Dense.jvp_keep`` /
``Dense.hvp_vjp``: the backward step reuses the forward's pre-activation
derivative and pushes ``hvp`` and ``vjp`` through one adjoint, written in
place), minimum of 15 (depth 1024) or 5 (depth 4096) runs, one direction,
on a shared 2-core CPU (+-20 %)::

    batch depth   HVP before   HVP after   gradient (unchanged)
        1  1024      52.0 ms     35.3 ms    ~30 ms
       32  1024      82.5 ms     60.8 ms    ~54 ms
        1  4096     218.5 ms    156.5 ms   ~130 ms
       32  4096     323.7 ms    241.4 ms   ~220 ms

Then runs of square dense layers swept stacked (``blockops.network.dense_sweep``:
three array calls per layer and direction-independent terms batched over the
run), same machine, min of 5 runs (gradient in the same run)::

    batch depth   HVP     gradient   HVP / gradient
        1  1024   14.2 ms   35.9 ms   0.40
       32  1024   47.7 ms  109.1 ms   0.44
        1  4096   73.4 ms  273.1 ms   0.27
       32  4096  193.4 ms  416.2 ms   0.46

Run::

    python -m pytest benchmarks/bench_hvp.py --benchmark-only
    python benchmarks/bench_hvp.py [--quick]
"""

from __future__ import annotations

import sys
import time
from functools import partial

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from blockops.cli.problem import best_time
from blockops.hessian import hvp, literal_hessian
from blockops.network import Dense, MSELoss, Pipeline

WIDTH = 16
BATCHES = (1, 32)
DEPTHS = (64, 256, 1024, 4096)
LITERAL_MAX_ENTRIES = 40_000_000  # skip the literal form beyond this many vec ∇_x f entries


def make_case(depth: int, batch: int, width: int = WIDTH, seed: int = 0):
    net = Pipeline([Dense(width, width, "tanh") for _ in range(depth)] + [MSELoss()])
    rng = np.random.default_rng(seed)
    x = net.init(seed=seed)
    X = rng.standard_normal((batch, width))
    y = rng.standard_normal((batch, width))
    v = rng.standard_normal(net.n_params)
    return net, x, X, y, v


def literal_entries(depth: int, batch: int, width: int = WIDTH) -> int:
    return depth * batch * width * width * (width + 1)


def run(quick: bool = False) -> list[dict]:
    """One row per (batch, depth): seconds and ratios, plus the fused/literal agreement."""
    depths = (64, 256) if quick else DEPTHS
    rows = []
    with threadpool_limits(1):
        for batch in BATCHES:
            for depth in depths:
                repeat = 3 if quick or depth >= 1024 else 7
                net, x, X, y, v = make_case(depth, batch)
                t_grad = best_time(partial(net.gradient, x, X, y), repeat)[0]
                pt = net.linearize(x, X, y)
                hv = hvp(pt, v)
                t_fused = best_time(partial(hvp, pt, v), repeat)[0]
                row = {
                    "width": WIDTH,
                    "batch": batch,
                    "depth": depth,
                    "gradient_s": t_grad,
                    "fused_s": t_fused,
                    "fused_over_gradient": t_fused / t_grad,
                    "literal_build_s": None,
                    "literal_s": None,
                    "literal_over_fused": None,
                    "literal_vs_fused_rel": None,
                }
                if literal_entries(depth, batch) <= LITERAL_MAX_ENTRIES:
                    t = time.perf_counter()
                    H = literal_hessian(pt)
                    row["literal_build_s"] = time.perf_counter() - t
                    hl = H @ v
                    row["literal_vs_fused_rel"] = float(np.abs(hl - hv).max() / np.abs(hv).max())
                    row["literal_s"] = best_time(partial(H.matvec, v), max(1, repeat // 2))[0]
                    row["literal_over_fused"] = row["literal_s"] / t_fused
                rows.append(row)
    return rows


# -- pytest-benchmark ---------------------------------------------------------------
def _point(depth, batch):
    net, x, X, y, v = make_case(depth, batch)
    return net, x, X, y, v, net.linearize(x, X, y)


SIZES = [pytest.param(1024, 1, id="d1024-B1"), pytest.param(256, 32, id="d256-B32")]


@pytest.mark.parametrize("depth,batch", SIZES)
def test_bench_gradient(benchmark, depth, batch):
    net, x, X, y, _, _ = _point(depth, batch)
    with threadpool_limits(1):
        benchmark(net.gradient, x, X, y)


@pytest.mark.parametrize("depth,batch", SIZES)
def test_bench_hvp_fused(benchmark, depth, batch):
    *_, v, pt = _point(depth, batch)
    with threadpool_limits(1):
        benchmark(hvp, pt, v)


@pytest.mark.parametrize("depth,batch", SIZES)
def test_bench_hvp_literal(benchmark, depth, batch):
    *_, v, pt = _point(depth, batch)
    H = literal_hessian(pt)
    with threadpool_limits(1):
        benchmark(H.matvec, v)


def _fmt(val, spec):
    return "-" if val is None else format(val, spec)


if __name__ == "__main__":
    rows = run(quick="--quick" in sys.argv)
    head = (
        "batch",
        "depth",
        "grad s",
        "fused s",
        "fused/grad",
        "literal s",
        "lit/fused",
        "lit-fused",
    )
    print("{:>5s} {:>5s} {:>9s} {:>9s} {:>10s} {:>9s} {:>9s} {:>9s}".format(*head))
    for r in rows:
        print(
            f"{r['batch']:5d} {r['depth']:5d} {r['gradient_s']:9.4f} {r['fused_s']:9.4f} "
            f"{r['fused_over_gradient']:10.2f} {_fmt(r['literal_s'], '9.4f'):>9s} "
            f"{_fmt(r['literal_over_fused'], '9.2f'):>9s} "
            f"{_fmt(r['literal_vs_fused_rel'], '9.1e'):>9s}"
        )
