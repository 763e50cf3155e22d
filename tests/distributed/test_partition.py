"""The per-rank pieces of the depth-partitioned HVP and solve, chained serially (no MPI needed).

References: JAX's dense Hessian of the pipeline (``tests/reference.py``) and
``numpy.linalg.solve`` on it.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import dense_hessian

import blockops as bo
from blockops.distributed.partition import LocalKKT, RangeSweep, ReducedSystem, layer_ranges


@pytest.fixture(scope="module")
def case():
    """Every hidden-layer kind, a stacked dense run, batch 2, MSE: indefinite H."""
    w = 4
    net = bo.Pipeline(
        [
            bo.Dense(3, w, "tanh"),
            bo.Dense(w, w, "tanh"),
            bo.Dense(w, w, "tanh"),
            bo.Dense(w, w, "tanh"),
            bo.Bias(w, "sigmoid"),
            bo.Scale(w, "softplus"),
            bo.Residual(w, "tanh", h=0.5),
            bo.Elementwise(w, "gelu"),
            bo.Dense(w, 2, "identity"),
            bo.MSELoss(),
        ]
    )
    rng = np.random.default_rng(4)
    x, X, y = net.init(seed=4), rng.standard_normal((2, 3)), 3.0 * rng.standard_normal((2, 2))
    pt = net.linearize(x, X, y)
    return pt, dense_hessian(net, x, X, y)


def chained_hvp(pt, ranges, V):
    """``H V`` by the ranges' sweeps chained through their affine boundary maps."""
    sweeps = [RangeSweep(pt, a, b) for a, b in ranges]
    W = np.ascontiguousarray(V.T)
    parts = [np.ascontiguousarray(W[:, sw.x_slice]) for sw in sweeps]
    g, states = None, []
    for sw, Wl in zip(sweeps, parts):  # g_in(r+1) = T_r g_in(r) + g0_out(r)
        g0, _ = sw.forward(Wl, None)
        _, state = sw.forward(Wl, g)
        states.append(state)
        g = g0 if g is None else sw.push_tangent(g) + (0 if g0 is None else g0)
    out, b = np.empty_like(W), None
    for sw, Wl, state in zip(sweeps[::-1], parts[::-1], states[::-1]):
        b0 = sw.backward(state, None, np.empty_like(Wl))  # b'_in(r) = b'_out(r) T_r + b'0_in(r)
        rows = np.empty_like(Wl)
        sw.backward(state, b, rows)
        out[:, sw.x_slice] = rows
        b = b0 if b is None else sw.pull_adjoint(b) + (0 if b0 is None else b0)
    return out.T


def partitioned_solve(pt, ranges, G, lam):
    kkts = [LocalKKT(pt, a, b, lam) for a, b in ranges]
    sizes = [(k.n_left, k.n_right) for k in kkts]
    red = ReducedSystem([k.schur for k in kkts], sizes, pt.dtype, np, ranges)
    cols = [RangeSweep(pt, a, b).x_slice for a, b in ranges]
    condensed = [k.condense(G[c]) for k, c in zip(kkts, cols)]
    seps = red.solve([t for _, t in condensed])
    return np.concatenate([k.expand(Y, s) for k, (Y, _), s in zip(kkts, condensed, seps)])


@pytest.mark.parametrize("n_parts", [1, 2, 3, 4, 10])
def test_chained_hvp_equals_dense_hessian(case, n_parts):
    pt, Hd = case
    V = np.random.default_rng(0).standard_normal((pt.n_params, 3))
    L = pt.n_layers  # one layer per range at n_parts = L: the HVP needs no balance
    ranges = [(l, l + 1) for l in range(L)] if n_parts == L else layer_ranges(pt, n_parts)
    HV = chained_hvp(pt, ranges, V)
    assert np.linalg.norm(HV - Hd @ V) <= 1e-12 * np.linalg.norm(Hd @ V)


@pytest.mark.parametrize("n_parts", [1, 2, 3, 4, 6])
def test_partitioned_solve_equals_dense_solve_indefinite(case, n_parts):
    pt, Hd = case
    lam, n = 0.05, pt.n_params
    A = Hd + lam * np.eye(n)
    ev = np.linalg.eigvalsh(A)
    assert ev[0] < 0 < ev[-1]  # indefinite
    G = np.random.default_rng(1).standard_normal((n, 2))
    X = partitioned_solve(pt, layer_ranges(pt, n_parts), G, lam)
    ref = np.linalg.solve(A, G)
    # one unrefined solve: forward error up to cond(A) eps
    assert np.linalg.norm(X - ref) <= 1e3 * np.linalg.cond(A) * 2.2e-16 * np.linalg.norm(ref)


def test_tangent_map_is_product_of_jacobians(case):
    pt, _ = case
    sw = RangeSweep(pt, 1, 5)
    T = np.eye(4)[None].repeat(2, axis=0)
    for ly, c in zip(pt.layers[1:5], pt.caches[1:5]):
        T = np.stack([ly.jacobian_z(c)[s] @ T[s] for s in range(2)])
    assert np.allclose(sw.T, T, rtol=1e-13, atol=1e-15)


def test_layer_ranges_balance_and_cover(case):
    pt, _ = case
    for R in range(1, 7):
        ranges = layer_ranges(pt, R)
        assert len(ranges) == R and ranges[0][0] == 0 and ranges[-1][1] == pt.n_layers
        assert all(a < b for a, b in ranges)
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(R - 1))


def test_layer_ranges_balanced_by_parameters():
    net = bo.Pipeline([bo.Dense(4, 4, "tanh") for _ in range(16)] + [bo.MSELoss()])
    pt = net.linearize(net.init(), np.ones((1, 4)), np.zeros((1, 4)))
    counts = [sum(ly.n_params for ly in pt.layers[a:b]) for a, b in layer_ranges(pt, 4)]
    assert counts == [80, 80, 80, 80]


def test_uncontrollable_range_is_refused(case):
    """One layer per range: the Bias range (4 parameters, batch 2 x width 4 at its end)
    cannot move its output with its input fixed, so its interior is singular."""
    pt, _ = case
    with pytest.raises(ValueError, match="use fewer ranks"):
        layer_ranges(pt, 10)
    with pytest.raises(bo.SingularBlockError, match="cannot move the activation"):
        LocalKKT(pt, 4, 5, 0.05)


def test_layer_ranges_errors(case):
    pt, _ = case
    with pytest.raises(ValueError, match="at most 10 ranks"):
        layer_ranges(pt, 11)
    with pytest.raises(ValueError, match="n_parts"):
        layer_ranges(pt, 0)
    with pytest.raises(ValueError, match="layer range"):
        RangeSweep(pt, 3, 3)


def test_singular_system_names_the_layers():
    """λ = 0 at batch 1: H has rank below n, so some elimination step must refuse."""
    net = bo.Pipeline([bo.Dense(3, 3, "tanh") for _ in range(6)] + [bo.MSELoss()])
    rng = np.random.default_rng(0)
    pt = net.linearize(net.init(), rng.standard_normal((1, 3)), rng.standard_normal((1, 3)))
    with pytest.raises(bo.SingularBlockError, match=r"singular"):
        partitioned_solve(pt, layer_ranges(pt, 3), np.ones((pt.n_params, 1)), 0.0)
