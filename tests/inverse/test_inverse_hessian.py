"""``inverse_hessian``: exact ``(H + λI)⁻¹`` vs the independent JAX dense Hessian.

References: ``reference.dense_hessian`` (``jax.hessian`` of a plain
re-implementation), ``numpy.linalg.eigvalsh`` / ``slogdet`` for inertia and
log-determinant. Residuals of the solves are measured against the JAX
matrix; the very deep case uses the fused HVP residual instead.
"""

from __future__ import annotations

import warnings

import numpy as np
import pylops
import pytest
import reference
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from blockops import SingularBlockError
from blockops.inverse import InverseHessian, inverse_hessian
from blockops.network import Bias, Dense, MSELoss, Pipeline

EPS32 = float(np.finfo(np.float32).eps)


def dense_case(case, lam):
    net, x, X, y = case.pipeline, case.x, case.X, case.y
    H = reference.dense_hessian(net.spec(), x, X, y)
    return net.linearize(x, X, y), H + lam * np.eye(len(H))


def rel_res(Hl, X, G):
    return np.linalg.norm(Hl @ X - G) / np.linalg.norm(G)


def dense_inertia(Hl):
    w = np.linalg.eigvalsh(Hl)
    return (int((w < 0).sum()), 0, int((w > 0).sum()))


@settings(max_examples=10)
@given(
    reference.pipelines(widths=(1, 5), depths=(1, 4), batches=(1, 4)),
    st.sampled_from([1e-2, 0.3]),
    st.sampled_from(["auto", "riccati", "kkt"]),
)
def test_random_pipelines_damped(case, lam, method):
    pt, Hl = dense_case(case, lam)
    cond = np.linalg.cond(Hl)
    assume(cond <= 1e6)  # the 1e-10 criterion needs a moderately conditioned matrix
    rng = np.random.default_rng(0)
    G = rng.standard_normal((Hl.shape[0], 3))
    G0 = G.copy()
    Hi = inverse_hessian(pt, damping=lam, method=method)
    X = Hi @ G
    np.testing.assert_array_equal(G, G0)
    assert rel_res(Hl, X, G) <= 1e-10
    assert Hi.inertia == dense_inertia(Hl)
    assert Hi.logdet == pytest.approx(np.linalg.slogdet(Hl)[1], rel=1e-9, abs=1e-9)
    np.testing.assert_allclose(Hi.residual(G, X), rel_res(Hl, X, G), atol=1e-12)


def _indefinite_invertible_cases():
    rng = np.random.default_rng(7)
    nets = [
        # dense layers with batch >= inputs + 1: complete basis, lambda = 0 allowed
        (Pipeline([Dense(3, 4, "tanh"), Dense(4, 4, "tanh"), Dense(4, 2, "tanh"), MSELoss()]), 8),
        # bias-only hidden layers
        (Pipeline([Bias(3, "tanh"), Bias(3, "sigmoid"), Bias(3, "tanh"), MSELoss()]), 2),
        # Dense 6->1 with batch 4 < 7: the stage pivot is singular, H is not (kkt fallback)
        (
            Pipeline(
                [
                    Dense(3, 1, "softplus"),
                    Dense(1, 6, "sigmoid"),
                    Dense(6, 1, "sigmoid"),
                    Dense(1, 3, "gelu"),
                    MSELoss(),
                ]
            ),
            4,
        ),
    ]
    out = []
    for net, B in nets:
        x = net.init(seed=3)
        X = 2 * rng.standard_normal((B, net.n_in))
        y = 3 * rng.standard_normal((B, net.layers[-2].n_out))
        out.append(reference.Case(net, x, X, y))
    return out


