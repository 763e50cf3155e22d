"""CuPy backend: the same expressions on the GPU (skipped without CuPy and a GPU).

The NumPy results are the reference: every quantity computed on the device
must match the host computation of the same pipeline to rounding, and the hot
paths (HVP, factor, solve) must not copy arrays to the host.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from blockops.backend import as_backend, cupy_available, to_numpy

pytestmark = [
    pytest.mark.cupy,
    pytest.mark.skipif(
        not cupy_available(), reason="CuPy with a CUDA GPU is not available on this machine"
    ),
]


def _net(depth=6, width=4, n_in=3, n_out=2):
    from blockops.network import Dense, MSELoss, Pipeline

    layers = [Dense(n_in, width, "tanh")]
    layers += [Dense(width, width, "tanh") for _ in range(depth - 2)]
    layers += [Dense(width, n_out, "identity"), MSELoss()]
    return Pipeline(layers)


def _problem(backend, batch=3, seed=0):
    net = _net()
    rng = np.random.default_rng(seed)
    x = net.init(seed=seed)
    X = rng.standard_normal((batch, 3))
    y = rng.standard_normal((batch, 2))
    return net, *(as_backend(a, backend) for a in (x, X, y))


@contextlib.contextmanager
def no_host_copies(monkeypatch):
    """Fail on any device-to-host array copy inside the block."""
    import cupy

    def refuse(*args, **kwargs):
        raise AssertionError("device-to-host copy in a hot path")

    with monkeypatch.context() as m:
        m.setattr(cupy.ndarray, "get", refuse)
        m.setattr(cupy, "asnumpy", refuse)
        yield


def test_gradient_and_hvp_match_numpy():
    from blockops.hessian import hvp

    net, x, X, y = _problem("numpy")
    ref = net.linearize(x, X, y)
    netg, xg, Xg, yg = _problem("cupy")
    pt = netg.linearize(xg, Xg, yg)
    v = np.random.default_rng(1).standard_normal(x.size)
    np.testing.assert_allclose(to_numpy(pt.gradient), ref.gradient, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        to_numpy(hvp(pt, as_backend(v, "cupy"))), hvp(ref, v), rtol=1e-11, atol=1e-13
    )


def test_literal_hessian_matches_fused_on_gpu():
    from blockops.hessian import hessian

    net, x, X, y = _problem("cupy")
    pt = net.linearize(x, X, y)
    import cupy

    v = cupy.asarray(np.random.default_rng(2).standard_normal(x.size))
    Hf = hessian(pt, form="fused")
    Hl = hessian(pt, form="literal")
    np.testing.assert_allclose(to_numpy(Hl @ v), to_numpy(Hf @ v), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("method", ["riccati", "banded"])
def test_inverse_matches_numpy(method):
    from blockops.inverse import inverse_hessian

    net, x, X, y = _problem("numpy")
    g = np.random.default_rng(3).standard_normal(x.size)
    ref = inverse_hessian(net.linearize(x, X, y), damping=1e-3, method=method) @ g
    netg, xg, Xg, yg = _problem("cupy")
    Hinv = inverse_hessian(netg.linearize(xg, Xg, yg), damping=1e-3, method=method)
    sol = Hinv @ as_backend(g, "cupy")
    np.testing.assert_allclose(to_numpy(sol), ref, rtol=1e-9, atol=1e-12)
    assert Hinv.residual(as_backend(g, "cupy"), sol) < 1e-10


def test_hot_paths_stay_on_device(monkeypatch):
    import cupy

    from blockops.hessian import hvp
    from blockops.inverse import inverse_hessian

    net, x, X, y = _problem("cupy")
    pt = net.linearize(x, X, y)
    v = cupy.asarray(np.random.default_rng(4).standard_normal(x.size))
    Hinv = inverse_hessian(pt, damping=1e-3, method="riccati", check=False)
    with no_host_copies(monkeypatch):
        hv = hvp(pt, v)
        sol = Hinv @ v
    assert isinstance(hv, cupy.ndarray) and isinstance(sol, cupy.ndarray)


def test_krylov_solvers_use_cupyx():
    import cupy

    from blockops.hessian import hessian
    from blockops.solvers import cg

    net, x, X, y = _problem("cupy")
    pt = net.linearize(x, X, y)
    H = hessian(pt, damping=1.0, kind="ggn")
    g = cupy.asarray(np.random.default_rng(5).standard_normal(x.size))
    res = cg(H, g, rtol=1e-10, maxiter=500)
    assert isinstance(res.x, cupy.ndarray)
    r = to_numpy(H @ res.x - g)
    assert np.linalg.norm(r) <= 1e-8 * float(cupy.linalg.norm(g))
