"""BlockDiagonal, Shift (P) and KronContract (I kron b) against dense matrices built here."""

from __future__ import annotations

import numpy as np
import pylops
import pytest
import scipy.sparse.linalg as spla
from _helpers import bname, dot_test, requires_cupy, tol
from hypothesis import given
from hypothesis import strategies as st

from blockops.backend import to_numpy
from blockops.operators import BlockDiagonal, KronContract, Shift

DTYPES = [np.float32, np.float64]


def dense_blockdiag(mats):
    """Dense block diagonal of 2-D numpy matrices, with plain loops."""
    R = sum(m.shape[0] for m in mats)
    C = sum(m.shape[1] for m in mats)
    out = np.zeros((R, C))
    r = c = 0
    for m in mats:
        out[r : r + m.shape[0], c : c + m.shape[1]] = m
        r, c = r + m.shape[0], c + m.shape[1]
    return out


def check_against(xp, op, dense, dtype, seed):
    """Products, adjoints, batched products and the dot test against ``dense``."""
    rng = np.random.default_rng(seed)
    m, n = dense.shape
    assert op.shape == (m, n)
    x = rng.standard_normal(n).astype(dtype)
    y = rng.standard_normal(m).astype(dtype)
    X = rng.standard_normal((n, 2)).astype(dtype)
    Y = rng.standard_normal((m, 2)).astype(dtype)
    scale = (np.linalg.norm(dense) + 1) * max(np.linalg.norm(X), np.linalg.norm(Y), 1)
    a = tol(dtype, max(m, n)) * scale
    np.testing.assert_allclose(to_numpy(op.matvec(xp.asarray(x))), dense @ x, atol=a)
    np.testing.assert_allclose(to_numpy(op.rmatvec(xp.asarray(y))), dense.T @ y, atol=a)
    np.testing.assert_allclose(to_numpy(op.matmat(xp.asarray(X))), dense @ X, atol=a)
    np.testing.assert_allclose(to_numpy(op.rmatmat(xp.asarray(Y))), dense.T @ Y, atol=a)
    assert op.matvec(xp.asarray(x)).dtype == dtype
    if m and n:
        dot_test(op, xp, dtype, np.linalg.norm(dense))


# ---------------------------------------------------------------- BlockDiagonal
@st.composite
def blockdiag_case(draw):
    nb = draw(st.integers(1, 6))
    shapes = draw(
        st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=nb, max_size=nb)
    )
    form = draw(st.sampled_from(["list2d", "stack", "mixed"]))
    return shapes, form, draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**31 - 1))


@given(case=blockdiag_case())
def test_blockdiagonal_matches_dense(xp, case):
    shapes, form, dtype, seed = case
    rng = np.random.default_rng(seed)
    if form == "stack":
        arr = rng.standard_normal((len(shapes), *shapes[0])).astype(dtype)
        blocks, mats = xp.asarray(arr), list(arr)
    elif form == "list2d":
        mats = [rng.standard_normal(s).astype(dtype) for s in shapes]
        blocks = [xp.asarray(b) for b in mats]
    else:  # 2-D blocks and 3-D (G, r, c) stacks, ragged
        blocks, mats = [], []
        for i, s in enumerate(shapes):
            g = 1 + i % 3
            b = rng.standard_normal((g, *s)).astype(dtype)
            blocks.append(xp.asarray(b if i % 2 else b[0]))
            mats.extend(list(b) if i % 2 else [b[0]])
    before = [to_numpy(b).copy() for b in (blocks if isinstance(blocks, list) else [blocks])]
    op = BlockDiagonal(blocks)
    assert op.dtype == dtype
    check_against(xp, op, dense_blockdiag(mats), dtype, seed)
    after = [to_numpy(b) for b in (blocks if isinstance(blocks, list) else [blocks])]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_blockdiagonal_runs_group_equal_shapes(xp, rng):
    blocks = [xp.asarray(rng.standard_normal((3, 3))) for _ in range(5)]
    blocks += [xp.asarray(rng.standard_normal((2, 4))) for _ in range(3)]
    op = BlockDiagonal(blocks)
    assert len(op._runs) == 2  # two batched matmuls, not eight
    check_against(xp, op, dense_blockdiag([to_numpy(b) for b in blocks]), np.float64, 0)


