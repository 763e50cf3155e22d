"""Gradient of a deep, narrow pipeline: blockops backprop vs ``jax.jit(jax.grad(loss))`` on CPU.

Width 16, batch 32, depth 256 dense tanh layers with an MSE loss, float64.
JAX is timed after warm-up (compilation excluded). blockops runs with one BLAS
thread (per-layer matrices are small). Run::

    python -m pytest benchmarks/bench_gradient.py --benchmark-only
    python benchmarks/bench_gradient.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from blockops.cli.problem import best_time
from blockops.network import Dense, MSELoss, Pipeline

WIDTH, BATCH, DEPTH = 16, 32, 256


def make_case(width=WIDTH, batch=BATCH, depth=DEPTH, seed=0):
    layers = [Dense(width, width, "tanh") for _ in range(depth)] + [MSELoss()]
    net = Pipeline(layers)
    rng = np.random.default_rng(seed)
    x = net.init(seed=seed)
    X = rng.standard_normal((batch, width))
    y = rng.standard_normal((batch, width))
    return net, x, X, y


def jax_gradient(net, X, y):
    """Jitted JAX gradient of the same loss (the independent test reference)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import jax
    import jax.numpy as jnp
    import reference as R

    fn = jax.jit(jax.grad(R.loss_fn(net.spec(), jnp.asarray(X), jnp.asarray(y))))
    return lambda x: fn(x).block_until_ready()


def run(quick: bool = False) -> list[dict]:
    """Time both gradients; one row per method with the ratio to JAX."""
    import jax.numpy as jnp

    depth = 64 if quick else DEPTH
    repeat = 5 if quick else 20
    net, x, X, y = make_case(depth=depth)
    jg = jax_gradient(net, X, y)
    xj = jnp.asarray(x)
    g_ref = np.asarray(jg(xj))  # warm-up (compile)
    t_jax = best_time(lambda: jg(xj), repeat)[0]
    rows = [
        {
            "method": "jax.jit(jax.grad)",
            "depth": depth,
            "width": WIDTH,
            "batch": BATCH,
            "seconds": t_jax,
            "ratio_to_jax": 1.0,
            "max_rel_err": 0.0,
        }
    ]
    with threadpool_limits(1):
        for method in ("vjp", "bidiagonal"):
            g = net.gradient(x, X, y, method=method)
            err = float(np.abs(g - g_ref).max() / np.abs(g_ref).max())
            t = best_time(lambda m=method: net.gradient(x, X, y, method=m), repeat)[0]
            rows.append(
                {
                    "method": f"blockops ({method})",
                    "depth": depth,
                    "width": WIDTH,
                    "batch": BATCH,
                    "seconds": t,
                    "ratio_to_jax": t / t_jax,
                    "max_rel_err": err,
                }
            )
    return rows


# -- pytest-benchmark -----------------------------------------------------------------
def _case():
    return make_case()


def test_bench_gradient_vjp(benchmark):
    net, x, X, y = _case()
    with threadpool_limits(1):
        benchmark(net.gradient, x, X, y, method="vjp")


def test_bench_gradient_bidiagonal(benchmark):
    net, x, X, y = _case()
    with threadpool_limits(1):
        benchmark(net.gradient, x, X, y, method="bidiagonal")


def test_bench_gradient_jax(benchmark):
    # the baseline needs JAX (the `test` extra), not part of the `bench` extra
    jnp = pytest.importorskip("jax.numpy", reason="the JAX baseline needs pip install .[test]")

    net, x, X, y = _case()
    jg = jax_gradient(net, X, y)
    xj = jnp.asarray(x)
    jg(xj)
    benchmark(jg, xj)


if __name__ == "__main__":
    rows = run(quick="--quick" in sys.argv)
    print(f"{'method':24s} {'depth':>5s} {'seconds':>10s} {'ratio':>7s} {'rel err':>9s}")
    for r in rows:
        print(
            f"{r['method']:24s} {r['depth']:5d} {r['seconds']:10.5f} "
            f"{r['ratio_to_jax']:7.2f} {r['max_rel_err']:9.1e}"
        )
