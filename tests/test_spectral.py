"""Exact eigenvalue counts, spectral histograms and shift-invert eigenpairs.

References: ``numpy.linalg.eigvalsh`` / ``eigh`` of a dense matrix. The
fixed cases use the JAX dense Hessian (``reference.dense_hessian``); the
100-draw count property uses the matrix whose columns are the fused HVP (or
GGN product) of the identity: that code shares nothing with the
factorisation whose inertia is counted, is itself checked against JAX in
``tests/hessian``, and needs no JAX compilation per drawn shape (which made
the property take minutes). Shifts are drawn away from ties: at least
``1e-6 ‖H‖`` from every eigenvalue, where a count is a well-posed integer.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from blockops import SingularBlockError
from blockops.hessian import ggn_vp, hvp
from blockops.network import Dense, MSELoss, Pipeline
from blockops.spectral import count_eigenvalues, eigsh_near, spectral_histogram


def _clear_of(w, sigma):
    scale = max(float(np.abs(w).max()), 1e-12)
    return float(np.abs(w - sigma).min()) >= 1e-6 * scale


@settings(max_examples=100, deadline=None)
@given(
    reference.pipelines(widths=(1, 4), depths=(1, 3), batches=(1, 3)),
    st.floats(-0.2, 1.2),
    st.floats(-0.2, 1.2),
    st.sampled_from(["hessian", "ggn"]),
)
def test_counts_equal_eigvalsh(case, u, v, kind):
    net, x, X, y = case.pipeline, case.x, case.X, case.y
    pt = net.linearize(x, X, y)
    H = (ggn_vp if kind == "ggn" else hvp)(pt, np.eye(pt.n_params))
    w = np.linalg.eigvalsh(0.5 * (H + H.T))
    span = max(float(w[-1] - w[0]), 1e-3)
    lo, hi = sorted((w[0] + u * span, w[0] + v * span))
    assume(hi - lo > 1e-9 * span and _clear_of(w, lo) and _clear_of(w, hi))
    got = count_eigenvalues(pt, lo, hi, kind=kind)
    assert got == int(((w >= lo) & (w < hi)).sum())
    assert count_eigenvalues(pt, -np.inf, hi, kind=kind) == int((w < hi).sum())


def _net(B=2, seed=0, depth=4, width=4):
    rng = np.random.default_rng(seed)
    layers = [Dense(2, width, "tanh")] + [Dense(width, width, "tanh") for _ in range(depth - 2)]
    net = Pipeline([*layers, Dense(width, 1, "identity"), MSELoss()])
    x = net.init(seed) * 1.5
    X, y = rng.standard_normal((B, 2)), rng.standard_normal((B, 1))
    return net.linearize(x, X, y), reference.dense_hessian(net.spec(), x, X, y)


def test_histogram_matches_numpy():
    pt, H = _net()
    w = np.linalg.eigvalsh(H)
    edges = np.linspace(w[0] - 0.013, w[-1] + 0.011, 9)
    assert all(_clear_of(w, e) for e in edges)
    counts = spectral_histogram(pt, edges)
    np.testing.assert_array_equal(counts, np.histogram(w, bins=edges)[0])
    mid = 0.5 * (w[0] + w[-1])
    assert _clear_of(w, mid)
    halves = spectral_histogram(pt, [-np.inf, mid, np.inf])
    np.testing.assert_array_equal(halves, [(w < mid).sum(), (w >= mid).sum()])


@pytest.mark.parametrize("where", ["bottom", "interior"])
def test_eigsh_near_matches_eigh(where):
    pt, H = _net(B=3, seed=1)
    w, U = np.linalg.eigh(H)
    if where == "bottom":
        sigma = w[0] - 0.05
    else:  # the middle of the widest gap among the positive eigenvalues
        pos = w[w > 1e-3 * np.abs(w).max()]
        i = int(np.argmax(np.diff(pos)))
        sigma = 0.5 * (pos[i] + pos[i + 1])
    assert _clear_of(w, sigma)
    k = 4
    lam, V, res = eigsh_near(pt, sigma, k=k)
    near = np.argsort(np.abs(w - sigma), kind="stable")[:k]
    np.testing.assert_allclose(lam, w[near], rtol=0, atol=1e-10 * np.abs(w).max())
    # simple eigenvalues here: each vector is the reference one up to sign
    np.testing.assert_allclose(np.abs(np.sum(U[:, near] * V, axis=0)), 1.0, atol=1e-8)
    scale = np.abs(w).max()
    assert res.max() <= 1e-10 * scale
    np.testing.assert_allclose(np.linalg.norm(H @ V - V * lam, axis=0), res, atol=1e-12 * scale)
    np.testing.assert_allclose(V.T @ V, np.eye(k), atol=1e-10)


def test_bad_arguments_are_refused():
    pt, H = _net()
    with pytest.raises(ValueError, match="lo < hi"):
        count_eigenvalues(pt, 1.0, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        count_eigenvalues(pt, np.nan, 1.0)
    with pytest.raises(ValueError, match="increase strictly"):
        spectral_histogram(pt, [0.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="k < n"):
        eigsh_near(pt, 0.1, k=len(H))
    with pytest.raises(ValueError, match="finite shift"):
        eigsh_near(pt, np.inf)


def test_shift_on_zero_eigenvalue_of_rank_deficient_hessian():
    # batch 1, width 4: H has a large null space, so sigma = 0 is an eigenvalue
    pt, H = _net(B=1)
    assert int((np.abs(np.linalg.eigvalsh(H)) < 1e-12).sum()) > 1
    with pytest.raises(SingularBlockError):
        count_eigenvalues(pt, 0.0, 1.0)