def test_blockdiagonal_bad_inputs(xp):
    with pytest.raises(ValueError, match=r"BD: blocks\[1\] has shape \(2, 3, 4, 5\)"):
        BlockDiagonal([xp.ones((2, 2)), xp.ones((2, 3, 4, 5))], name="BD")
    with pytest.raises(ValueError, match=r"BlockDiagonal: blocks has shape \(2, 2\)"):
        BlockDiagonal(xp.ones((2, 2)))
    with pytest.raises(ValueError, match="at least one block"):
        BlockDiagonal([])
    with pytest.raises(TypeError, match="int64"):
        BlockDiagonal([xp.ones((2, 2), dtype=xp.int64)])
    with pytest.raises(ValueError, match=r"BlockDiagonal: blocks\[1\] contains 2 NaN or Inf"):
        BlockDiagonal([xp.ones((2, 2)), xp.asarray([[np.nan, 1.0], [np.inf, 0.0]])])
    op = BlockDiagonal(xp.ones((3, 2, 4)))
    with pytest.raises(ValueError, match=r"BlockDiagonal: x has shape \(6,\); expected \(12,\)"):
        op.matvec(xp.ones(6))
    with pytest.raises(ValueError, match=r"expected \(6,\) or \(6, k\)"):
        op.rmatvec(xp.ones(12))


@requires_cupy
def test_blockdiagonal_mixed_backends(rng):
    import cupy as cp

    with pytest.raises(TypeError, match=r"BlockDiagonal: .*different backends"):
        BlockDiagonal([np.ones((2, 2)), cp.ones((2, 2))])


def test_blockdiagonal_composes_and_krylov(xp, rng):
    mats = [rng.standard_normal((4, 4)) + 4 * np.eye(4) for _ in range(5)]
    op = BlockDiagonal([xp.asarray(m) for m in mats])
    D = dense_blockdiag(mats)
    combo = (op.T @ op + 2 * pylops.Identity(20, dtype=np.float64)) * 0.5 - op.H
    np.testing.assert_allclose(
        to_numpy(combo.todense(bname(xp))), 0.5 * (D.T @ D + 2 * np.eye(20)) - D.T, atol=1e-12
    )
    if xp is not np:
        return
    y = rng.standard_normal(20)
    A, Ad = op.T @ op, D.T @ D
    for solver in (spla.cg, spla.minres):
        x, info = solver(A, y, rtol=1e-12, maxiter=200)
        assert info == 0
        np.testing.assert_allclose(x, np.linalg.solve(Ad, y), rtol=1e-8, atol=1e-10)
    x, info = spla.gmres(op, y, rtol=1e-12, restart=20)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(D, y), rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------------ Shift
def dense_shift(sizes):
    off_in = np.concatenate([[0], np.cumsum(sizes[1:])]).astype(int)  # z_1..z_L
    off_out = np.concatenate([[0], np.cumsum(sizes[:-1])]).astype(int)  # y_0..y_{L-1}
    P = np.zeros((off_out[-1], off_in[-1]))
    for l in range(1, len(sizes) - 1):  # z_l goes to output block l
        for i in range(sizes[l]):
            P[off_out[l] + i, off_in[l - 1] + i] = 1.0
    return P


@given(
    sizes=st.lists(st.integers(0, 4), min_size=2, max_size=6),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 1000),
)
def test_shift_matches_dense(xp, sizes, dtype, seed):
    P = Shift(sizes, dtype=dtype)
    check_against(xp, P, dense_shift(sizes), dtype, seed)


