"""BlockTridiagonal, its pivoted factorisations and inverse, against dense numpy."""

from __future__ import annotations

import numpy as np
import pylops
import pytest
import scipy.sparse.linalg as spla
from _helpers import bname, dot_test, tol
from hypothesis import given
from hypothesis import strategies as st

from blockops import SingularBlockError
from blockops.backend import to_numpy
from blockops.operators import BlockTridiagonal

DTYPES = [np.float32, np.float64]


def dense_tridiag(lower, diag, upper):
    sizes = [d.shape[0] for d in diag]
    off = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    A = np.zeros((off[-1], off[-1]))
    for k, d in enumerate(diag):
        A[off[k] : off[k + 1], off[k] : off[k + 1]] = d
    for k, lo in enumerate(lower):
        up = lo.T if upper is None else upper[k]
        A[off[k + 1] : off[k + 2], off[k] : off[k + 1]] = lo
        A[off[k] : off[k + 1], off[k + 1] : off[k + 2]] = up
    return A


def methods(xp):
    return ["banded", "block"] if xp is np else ["block"]


@st.composite
def tridiag_case(draw):
    L = draw(st.integers(1, 5))
    sizes = draw(st.lists(st.integers(1, 4), min_size=L, max_size=L))
    symmetric = draw(st.booleans())
    indefinite_pivots = draw(st.booleans())  # zero diagonal blocks: pivoting is required
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    diag = [rng.standard_normal((n, n)) for n in sizes]
    if indefinite_pivots:
        diag = [0 * d if k % 2 == 0 and k < L - 1 else d for k, d in enumerate(diag)]
    if symmetric:
        diag = [d + d.T for d in diag]
    lower = [rng.standard_normal((sizes[k + 1], sizes[k])) for k in range(L - 1)]
    upper = (
        None if symmetric else [rng.standard_normal((sizes[k], sizes[k + 1])) for k in range(L - 1)]
    )
    cast = lambda bl: None if bl is None else [b.astype(dtype) for b in bl]  # noqa: E731
    return cast(lower), cast(diag), cast(upper), dtype, seed