@pytest.mark.parametrize("case", _indefinite_invertible_cases())
def test_indefinite_undamped(case):
    pt, H = dense_case(case, 0.0)
    w = np.linalg.eigvalsh(H)
    assert w.min() < 0 < w.max() and np.abs(w).min() > 1e-8 * np.abs(w).max()
    G = np.random.default_rng(1).standard_normal((H.shape[0], 2))
    Hi = inverse_hessian(pt, damping=0.0)
    assert rel_res(H, Hi @ G, G) <= 1e-10
    assert Hi.inertia == dense_inertia(H)
    assert Hi.logdet == pytest.approx(np.linalg.slogdet(H)[1], rel=1e-9)
    Hk = inverse_hessian(pt, damping=0.0, method="kkt")
    assert Hk.method == "kkt"
    assert rel_res(H, Hk @ G, G) <= 1e-10
    assert Hk.logdet == pytest.approx(np.linalg.slogdet(H)[1], rel=1e-9)  # |det KKT| = |det H|


def test_auto_falls_back_to_kkt_on_singular_stage_pivot():
    case = _indefinite_invertible_cases()[2]
    pt, H = dense_case(case, 0.0)
    with pytest.raises(SingularBlockError, match="damping"):
        inverse_hessian(pt, damping=0.0, method="riccati")
    Hi = inverse_hessian(pt, damping=0.0)
    assert Hi.method == "kkt" and "fallback" in Hi.info
    g = np.ones(H.shape[0])
    assert rel_res(H, Hi @ g, g) <= 1e-10


def test_damped_singular_single_sample():
    net = Pipeline([Dense(3, 5, "tanh"), Dense(5, 5, "tanh"), Dense(5, 2), MSELoss()])
    rng = np.random.default_rng(2)
    case = reference.Case(
        net, net.init(seed=1), rng.standard_normal((1, 3)), rng.standard_normal((1, 2))
    )
    pt, H = dense_case(case, 0.0)
    assert np.linalg.matrix_rank(H) < H.shape[0]  # singular without damping
    lam = 1e-3
    Hl = H + lam * np.eye(len(H))
    G = rng.standard_normal((len(H), 4))
    Hi = inverse_hessian(pt, damping=lam)
    assert Hi.method == "riccati"
    assert rel_res(Hl, Hi @ G, G) <= 1e-10
    assert Hi.inertia == dense_inertia(Hl)
    assert Hi.logdet == pytest.approx(np.linalg.slogdet(Hl)[1], rel=1e-9)
    # undamped: a clear error that names a layer and suggests damping
    with pytest.raises(SingularBlockError, match=r"layer \d.*damping|damping.*layer"):
        inverse_hessian(pt, damping=0.0)


