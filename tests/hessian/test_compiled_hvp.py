"""The compiled recurrences of the stacked dense HVP sweep against JAX and the array path.

On host NumPy with numba, :class:`blockops.network.dense_sweep.DenseRun` runs
its two per-layer recurrences compiled (:mod:`blockops.network.dense_sweep_jit`):
row by row for few directions times samples, through BLAS from
``GEMM_ROWS`` on. Both must give ``H V`` and ``G V`` as JAX's dense Hessian and
Gauss-Newton matrix of a plain re-implementation do (``tests/reference.py``),
and agree with the array loop (the CuPy path) to rounding.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import reference as ref

from blockops.hessian import ggn_vp, hvp
from blockops.network import Dense, MSELoss, Pipeline, SoftmaxCrossEntropy
from blockops.network.dense_stage_jit import available, compiled
from blockops.network.dense_sweep_jit import GEMM_ROWS

jax.config.update("jax_enable_x64", True)

requires_numba = pytest.mark.skipif(
    not available(), reason="numba is not installed: the HVP sweep runs its array loops"
)

# (depth, batch, width, a_in, directions, activation, loss, dtype). a_in != width puts a
# non-square layer first, so the stacked run starts from an incoming tangent; batch 32
# with 4 directions is GEMM_ROWS rows (the BLAS branch).
CASES = [
    (6, 1, 5, None, 1, "tanh", "mse", np.float64),
    (5, 3, 4, 2, 3, "softplus", "mse", np.float64),
    (4, 2, 3, None, 2, "sigmoid", "softmax", np.float64),
    (3, 32, 4, 3, 4, "tanh", "mse", np.float64),
    (5, 2, 4, None, 2, "tanh", "mse", np.float32),
]


def _case(depth, batch, width, a_in, act, loss, dtype, seed=0):
    a_in = a_in or width
    layers = [Dense(a_in, width, act)] + [Dense(width, width, act) for _ in range(depth - 1)]
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, a_in))
    if loss == "mse":
        head, y = MSELoss(), rng.standard_normal((batch, width))
    else:
        head, y = SoftmaxCrossEntropy(width), rng.integers(0, width, batch)
    net = Pipeline([*layers, head])
    x = net.init(seed=seed, dtype=dtype)
    return net, x, X.astype(dtype), y


def _rel(A, B):
    return float(np.abs(A - B).max() / max(np.abs(B).max(), 1e-300))


@requires_numba
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"d{c[0]}-b{c[1]}-k{c[4]}-{c[6]}")
def test_compiled_hvp_matches_jax_and_array_loops(case):
    depth, batch, width, a_in, k, act, loss, dt = case
    net, x, X, y = _case(depth, batch, width, a_in, act, loss, dt)
    spec = ref.spec_of(net)
    x64, X64 = np.asarray(x, np.float64), np.asarray(X, np.float64)
    H = ref.dense_hessian(spec, x64, X64, y)
    G = ref.ggn(spec, x64, X64, y)
    V = np.random.default_rng(1).standard_normal((net.n_params, k)).astype(dt)
    tol = 1e-12 if dt == np.float64 else 2e-5
    out = {}
    for on in (True, False):
        with compiled(on):
            pt = net.linearize(x, X, y)  # stacked runs are built per point, under the switch
            out[on] = hvp(pt, V), ggn_vp(pt, V)
            (run,) = [r.sweep for r in pt.memo["stacked_runs"].values()]
            assert (run._jit is not None) == on
    V64 = V.astype(np.float64)
    for got, ref_ in zip(out[True], (H @ V64, G @ V64)):
        assert _rel(got, ref_) <= tol
    for a, b in zip(out[True], out[False]):
        assert _rel(a, b) <= tol


def test_cases_reach_both_branches():
    rows = [c[1] * c[4] for c in CASES]
    assert min(rows) < GEMM_ROWS <= max(rows)


@requires_numba
def test_compiled_hvp_does_not_mutate_directions():
    net, x, X, y = _case(8, 2, 4, None, "tanh", "mse", np.float64)
    pt = net.linearize(x, X, y)
    V = np.random.default_rng(2).standard_normal((net.n_params, 3))
    V0 = V.copy()
    hvp(pt, V)
    ggn_vp(pt, V[:, 0])
    np.testing.assert_array_equal(V, V0)
