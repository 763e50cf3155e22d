"""BlockBidiagonal (the paper's M) and its inverse against dense matrices built here."""

from __future__ import annotations

import numpy as np
import pylops
import pytest
import scipy.sparse.linalg as spla
from _helpers import dot_test, requires_cupy, tol
from hypothesis import given
from hypothesis import strategies as st

from blockops import SingularBlockError
from blockops.backend import to_numpy
from blockops.operators import BlockBidiagonal

DTYPES = [np.float32, np.float64]


def dense_group(b):
    """Dense blockdiag of a 2-D block or a 3-D (G, r, c) stack, with plain loops."""
    b = np.asarray(b, dtype=np.float64)
    if b.ndim == 2:
        return b.copy()
    g, r, c = b.shape
    out = np.zeros((g * r, g * c))
    for i in range(g):
        out[i * r : (i + 1) * r, i * c : (i + 1) * c] = b[i]
    return out


def dense_bidiagonal(sub, diag, sizes):
    off = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    M = np.zeros((off[-1], off[-1]))
    for l in range(len(sizes)):
        d = np.eye(sizes[l]) if diag is None or diag[l] is None else dense_group(diag[l])
        M[off[l] : off[l + 1], off[l] : off[l + 1]] = d
    for j, s in enumerate(sub):
        M[off[j + 1] : off[j + 2], off[j] : off[j + 1]] = dense_group(s)
    return M


@st.composite
def bidiagonal_case(draw):
    """Ragged widths, a batch B, each block per-sample (B, r, c) or dense 2-D."""
    L = draw(st.integers(1, 5))
    B = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(1, 4), min_size=L, max_size=L))
    per_sample = draw(st.lists(st.booleans(), min_size=L, max_size=L))
    with_diag = draw(st.sampled_from(["none", "some", "all"]))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    sizes = [B * a for a in widths]
    sub = []
    for j in range(L - 1):
        if per_sample[j]:
            s = rng.standard_normal((B, widths[j + 1], widths[j])) / np.sqrt(widths[j])
        else:
            s = rng.standard_normal((sizes[j + 1], sizes[j])) / np.sqrt(sizes[j])
        sub.append(s.astype(dtype))
    diag = None
    if with_diag != "none":
        diag = []
        for l in range(L):
            if with_diag == "some" and l % 2 == 0:
                diag.append(None)
                continue
            a = widths[l]
            d = rng.standard_normal((B, a, a)) / np.sqrt(a) + 2 * np.eye(a)
            diag.append((d if per_sample[l] else dense_group(d)).astype(dtype))
    return sub, diag, sizes, dtype, seed


def to_xp(xp, blocks):
    if blocks is None:
        return None
    return [None if b is None else xp.asarray(b) for b in blocks]


def backend_name(xp):
    return "numpy" if xp is np else "cupy"


