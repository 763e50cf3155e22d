"""Partitioned2x2 (Schur-complement inverse, eqs. 29, 40-43) and Woodbury (eq. 28)."""

from __future__ import annotations

import numpy as np
import pylops
import pytest
import scipy.sparse.linalg as spla
from _helpers import bname, dot_test, tol
from hypothesis import assume, given
from hypothesis import strategies as st
from pylops.utils import dottest

from blockops import SingularBlockError
from blockops.backend import to_numpy
from blockops.operators import BlockDiagonal, Partitioned2x2, Woodbury

DTYPES = [np.float32, np.float64]


def well_conditioned(rng, n, dtype):
    return (rng.standard_normal((n, n)) / np.sqrt(n) + 2 * np.eye(n)).astype(dtype)


def rel(a, b):
    return np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-300)


@st.composite
def part_case(draw):
    n1, n2 = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    return (
        n1,
        n2,
        draw(st.sampled_from(["11", "22"])),
        draw(st.sampled_from(["arrays", "operators", "given_inverses"])),
        draw(st.sampled_from(DTYPES)),
        draw(st.integers(0, 2**31 - 1)),
    )


@given(case=part_case())
def test_partitioned_matches_dense(xp, case):
    n1, n2, pivot, form, dtype, seed = case
    rng = np.random.default_rng(seed)
    A = well_conditioned(rng, n1 + n2, dtype)
    A11, A12, A21, A22 = A[:n1, :n1], A[:n1, n1:], A[n1:, :n1], A[n1:, n1:]
    blocks = [xp.asarray(b.copy()) for b in (A11, A12, A21, A22)]
    before = [to_numpy(b).copy() for b in blocks]
    if form == "arrays":
        P = Partitioned2x2(*blocks)
    else:
        P = Partitioned2x2(*[pylops.MatrixMult(b, dtype=dtype) for b in blocks])
    assert P.shape == (n1 + n2, n1 + n2) and P.dtype == dtype
    Ad = A.astype(np.float64)
    # independent dense references: numpy inverse of the whole matrix and of the pieces
    kw = {}
    if form == "given_inverses":
        if pivot == "11":
            S = Ad[n1:, n1:] - Ad[n1:, :n1] @ np.linalg.solve(Ad[:n1, :n1], Ad[:n1, n1:])
            kw = {"A11_inv": np.linalg.inv(Ad[:n1, :n1]), "S_inv": np.linalg.inv(S)}
        else:
            S = Ad[:n1, :n1] - Ad[:n1, n1:] @ np.linalg.solve(Ad[n1:, n1:], Ad[n1:, :n1])
            kw = {"A22_inv": np.linalg.inv(Ad[n1:, n1:]), "S_inv": np.linalg.inv(S)}
        kw = {k: xp.asarray(v.astype(dtype)) for k, v in kw.items()}
        np.testing.assert_allclose(
            to_numpy(
                P.schur_complement(pivot, **{k: v for k, v in kw.items() if k != "S_inv"}).todense(
                    bname(xp)
                )
            ),
            S,
            rtol=tol(dtype) * 10,
            atol=tol(dtype) * 10,
        )
    Pinv = P.inverse(pivot=pivot, **kw)
    dense = to_numpy(P.todense(bname(xp)))
    np.testing.assert_allclose(dense, Ad, rtol=tol(dtype), atol=tol(dtype))
    inv = to_numpy(Pinv.todense(bname(xp)))
    assert rel(inv, np.linalg.inv(Ad)) < tol(dtype) * 10
    assert rel(Ad @ inv, np.eye(n1 + n2)) < tol(dtype) * 10
    y = rng.standard_normal(n1 + n2).astype(dtype)
    assert rel(to_numpy(Pinv.rmatvec(xp.asarray(y))), np.linalg.solve(Ad.T, y)) < tol(dtype) * 10
    dot_test(P, xp, dtype, np.linalg.norm(Ad))
    dot_test(Pinv, xp, dtype, np.linalg.norm(np.linalg.inv(Ad)))
    for b0, b1 in zip(before, blocks):
        np.testing.assert_array_equal(b0, to_numpy(b1))


def test_partitioned_rectangular_forward_and_errors(xp, rng):
    A11, A12 = xp.asarray(rng.standard_normal((2, 3))), xp.asarray(rng.standard_normal((2, 4)))
    A21, A22 = xp.asarray(rng.standard_normal((5, 3))), xp.asarray(rng.standard_normal((5, 4)))
    P = Partitioned2x2(A11, A12, A21, A22, name="K")
    dense = np.block([[to_numpy(A11), to_numpy(A12)], [to_numpy(A21), to_numpy(A22)]])
    x = rng.standard_normal(7)
    np.testing.assert_allclose(to_numpy(P.matvec(xp.asarray(x))), dense @ x, rtol=1e-13)
    dottest(P, backend=bname(xp))
    with pytest.raises(ValueError, match=r"K: the inverse needs square diagonal blocks"):
        P.inverse()
    with pytest.raises(ValueError, match=r"K: A12 has shape \(3, 4\) but A11 has shape \(2, 3\)"):
        Partitioned2x2(A11, xp.ones((3, 4)), A21, A22, name="K")
    with pytest.raises(ValueError, match=r"K: x has shape \(6,\); expected \(7,\)"):
        P.matvec(xp.ones(6))
    with pytest.raises(TypeError, match="A11 must be a 2-D array or a pylops LinearOperator"):
        Partitioned2x2([[1.0]], A12, A21, A22)