@given(case=tridiag_case())
def test_matches_dense_and_solves(xp, case):
    lower, diag, upper, dtype, seed = case
    A = dense_tridiag(lower, diag, upper)
    n = A.shape[0]
    to = lambda bl: None if bl is None else [xp.asarray(b) for b in bl]  # noqa: E731
    lx, dx, ux = to(lower), to(diag), to(upper)
    before = [to_numpy(b).copy() for b in lx + dx + (ux or [])]
    T = BlockTridiagonal(lx, dx, ux)
    assert T.dtype == dtype and T.shape == (n, n)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 3)).astype(dtype)
    a = tol(dtype, n) * (np.linalg.norm(A) + 1) * np.linalg.norm(X)
    np.testing.assert_allclose(to_numpy(T.matmat(xp.asarray(X))), A @ X, atol=a)
    np.testing.assert_allclose(to_numpy(T.rmatmat(xp.asarray(X))), A.T @ X, atol=a)
    np.testing.assert_allclose(to_numpy(T.matvec(xp.asarray(X[:, 0]))), A @ X[:, 0], atol=a)
    np.testing.assert_array_equal(to_numpy(T.todense()), A.astype(dtype))
    dot_test(T, xp, dtype, np.linalg.norm(A))
    if np.linalg.cond(A) > 1e3 if dtype == np.float32 else np.linalg.cond(A) > 1e10:
        return  # random draw too close to singular for a meaningful solve check
    for method in methods(xp):
        F = T.factor(method)
        for trans, M in ((False, A), (True, A.T)):
            Z = to_numpy(F.solve(xp.asarray(X), trans=trans)).astype(np.float64)
            z = to_numpy(F.solve(xp.asarray(X[:, 0]), trans=trans)).astype(np.float64)
            assert Z.shape == X.shape and z.shape == (n,)
            # backward error: pivoted LU / orthogonal elimination are backward stable
            bound = 10 * tol(dtype, n) * (np.linalg.norm(M) * np.linalg.norm(Z) + np.linalg.norm(X))
            assert np.linalg.norm(M @ Z - X) <= bound
            assert np.linalg.norm(M @ z - X[:, 0]) <= bound
        Tinv = T.inverse(method)
        dot_test(Tinv, xp, dtype, np.linalg.norm(np.linalg.inv(A)))
    after = [to_numpy(b) for b in lx + dx + (ux or [])]
    for b0, b1 in zip(before, after):
        np.testing.assert_array_equal(b0, b1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inverse_times_operator_is_identity(xp, rng, dtype):
    sizes = [3, 2, 4, 3]
    diag = [rng.standard_normal((n, n)) + 3 * np.eye(n) for n in sizes]
    lower = [rng.standard_normal((sizes[k + 1], sizes[k])) for k in range(3)]
    upper = [rng.standard_normal((sizes[k], sizes[k + 1])) for k in range(3)]
    A = dense_tridiag(lower, diag, upper)
    c = lambda bl: [xp.asarray(b.astype(dtype)) for b in bl]  # noqa: E731
    T = BlockTridiagonal(c(lower), c(diag), c(upper))
    eye = np.eye(12)
    t = 1e-4 if dtype == np.float32 else 1e-12
    for method in methods(xp):
        Tinv = T.inverse(method)
        prod = to_numpy((T @ Tinv).todense(bname(xp)))
        np.testing.assert_allclose(prod, eye, atol=t)
        np.testing.assert_allclose(A @ to_numpy(Tinv.todense(bname(xp))), eye, atol=t)
        v = rng.standard_normal(12).astype(dtype)
        np.testing.assert_allclose(to_numpy(T.matvec(Tinv.matvec(xp.asarray(v)))), v, atol=t * 10)
        np.testing.assert_allclose(to_numpy(Tinv.rmatvec(T.rmatvec(xp.asarray(v)))), v, atol=t * 10)


def test_pivoting_needed_and_factor_reused(xp, rng):
    """Zero diagonal blocks (saddle-point shape): unpivoted block LU would divide by zero."""
    n, L = 3, 6
    diag = [np.zeros((n, n)) if k % 2 else rng.standard_normal((n, n)) for k in range(L)]
    diag = [d + d.T for d in diag]
    lower = [rng.standard_normal((n, n)) for _ in range(L - 1)]
    A = dense_tridiag(lower, diag, None)
    T = BlockTridiagonal([xp.asarray(b) for b in lower], [xp.asarray(d) for d in diag])
    assert T.factor() is T.factor()  # cached: factor once, solve many
    B = rng.standard_normal((n * L, 4))
    for method in methods(xp):
        X = to_numpy(T.solve(xp.asarray(B), method=method))
        np.testing.assert_allclose(X, np.linalg.solve(A, B), rtol=1e-9, atol=1e-10)


def test_singular_names_block_row(xp, rng):
    sizes = [2, 3, 2, 2]
    diag = [rng.standard_normal((n, n)) for n in sizes]
    lower = [rng.standard_normal((sizes[k + 1], sizes[k])) for k in range(3)]
    upper = [rng.standard_normal((sizes[k], sizes[k + 1])) for k in range(3)]
    # zero column 1 of block 2 (0-based): A has a zero column in block row/col 3 (1-based)
    diag[2][:, 1] = 0.0
    upper[1][:, 1] = 0.0
    lower[2][:, 1] = 0.0
    T = BlockTridiagonal(*[[xp.asarray(b) for b in bl] for bl in (lower, diag, upper)], name="KKT")
    for method in methods(xp):
        with pytest.raises(SingularBlockError, match=r"KKT: .*block row 3 of 4") as err:
            T.factor(method)
        assert err.value.layer == 3


def test_bad_inputs(xp, rng):
    d = [xp.asarray(rng.standard_normal((2, 2))), xp.asarray(rng.standard_normal((3, 3)))]
    with pytest.raises(ValueError, match=r"T: lower\[0\] has shape \(2, 3\); expected \(3, 2\)"):
        BlockTridiagonal([xp.ones((2, 3))], d, name="T")
    with pytest.raises(ValueError, match=r"upper\[0\] has shape \(3, 2\); expected \(2, 3\)"):
        BlockTridiagonal([xp.ones((3, 2))], d, [xp.ones((3, 2))])
    with pytest.raises(ValueError, match=r"diag\[1\] has shape \(3, 2\); expected square"):
        BlockTridiagonal([xp.ones((3, 2))], [d[0], xp.ones((3, 2))])
    with pytest.raises(ValueError, match="need 1 lower blocks, got 0"):
        BlockTridiagonal([], d)
    T = BlockTridiagonal([xp.ones((3, 2))], d)
    with pytest.raises(ValueError, match=r"x has shape \(4,\); expected \(5,\)"):
        T.matvec(xp.ones(4))
    with pytest.raises(ValueError, match=r"rhs has shape \(6,\)"):
        T.solve(xp.ones(6))
    with pytest.raises(ValueError, match="unknown method"):
        T.factor("cholesky")
    bad = [d[0], d[1].copy()]
    bad[1][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"contains 1 NaN"):
        BlockTridiagonal([xp.ones((3, 2))], bad).factor()


def test_krylov_and_composition(xp, rng):
    if xp is not np:
        pytest.skip("scipy Krylov solvers take NumPy arrays")
    n, L = 3, 5
    lower = [rng.standard_normal((n, n)) / 3 for _ in range(L - 1)]
    diag = [(lambda g: g @ g.T + n * np.eye(n))(rng.standard_normal((n, n))) for _ in range(L)]
    T = BlockTridiagonal(lower, diag)  # symmetric positive definite (diagonally dominant)
    A = dense_tridiag(lower, diag, None)
    y = rng.standard_normal(n * L)
    for solver in (spla.cg, spla.minres, spla.gmres):
        x, info = solver(T, y, rtol=1e-12, maxiter=500)
        assert info == 0
        np.testing.assert_allclose(x, np.linalg.solve(A, y), rtol=1e-8, atol=1e-10)
    # the exact inverse as preconditioner: one iteration
    x, info = spla.cg(T, y, M=T.inverse(), rtol=1e-12, maxiter=2)
    assert info == 0
    combo = T.H @ T.inverse() + 2.0 * pylops.Identity(n * L) - T.T
    np.testing.assert_allclose(combo.todense(), 3 * np.eye(n * L) - A.T, atol=1e-12)