def test_many_right_hand_sides_and_operator():
    case = _indefinite_invertible_cases()[0]
    pt, H = dense_case(case, 0.1)
    G = np.random.default_rng(4).standard_normal((H.shape[0], 9))
    Hi = inverse_hessian(pt, damping=0.1)
    X = Hi @ G
    for j in range(G.shape[1]):
        np.testing.assert_allclose(X[:, j], Hi @ G[:, j], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(X, np.linalg.solve(H, G), rtol=1e-8, atol=1e-10)
    assert isinstance(Hi, pylops.LinearOperator) and isinstance(Hi, InverseHessian)
    np.testing.assert_allclose(Hi.H @ G[:, 0], X[:, 0], rtol=1e-10, atol=1e-12)  # symmetric
    assert pylops.utils.dottest(Hi, *Hi.shape, rtol=1e-8)
    # the pipeline / params / batch form
    Hj = inverse_hessian(case.pipeline, case.x, (case.X, case.y), damping=0.1)
    np.testing.assert_allclose(Hj @ G, X, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("precision", ["float32", "mixed"])
def test_float32_and_mixed(precision):
    case = _indefinite_invertible_cases()[0]
    lam = 0.05
    pt, Hl = dense_case(case, lam)
    cond = np.linalg.cond(Hl)
    G = np.random.default_rng(5).standard_normal((Hl.shape[0], 2))
    Hi = inverse_hessian(pt, damping=lam, precision=precision, refine=0, check=False)
    res0 = rel_res(Hl, Hi @ G, G)
    assert res0 <= 20 * EPS32 * cond
    Hr = inverse_hessian(pt, damping=lam, precision=precision, refine=2, check=False)
    X = Hr @ G
    if precision == "mixed":  # refinement in float64 contracts by ~ eps32 * cond per step
        assert X.dtype == np.float64
        assert rel_res(Hl, X, G) <= max(1e-12, (20 * EPS32 * cond) ** 3)
    else:
        assert X.dtype == np.float32
        assert rel_res(Hl, X, G) <= 20 * EPS32 * cond


def test_float32_point():
    net = Pipeline([Dense(3, 4, "tanh"), Dense(4, 3, "tanh"), MSELoss()])
    rng = np.random.default_rng(6)
    X = rng.standard_normal((5, 3))
    y = rng.standard_normal((5, 3))
    x64 = net.init(seed=2)
    lam = 0.1
    H = reference.dense_hessian(net.spec(), x64, X, y) + lam * np.eye(net.n_params)
    pt = net.linearize(x64.astype(np.float32), X.astype(np.float32), y.astype(np.float32))
    g = rng.standard_normal(net.n_params).astype(np.float32)
    Hi = inverse_hessian(pt, damping=lam, check=False)
    xs = Hi @ g
    assert xs.dtype == np.float32
    assert rel_res(H, xs, g) <= 50 * EPS32 * np.linalg.cond(H)


def test_very_deep_narrow():
    depth = 10_000
    net = Pipeline([Dense(2, 2, "tanh") for _ in range(depth)] + [MSELoss()])
    rng = np.random.default_rng(8)
    pt = net.linearize(net.init(seed=0), rng.standard_normal((1, 2)), rng.standard_normal((1, 2)))
    g = rng.standard_normal(net.n_params)
    Hi = inverse_hessian(pt, damping=1e-3)
    assert Hi.method == "riccati"
    x = Hi @ g
    assert np.all(np.isfinite(x))
    assert Hi.residual(g, x) <= 1e-10
    assert Hi.inertia[1] == 0 and sum(Hi.inertia) == net.n_params


def test_bad_input():
    case = _indefinite_invertible_cases()[0]
    pt, _ = dense_case(case, 0.0)
    Hi = inverse_hessian(pt, damping=0.1)
    n = Hi.shape[0]
    g = np.ones(n)
    g[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Hi.solve(g)
    g[3] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        Hi.solve(g)
    with pytest.raises(ValueError, match="shape"):
        Hi.solve(np.ones(n + 1))
    with pytest.raises(ValueError, match="damping"):
        inverse_hessian(pt, damping=float("nan"))
    with pytest.raises(ValueError, match="method"):
        inverse_hessian(pt, method="cholesky")
    with pytest.warns(RuntimeWarning, match="residual"):
        inverse_hessian(pt, damping=0.1, rtol=1e-300).solve(np.ones(n))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inverse_hessian(pt, damping=0.1).solve(np.ones(n))


def test_woodbury_dispatch(monkeypatch):
    import blockops.woodbury as wb

    case = _indefinite_invertible_cases()[1]
    pt, _ = dense_case(case, 0.0)
    calls = []
    monkeypatch.setattr(
        wb, "woodbury_inverse", lambda p, d, rtol: calls.append((p, d, rtol)) or "W"
    )
    assert inverse_hessian(pt, damping=0.5, method="woodbury", rtol=1e-6) == "W"
    assert calls == [(pt, 0.5, 1e-6)]
    for bad in ({"kind": "ggn"}, {"refine": 3}, {"precision": "mixed"}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} not supported"):
            inverse_hessian(pt, method="woodbury", **bad)


def test_float32_residual_certifies_the_returned_array():
    """precision='float32': the stored residual is that of the float32 result."""
    case = _indefinite_invertible_cases()[0]
    lam = 0.05
    pt, Hl = dense_case(case, lam)
    g = np.random.default_rng(9).standard_normal(Hl.shape[0])
    Hi = inverse_hessian(pt, damping=lam, precision="float32", refine=2)
    x = Hi @ g
    assert x.dtype == np.float32
    np.testing.assert_allclose(Hi.info["residual"], rel_res(Hl, x, g), rtol=1e-6)
    assert Hi.rtol == pytest.approx(np.sqrt(EPS32))


def _aux_ggn_case():
    from blockops.network import AuxiliaryScalarLoss, SoftmaxCrossEntropy

    layers = [Dense(3, 4, "tanh"), Dense(4, 3, "sigmoid")]
    plain = Pipeline([*layers, SoftmaxCrossEntropy()])
    aux = Pipeline([*layers, AuxiliaryScalarLoss(SoftmaxCrossEntropy(), s0=0.7)])
    rng = np.random.default_rng(11)
    X, y = rng.standard_normal((4, 3)), rng.integers(0, 3, size=4)
    x = plain.init(seed=3)
    # the auxiliary term s²/2 is decoupled: G_aux = [[G, 0], [0, 1]]
    G = reference.ggn(plain.spec(), x, X, y)
    G_aux = np.zeros((len(x) + 1,) * 2)
    G_aux[:-1, :-1], G_aux[-1, -1] = G, 1.0
    return aux.linearize(np.append(x, 0.7), X, y), G_aux


def test_ggn_with_loss_parameters():
    """kind='ggn' keeps the loss layer's own parameter curvature in every form."""
    from blockops.hessian import hessian

    pt, G_aux = _aux_ggn_case()
    n = G_aux.shape[0]
    E = np.eye(n)
    scale = np.abs(G_aux).max()
    assert np.abs(hessian(pt, kind="ggn") @ E - G_aux).max() <= 1e-12 * scale
    assert np.abs(hessian(pt, kind="ggn", form="literal").todense() - G_aux).max() <= 1e-12 * scale
    lam = 1e-2
    Gl = G_aux + lam * np.eye(n)
    g = np.random.default_rng(1).standard_normal(n)
    for method in ("riccati", "kkt"):
        Gi = inverse_hessian(pt, damping=lam, kind="ggn", method=method)
        assert rel_res(Gl, Gi @ g, g) <= 1e-10
        assert Gi.inertia == (0, 0, n)


@pytest.mark.parametrize("case", _indefinite_invertible_cases())
def test_kkt_inertia_equals_eigvalsh(case):
    """Block LDLᵀ of the lifted KKT: In(K) − (m, 0, m) is the inertia of H (Gould's theorem)."""
    from blockops.inverse.banded_kkt import kkt_inertia

    pt, H = dense_case(case, 0.0)
    assert kkt_inertia(pt, 0.0) == dense_inertia(H)
    w = np.linalg.eigvalsh(H)
    sigma = 0.5 * (w[1] + w[2]) if w[2] - w[1] > 1e-6 * np.abs(w).max() else w[0] - 1.0
    shifted = H - sigma * np.eye(len(H))
    assert kkt_inertia(pt, -sigma) == dense_inertia(shifted)


def test_inertia_after_kkt_fallback_comes_from_the_lifted_kkt(monkeypatch):
    """Singular stage pivots (even explicit ones): the inertia comes from the lifted KKT."""
    import blockops.inverse.operator as op
    from blockops.inverse.stagewise import StagewiseFactor, stages_from_point

    case = _indefinite_invertible_cases()[2]  # Dense 6->1 at batch 4: Q_uu singular
    pt, H = dense_case(case, 0.0)
    with pytest.raises(SingularBlockError):
        StagewiseFactor(stages_from_point(pt, 0.0, False))
    Hi = inverse_hessian(pt, damping=0.0)
    assert Hi.method == "kkt"
    calls = []

    def counted(*args):
        calls.append(args)
        return kkt_inertia(*args)

    kkt_inertia = op.kkt_inertia
    monkeypatch.setattr(op, "kkt_inertia", counted)
    assert Hi.inertia == dense_inertia(H)
    assert len(calls) == 1  # answered by the lifted KKT, not by a dense eigenvalue count