@given(case=bidiagonal_case())
def test_matches_dense_and_inverse(xp, case):
    sub, diag, sizes, dtype, seed = case
    sub_x, diag_x = to_xp(xp, sub), to_xp(xp, diag)
    copies = [to_numpy(b).copy() for b in sub_x + [d for d in (diag_x or []) if d is not None]]
    M = BlockBidiagonal(sub_x, diag=diag_x, block_sizes=sizes, dtype=dtype)
    Md = dense_bidiagonal(sub, diag, sizes)
    n = Md.shape[0]
    assert M.shape == (n, n) and M.dtype == dtype and M.block_sizes == sizes
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal(n).astype(dtype)
    X = rng.standard_normal((n, 3)).astype(dtype)
    scale = np.linalg.norm(Md) * np.linalg.norm(X)
    # forward, adjoint and batched products equal the dense matrix
    np.testing.assert_allclose(
        to_numpy(M.matvec(xp.asarray(x))), Md @ x, atol=tol(dtype, n) * scale
    )
    np.testing.assert_allclose(
        to_numpy(M.rmatvec(xp.asarray(x))), Md.T @ x, atol=tol(dtype, n) * scale
    )
    np.testing.assert_allclose(
        to_numpy(M.matmat(xp.asarray(X))), Md @ X, atol=tol(dtype, n) * scale
    )
    np.testing.assert_allclose(
        to_numpy(M.rmatmat(xp.asarray(X))), Md.T @ X, atol=tol(dtype, n) * scale
    )
    # inverse: backward error of M z = y and M^T w = y (substitution is backward stable)
    Minv = M.inverse()
    for op, A in ((Minv.matmat, Md), (Minv.rmatmat, Md.T)):
        Z = to_numpy(op(xp.asarray(X))).astype(np.float64)
        assert Z.dtype == np.float64 and Z.shape == X.shape
        res = np.linalg.norm(A @ Z - X)
        assert res <= tol(dtype, n) * (np.linalg.norm(A) * np.linalg.norm(Z) + np.linalg.norm(X))
    z = to_numpy(Minv.matvec(xp.asarray(x)))
    np.testing.assert_allclose(
        z, to_numpy(Minv.matmat(xp.asarray(x[:, None])))[:, 0], rtol=0, atol=0
    )
    dot_test(M, xp, dtype, np.linalg.norm(Md))
    dot_test(Minv, xp, dtype, np.linalg.norm(np.linalg.inv(Md)))
    # caller arrays untouched
    after = [to_numpy(b) for b in sub_x + [d for d in (diag_x or []) if d is not None]]
    for a, b in zip(copies, after):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stacked_fast_path_equals_list(xp, rng, dtype):
    L, B, a = 6, 4, 3
    sub = (rng.standard_normal((L - 1, B, a, a)) / 2).astype(dtype)
    diag = (rng.standard_normal((L, B, a, a)) / 3 + np.eye(a)).astype(dtype)
    Md = dense_bidiagonal(list(sub), list(diag), [B * a] * L)
    for d in (None, diag):
        M4 = BlockBidiagonal(xp.asarray(sub), diag=None if d is None else xp.asarray(d))
        Ml = BlockBidiagonal(
            [xp.asarray(s) for s in sub], diag=None if d is None else list(xp.asarray(d))
        )
        ref = dense_bidiagonal(list(sub), None if d is None else list(d), [B * a] * L)
        np.testing.assert_allclose(to_numpy(M4.todense(backend_name(xp))), ref, atol=tol(dtype, 12))
        np.testing.assert_allclose(to_numpy(Ml.todense(backend_name(xp))), ref, atol=tol(dtype, 12))
    # M @ Minv = I as dense matrices
    M = BlockBidiagonal(xp.asarray(sub), diag=xp.asarray(diag))
    prod = Md @ to_numpy(M.inverse().todense(backend_name(xp))).astype(np.float64)
    np.testing.assert_allclose(prod, np.eye(L * B * a), atol=tol(dtype, L * B * a) * 10)
    np.testing.assert_allclose(
        to_numpy((M @ M.inverse()).todense(backend_name(xp))),
        np.eye(L * B * a),
        atol=tol(dtype, L * B * a) * 10,
    )


def test_gradient_use_rmatvec_of_e_L(xp, rng):
    """b = e_L^T M^-1 (eq. 7) for a chain whose last block is the loss (B rows)."""
    B, widths = 4, [3, 5, 2, 1]
    sub = [-rng.standard_normal((B, widths[j + 1], widths[j])) for j in range(3)]
    M = BlockBidiagonal([xp.asarray(s) for s in sub])
    Md = dense_bidiagonal(sub, None, [B * a for a in widths])
    e = np.zeros(Md.shape[0])
    e[-B:] = 1.0
    b = to_numpy(M.inverse().rmatvec(xp.asarray(e)))
    np.testing.assert_allclose(b, np.linalg.solve(Md.T, e), rtol=1e-12, atol=1e-12)
    # the b_L block is ones; b_{L-1} is the sum over the loss rows of grad_z f_L per sample
    np.testing.assert_allclose(b[-B:], 1.0)
    np.testing.assert_allclose(b[-3 * B : -B].reshape(B, 2), -sub[2][:, 0, :], rtol=1e-14)


def test_single_block_and_block_sizes(xp):
    M = BlockBidiagonal([], block_sizes=5)
    x = xp.arange(5.0)
    np.testing.assert_array_equal(to_numpy(M.matvec(x)), np.arange(5.0))
    np.testing.assert_array_equal(to_numpy(M.inverse().rmatvec(x)), np.arange(5.0))
    with pytest.raises(ValueError, match="block_sizes"):
        BlockBidiagonal([])
    with pytest.raises(ValueError, match=r"block_sizes\[0\] = 4"):
        BlockBidiagonal([xp.ones((2, 3))], block_sizes=4)


