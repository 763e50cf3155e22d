"""Signed shifts ``H − σI`` and per-layer damping ``H + diag(λ_l I)`` of the exact inverse.

References: the JAX dense Hessian (``reference.dense_hessian``), a dense
``numpy.linalg.solve``, ``eigvalsh`` for inertia and ``slogdet``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import reference

from blockops.inverse import inverse_hessian
from blockops.network import Dense, MSELoss, Pipeline
from blockops.network.dense_stage_jit import compiled
from blockops.singular import damping_hint

METHODS = ("riccati", "kkt")


def _case(widths, B, seed=0, act="tanh"):
    rng = np.random.default_rng(seed)
    layers = [Dense(a, b, act) for a, b in itertools.pairwise(widths[:-1])]
    layers += [Dense(widths[-2], widths[-1], "identity"), MSELoss()]
    net = Pipeline(layers)
    x = net.init(seed) * 1.5
    X = rng.standard_normal((B, widths[0]))
    y = rng.standard_normal((B, widths[-1]))
    H = reference.dense_hessian(net.spec(), x, X, y)
    return net, net.linearize(x, X, y), H


def _gap_shift(w):
    """A shift in the widest gap of the spectrum ``w`` away from its zero cluster."""
    scale = np.abs(w).max()
    mids, gaps = 0.5 * (w[1:] + w[:-1]), np.diff(w)
    ok = np.abs(mids) > 1e-2 * scale
    return float(mids[ok][np.argmax(gaps[ok])])


def _inertia(M):
    w = np.linalg.eigvalsh(M)
    return (int((w < 0).sum()), 0, int((w > 0).sum()))


@pytest.mark.parametrize(
    "method, jit", [("riccati", True), ("riccati", False), ("kkt", True)]
)  # the sweep compiled and as array code (the CuPy path), and the banded LU
@pytest.mark.parametrize("B, width", [(1, 5), (6, 5), (9, 4)])  # low-rank, complete, large
def test_negative_shift_solves_and_counts(method, jit, B, width):
    _, pt, H = _case([3, width, width, 2], B)
    w = np.linalg.eigvalsh(H)
    sigma = _gap_shift(w)
    M = H - sigma * np.eye(len(H))
    with compiled(jit):
        Hi = inverse_hessian(pt, damping=-sigma, method=method)
    g = np.random.default_rng(1).standard_normal(len(H))
    x = Hi @ g
    ref = np.linalg.solve(M, g)
    # backward error at working precision; forward error within cond(M) of it
    assert np.linalg.norm(M @ x - g) <= 1e-13 * np.linalg.norm(M, 2) * np.linalg.norm(x)
    assert np.linalg.norm(x - ref) <= 1e-13 * np.linalg.cond(M) * np.linalg.norm(ref)
    assert Hi.inertia == _inertia(M)
    assert Hi.inertia[0] == int((w < sigma).sum())
    assert Hi.logdet == pytest.approx(np.linalg.slogdet(M)[1], rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_per_layer_damping_matches_dense(method):
    net, pt, H = _case([3, 4, 4, 4, 2], 2, seed=3)
    lams = [0.1, 0.1, 2.0, 0.5, 7.0]  # the loss layer's entry is unused
    D = np.concatenate([np.full(ly.n_params, lam) for ly, lam in zip(net.layers, lams)])
    M = H + np.diag(D)
    Hi = inverse_hessian(pt, damping=lams, method=method)
    G = np.random.default_rng(2).standard_normal((len(H), 3))
    X = Hi @ G
    np.testing.assert_allclose(X, np.linalg.solve(M, G), rtol=1e-10, atol=1e-12)
    assert Hi.inertia == _inertia(M)
    assert Hi.logdet == pytest.approx(np.linalg.slogdet(M)[1], rel=1e-10)
    assert float(Hi.residual(G, X).max()) <= 1e-12


def test_equal_per_layer_damping_is_the_scalar():
    net, pt, _ = _case([3, 4, 2], 2)
    Hi = inverse_hessian(pt, damping=[0.3] * len(net.layers))
    assert Hi.damping == 0.3


def test_bad_per_layer_damping_refused():
    _, pt, _ = _case([3, 4, 2], 2)
    with pytest.raises(ValueError, match="one value per layer"):
        inverse_hessian(pt, damping=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"damping\[1\].*expected a finite value"):
        inverse_hessian(pt, damping=[0.1, np.nan, 0.0])
    with pytest.raises(ValueError, match="finite"):
        inverse_hessian(pt, damping=np.inf)


def test_singular_shift_message_says_move_the_shift():
    # a shift onto an eigenvalue is reported as such (not as "increase damping")
    msg = damping_hint(-0.25, np.float64)
    assert "sigma = 0.25" in msg and "move it" in msg
    assert "increase damping" in damping_hint(1e-3, np.float64)
