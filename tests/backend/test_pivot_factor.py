"""Host factors of the dense stage's pivots ``T`` against dense NumPy references.

``pivot_factorizer`` factors a symmetric ``T`` by Cholesky when it is
positive definite and by Bunch-Kaufman ``L D Lᵀ`` (LAPACK ``sytrf``) when it
is not; the generic path (``generic_linalg``) by LU through
``xp.linalg.solve``. Every factor must give ``T⁻¹ X``, the split
``T⁻¹ = R_f⁻¹ L_f⁻¹`` the dense sweep uses (half gain ``Y = L_f⁻¹ R``),
the Schur update ``Q − Rᵀ T⁻¹ R``, pivot magnitudes whose logs sum to
``log|det T|`` and, on the host, the number of negative eigenvalues, all
checked against ``numpy.linalg`` on the explicit matrix, and must pickle.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.linalg

from blockops.backend import generic_linalg, pivot_factorizer
from blockops.backend.kernels import _LU, _HostCholesky, _HostLDL
from blockops.network.dense_stage import _mirror_lower

TOL = {np.float64: 1e-10, np.float32: 2e-3}


def _definite(rng, k):
    A = rng.standard_normal((k, k))
    return A @ A.T + k * np.eye(k)


def _indefinite(rng, k):
    """Symmetric, about half its eigenvalues negative, well conditioned."""
    Q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    w = rng.uniform(1.0, 3.0, k) * np.where(np.arange(k) % 2 == 0, -1.0, 1.0)
    return (Q * w) @ Q.T


def _saddle(rng, k):
    """Zero diagonal blocks: Bunch-Kaufman must take 2×2 pivots."""
    h = k // 2
    B = rng.standard_normal((h, k - h)) + 3 * np.eye(h, k - h)
    T = np.zeros((k, k))
    T[:h, h:], T[h:, :h] = B, B.T
    T[h:, h:] = 0.1 * np.eye(k - h)
    return T


def _rel(x, ref):
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _check_factor(fac, T, dt, rng, host=True):
    k, tol = T.shape[0], TOL[dt]
    T64 = T.astype(np.float64)
    X = rng.standard_normal((k, 3)).astype(dt)
    R = rng.standard_normal((k, 7)).astype(dt)
    x = rng.standard_normal(k).astype(dt)
    TinvX = np.linalg.solve(T64, X.astype(np.float64))
    TinvR = np.linalg.solve(T64, R.astype(np.float64))
    assert _rel(fac.solve(X), TinvX) <= tol
    assert _rel(fac.right(fac.left(X)), TinvX) <= tol  # T^-1 = R_f^-1 L_f^-1
    # the dense sweep's products: T^-1 R s = R_f^-1 (Y s), (T^-1 R)^T x = Y^T R_f^-T x
    Y = fac.left(R)
    assert _rel(fac.right(Y), TinvR) <= tol
    assert _rel(Y.T @ fac.right_T(x[:, None]), TinvR.T @ x[:, None]) <= tol
    assert _rel(fac.left(x), fac.left(x[:, None])[:, 0]) <= tol  # vectors too
    # Schur update of Q's lower triangle (all of Q on the generic path)
    Q0 = rng.standard_normal((7, 7)).astype(dt)
    Q = Q0.copy()
    Rw = R.copy()
    Y2 = fac.half_gain_update(Rw, Q)
    ref = Q0.astype(np.float64) - R.T.astype(np.float64) @ TinvR
    low = np.tril_indices(7)
    assert _rel(Q[low], ref[low]) <= tol
    assert _rel(fac.right(Y2), TinvR) <= tol
    if host:
        up = np.triu_indices(7, 1)
        assert np.array_equal(Q[up], Q0[up])  # the strict upper triangle is the caller's
    # pivots: their logs sum to log|det T|; on the host the negatives are T's
    piv = fac.pivots()
    if piv is not None:
        _, logdet = np.linalg.slogdet(T64)
        assert abs(float(np.sum(np.log(piv.astype(np.float64)))) - logdet) <= tol * max(
            1.0, abs(logdet)
        )
        w = np.linalg.eigvalsh(T64)
        assert fac.negatives == int(np.count_nonzero(w < 0))
        # magnitudes: the singular check compares the smallest with the largest
        spread = float(piv.min() / piv.max())
        assert 0 < spread <= 1
    # pickled without its LAPACK routines, fetched again on load
    back = pickle.loads(pickle.dumps(fac))
    assert np.array_equal(back.solve(X), fac.solve(X))
    assert back.negatives == fac.negatives


KINDS_K = [
    (kind, k)
    for kind in ("definite", "indefinite", "saddle")
    for k in (1, 2, 5, 40, 272)
    if kind != "saddle" or k >= 2  # a saddle needs two zero-diagonal blocks
]


@pytest.mark.parametrize("dt", [np.float64, np.float32])
@pytest.mark.parametrize("kind, k", KINDS_K)
def test_host_factor_against_dense_reference(kind, k, dt):
    rng = np.random.default_rng(k)
    make = {"definite": _definite, "indefinite": _indefinite, "saddle": _saddle}[kind]
    T = make(rng, k).astype(dt)
    fac = pivot_factorizer(np, np.dtype(dt))(T)
    definite = kind == "definite"
    assert isinstance(fac, _HostCholesky if definite else _HostLDL)
    assert fac.definite == definite
    if kind == "saddle" and k >= 4:
        assert len(fac.blocks) > 0  # 2×2 pivots taken
    _check_factor(fac, T, dt, rng)


@pytest.mark.parametrize("kind", ["definite", "indefinite"])
def test_generic_factor_against_dense_reference(kind):
    rng = np.random.default_rng(3)
    T = (_definite if kind == "definite" else _indefinite)(rng, 12)
    with generic_linalg():
        fac = pivot_factorizer(np, np.dtype(np.float64))(T)
    assert isinstance(fac, _LU) and fac.negatives is None
    _check_factor(fac, T, np.float64, rng, host=False)


def test_bunch_kaufman_pivot_magnitudes_are_block_eigenvalues():
    """|D-block eigenvalues|: 1×1 pivots as they are, 2×2 ones by their eigenvalues."""
    rng = np.random.default_rng(5)
    T = _saddle(rng, 10)
    fac = pivot_factorizer(np, np.dtype(np.float64))(T)
    assert len(fac.blocks) > 0
    _, D, _ = scipy.linalg.ldl(T, lower=True)
    ref = np.sort(np.abs(np.linalg.eigvalsh(D)))  # D block diagonal: its blocks' eigenvalues
    assert np.allclose(np.sort(fac.pivots()), ref, rtol=1e-12, atol=0)


def test_exactly_singular_pivot_gives_none():
    T = np.diag([1.0, -2.0, 0.0])
    assert pivot_factorizer(np, np.dtype(np.float64))(T) is None


@pytest.mark.parametrize("n", [1, 63, 64, 130, 512])
def test_mirror_lower(n):
    rng = np.random.default_rng(n)
    V = rng.standard_normal((n, n))
    ref = np.tril(V) + np.tril(V, -1).T
    _mirror_lower(np, V)
    assert np.array_equal(V, ref)
