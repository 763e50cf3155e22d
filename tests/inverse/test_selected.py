"""Selected inversion: ``diag((H + λI)⁻¹)`` and its diagonal blocks vs a dense inverse.

References: ``numpy.linalg.inv`` of the JAX dense Hessian / GGN
(``reference.dense_hessian``, ``reference.ggn``) plus the damping. Cases:
indefinite and damped at depth 32, batch 1 (low-rank dense stages) and 3,
the compiled and the array sweeps (the CuPy path), per-layer damping, a
negative shift, the GGN, layers without a structured stage (probed through
their own sweep steps) and an operator that factored by the banded KKT LU.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import reference

from blockops.inverse import inverse_diagonal, inverse_diagonal_blocks, inverse_hessian
from blockops.network import Bias, Dense, MSELoss, Pipeline, Residual, Scale
from blockops.network.dense_stage_jit import compiled


def _deep(depth, width=3, B=1, seed=0):
    rng = np.random.default_rng(seed)
    layers = [Dense(2, width, "tanh")] + [Dense(width, width, "tanh") for _ in range(depth - 2)]
    net = Pipeline([*layers, Dense(width, 1, "identity"), MSELoss()])
    x = net.init(seed) * 1.3
    X, y = rng.standard_normal((B, 2)), rng.standard_normal((B, 1))
    return net, x, X, y


def _dense_inverse(net, x, X, y, damping, kind="hessian"):
    H = (reference.ggn if kind == "ggn" else reference.dense_hessian)(net.spec(), x, X, y)
    sizes = [ly.n_params for ly in net.layers]
    lam = np.repeat(np.broadcast_to(damping, (len(sizes),)), sizes)
    M = H + np.diag(lam)
    return M, np.linalg.inv(M)


def _check(Hi, Minv):
    d = inverse_diagonal(Hi)
    ref = np.diag(Minv)
    assert d.shape == ref.shape
    assert np.abs(d - ref).max() <= 1e-10 * np.abs(ref).max()
    blocks, off = inverse_diagonal_blocks(Hi), 0
    for b in blocks:
        p = b.shape[0]
        ref_b = Minv[off : off + p, off : off + p]
        assert b.shape == ref_b.shape
        assert np.abs(b - ref_b).max(initial=0.0) <= 1e-10 * np.abs(Minv).max()
        off += p
    assert off == Minv.shape[0]
    np.testing.assert_allclose(Hi.diagonal(), d, rtol=0, atol=0)


@functools.cache
def _deep_reference(B):
    """Depth 32: the JAX reference is built once for both sweeps."""
    net, x, X, y = _deep(32, B=B)
    return (net, x, X, y), _dense_inverse(net, x, X, y, 1e-2)


@pytest.mark.parametrize("jit", [True, False])  # compiled sweep / array code (CuPy path)
@pytest.mark.parametrize("B", [1, 3])
def test_deep_indefinite_damped(jit, B):
    (net, x, X, y), (M, Minv) = _deep_reference(B)
    assert np.linalg.eigvalsh(M)[0] < 0  # indefinite
    with compiled(jit):
        Hi = inverse_hessian(net.linearize(x, X, y), damping=1e-2, method="riccati")
        _check(Hi, Minv)


def test_large_batch_segment_path():
    net, x, X, y = _deep(6, width=4, B=9)  # B a = 36: the per-layer (large) path
    _, Minv = _dense_inverse(net, x, X, y, 1e-2)
    with compiled(False):
        Hi = inverse_hessian(net.linearize(x, X, y), damping=1e-2, method="riccati")
        _check(Hi, Minv)


def test_ggn_per_layer_damping_and_shift():
    net, x, X, y = _deep(8, B=2, seed=1)
    lams = np.linspace(0.05, 0.5, len(net.layers))
    _, Minv = _dense_inverse(net, x, X, y, lams, kind="ggn")
    _check(inverse_hessian(net.linearize(x, X, y), damping=lams, kind="ggn"), Minv)
    _, Minv = _dense_inverse(net, x, X, y, -0.1)  # H - 0.1 I, indefinite
    _check(inverse_hessian(net.linearize(x, X, y), damping=-0.1), Minv)


def test_layers_without_structured_stage_are_probed():
    rng = np.random.default_rng(4)
    net = Pipeline(
        [Dense(2, 3, "tanh"), Bias(3, "sigmoid"), Scale(3, "tanh"), Residual(3, "tanh"),
         Dense(3, 1, "identity"), MSELoss()]
    )  # fmt: skip
    x = net.init(4)
    X, y = rng.standard_normal((2, 2)), rng.standard_normal((2, 1))
    _, Minv = _dense_inverse(net, x, X, y, 0.05)
    _check(inverse_hessian(net.linearize(x, X, y), damping=0.05), Minv)


def test_after_a_banded_factorisation():
    net, x, X, y = _deep(5, B=2, seed=2)
    _, Minv = _dense_inverse(net, x, X, y, 0.1)
    Hi = inverse_hessian(net.linearize(x, X, y), damping=0.1, method="kkt")
    assert Hi.method == "kkt"
    _check(Hi, Minv)


def test_float32_operator_gives_a_float64_diagonal():
    net, x, X, y = _deep(6, B=2, seed=3)
    _, Minv = _dense_inverse(net, x, X, y, 0.1)
    Hi = inverse_hessian(net.linearize(x, X, y), damping=0.1, precision="mixed")
    d = inverse_diagonal(Hi)
    assert d.dtype == np.float64
    assert np.abs(d - np.diag(Minv)).max() <= 1e-10 * np.abs(np.diag(Minv)).max()
