"""ReLU and leaky ReLU: every form against the independent JAX reference."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref

from blockops.hessian import hessian
from blockops.inverse import inverse_hessian
from blockops.network import Dense, MSELoss, Pipeline, leaky_relu


def _case(act, seed=0, batch=4):
    net = Pipeline([Dense(3, 6, act), Dense(6, 6, act), Dense(6, 2, "identity"), MSELoss()])
    rng = np.random.default_rng(seed)
    X, y = rng.standard_normal((batch, 3)), rng.standard_normal((batch, 2))
    return net, net.init(seed=seed), X, y


@pytest.mark.parametrize("act", ["relu", "leaky_relu", leaky_relu(0.2)])
def test_relu_networks_match_jax(act):
    net, x, X, y = _case(act)
    pt = net.linearize(x, X, y)
    spec = net.spec()
    pre = [c.extra["pre"] for c in pt.caches[:-1]]
    assert min(float(np.abs(p).min()) for p in pre) > 1e-6  # no pre-activation at the kink
    np.testing.assert_allclose(pt.gradient, ref.gradient(spec, x, X, y), rtol=1e-12, atol=1e-14)
    Hj = ref.dense_hessian(spec, x, X, y)
    n = net.n_params
    for form in ("fused", "literal"):
        Hb = hessian(pt, form=form) @ np.eye(n)
        assert np.linalg.norm(Hb - Hj) <= 1e-12 * np.linalg.norm(Hj)
    lam = 1e-2
    w = np.linalg.eigvalsh(Hj + lam * np.eye(n))
    assert w.min() < 0 < w.max()  # indefinite: the exact inverse is not a Cholesky solve
    g = np.random.default_rng(1).standard_normal(n)
    for method in ("riccati", "kkt"):
        Hi = inverse_hessian(pt, damping=lam, method=method)
        x_inv = Hi @ g
        res = np.linalg.norm((Hj + lam * np.eye(n)) @ x_inv - g) / np.linalg.norm(g)
        assert res <= 1e-12
        assert Hi.inertia == (int((w < 0).sum()), 0, int((w > 0).sum()))


def test_relu_has_no_curvature_of_its_own():
    """σ'' = 0: with an identity loss curvature only, H is the GGN exactly (MSE, ReLU hidden)."""
    net, x, X, y = _case("relu")
    pt = net.linearize(x, X, y)
    n = net.n_params
    V = np.random.default_rng(2).standard_normal((n, 3))
    Hv, Gv = hessian(pt) @ V, hessian(pt, kind="ggn") @ V
    # the difference is the bilinear terms of pre = W z + c only (b σ' dW), not σ''
    assert np.linalg.norm(Hv - Gv) > 0
    w = pt.caches[0].extra["d2"]
    assert not np.any(w)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_loss_scale_matches_jax(loss):
    """``scale`` multiplies every sample's share (how torch's reductions map on)."""
    from blockops.network import SoftmaxCrossEntropy

    rng = np.random.default_rng(3)
    last = MSELoss(scale=0.25) if loss == "mse" else SoftmaxCrossEntropy(scale=5.0)
    net = Pipeline([Dense(3, 4), Dense(4, 3, "identity"), last])
    X = rng.standard_normal((5, 3))
    y = rng.standard_normal((5, 3)) if loss == "mse" else rng.integers(0, 3, 5)
    x = net.init(seed=3)
    pt = net.linearize(x, X, y)
    spec = net.spec()
    np.testing.assert_allclose(pt.loss, ref.loss_value(spec, x, X, y), rtol=1e-13)
    np.testing.assert_allclose(pt.gradient, ref.gradient(spec, x, X, y), rtol=1e-12, atol=1e-15)
    Hj = ref.dense_hessian(spec, x, X, y)
    Hb = hessian(pt) @ np.eye(net.n_params)
    assert np.linalg.norm(Hb - Hj) <= 1e-12 * np.linalg.norm(Hj)
