r"""Small dense factorisations of symmetric pivots, chosen once per backend.

The stagewise sweep of the exact inverse factors one symmetric pivot per
stage. These kernels hide whether that runs on host LAPACK or as generic
array code (CuPy; NumPy inside :func:`~blockops.backend.generic_linalg`), so
the sweeps hold no ``if lapack`` branches:

:func:`factor_symmetric` (``Q`` symmetric, possibly indefinite)
    Host: Bunch-Kaufman ``Q = L D Lᵀ`` (``sytrf``/``sytrs``), reciprocal
    condition from ``sycon``, inertia and ``log|det|`` from the 1×1 and 2×2
    blocks of ``D``. Generic: LU with partial pivoting for the solves and
    ``eigvalsh`` for the rest (kept on the device until asked for).
:func:`pivot_factorizer` (``T`` symmetric, usually definite; the dense stage's large form)
    Host: Cholesky (``potrf``), Bunch-Kaufman ``P L D Lᵀ Pᵀ`` (``sytrf``)
    when ``T`` is not definite. Generic: LU through ``xp.linalg.solve``. The
    factor splits ``T = L_f R_f`` (Cholesky: ``L_f = L``, ``R_f = Lᵀ``;
    Bunch-Kaufman: ``R_f = Σ L_fᵀ`` with ``Σ`` the signs of ``D``'s block
    eigenvalues, see :class:`_HostLDL`; LU: ``L_f = T``, ``R_f = I``), so a
    sweep can store the half gain ``Y = L_f⁻¹ R`` and form ``T⁻¹ R s``
    without knowing which factorisation ran; ``half_gain_update`` also
    subtracts ``Rᵀ T⁻¹ R`` from a value matrix (host: one or two ``syrk``
    on its lower triangle, half the flops of a full product).
:func:`pivot_solver` (``T`` symmetric, usually definite; the stacked small form)
    Host: ``posv`` (Cholesky), ``gesv`` when ``T`` is not definite. Generic:
    ``xp.linalg.solve``.
:func:`pivot_magnitudes` / :func:`count_negative`
    Pivot sizes and inertia of a stack of such pivots (batched ``eigvalsh``
    on the generic path).

Singularity is judged by :mod:`blockops.singular` from the magnitudes these
kernels report (``|pivots|``: ``diag(L)²`` of a Cholesky factor, ``|diag U|``
of an LU, the ``|eigenvalues|`` of ``D``'s 1×1 and 2×2 blocks of a
Bunch-Kaufman factor; ``|eigenvalues|`` of ``T`` on the generic path). Their
product is ``|det T|`` in every case.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types

import numpy as np
import scipy.linalg.blas as blas
import scipy.linalg.lapack as lapack

from .arrays import get_array_module, get_linalg, host_lapack

__all__ = [
    "count_negative",
    "factor_symmetric",
    "getrs_guard",
    "pivot_factorizer",
    "pivot_magnitudes",
    "pivot_solver",
]


# -- symmetric indefinite (the generic stage's Q_uu) ----------------------------
class _HostBunchKaufman:
    """``Q = L D Lᵀ`` by LAPACK ``sytrf`` with inertia from the blocks of ``D``."""

    def __init__(self, Q):
        p = Q.shape[0]
        self.dtype = Q.dtype
        if p == 0:
            self.rcond, self.inertia, self.logdet = 1.0, (0, 0, 0), 0.0
            return
        sytrf, sycon = lapack.get_lapack_funcs(("sytrf", "sycon"), (Q,))
        anorm = float(np.abs(Q).sum(axis=0).max())
        self.ldl, self.ipiv, info = sytrf(Q, lower=1)
        if info > 0 or not np.isfinite(anorm):
            self.rcond = 0.0
            return
        self.rcond, _ = sycon(self.ldl, self.ipiv, anorm, lower=1)
        self.inertia, self.logdet = self._inertia_logdet()

    def _inertia_logdet(self):
        """Sylvester's law over the 1×1 and 2×2 blocks of ``D``."""
        ldl, ipiv = self.ldl, self.ipiv
        d, p = np.diagonal(ldl).copy(), ldl.shape[0]
        if not np.any(ipiv < 0):
            neg = int(np.count_nonzero(d < 0))
            return (neg, 0, p - neg), float(np.sum(np.log(np.abs(d))))
        neg = pos = k = 0
        logdet = 0.0
        while k < p:
            if ipiv[k] > 0:
                neg, pos = neg + int(d[k] < 0), pos + int(d[k] > 0)
                logdet += float(np.log(abs(d[k])))
                k += 1
                continue
            det = d[k] * d[k + 1] - ldl[k + 1, k] ** 2  # det < 0: one eigenvalue of each sign
            logdet += float(np.log(abs(det)))
            if det < 0:
                neg, pos = neg + 1, pos + 1
            elif d[k] + d[k + 1] > 0:
                pos += 2
            else:
                neg += 2
            k += 2
        return (neg, 0, pos), logdet

    def solve(self, rhs):
        sytrs = lapack.get_lapack_funcs("sytrs", (self.ldl,))
        return sytrs(self.ldl, self.ipiv, rhs, lower=1)[0]


