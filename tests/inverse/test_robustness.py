"""Regression tests for defects found under attack: each failed before its fix."""

from __future__ import annotations

import copy
import pickle
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from blockops import Dense, MSELoss, Pipeline, SingularBlockError
from blockops.hessian import hessian
from blockops.inverse import inverse_hessian


def _dense(op, n):
    return op @ np.eye(n)


def _large_target_case():
    net = Pipeline([Dense(3, 16), Dense(16, 16), Dense(16, 2, "identity"), MSELoss()])
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((8, 3)), 1e6 * rng.standard_normal((8, 2))
    return net, net.linearize(net.init(), X, y), rng


@pytest.mark.parametrize("method", ["auto", "kkt"])
def test_large_targets_are_not_called_singular(method):
    """κ(H + λI) ≈ 2e9 with targets scaled by 1e6: a valid problem, solved to its conditioning.

    The pivot test used to compare every pivot with the largest of the whole
    matrix, so the loss layer's rows looked singular next to the hidden layers
    weighted by ``b ≈ 1e6``.
    """
    net, pt, rng = _large_target_case()
    Hd = _dense(hessian(pt, damping=1e-3), net.n_params)
    cond = np.linalg.cond(Hd)
    assert cond < 1e10
    g = rng.standard_normal(net.n_params)
    Hi = inverse_hessian(pt, damping=1e-3, method=method, refine=2)
    x = Hi @ g
    x_ref = np.linalg.solve(Hd, g)
    # forward error within the conditioning bound cond * eps (a factor 10 for the sizes)
    assert np.linalg.norm(x - x_ref) / np.linalg.norm(x_ref) <= 10 * cond * np.finfo(float).eps
    # the residual at the rounding level of forming H x in float64: ‖ |H| |x| ‖ eps / ‖g‖
    floor = np.finfo(float).eps * np.linalg.norm(np.abs(Hd) @ np.abs(x)) / np.linalg.norm(g)
    for res in (np.linalg.norm(Hd @ x - g) / np.linalg.norm(g), Hi.info["residual"]):
        assert res <= 10 * floor
    assert Hi.logdet == pytest.approx(np.linalg.slogdet(Hd)[1], rel=1e-10)


def test_point_does_not_alias_the_callers_targets():
    """Changing ``y`` after linearising must not move ``H`` or the factorised inverse."""
    net = Pipeline([Dense(3, 4), Dense(4, 2, "identity"), MSELoss()])
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    pt = net.linearize(net.init(), X, y)
    v = rng.standard_normal(net.n_params)
    before = hessian(pt) @ v
    y += 100.0
    np.testing.assert_array_equal(hessian(pt) @ v, before)


def test_concurrent_solves_leave_blas_threads_as_they_were():
    """Four threads solving at once used to leave the process with one BLAS thread."""
    net, pt, rng = _large_target_case()
    Hi = inverse_hessian(pt, damping=1.0)
    g = rng.standard_normal(net.n_params)
    with threadpool_limits(limits=2):
        before = [i["num_threads"] for i in threadpool_info()]
        threads = [threading.Thread(target=lambda: [Hi @ g for _ in range(20)]) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [i["num_threads"] for i in threadpool_info()] == before


def test_points_and_operators_pickle_and_deepcopy():
    """Nothing could be sent to a process pool: ``cannot pickle 'module' object``."""
    net, pt, rng = _large_target_case()
    g = rng.standard_normal(net.n_params)
    H, Hi = hessian(pt, damping=1.0), inverse_hessian(pt, damping=1.0)
    x = Hi @ g
    for obj in (pt, H, Hi):
        copy.deepcopy(obj)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(pt)).gradient, pt.gradient)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(H)) @ g, H @ g)
    np.testing.assert_allclose(pickle.loads(pickle.dumps(Hi)) @ g, x, rtol=1e-12)


def test_complex_right_hand_side_is_refused():
    """``Hinv.solve(1j * g)`` used to return zeros (the imaginary part silently dropped)."""
    net, pt, rng = _large_target_case()
    Hi = inverse_hessian(pt, damping=1.0)
    with pytest.raises(TypeError, match="complex"):
        Hi.solve(1j * rng.standard_normal(net.n_params))