def test_partitioned_singular_and_nan(xp, rng):
    A = well_conditioned(rng, 4, np.float64)
    b = [xp.asarray(v) for v in (A[:2, :2], A[:2, 2:], A[2:, :2], A[2:, 2:])]
    with pytest.raises(SingularBlockError, match=r"P2: A11 \(2x2\) is singular"):
        Partitioned2x2(xp.zeros((2, 2)), b[1], b[2], b[3], name="P2").inverse(pivot="11")
    # A22 = A21 A11^-1 A12 makes the Schur complement (pivot 11) exactly zero
    S0 = to_numpy(b[2]) @ np.linalg.solve(to_numpy(b[0]), to_numpy(b[1]))
    with pytest.raises(SingularBlockError, match=r"Schur complement \(pivot 11\)"):
        Partitioned2x2(b[0], b[1], b[2], xp.asarray(S0)).inverse(pivot="11")
    nan = to_numpy(b[3]).copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"Partitioned2x2: A22 contains 1 NaN"):
        Partitioned2x2(b[0], b[1], b[2], xp.asarray(nan)).inverse()
    with pytest.raises(ValueError, match="pivot must be '11' or '22'"):
        Partitioned2x2(*b).inverse(pivot="12")
    with pytest.raises(ValueError, match=r"S_inv has shape \(3, 3\); expected \(2, 2\)"):
        Partitioned2x2(*b).inverse(S_inv=xp.ones((3, 3)))


def test_partitioned_with_structured_blocks_and_krylov(xp, rng):
    """Blocks that are blockops operators; the inverse as a preconditioner."""
    g = rng.standard_normal((3, 2, 2))
    d1 = g @ np.swapaxes(g, 1, 2) + 3 * np.eye(2)  # symmetric: P is symmetric (indefinite ok)
    A11 = BlockDiagonal(xp.asarray(d1))
    A11_inv = BlockDiagonal(xp.asarray(np.linalg.inv(d1)))
    A12 = xp.asarray(rng.standard_normal((6, 2)) / 3)
    A22 = xp.asarray(np.eye(2) * 2)
    P = Partitioned2x2(A11, A12, A12.T, A22)  # symmetric
    Pinv = P.inverse(A11_inv=A11_inv, pivot="11")
    dense = to_numpy(P.todense(bname(xp)))
    np.testing.assert_allclose(dense @ to_numpy(Pinv.todense(bname(xp))), np.eye(8), atol=1e-12)
    if xp is not np:
        return
    y = rng.standard_normal(8)
    for solver in (spla.gmres, spla.minres):
        x, info = solver(P, y, rtol=1e-12, maxiter=200)
        assert info == 0
        np.testing.assert_allclose(x, np.linalg.solve(dense, y), rtol=1e-8, atol=1e-10)
    x, info = spla.cg(P.H @ P, P.H @ y, M=Pinv @ Pinv.H, rtol=1e-12, maxiter=3)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(dense, y), rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------- Woodbury
