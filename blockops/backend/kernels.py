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
:func:`pivot_factorizer` / :func:`pivot_solver` (``T`` symmetric, usually definite)
    Host: Cholesky (``potrf``), LU (``getrf``) when ``T`` is not definite.
    Generic: LU through ``xp.linalg.solve``. The factor splits ``T = L_f R_f``
    (Cholesky: ``L_f = L``, ``R_f = Lᵀ``; LU: ``L_f = T``, ``R_f = I``), so a
    sweep can store the half gain ``Y = L_f⁻¹ R`` and form
    ``Rᵀ T⁻¹ R`` and ``T⁻¹ R s`` without knowing which factorisation ran.
:func:`pivot_magnitudes` / :func:`count_negative`
    Pivot sizes and inertia of a stack of such pivots (batched ``eigvalsh``
    on the generic path).

Singularity is judged by :mod:`blockops.singular` from the magnitudes these
kernels report (``|pivots|``, or ``|eigenvalues|`` on the generic path).
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
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
class _HostCholesky:
    """``T = L Lᵀ`` (``potrf``): ``L_f = L``, ``R_f = Lᵀ``."""

    definite = True

    def __init__(self, L, trtrs, potrs):
        self.L, self._trtrs, self._potrs = L, trtrs, potrs

    def __getstate__(self):
        """Pickle the factor only: LAPACK routines do not pickle and are fetched again."""
        return {"L": self.L}

    def __setstate__(self, state):
        self.L = state["L"]
        self._trtrs, self._potrs = lapack.get_lapack_funcs(("trtrs", "potrs"), dtype=self.L.dtype)

    def pivots(self):
        return self.L.diagonal() ** 2

    def left(self, X):
        """``L_f⁻¹ X``."""
        return self._trtrs(self.L, X, lower=1)[0]

    def right(self, X):
        """``R_f⁻¹ X``."""
        return self._trtrs(self.L, X, lower=1, trans=1)[0]

    def right_T(self, X):
        """``R_f⁻ᵀ X``."""
        return self.left(X)

    def half_gain(self, R, out=None):
        """``(Y, S) = (L_f⁻¹ R, Rᵀ T⁻¹ R)``; ``S`` written into ``out`` when given."""
        Y = self.left(R)
        return Y, np.matmul(Y.T, Y, out=out)

    def solve(self, X):
        return self._potrs(self.L, X, lower=1)[0]


class _LU:
    """``T = P L U`` (host ``getrf``/``getrs``, or generic ``xp.linalg.solve``).

    The split is ``L_f = T``, ``R_f = I``: the half gain is the full gain ``T⁻¹ R``.
    """

    definite = False

    def __init__(self, T, lu=None, getrs=None):
        self.T, self.lu, self._getrs = T, lu, getrs
        self.xp = get_array_module(T)

    def __getstate__(self):
        """Pickle the factor only: the array module and LAPACK's getrs are fetched again."""
        return {"T": self.T, "lu": self.lu}

    def __setstate__(self, state):
        self.T, self.lu = state["T"], state["lu"]
        self.xp = get_array_module(self.T)
        self._getrs = None if self.lu is None else lapack.get_lapack_funcs("getrs", (self.lu[0],))

    def pivots(self):
        """``|diag U|`` (host), or ``None`` (generic: see :func:`pivot_magnitudes`)."""
        return None if self.lu is None else np.abs(self.lu[0].diagonal())

    def left(self, X):
        if self.lu is None:
            return self.xp.linalg.solve(self.T, X)
        with _GETRS_LOCK:
            return self._getrs(self.lu[0], self.lu[1], X)[0]

    def right(self, X):
        return X

    def right_T(self, X):
        return X

    def half_gain(self, R, out=None):
        Y = self.left(R)
        return Y, self.xp.matmul(R.T, Y, out=out)

    solve = left


def pivot_factorizer(xp, dtype):
    """``factor(T)`` for symmetric pivots ``T`` of ``xp`` and ``dtype``, bound once.

    Host: Cholesky (``potrf``) first, LU (``getrf``) when ``T`` is not
    definite; generic: LU through ``xp.linalg.solve``. ``factor(T)`` returns
    ``None`` when LU meets an exactly zero pivot, else an object with
    ``left``, ``right``, ``right_T`` (see the module docstring),
    ``half_gain(R)``, ``solve``, ``definite`` and ``pivots()``.
    """
    if not host_lapack(xp):
        return _LU
    potrf, getrf, getrs, trtrs, potrs = lapack.get_lapack_funcs(
        ("potrf", "getrf", "getrs", "trtrs", "potrs"), dtype=dtype
    )

    def factor(T):
        Lc, info = potrf(T, lower=1, clean=1)
        if info == 0:
            return _HostCholesky(Lc, trtrs, potrs)
        lu, piv, info = getrf(T)
        return None if info > 0 else _LU(T, (lu, piv), getrs)

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