def test_residual_refuses_a_mismatched_shape():
    """An ``(n, 1)`` ``x`` used to broadcast against an ``(n,)`` ``g`` into an array."""
    net, pt, rng = _large_target_case()
    Hi = inverse_hessian(pt, damping=1.0)
    g = rng.standard_normal(net.n_params)
    with pytest.raises(ValueError, match="shape"):
        Hi.residual(g, (Hi @ g)[:, None])
    assert isinstance(Hi.residual(g, Hi @ g), float)
    Hi @ g
    assert isinstance(Hi.info["residual"], float)


@pytest.mark.parametrize(
    "bad",
    [
        {"refine": -1},
        {"refine": 1.5},
        {"threads": 0},
        {"threads": None},
        {"rtol": float("nan")},
        {"damping": float("nan")},  # negative damping is a signed shift: tests/inverse/test_shifts
        {"damping": float("inf")},
        {"damping": [1.0, 2.0]},  # per-layer needs one value per layer
        {"kind": "gn"},
        {"precision": "half"},
    ],
)
def test_bad_options_are_refused(bad):
    _, pt, _ = _large_target_case()
    with pytest.raises((ValueError, TypeError)):
        inverse_hessian(pt, **{"damping": 1.0, **bad})


def test_hopeless_fallback_keeps_the_first_error(monkeypatch):
    """``auto`` must not start a banded fallback that cannot fit in memory."""
    import blockops.inverse.operator as op

    net = Pipeline([Dense(4, 4) for _ in range(3)] + [MSELoss()])
    pt = net.linearize(net.init(), np.ones((1, 4)), np.zeros((1, 4)))
    monkeypatch.setattr(op, "available_bytes", lambda: 1024)  # a machine with 1 KiB
    with pytest.raises(SingularBlockError, match=r"stage pivot.*would need about"):
        inverse_hessian(pt, damping=0.0)


def test_lists_are_accepted_as_operands_and_junk_is_refused():
    """A list used to reach pylops and fail with a bare AttributeError."""
    net, pt, rng = _large_target_case()
    v = rng.standard_normal(net.n_params)
    H, Hi = hessian(pt, damping=1.0), inverse_hessian(pt, damping=1.0)
    np.testing.assert_array_equal(H @ list(v), H @ v)
    np.testing.assert_allclose(Hi @ list(v), Hi @ v, rtol=1e-14)
    with pytest.raises(TypeError, match="expected an array"):
        H.matvec({"v": v})


def test_parameters_as_a_list_are_refused_clearly():
    """A list of parameters used to be reported as 'shape ()'."""
    net, pt, _ = _large_target_case()
    with pytest.raises(TypeError, match="parameters must be a 1-D array"):
        net.linearize(list(pt.params), pt.X, pt.y)


def test_mixed_precision_fallback_warns():
    """precision='mixed' used to redo the sweep in float64 silently."""
    net = Pipeline([Dense(4, 4) for _ in range(3)] + [MSELoss()])
    rng = np.random.default_rng(0)
    pt = net.linearize(net.init(), rng.standard_normal((2, 4)), rng.standard_normal((2, 4)))
    # damping 1e-6: stage pivot ratios near 1e-6, singular in float32 (10 eps = 1.2e-6) only
    inverse_hessian(pt, damping=1e-6, method="riccati", check=False)  # fine in float64
    with pytest.warns(RuntimeWarning, match="factored in float64 instead"):
        Hi = inverse_hessian(pt, damping=1e-6, precision="mixed", method="riccati", check=False)
    assert Hi.work_dtype == np.float64


def test_float32_damping_hint_is_above_the_given_damping():
    """float32 singular errors used to suggest a damping smaller than the one given."""
    net = Pipeline([Dense(4, 4) for _ in range(3)] + [MSELoss()])
    pt = net.linearize(net.init(dtype=np.float32), np.ones((1, 4), np.float32), np.zeros((1, 4)))
    with pytest.raises(SingularBlockError, match=r"above the current 1\.0e-12, e.g. to 1e-3 \*"):
        inverse_hessian(pt, damping=1e-12, method="riccati")


def test_an_overflowing_solve_names_the_cause(monkeypatch):
    """An overflow used to surface as 'hvp: V contains N NaN' from the refinement."""
    net, pt, rng = _large_target_case()
    Hi = inverse_hessian(pt, damping=1.0)
    monkeypatch.setattr(Hi._factor, "solve", lambda G: G * np.inf)
    with pytest.raises(SingularBlockError, match="overflowed"):
        Hi @ rng.standard_normal(net.n_params)