def test_shift_rectangular_example(xp):
    P = Shift([2, 1, 3])  # (0_2, z_1) from (z_1, z_2): 3x4
    x = xp.asarray([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(to_numpy(P.matvec(x)), [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(to_numpy(P.rmatvec(xp.asarray([5.0, 6.0, 7.0]))), [7, 0, 0, 0])
    x_before = to_numpy(x).copy()
    P.matvec(x)
    np.testing.assert_array_equal(to_numpy(x), x_before)
    with pytest.raises(ValueError, match=r"P: x has shape \(3,\); expected \(4,\)"):
        P.matvec(xp.ones(3))
    with pytest.raises(ValueError, match="sizes"):
        Shift([3])
    with pytest.raises(TypeError, match="int32"):
        Shift([1, 2], dtype=np.int32)


def test_shift_fixed_backend_rejects_other():
    class Fake:
        __module__ = "cupy"
        shape, ndim = (2,), 1

    with pytest.raises(TypeError, match="P: x is a cupy array"):
        Shift([1, 2], backend="numpy").matvec(Fake())


# ----------------------------------------------------------------- KronContract
def dense_kron_layer(b, n):
    """blockdiag over groups of np.kron(I_n, b_g), column-major vec."""
    b2 = np.atleast_2d(np.asarray(b, dtype=np.float64))
    return dense_blockdiag([np.kron(np.eye(n), bg[None, :]) for bg in b2])


@st.composite
def kron_case(draw):
    L = draw(st.integers(1, 4))
    form = draw(st.sampled_from(["rows", "groups", "stack2", "stack3"]))
    same = form.startswith("stack")
    ns = (
        [draw(st.integers(0, 3))] * L
        if same
        else draw(st.lists(st.integers(0, 3), min_size=L, max_size=L))
    )
    m0, g0 = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ms = [m0] * L if same else draw(st.lists(st.integers(1, 3), min_size=L, max_size=L))
    gs = [g0] * L if same else draw(st.lists(st.integers(1, 3), min_size=L, max_size=L))
    return L, form, ns, ms, gs, draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**31 - 1))


@given(case=kron_case())
def test_kroncontract_matches_np_kron(xp, case):
    L, form, ns, ms, gs, dtype, seed = case
    rng = np.random.default_rng(seed)
    if form == "rows":
        bs = [rng.standard_normal(m).astype(dtype) for m in ms]
    elif form == "groups":
        bs = [rng.standard_normal((g, m)).astype(dtype) for g, m in zip(gs, ms)]
    elif form == "stack2":
        bs = rng.standard_normal((L, ms[0])).astype(dtype)
    else:
        bs = rng.standard_normal((L, gs[0], ms[0])).astype(dtype)
    arg = xp.asarray(bs) if form.startswith("stack") else [xp.asarray(b) for b in bs]
    K = KronContract(arg, ns[0] if form.startswith("stack") else ns)
    dense = dense_blockdiag([dense_kron_layer(b, n) for b, n in zip(list(bs), ns)])
    check_against(xp, K, dense, dtype, seed)


def test_kroncontract_vec_conventions(xp, rng):
    """(I kron b) vec_colmajor(X) = (b X)^T  and  (b kron I) X.ravel() = b X."""
    m, n = 3, 4
    b, X = rng.standard_normal(m), rng.standard_normal((m, n))
    K = KronContract([xp.asarray(b)], n)
    out = to_numpy(K.matvec(xp.asarray(X.ravel(order="F"))))
    np.testing.assert_allclose(out, b @ X, rtol=1e-14)
    np.testing.assert_allclose(np.kron(np.eye(n), b[None]) @ X.ravel(order="F"), b @ X, rtol=1e-14)
    np.testing.assert_allclose(np.kron(b[None], np.eye(n)) @ X.ravel(), b @ X, rtol=1e-14)


def test_kroncontract_bad_inputs(xp):
    with pytest.raises(ValueError, match=r"DM: bs\[1\] has shape \(2, 2, 2\)"):
        KronContract([xp.ones(2), xp.ones((2, 2, 2))], 3, name="DM")
    with pytest.raises(ValueError, match="DD: n = "):
        KronContract([xp.ones(2), xp.ones(2)], [1, 2, 3], name="DD")
    with pytest.raises(ValueError, match="DD: n = "):
        KronContract([xp.ones(2)], -1, name="DD")
    with pytest.raises(ValueError, match=r"DM: bs\[0\] contains 1 NaN or Inf"):
        KronContract([xp.asarray([1.0, np.nan])], 3, name="DM")
    K = KronContract([xp.ones(2)], 3)
    with pytest.raises(ValueError, match=r"KronContract: x has shape \(5,\); expected \(6,\)"):
        K.matvec(xp.ones(5))


def test_rectangular_ops_in_krylov(xp, rng):
    """P and KronContract are rectangular: use them inside normal-equation operators."""
    bs = [rng.standard_normal((2, 3)), rng.standard_normal((1, 2))]
    K = KronContract([xp.asarray(b) for b in bs], [2, 4])
    P = Shift([2, 3, 3, 2])
    Kd = dense_blockdiag([dense_kron_layer(b, n) for b, n in zip(bs, [2, 4])])
    Pd = dense_shift([2, 3, 3, 2])
    A = K @ K.T + P @ P.T + pylops.Identity(K.shape[0])  # K.shape[0] == P.shape[0] == 8
    Ad = Kd @ Kd.T + Pd @ Pd.T + np.eye(8)
    np.testing.assert_allclose(to_numpy(A.todense(bname(xp))), Ad, atol=1e-13)
    if xp is not np:
        return
    y = rng.standard_normal(8)
    for solver in (spla.cg, spla.minres, spla.gmres):
        x, info = solver(A, y, rtol=1e-12, maxiter=100)
        assert info == 0
        np.testing.assert_allclose(x, np.linalg.solve(Ad, y), rtol=1e-8)


def test_dense_inverse_is_safe_under_threads():
    """One LU-factored block inverse solved from four threads at once equals serial solves.

    Host ``getrs`` of SciPy's OpenBLAS corrupts the heap when called
    concurrently; the block inverse takes the backend's getrs lock.
    """
    import threading

    from blockops.operators._common import dense_inverse

    rng = np.random.default_rng(0)
    A = rng.standard_normal((40, 40)) + 40 * np.eye(40)
    Ainv = dense_inverse(A, "test", "A")
    B = rng.standard_normal((40, 8))
    want = np.linalg.solve(A, B)
    out = [[] for _ in range(4)]

    def work(k):
        out[k] = [Ainv.matmat(B) for _ in range(50)]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for res in out:
        assert len(res) == 50
        for X in res:
            np.testing.assert_allclose(X, want, rtol=1e-12, atol=1e-14)