def test_krylov_and_composition(xp, rng):
    if xp is not np:
        pytest.skip("scipy Krylov solvers take NumPy arrays")
    sub = [rng.standard_normal((3, 2, 2)) / 2 for _ in range(4)]
    M = BlockBidiagonal(sub)
    Md = dense_bidiagonal(sub, None, [6] * 5)
    y = rng.standard_normal(30)
    A = M.T @ M + 0.5 * pylops.Identity(30)
    Ad = Md.T @ Md + 0.5 * np.eye(30)
    for solver in (spla.cg, spla.minres):
        x, info = solver(A, y, rtol=1e-12, maxiter=500)
        assert info == 0
        np.testing.assert_allclose(x, np.linalg.solve(Ad, y), rtol=1e-8, atol=1e-9)
    x, info = spla.gmres(M, y, rtol=1e-12, restart=30, maxiter=100)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(Md, y), rtol=1e-8, atol=1e-9)
    # M^-1 as preconditioner: GMRES converges in one step
    x, info = spla.gmres(M, y, M=M.inverse(), rtol=1e-12, restart=5, maxiter=2)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(Md, y), rtol=1e-10, atol=1e-12)
    combo = 2.0 * M.H + M.inverse() * pylops.Identity(30)
    Cd = 2.0 * Md.T + np.linalg.inv(Md)
    np.testing.assert_allclose(combo.todense(), Cd, atol=1e-12)


def test_bad_inputs(xp, rng):
    good = [xp.asarray(rng.standard_normal((2, 3, 4))), xp.asarray(rng.standard_normal((2, 2, 3)))]
    with pytest.raises(ValueError, match=r"M: sub\[1\] has shape \(2, 3, 4\).*block 1 has size 6"):
        BlockBidiagonal([good[0], xp.asarray(rng.standard_normal((2, 3, 4)))])
    with pytest.raises(ValueError, match=r"Mx: diag\[1\] has shape"):
        BlockBidiagonal(good, diag=[None, xp.ones((6, 5)), None], name="Mx")
    with pytest.raises(ValueError, match=r"need 3 diagonal blocks"):
        BlockBidiagonal(good, diag=[None])
    with pytest.raises(TypeError, match=r"M: sub\[0\] has dtype int64"):
        BlockBidiagonal([xp.ones((2, 2), dtype=xp.int64)])
    M = BlockBidiagonal(good)
    for op in (M, M.inverse()):
        with pytest.raises(ValueError, match=r"has shape \(5,\); expected \(18,\)"):
            op.matvec(xp.ones(5))
        with pytest.raises(ValueError, match=r"expected \(18,\) or \(18, k\)"):
            op.rmatmat(xp.ones((15, 2)))
    bad = [good[0].copy(), good[1].copy()]
    bad[1][0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"M: sub\[1\] contains 1 NaN"):
        BlockBidiagonal(bad)  # refused when built, not only when inverted
    D = rng.standard_normal((2, 3, 3))
    D[1] = 0.0
    D[1, 0, 1] = 1.0  # rank one: singular second group of block 2
    with pytest.raises(SingularBlockError, match=r"diagonal block 2 \(layer 2") as err:
        BlockBidiagonal(good, diag=[None, xp.asarray(D), None]).inverse()
    assert err.value.layer == 2
    nan_d = np.eye(4)[None].repeat(2, 0)
    nan_d[0, 1, 1] = np.inf
    with pytest.raises(ValueError, match=r"diag\[0\] contains 1 NaN or Inf"):
        BlockBidiagonal(good, diag=[xp.asarray(nan_d), None, None])


@requires_cupy
def test_mixed_backends_raise(rng):
    import cupy as cp

    a = rng.standard_normal((2, 2, 2))
    with pytest.raises(TypeError, match=r"M: .*different backends"):
        BlockBidiagonal([a, cp.asarray(a)])
    M = BlockBidiagonal([cp.asarray(a)])
    with pytest.raises(TypeError, match="M: x is a numpy array"):
        M.matvec(np.ones(4))


def test_numpy_operator_rejects_foreign_vector():
    class Fake:  # quacks like a CuPy array without a GPU
        __module__ = "cupy"
        shape, ndim = (4,), 1

    M = BlockBidiagonal([np.ones((2, 2))])
    with pytest.raises(TypeError, match="M: x is a cupy array"):
        M.matvec(Fake())


@pytest.mark.parametrize("dtype", DTYPES)
def test_stacked_diag_numerically_singular_names_block_and_group(xp, rng, dtype):
    L, B, a = 5, 3, 4
    diag = rng.standard_normal((L, B, a, a)) + 3 * np.eye(a)
    u = rng.standard_normal(a)
    diag[3, 2] = np.outer(u, u) + np.eye(a) * 1e-3 * np.finfo(dtype).eps  # rank one + noise
    sub = xp.asarray(rng.standard_normal((L - 1, B, a, a)).astype(dtype))
    M = BlockBidiagonal(sub, diag=xp.asarray(diag.astype(dtype)))
    with pytest.raises(SingularBlockError, match=r"diagonal block 4 \(layer 4.*\(group 2\)") as e:
        M.inverse()
    assert e.value.layer == 4