@given(
    n=st.integers(1, 6),
    m=st.integers(1, 4),
    form=st.sampled_from(["arrays", "operators", "given_S"]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_woodbury_matches_dense_inverse(xp, n, m, form, dtype, seed):
    rng = np.random.default_rng(seed)
    A = well_conditioned(rng, n, np.float64)
    A = A @ A.T  # symmetric positive definite, like the paper's A
    U = rng.standard_normal((m, n)) / np.sqrt(n)
    Q = np.diag(rng.uniform(0.5, 2.0, m)) * rng.choice([-1.0, 1.0], m)  # indefinite Q allowed
    ref = np.linalg.inv(A + U.T @ Q @ U)
    if np.linalg.cond(A + U.T @ Q @ U) > 1e3:
        Q = np.abs(Q)
        ref = np.linalg.inv(A + U.T @ Q @ U)
    Ainv, Qinv = np.linalg.inv(A), np.linalg.inv(Q)
    # The fixed tolerances below assume eq. 28 loses at most ~3 digits. Its rounding
    # error relative to |W| is about eps * amp * cond(C): amp = (|A^-1| + |A^-1 U^T|^2
    # |C^-1|) / |W| is the cancellation between its two terms (a tiny A: huge A^-1 and
    # |W| = O(1)) and cond(C) enters through C^-1 (LU-solved here or given). Neither is
    # bounded by the draws above (n=1, m=2, given_S, float32, seed=151: amp 2.2e8,
    # cond(C) 1.5e4, error 1.63), so bound their product (float64 numpy, independently).
    C64 = Qinv + U @ Ainv @ U.T
    amp = (
        np.linalg.norm(Ainv) + np.linalg.norm(Ainv @ U.T) ** 2 * np.linalg.norm(np.linalg.inv(C64))
    ) / np.linalg.norm(ref)
    assume(amp * np.linalg.cond(C64) <= 1e3)
    args = [xp.asarray(v.astype(dtype)) for v in (Ainv, U, Qinv)]
    kw = {}
    if form == "operators":
        args = [pylops.MatrixMult(a, dtype=dtype) for a in args]
    if form == "given_S":
        C = Qinv + U @ Ainv @ U.T
        kw = {"S_inv": xp.asarray(np.linalg.inv(C).astype(dtype))}
    W = Woodbury(*args, **kw)
    assert W.shape == (n, n) and W.dtype == dtype
    np.testing.assert_allclose(
        to_numpy(W.capacitance().todense(bname(xp))),
        Qinv + U @ Ainv @ U.T,
        rtol=tol(dtype) * 10,
        atol=tol(dtype) * 10,
    )
    assert rel(to_numpy(W.todense(bname(xp))), ref) < tol(dtype) * 100
    y = rng.standard_normal(n).astype(dtype)
    assert rel(to_numpy(W.rmatvec(xp.asarray(y))), ref.T @ y) < tol(dtype) * 100
    # rounding scales with the terms of eq. 28, not with |W|: A^-1 and A^-1 U^T C^-1 U A^-1
    Cinv = np.linalg.inv(Qinv + U @ Ainv @ U.T)
    terms = np.linalg.norm(Ainv) + np.linalg.norm(Ainv @ U.T) ** 2 * np.linalg.norm(Cinv)
    dot_test(W, xp, dtype, terms)


def test_woodbury_errors(xp, rng):
    Ainv, U, Qinv = xp.eye(3), xp.asarray(rng.standard_normal((2, 3))), xp.eye(2)
    with pytest.raises(ValueError, match=r"W: A_inv has shape \(2, 2\); expected \(3, 3\)"):
        Woodbury(xp.eye(2), U, Qinv, name="W")
    with pytest.raises(ValueError, match=r"Q_inv has shape \(3, 3\); expected \(2, 2\)"):
        Woodbury(Ainv, U, xp.eye(3))
    with pytest.raises(ValueError, match=r"S_inv has shape \(3, 3\); expected \(2, 2\)"):
        Woodbury(Ainv, U, Qinv, S_inv=xp.eye(3))
    bad = to_numpy(U).copy()
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="Woodbury: U contains 1 NaN or Inf"):
        Woodbury(Ainv, xp.asarray(bad), Qinv)
    # Q^-1 = -U A^-1 U^T: zero capacitance matrix
    C = to_numpy(U) @ to_numpy(U).T
    with pytest.raises(SingularBlockError, match="Woodbury: capacitance matrix"):
        Woodbury(Ainv, U, xp.asarray(-C))
    W = Woodbury(Ainv, U, Qinv)
    with pytest.raises(ValueError, match=r"Woodbury: x has shape \(2,\); expected \(3,\)"):
        W.matvec(xp.ones(2))


def test_woodbury_in_krylov_and_composition(xp, rng):
    """W is SPD for SPD A and Q: CG with W, and W as a preconditioner for A + U^T Q U."""
    n, m = 8, 3
    G = rng.standard_normal((n, n))
    A = G @ G.T / n + np.eye(n)
    U = rng.standard_normal((m, n))
    Q = np.diag([1.0, 2.0, 0.5])
    H = A + U.T @ Q @ U
    W = Woodbury(*[xp.asarray(v) for v in (np.linalg.inv(A), U, np.linalg.inv(Q))])
    combo = 2.0 * W.H - W @ pylops.MatrixMult(xp.asarray(H))
    np.testing.assert_allclose(
        to_numpy(combo.todense(bname(xp))), 2 * np.linalg.inv(H) - np.eye(n), atol=1e-12
    )
    if xp is not np:
        return
    y = rng.standard_normal(n)
    for solver in (spla.cg, spla.minres, spla.gmres):
        x, info = solver(W, y, rtol=1e-12, maxiter=100)
        assert info == 0
        np.testing.assert_allclose(x, H @ y, rtol=1e-8)
    x, info = spla.cg(pylops.MatrixMult(H), y, M=W, rtol=1e-12, maxiter=2)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(H, y), rtol=1e-10)
