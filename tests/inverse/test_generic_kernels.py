"""The backend-generic factorisations (the CuPy code path), run on NumPy.

Inside ``blockops.backend.generic_linalg()`` the exact inverse uses the kernels
it uses on CuPy: LU / ``xp.linalg.solve`` with ``xp.linalg.eigvalsh`` for the
stage pivots, block QR for the lifted KKT system. Each route (generic dense
stage, structured low-rank stage in its small and large forms, banded KKT) is
checked against the LAPACK path and against independent references: the JAX
dense Hessian (``reference.dense_hessian``) for the residual and NumPy
``eigvalsh`` / ``slogdet`` of that matrix for inertia and ``log|det|``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import reference
import scipy.linalg.lapack

from blockops import SingularBlockError
from blockops.backend import BlockQR, generic_linalg, host_lapack
from blockops.backend.kernels import _GenericSymmetric
from blockops.inverse import inverse_hessian
from blockops.inverse.stagewise import ExplicitStage, StagewiseFactor, stages_from_point
from blockops.network import Bias, Dense, MSELoss, Pipeline

EPS32 = float(np.finfo(np.float32).eps)


def _case(layers, batch, seed):
    net = Pipeline([*layers, MSELoss()])
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, net.n_in))
    y = 2 * rng.standard_normal((batch, net.layers[-2].n_out))
    x = net.init(seed=seed)
    return net, x, X, y


# (id, layers, batch, damping, method, route the stagewise sweep should take)
CASES = [
    ("stage-bias", [Bias(3, "tanh"), Bias(3, "sigmoid"), Bias(3, "tanh")], 2, 0.0, "riccati"),
    (
        "stage-mixed",
        [Dense(3, 4, "tanh"), Bias(4, "sigmoid"), Dense(4, 2, "tanh")],
        3,
        0.05,
        "riccati",
    ),
    (
        "lowrank-small-perp",
        [Dense(3, 4, "tanh"), Dense(4, 4, "tanh"), Dense(4, 2)],
        3,
        1e-2,
        "riccati",
    ),
    (
        "lowrank-small-full",
        [Dense(3, 4, "tanh"), Dense(4, 4, "tanh"), Dense(4, 2, "tanh")],
        8,
        0.0,
        "riccati",
    ),
    (
        "lowrank-large-perp",
        [Dense(3, 12, "tanh"), Dense(12, 12, "tanh"), Dense(12, 2)],
        4,
        1e-2,
        "riccati",
    ),
    (
        "lowrank-large-full",
        [Dense(3, 6, "tanh"), Dense(6, 6, "tanh"), Dense(6, 2)],
        8,
        0.05,
        "riccati",
    ),
    ("banded-mixed", [Dense(3, 4, "tanh"), Bias(4, "tanh"), Dense(4, 2)], 3, 1e-2, "kkt"),
    ("banded-full", [Dense(3, 4, "tanh"), Dense(4, 4, "tanh"), Dense(4, 2, "tanh")], 8, 0.0, "kkt"),
]


def _dense(net, x, X, y, lam):
    H = reference.dense_hessian(net.spec(), x, X, y)
    return H + lam * np.eye(len(H))


def _rel(A, X, G):
    return np.linalg.norm(A @ X - G) / np.linalg.norm(G)


@pytest.mark.parametrize("name, layers, batch, lam, method", CASES, ids=[c[0] for c in CASES])
def test_generic_matches_lapack_and_dense_reference(name, layers, batch, lam, method):
    net, x, X, y = _case(layers, batch, seed=len(name))
    pt = net.linearize(x, X, y)
    Hl = _dense(net, x, X, y, lam)
    w = np.linalg.eigvalsh(Hl)
    assert np.abs(w).min() > 1e-6 * np.abs(w).max()  # a well-posed comparison
    G = np.random.default_rng(1).standard_normal((Hl.shape[0], 3))
    G0 = G.copy()
    ref = inverse_hessian(pt, damping=lam, method=method)
    with generic_linalg():
        Hi = inverse_hessian(pt, damping=lam, method=method)
        Xg = Hi @ G
    assert Hi.method == ref.method == ("kkt" if method == "kkt" else "riccati")
    if "large" in name:  # the Kronecker-structured (B a > 32) form of the low-rank stage
        assert not Hi._factor.stages[0].small
    if method == "riccati":  # really the generic kernels: eigenvalues judged the pivots
        for st in Hi._factor.stages:
            if isinstance(st, ExplicitStage):
                assert isinstance(st.pivot, _GenericSymmetric)
            else:
                assert st._eigT is not None
    else:
        assert isinstance(Hi._factor._fac, BlockQR)  # the generic block factorisation
    np.testing.assert_array_equal(G, G0)
    Xl = ref @ G
    assert np.linalg.norm(Xg - Xl) / np.linalg.norm(Xl) <= 1e-10
    assert _rel(Hl, Xg, G) <= 1e-10
    assert Hi.inertia == (int((w < 0).sum()), 0, int((w > 0).sum()))
    assert Hi.logdet == pytest.approx(np.linalg.slogdet(Hl)[1], rel=1e-9, abs=1e-9)


def test_generic_dense_stage_for_dense_layers():
    """The explicit-block stage (what non-dense layers use) on a dense net."""
    net, x, X, y = _case([Dense(3, 5, "tanh"), Dense(5, 5, "tanh"), Dense(5, 2)], 4, seed=3)
    lam = 0.1
    pt = net.linearize(x, X, y)
    Hl = _dense(net, x, X, y, lam)
    G = np.random.default_rng(2).standard_normal((Hl.shape[0], 2))
    Fl = StagewiseFactor(stages_from_point(pt, lam, structured=False))
    with generic_linalg():
        Fg = StagewiseFactor(stages_from_point(pt, lam, structured=False))
    assert all(isinstance(st, ExplicitStage) for st in Fg.stages)
    assert all(isinstance(st.pivot, _GenericSymmetric) for st in Fg.stages)
    Xl, Xg = Fl.solve(G), Fg.solve(G)
    assert np.linalg.norm(Xg - Xl) / np.linalg.norm(Xl) <= 1e-10
    assert _rel(Hl, Xg, G) <= 1e-10  # no refinement here: the bare sweep
    w = np.linalg.eigvalsh(Hl)
    assert Fg.inertia == Fl.inertia == (int((w < 0).sum()), 0, int((w > 0).sum()))
    assert Fg.logdet == pytest.approx(np.linalg.slogdet(Hl)[1], rel=1e-9)


def test_generic_path_never_calls_host_lapack(monkeypatch):
    """Inside generic_linalg nothing reaches scipy.linalg.lapack (absent on CuPy)."""
    import blockops.backend.banded as btf

    def refuse(*args, **kwargs):
        raise AssertionError("host LAPACK called on the generic path")

    net, x, X, y = _case([Dense(3, 12, "tanh"), Bias(12, "tanh"), Dense(12, 2)], 4, seed=5)
    pt = net.linearize(x, X, y)
    g = np.ones(net.n_params)
    monkeypatch.setattr(scipy.linalg.lapack, "get_lapack_funcs", refuse)
    monkeypatch.setattr(btf, "get_lapack_funcs", refuse)
    with generic_linalg():
        for method in ("riccati", "kkt"):
            Hi = inverse_hessian(pt, damping=1e-2, method=method)
            assert Hi.residual(g, Hi @ g) <= 1e-10
            assert sum(Hi.inertia) == net.n_params
    with pytest.raises(AssertionError, match="host LAPACK"):
        inverse_hessian(pt, damping=1e-2, method="kkt")  # and outside it, LAPACK is used


def _norm_msg(err):
    """The message without the singularity detail (the pivot tests differ there)."""
    return re.sub(r"is (exactly singular|numerically singular \([^)]*\))", "is singular", str(err))


def _both(fn):
    errs = []
    for generic in (False, True):
        with generic_linalg(generic), pytest.raises(SingularBlockError) as info:
            fn()
        errs.append(info.value)
    return errs


def test_singular_dense_stage_same_error():
    rng = np.random.default_rng(0)
    stages = []
    for l in range(2):
        A = rng.standard_normal((1, 2, 2))
        Kzz = rng.standard_normal((1, 2, 2))
        Kxx = rng.standard_normal((2, 2))
        Bx, Kxx = rng.standard_normal((2, 2)), Kxx + Kxx.T
        if l == 1:  # Q_uu of layer 2 is exactly zero
            Bx, Kxx = np.zeros_like(Bx), np.zeros_like(Kxx)
        stages.append((A, Bx, Kzz + Kzz.transpose(0, 2, 1), rng.standard_normal((2, 2)), Kxx))

    def factor():
        StagewiseFactor(
            [ExplicitStage(*s, 0.0, i + 1, f"layer {i + 1}") for i, s in enumerate(stages)]
        )

    lap, gen = _both(factor)
    assert str(gen) == str(lap)  # exact zero pivot: "exactly singular" in both
    assert gen.layer == lap.layer == 2 and "damping" in str(gen)


def test_singular_pivots_same_error_through_inverse_hessian():
    # numerically singular generic stage (Dense 6->1, batch 4, no damping)
    layers = [Dense(3, 1, "softplus"), Dense(1, 6, "sigmoid"), Dense(6, 1, "sigmoid")]
    net, x, X, y = _case(layers, 4, seed=7)
    pt = net.linearize(x, X, y)
    lap, gen = _both(lambda: StagewiseFactor(stages_from_point(pt, 0.0, structured=False)))
    assert _norm_msg(gen) == _norm_msg(lap) and gen.layer == lap.layer == 3
    lap, gen = _both(lambda: inverse_hessian(pt, damping=0.0, method="riccati"))
    assert str(gen) == str(lap) and gen.layer == lap.layer == 3
    # the low-rank pivot check (damping far below eps * ||T||)
    net, x, X, y = _case([Dense(3, 4, "tanh"), Dense(4, 4, "tanh"), Dense(4, 2)], 2, seed=1)
    pt = net.linearize(x, X, y)
    lap, gen = _both(lambda: inverse_hessian(pt, damping=1e-300, method="riccati"))
    assert _norm_msg(gen) == _norm_msg(lap) and gen.layer == lap.layer
    assert "numerically singular (pivot ratio" in str(gen)


def test_singular_banded_same_error():
    net, x, X, y = _case([Dense(3, 5, "tanh"), Dense(5, 5, "tanh"), Dense(5, 2)], 1, seed=2)
    pt = net.linearize(x, X, y)
    lap, gen = _both(lambda: inverse_hessian(pt, damping=0.0, method="kkt"))
    for err in (lap, gen):
        assert str(err).startswith("BandedKKT:") and "damping" in str(err)
        assert err.layer is not None and 1 <= err.layer <= len(net.layers)
    assert re.search(r"\(layer \d \(Dense", str(gen))


def test_generic_float32_point():
    net, x, X, y = _case([Dense(3, 4, "tanh"), Dense(4, 3, "tanh")], 5, seed=6)
    lam = 0.1
    Hl = _dense(net, x, X, y, lam)
    pt = net.linearize(x.astype(np.float32), X.astype(np.float32), y.astype(np.float32))
    g = np.random.default_rng(6).standard_normal(net.n_params).astype(np.float32)
    for method in ("riccati", "kkt"):
        with generic_linalg():
            xs = inverse_hessian(pt, damping=lam, method=method, check=False) @ g
        assert xs.dtype == np.float32
        assert _rel(Hl, xs, g) <= 50 * EPS32 * np.linalg.cond(Hl)


def test_switch_is_scoped():
    assert host_lapack(np)
    with generic_linalg():
        assert not host_lapack(np)
        with generic_linalg(False):
            assert host_lapack(np)
        assert not host_lapack(np)
    assert host_lapack(np)
