"""``influence_scores`` and ``per_sample_gradients`` against dense solves.

References, independent of blockops' numerics: ``reference.dense_hessian`` /
``reference.ggn`` (JAX on a plain re-implementation), per-sample gradients by
``reference.gradient`` on one-sample batches, and ``numpy.linalg.solve`` of
the explicitly formed ``H + D``.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference

from blockops import InfluenceScores, influence_scores, inverse_hessian, per_sample_gradients
from blockops.network import Bias, Dense, MSELoss, Pipeline, SoftmaxCrossEntropy


def regression_case():
    rng = np.random.default_rng(21)
    net = Pipeline(
        [Dense(2, 4, "tanh"), Bias(4, "sigmoid"), Dense(4, 2, "identity"), MSELoss(scale=2.0)]
    )
    X, y = rng.standard_normal((9, 2)), rng.standard_normal((9, 2))
    return net, net.init(seed=22), X, y


def classification_case():
    rng = np.random.default_rng(23)
    net = Pipeline([Dense(3, 4, "gelu"), Dense(4, 3, "identity"), SoftmaxCrossEntropy()])
    X, y = rng.standard_normal((8, 3)), rng.integers(0, 3, size=8)
    return net, net.init(seed=24), X, y


CASES = {"mse": regression_case, "softmax": classification_case}


def dense_matrix(net, x, X, y, kind, damping):
    H = (reference.ggn if kind == "ggn" else reference.dense_hessian)(net.spec(), x, X, y)
    d = np.broadcast_to(np.asarray(damping, dtype=float), (len(net.layers),))
    return H + np.diag(np.repeat(d, [ly.n_params for ly in net.layers]))


def reference_grads(net, x, X, y):
    return np.stack(
        [reference.gradient(net.spec(), x, X[i : i + 1], y[i : i + 1]) for i in range(len(X))],
        axis=1,
    )


@pytest.mark.parametrize("case", CASES)
def test_per_sample_gradients(case):
    net, x, X, y = CASES[case]()
    pt = net.linearize(x, X, y)
    want = reference_grads(net, x, X, y)
    for chunk in (64, 4):  # one chunk, and 3 chunks of 4, 4, 1 samples
        got = per_sample_gradients(pt, chunk=chunk)
        assert got.shape == (net.n_params, len(X))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got.mean(axis=1), pt.gradient, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    ("kind", "damping"), [("hessian", 0.1), ("ggn", 0.05), ("hessian", [0.2, 0.5, 1.0, 0.0])]
)
@pytest.mark.parametrize("n_test", [3, 40])  # fewer test than train columns, and more
def test_scores_against_dense_solve(case, kind, damping, n_test):
    net, x, X, y = CASES[case]()
    if np.ndim(damping) and len(damping) != len(net.layers):
        damping = [*damping[: len(net.layers) - 1], 0.0]
    A = dense_matrix(net, x, X, y, kind, damping)
    pt = net.linearize(x, X, y)
    train = reference_grads(net, x, X, y)
    test = np.random.default_rng(5).standard_normal((net.n_params, n_test))
    train0, test0 = train.copy(), test.copy()
    res = influence_scores(pt, train, test, damping=damping, kind=kind)
    np.testing.assert_array_equal(train, train0)
    np.testing.assert_array_equal(test, test0)
    assert isinstance(res, InfluenceScores)
    want = -test.T @ np.linalg.solve(A, train)
    assert res.scores.shape == (n_test, len(X))
    assert np.linalg.norm(res.scores - want) <= 1e-10 * np.linalg.norm(want)
    # one batched solve of the smaller side; its certificate, checked against the dense matrix
    small = test if n_test <= len(X) else train
    assert res.solved == ("test" if n_test <= len(X) else "train")
    assert res.residuals.shape == (small.shape[1],)
    S = res.inverse @ small  # the same solve again, measured against the dense matrix
    dense_res = np.linalg.norm(A @ S - small, axis=0) / np.linalg.norm(small, axis=0)
    assert res.residual <= 1e-12 and dense_res.max() <= 1e-12
    np.testing.assert_allclose(res.residuals, dense_res, rtol=0, atol=1e-14)


def test_vectors_and_reused_factorisation():
    net, x, X, y = regression_case()
    pt = net.linearize(x, X, y)
    A = dense_matrix(net, x, X, y, "hessian", 0.3)
    g_train = reference_grads(net, x, X, y)[:, 0]
    g_test = np.random.default_rng(1).standard_normal(net.n_params)
    want = -g_test @ np.linalg.solve(A, g_train)
    res = influence_scores(pt, g_train, g_test, damping=0.3)
    assert res.scores.shape == (1, 1)
    assert res.scores[0, 0] == pytest.approx(want, rel=1e-10)
    for check in (True, False):  # an operator without its own check still certifies
        Hinv = inverse_hessian(pt, damping=0.3, check=check)
        again = influence_scores(Hinv, g_train, g_test)
        assert again.inverse is Hinv
        assert again.scores[0, 0] == pytest.approx(want, rel=1e-10)
        assert again.residuals.shape == (1,) and again.residual <= 1e-12


def test_bad_input():
    net, x, X, y = regression_case()
    pt = net.linearize(x, X, y)
    n = net.n_params
    g = np.ones((n, 2))
    with pytest.raises(ValueError, match=rf"train_grads has shape \(3, 2\); expected \({n},\)"):
        influence_scores(pt, np.ones((3, 2)), g, damping=0.1)
    with pytest.raises(ValueError, match="test_grads contains 1 NaN"):
        bad = g.copy()
        bad[0, 0] = np.nan
        influence_scores(pt, g, bad, damping=0.1)
    with pytest.raises(TypeError, match="test_grads has dtype complex"):
        influence_scores(pt, g, g + 1j, damping=0.1)
    Hinv = inverse_hessian(pt, damping=0.1)
    with pytest.raises(ValueError, match="damping given with a factorisation"):
        influence_scores(Hinv, g, g, damping=0.1)
    with pytest.raises(ValueError, match="damping given with a factorisation"):
        influence_scores(Hinv, g, g, damping=np.full(len(net.layers), 0.1))  # per layer
    with pytest.raises(ValueError, match="threads"):
        influence_scores(pt, g, g, damping=0.1, threads=0)
    with pytest.raises(TypeError, match="expected a Point or an InverseHessian"):
        influence_scores(net, g, g)
    with pytest.raises(ValueError, match="chunk=0"):
        per_sample_gradients(pt, chunk=0)
