"""Krylov wrappers with blockops operators and the exact inverse as preconditioner.

References: the JAX dense Hessian / GGN of ``tests/reference.py`` and dense
``numpy.linalg`` solves.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference

from blockops import solvers
from blockops.hessian import hessian
from blockops.inverse import inverse_hessian
from blockops.network import Dense, MSELoss, Pipeline


@pytest.fixture(scope="module")
def case():
    net = Pipeline([Dense(3, 4, "tanh"), Dense(4, 4, "tanh"), Dense(4, 2, "tanh"), MSELoss()])
    rng = np.random.default_rng(7)
    x = net.init(seed=3)
    X, y = 2 * rng.standard_normal((8, 3)), 3 * rng.standard_normal((8, 2))
    H = reference.dense_hessian(net.spec(), x, X, y)
    G = reference.ggn(net.spec(), x, X, y)
    b = rng.standard_normal(net.n_params)
    return net.linearize(x, X, y), H, G, b


def rel(A, x, b):
    return np.linalg.norm(A @ x - b) / np.linalg.norm(b)


def test_cg_exact_preconditioner_one_or_two_iterations(case):
    pt, H, _, b = case
    lam = 1.0 - np.linalg.eigvalsh(H).min()  # H + lam I positive definite
    Hl = H + lam * np.eye(len(H))
    A = hessian(pt, damping=lam)
    b0 = b.copy()
    plain = solvers.cg(A, b, rtol=1e-10)
    pre = solvers.cg(A, b, M=inverse_hessian(pt, damping=lam), rtol=1e-10)
    np.testing.assert_array_equal(b, b0)
    assert pre.converged and pre.iterations <= 2 < plain.iterations
    assert rel(Hl, pre.x, b) <= 1e-10
    assert len(pre.residuals) == pre.iterations and pre.residuals[-1] <= 1e-10
    assert pre.time >= 0


def test_gmres_exact_inverse_of_indefinite(case):
    pt, H, _, b = case
    assert np.linalg.eigvalsh(H).min() < 0
    res = solvers.gmres(hessian(pt), b, M=inverse_hessian(pt), rtol=1e-10)
    assert res.converged and res.iterations <= 2
    assert rel(H, res.x, b) <= 1e-10


def test_minres_positive_preconditioner(case):
    pt, H, G, b = case
    lam = 0.1
    P = solvers.positive_preconditioner(pt, lam)
    v = np.random.default_rng(1).standard_normal(len(b))
    # P is the exact inverse of the damped GGN (dense JAX reference)
    assert rel(G + lam * np.eye(len(G)), P @ v, v) <= 1e-10
    assert np.linalg.eigvalsh(np.linalg.inv(G + lam * np.eye(len(G)))).min() > 0
    pre = solvers.minres(hessian(pt), b, M=P, rtol=1e-10, maxiter=400)
    plain = solvers.minres(hessian(pt), b, rtol=1e-10, maxiter=400)
    assert pre.iterations < plain.iterations
    np.testing.assert_allclose(pre.residuals[-1], rel(H, pre.x, b), rtol=1e-6)
    with pytest.raises(ValueError, match="damping"):
        solvers.positive_preconditioner(pt, 0.0)


def test_arrays_and_bad_input(case):
    _, H, _, b = case
    Hl = H + 5.0 * np.eye(len(H))
    res = solvers.minres(Hl, b, rtol=1e-12, maxiter=500)
    assert res.iterations > 0 and rel(Hl, res.x, b) <= 1e-6
    with pytest.raises(ValueError, match="shape"):
        solvers.cg(Hl, np.ones(len(b) + 1))
    bad = b.copy()
    bad[0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        solvers.gmres(Hl, bad)


def test_gmres_iterations_count_inner_iterations():
    # 50x50 nonsymmetric, well conditioned (cond ~ 4); restart=5 needs several
    # inner iterations per cycle, so cycles and inner iterations differ
    import scipy.sparse.linalg as sla

    rng = np.random.default_rng(0)
    n = 50
    A = 2 * np.eye(n) + rng.standard_normal((n, n)) / np.sqrt(n)
    b = rng.standard_normal(n)
    inner, cycles = [], []
    sla.gmres(A, b, rtol=1e-8, restart=5, callback=inner.append, callback_type="pr_norm")
    sla.gmres(A, b, rtol=1e-8, restart=5, callback=cycles.append, callback_type="x")
    assert len(inner) > len(cycles) + 5  # many inner iterations per cycle
    res = solvers.gmres(A, b, rtol=1e-8, restart=5)
    assert res.iterations == len(inner)
    assert len(res.residuals) == res.iterations
    np.testing.assert_allclose(res.residuals, inner, rtol=1e-12)
    assert res.solver_residual == pytest.approx(inner[-1], rel=1e-12)
    assert res.converged and res.solver_converged
    np.testing.assert_allclose(res.residual, rel(A, res.x, b), rtol=1e-10)
    assert res.residual <= 1e-8
    quiet = solvers.gmres(A, b, rtol=1e-8, restart=5, history=False)
    assert quiet.iterations == len(inner) and quiet.residuals == []


def test_minres_converged_from_true_residual():
    # symmetric indefinite, eigenvalues ±[1e-4, 1] and three of size ~1e-6:
    # SciPy's MINRES stops on its recursive estimate (info == 0) with a true
    # relative residual far above rtol; converged must say so
    rng = np.random.default_rng(0)
    n, rtol = 60, 1e-8
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    mags = np.logspace(-4, 0, n)
    mags[:3] = 1e-6 * (1 + rng.random(3))
    lam = rng.choice([-1.0, 1.0], n) * mags
    A = (Q * lam) @ Q.T
    A = (A + A.T) / 2
    b = rng.standard_normal(n)
    res = solvers.minres(A, b, rtol=rtol, maxiter=10 * n)
    true = rel(A, res.x, b)
    assert res.info == 0  # the solver's own claim
    assert true > 1e3 * rtol
    assert not res.converged
    assert res.solver_converged
    np.testing.assert_allclose(res.residual, true, rtol=1e-8)
    assert res.rtol == rtol and res.solver_residual is None
    np.testing.assert_allclose(res.residuals[-1], true, rtol=1e-6)
    # a well-posed SPD solve still converges by the true residual
    spd = (Q * mags) @ Q.T + np.eye(n)
    ok = solvers.cg((spd + spd.T) / 2, b, rtol=rtol, history=False)
    assert ok.converged and ok.residual <= rtol and ok.residuals == []