class _GenericSymmetric:
    """LU for the solves, ``eigvalsh`` for conditioning, inertia and ``log|det|``."""

    def __init__(self, Q):
        xp = get_array_module(Q)
        self.xp, self.dtype = xp, Q.dtype
        self._w = xp.linalg.eigvalsh(Q)
        self.lu = get_linalg(xp).lu_factor(Q, check_finite=False) if Q.shape[0] else None

    def __getstate__(self):
        """Pickle without the array module (a module does not pickle)."""
        return {k: v for k, v in self.__dict__.items() if k != "xp"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.xp = get_array_module(self._w)

    @property
    def rcond(self) -> float:
        """``min|w| / max|w|`` (the 2-norm reciprocal condition): one scalar to the host."""
        if self._w.size == 0:
            return 1.0
        wa = self.xp.abs(self._w)
        hi = float(wa.max())
        return float(wa.min()) / hi if hi > 0 and np.isfinite(hi) else 0.0

    @property
    def inertia(self):
        neg = int(self.xp.count_nonzero(self._w < 0))
        return (neg, 0, int(self._w.size) - neg)

    @property
    def logdet(self) -> float:
        return float(self.xp.sum(self.xp.log(self.xp.abs(self._w))))

    def solve(self, rhs):
        return get_linalg(self.xp).lu_solve(self.lu, rhs, check_finite=False)


def factor_symmetric(Q):
    """Factor a symmetric, possibly indefinite ``Q``.

    Returns an object with ``solve(rhs)``, ``rcond`` (reciprocal condition;
    ``0`` when exactly singular, then nothing else may be used), ``inertia``
    ``(n_neg, n_zero, n_pos)`` and ``logdet`` (``log|det Q|``).
    """
    xp = get_array_module(Q)
    return _HostBunchKaufman(Q) if host_lapack(xp) else _GenericSymmetric(Q)


# LAPACK getrs of the OpenBLAS that SciPy ships (0.3.30) corrupts the heap when Python
# threads call it at once (free(): invalid next size; 4 threads solving with one factor),
# while getrf, gesv, posv, potrs and sytrs do not: host getrs calls take this lock.
_GETRS_LOCK = threading.Lock()


def getrs_guard(xp):
    """The lock every host ``getrs`` call takes (see above); a no-op on other backends."""
    return _GETRS_LOCK if host_lapack(xp) else contextlib.nullcontext()


# -- symmetric, usually definite (the dense layer's reduced pivots T) ----------------
@functools.cache
def _host_routines(dtype):
    """LAPACK and BLAS routines of the host pivot factors for ``dtype``, fetched once."""
    dtype = np.dtype(dtype)
    names = ("potrf", "potrs", "trtrs", "sytrf", "sytrf_lwork", "syconv")
    fn = dict(zip(names, lapack.get_lapack_funcs(names, dtype=dtype)))
    fn["trsm"], fn["syrk"] = blas.get_blas_funcs(("trsm", "syrk"), dtype=dtype)
    return types.SimpleNamespace(**fn)


def _syrk_lower(syrk, alpha, Y, Q):
    """``Q += alpha YᵀY`` on the lower triangle of the C-ordered ``Q`` (``syrk``, in place).

    ``Q.T`` is Fortran-ordered, and its upper triangle is ``Q``'s lower one;
    the strict upper triangle of ``Q`` is not touched.
    """
    if Y.shape[0] == 0:
        return
    out = syrk(alpha, Y.T, beta=1.0, c=Q.T, trans=0, lower=0, overwrite_c=1)
    if not np.may_share_memory(out, Q):  # Q was not contiguous: f2py worked on a copy
        Q[...] = out.T


class _HostCholesky:
    """``T = L Lᵀ`` (``potrf``): ``L_f = L``, ``R_f = Lᵀ``."""

    definite = True
    negatives = 0

    def __init__(self, L):
        self.L, self._fn = L, _host_routines(L.dtype)

    def __getstate__(self):
        """Pickle the factor only: LAPACK routines do not pickle and are fetched again."""
        return {"L": self.L}

    def __setstate__(self, state):
        self.L = state["L"]
        self._fn = _host_routines(self.L.dtype)

    def pivots(self):
        return self.L.diagonal() ** 2

    def left(self, X):
        """``L_f⁻¹ X``."""
        return self._fn.trtrs(self.L, X, lower=1)[0]

    def right(self, X):
        """``R_f⁻¹ X``."""
        return self._fn.trtrs(self.L, X, lower=1, trans=1)[0]

    def right_T(self, X):
        """``R_f⁻ᵀ X``."""
        return self.left(X)

    def half_gain_update(self, R, Q):
        """Return ``Y = L_f⁻¹ R`` and subtract ``Rᵀ T⁻¹ R = YᵀY`` from ``Q``'s lower triangle.

        ``R`` (C-ordered) is overwritten by ``Y``: ``Yᵀ = Rᵀ L⁻ᵀ`` is one
        right-sided ``trsm`` on the Fortran-ordered ``Rᵀ``; then one ``syrk``
        (half the flops of the full product ``YᵀY``). ``Q``'s strict upper
        triangle is left as it was (the caller mirrors the lower one).
        """
        fn = self._fn
        Y = fn.trsm(1.0, self.L, R.T, side=1, lower=1, trans_a=1, overwrite_b=1).T
        _syrk_lower(fn.syrk, -1.0, Y, Q)
        return Y

    def solve(self, X):
        return self._fn.potrs(self.L, X, lower=1)[0]


class _HostLDL:
    r"""Symmetric indefinite ``T = P L D Lᵀ Pᵀ`` by Bunch-Kaufman (``sytrf``, ``syconv``).

    ``L`` is unit lower triangular, ``P`` the row interchanges and ``D``
    block diagonal with 1×1 and 2×2 blocks. Each block is diagonalised,
    ``D = Q_D Λ Q_Dᵀ`` (one rotation per 2×2 block), and the rows are put in
    the order ``Π`` of the signs of ``Λ``, positive first. With
    ``L_f = P L Q_D |Λ|^{1/2} Πᵀ`` and ``Σ = Π \operatorname{sign}(Λ) Πᵀ =
    \operatorname{diag}(1, …, 1, -1, …, -1)``

    .. math::

        T = L_f Σ L_f^T,\qquad R_f = Σ L_f^T,\qquad
        R^T T^{-1} R = Y^T Σ Y = Y_+^T Y_+ - Y_-^T Y_-,\quad Y = L_f^{-1} R,

    two ``syrk`` on the rows of each sign: the flops of the Cholesky path,
    half those of LU's ``gesv`` and ``Rᵀ (T⁻¹ R)``. Pivot magnitudes are
    ``|Λ|`` (the eigenvalues of the 1×1 and 2×2 blocks of ``D``;
    ``∏ |Λ| = |det D| = |det T|``), and by Sylvester's law ``T`` has as many
    negative eigenvalues as ``Λ``.
    """

    definite = False
    _ARRAYS = ("L", "perm", "blocks", "rot", "lam", "order", "scale", "sign")

    def __init__(self, L, ipiv, e):
        """From ``syconv``'s ``L`` (strict lower triangle; ``D``'s diagonal on the diagonal),
        ``D``'s subdiagonal ``e`` and ``sytrf``'s ``ipiv`` (1-based; negative: a 2×2 block).
        """
        k = L.shape[0]
        self.L, self._fn = L, _host_routines(L.dtype)
        # 2x2 blocks (s, s+1) have ipiv[s] = ipiv[s+1] = -p (rows s+1 and p swapped); 1x1
        # pivots q swap rows q and ipiv[q] - 1. P^T x = x[perm]: the swaps in LAPACK's order
        # (as sytrs2 applies them), a Python loop over the nontrivial ones only.
        neg = ipiv < 0
        starts, ones = np.flatnonzero(neg)[::2], np.flatnonzero(~neg)
        step = np.concatenate([ones, starts])
        row = np.concatenate([ones, starts + 1])
        other = np.concatenate([ipiv[ones] - 1, -ipiv[starts] - 1])
        swaps = np.argsort(step)
        swaps = swaps[row[swaps] != other[swaps]]
        perm = np.arange(k)
        for q, p in zip(row[swaps].tolist(), other[swaps].tolist()):
            perm[q], perm[p] = perm[p], perm[q]
        self.perm = perm
        self.blocks = starts[:, None] + np.arange(2)  # (nb, 2)
        lam = L.diagonal().copy()
        i0 = self.blocks[:, 0]
        Db = np.empty((len(i0), 2, 2), L.dtype)
        Db[:, 0, 0], Db[:, 1, 1], Db[:, 0, 1], Db[:, 1, 0] = lam[i0], lam[i0 + 1], e[i0], e[i0]
        w, self.rot = np.linalg.eigh(Db)  # D block = rot diag(w) rotᵀ
        lam[self.blocks] = w
        self.lam = lam
        neg = lam < 0
        self.order = np.concatenate([np.flatnonzero(~neg), np.flatnonzero(neg)])
        self.npos = k - int(np.count_nonzero(neg))
        self.negatives = k - self.npos
        with np.errstate(divide="ignore"):
            self.scale = (1.0 / np.sqrt(np.abs(lam)))[self.order]  # |Λ|^{-1/2}, in Π order
        self.sign = np.where(np.arange(k) < self.npos, 1.0, -1.0).astype(L.dtype)

    @classmethod
    def factor(cls, T):
        """Factor ``T``; ``None`` when ``D`` has an exactly zero pivot."""
        fn = _host_routines(T.dtype)
        lwork = max(1, int(fn.sytrf_lwork(T.shape[0], lower=1)[0]))
        ldu, ipiv, info = fn.sytrf(T, lower=1, lwork=lwork)
        if info > 0:
            return None
        L, e, _ = fn.syconv(ldu, ipiv, lower=1, way=0, overwrite_a=1)
        fac = cls(L, ipiv, e)
        return fac if bool(np.all(fac.lam != 0)) else None

    def __getstate__(self):
        """Pickle the factor only: LAPACK routines do not pickle and are fetched again."""
        state = {name: getattr(self, name) for name in self._ARRAYS}
        state["npos"] = self.npos
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.negatives = self.L.shape[0] - self.npos
        self._fn = _host_routines(self.L.dtype)

    def pivots(self):
        """``|Λ|``: eigenvalue magnitudes of the 1×1 and 2×2 blocks of ``D``."""
        return np.abs(self.lam)

    def _rotate(self, Z, transpose):
        """``Q_Dᵀ Z`` (``transpose``) or ``Q_D Z`` in place, on the rows of the 2×2 blocks."""
        if len(self.blocks):
            rot = self.rot.transpose(0, 2, 1) if transpose else self.rot
            Z[self.blocks] = rot @ Z[self.blocks]

    def left(self, X):
        """``L_f⁻¹ X = Π |Λ|^{-1/2} Q_Dᵀ L⁻¹ Pᵀ X``."""
        Xm = X.reshape(X.shape[0], -1)
        Z = np.ascontiguousarray(Xm[self.perm])
        Z = self._fn.trsm(1.0, self.L, Z.T, side=1, lower=1, trans_a=1, diag=1, overwrite_b=1).T
        self._rotate(Z, True)
        Y = Z[self.order]
        Y *= self.scale[:, None]
        return Y.reshape(X.shape)

    def right(self, X):
        """``R_f⁻¹ X = L_f⁻ᵀ Σ X = P L⁻ᵀ Q_D |Λ|^{-1/2} Πᵀ Σ X``."""
        Xm = X.reshape(X.shape[0], -1)
        Z = np.empty(Xm.shape, np.result_type(Xm, self.L))
        Z[self.order] = Xm * (self.sign * self.scale)[:, None]
        self._rotate(Z, False)
        Z = self._fn.trsm(1.0, self.L, Z.T, side=1, lower=1, trans_a=0, diag=1, overwrite_b=1).T
        out = np.empty_like(Z)
        out[self.perm] = Z
        return out.reshape(X.shape)

    def right_T(self, X):
        """``R_f⁻ᵀ X = Σ L_f⁻¹ X``."""
        Y = self.left(X)
        return Y * self.sign.reshape((-1,) + (1,) * (Y.ndim - 1))

    def half_gain_update(self, R, Q):
        """Return ``Y = L_f⁻¹ R``; subtract ``Y₊ᵀY₊ − Y₋ᵀY₋`` from ``Q``'s lower triangle."""
        Y = self.left(R)
        _syrk_lower(self._fn.syrk, -1.0, Y[: self.npos], Q)
        _syrk_lower(self._fn.syrk, 1.0, Y[self.npos :], Q)
        return Y

    def solve(self, X):
        """``T⁻¹ X = R_f⁻¹ L_f⁻¹ X``."""
        return self.right(self.left(X))


class _LU:
    """Generic ``T⁻¹`` through ``xp.linalg.solve`` (CuPy; NumPy inside ``generic_linalg``).

    The split is ``L_f = T``, ``R_f = I``: the half gain is the full gain
    ``T⁻¹ R``. Pivot magnitudes and inertia come from one batched
    ``eigvalsh`` of the segment's ``T`` stack (:func:`pivot_magnitudes`).
    """

    definite = False
    negatives = None  # from eigvalsh of T (count_negative)

    def __init__(self, T):
        self.xp = get_array_module(T)
        self.T = self.xp.array(T, copy=True)  # the caller's buffer is reused

    def __getstate__(self):
        """Pickle ``T`` only: the array module is fetched again."""
        return {"T": self.T}

    def __setstate__(self, state):
        self.T = state["T"]
        self.xp = get_array_module(self.T)

    def pivots(self):
        """``None``: see :func:`pivot_magnitudes`."""
        return None

    def left(self, X):
        return self.xp.linalg.solve(self.T, X)

    def right(self, X):
        return X

    def right_T(self, X):
        return X

    def half_gain_update(self, R, Q):
        """Return ``Y = T⁻¹ R`` and subtract ``Rᵀ Y`` from all of ``Q``."""
        Y = self.left(R)
        Q -= R.T @ Y
        return Y

    solve = left


def pivot_factorizer(xp, dtype):
    """``factor(T)`` for symmetric pivots ``T`` of ``xp`` and ``dtype``, bound once.

    Host: Cholesky (``potrf``) first, Bunch-Kaufman ``L D Lᵀ`` (``sytrf``)
    when ``T`` is not definite; generic: LU through ``xp.linalg.solve``.
    ``factor(T)`` returns ``None`` when ``T`` has an exactly zero pivot, else
    an object with ``left``, ``right``, ``right_T`` (see the module
    docstring), ``half_gain_update(R, Q)`` (returns the half gain
    ``Y = L_f⁻¹ R``, possibly computed in ``R``'s memory, and subtracts
    ``Rᵀ T⁻¹ R`` from at least the lower triangle of ``Q``), ``solve``,
    ``definite``, ``negatives`` (the number of negative eigenvalues of ``T``,
    ``None`` on the generic path) and ``pivots()``.
    """
    if not host_lapack(xp):
        return _LU
    potrf = _host_routines(dtype).potrf

    def factor(T):
        Lc, info = potrf(T, lower=1, clean=1)
        return _HostCholesky(Lc) if info == 0 else _HostLDL.factor(T)

    return factor


def pivot_solver(xp, dtype):
    """``solve(T, R) -> (T⁻¹ R, |pivots|)`` for symmetric pivots, bound once per backend.

    Host: ``posv`` (Cholesky), ``gesv`` when ``T`` is not definite; generic:
    ``xp.linalg.solve`` with ``|pivots| = None`` (see :func:`pivot_magnitudes`).
    Both give ``(None, None)`` for an exactly zero pivot (CuPy returns inf/NaN
    instead, which the pivot check catches).
    """
    if not host_lapack(xp):

        def solve_generic(T, R):
            try:
                return xp.linalg.solve(T, R), None
            except np.linalg.LinAlgError:
                return None, None

        return solve_generic
    posv, gesv = lapack.get_lapack_funcs(("posv", "gesv"), dtype=dtype)

    def solve(T, R):
        # Cholesky first (3.9 vs 8.5 us at k = 16); LU when T is not definite
        c, TR, info = posv(T, R, lower=1)
        if info == 0:
            return TR, c.diagonal() ** 2
        lu, _, TR, info = gesv(T, R)
        return (None, None) if info > 0 else (TR, np.abs(lu.diagonal()))

    return solve


def pivot_magnitudes(xp, Ts, pivots):
    """``(L, k)`` pivot magnitudes of a stack of pivots for the singular check.

    ``pivots``: the per-layer ``|pivots|`` the host kernels returned. On the
    generic path they are ``None`` and the magnitudes are ``|eigvalsh(Ts)|``
    (one batched call on the stack ``Ts``), whose eigenvalues are returned
    too, for the inertia. Returns ``(magnitudes, eigenvalues or None)``.
    """
    if host_lapack(xp):
        return xp.stack(pivots), None
    w = xp.linalg.eigvalsh(xp.stack(list(Ts)) if isinstance(Ts, list) else Ts)
    return xp.abs(w), w


def count_negative(xp, Ts, eigenvalues=None) -> int:
    """Negative eigenvalues of a stack (or list) of symmetric pivots ``Ts``."""
    if eigenvalues is None:
        if len(Ts) == 0:
            return 0
        eigenvalues = xp.linalg.eigvalsh(xp.stack(list(Ts)) if isinstance(Ts, list) else Ts)
    return int(xp.count_nonzero(eigenvalues < 0))
