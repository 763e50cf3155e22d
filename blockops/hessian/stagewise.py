r"""Stagewise (Riccati) factorisation of ``H + λI`` for a layered pipeline.

The lifted system of ``DESIGN.md`` ("The general exact route") is the
stationarity condition of a linear-quadratic control problem: layer ``l``
has state ``s = dz_{l-1}`` (``B n_{l-1}`` entries, ``dz_0 = 0``), control
``u = dx_l`` (``p_l`` entries) and dynamics

.. math:: dz_l = A_l\, dz_{l-1} + B_l\, dx_l,

``A_l = ∇_z f_l`` (block-diagonal over samples) and ``B_l = ∇_x f_l``; the
stage cost is ``½ [s; u]ᵀ K_l [s; u] + ½ λ |u|² − g_lᵀ u`` with ``K_l`` the
four blocks of eq. 24 for layer ``l`` (``K_zz = DM Dzz``, ``K_zx = DM Dxz``,
``K_xz = DD Dzx``, ``K_xx = DD Dxx``). The backward sweep (``V_L = 0``)

.. math::

    Q_{ss} = K_{zz} + A^T V A,\quad Q_{us} = K_{xz} + B^T V A,\quad
    Q_{uu} = K_{xx} + λI + B^T V B,\\
    V_{l-1} = Q_{ss} - Q_{us}^T Q_{uu}^{-1} Q_{us}

is block Gaussian elimination of ``H + λI`` in the order ``x_L, …, x_1``;
the pivots are the ``Q_uu``, so by Haynsworth's inertia additivity
``inertia(H + λI) = Σ_l inertia(Q_uu,l)`` and
``log|det(H + λI)| = Σ_l log|det Q_uu,l|``. A right-hand side ``g`` is then
solved by one backward sweep for the linear terms
``v_{l-1} = A^T v - Q_{us}^T Q_{uu}^{-1}(B^T v - g_l)`` and one forward sweep
``u_l = -Q_{uu}^{-1}(Q_{us} s + B^T v_l - g_l)``, ``s_l = A s + B u``.

The sweep pivots only inside a stage, so a singular ``Q_uu`` (e.g. an
undamped dense layer with fewer samples than inputs) stops it with
:class:`~blockops.SingularBlockError`; the pivoted banded route of
:mod:`blockops.hessian.banded` handles those cases.

This module holds the driver (:class:`StagewiseFactor`) and the generic
dense stage (:class:`DenseStage`, explicit blocks, any layer type);
:mod:`blockops.hessian.lowrank` holds the structured stage of dense layers.

Backends: on NumPy a stage pivot is factored by LAPACK Bunch-Kaufman
(``sytrf``/``sycon``). Elsewhere (CuPy; or NumPy inside
:func:`blockops.backend.generic_linalg`) it is factored by LU with partial
pivoting (``get_linalg(xp).lu_factor``) and its inertia, ``log|det|`` and
conditioning come from ``xp.linalg.eigvalsh`` of the (symmetric) pivot; the
singularity test is then ``min|w| / max|w| < 10 eps`` (the 2-norm reciprocal
condition, where ``sycon`` estimates the 1-norm one). That test is one
device-to-host scalar per stage during the factorisation; solves never leave
the device.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg.lapack as lapack

from .._checks import SingularBlockError
from ..backend import get_array_module, get_linalg, host_lapack

__all__ = ["DenseStage", "StagewiseFactor", "sym_indefinite_factor", "sym_lu_factor"]


def _singular(name: str, index: int, detail: str) -> SingularBlockError:
    return SingularBlockError(
        f"stagewise factorisation: the stage pivot Q_uu of {name} is {detail}; "
        "H + damping*I is singular or nearly so in the stagewise ordering. "
        "Add damping (e.g. damping=1e-6 * ||H||) or use method='kkt' (pivoted banded LU).",
        layer=index,
    )


def sym_indefinite_factor(Q, name: str, index: int):
    """Bunch-Kaufman ``Q = L D Lᵀ`` of a symmetric stage pivot (LAPACK ``sytrf``).

    Returns ``(ldl, ipiv, inertia, logdet)``; raises
    :class:`~blockops.SingularBlockError` when ``Q`` is singular or its
    reciprocal condition number (LAPACK ``sycon``) is below ``10 eps``.
    """
    p = Q.shape[0]
    if p == 0:
        return Q, np.zeros(0, np.int32), (0, 0, 0), 0.0
    sytrf, sycon = lapack.get_lapack_funcs(("sytrf", "sycon"), (Q,))
    anorm = float(np.abs(Q).sum(axis=0).max())
    ldl, ipiv, info = sytrf(Q, lower=1)
    if info > 0 or not np.isfinite(anorm):
        raise _singular(name, index, "exactly singular")
    rcond, _ = sycon(ldl, ipiv, anorm, lower=1)
    eps = np.finfo(Q.dtype).eps
    if rcond < 10 * eps:
        raise _singular(name, index, f"numerically singular (reciprocal condition {rcond:.1e})")
    # Inertia and log|det| from the 1x1 and 2x2 blocks of D (Sylvester's law).
    d = np.diagonal(ldl).copy()
    neg, pos, logdet = 0, 0, 0.0
    k = 0
    twos = np.flatnonzero(ipiv < 0)
    if twos.size == 0:
        neg = int(np.count_nonzero(d < 0))
        pos = p - neg
        logdet = float(np.sum(np.log(np.abs(d))))
    else:
        while k < p:
            if ipiv[k] > 0:
                neg += int(d[k] < 0)
                pos += int(d[k] > 0)
                logdet += float(np.log(abs(d[k])))
                k += 1
            else:  # 2x2 block: det < 0 means one eigenvalue of each sign
                det = d[k] * d[k + 1] - ldl[k + 1, k] ** 2
                logdet += float(np.log(abs(det)))
                if det < 0:
                    neg, pos = neg + 1, pos + 1
                elif d[k] + d[k + 1] > 0:
                    pos += 2
                else:
                    neg += 2
                k += 2
    return ldl, ipiv, (neg, 0, pos), logdet


def sym_lu_factor(Q, name: str, index: int):
    """Backend-generic factorisation of a symmetric stage pivot (any ``xp``).

    LU with partial pivoting (``get_linalg(xp).lu_factor``) for the solves;
    eigenvalues ``w`` (``xp.linalg.eigvalsh``) for inertia and ``log|det|``,
    kept on the device until asked for. Returns ``(lu_piv, w)``; raises
    :class:`~blockops.SingularBlockError` (same messages as
    :func:`sym_indefinite_factor`) when ``min|w| / max|w| < 10 eps``.
    """
    xp = get_array_module(Q)
    w = xp.linalg.eigvalsh(Q)
    if Q.shape[0] == 0:
        return None, w
    wa = xp.abs(w)
    lo, hi = wa.min(), wa.max()
    eps = np.finfo(Q.dtype).eps
    if not bool(lo > 10 * eps * hi):  # one scalar to the host per stage (NaN fails too)
        lo, hi = float(lo), float(hi)
        if lo == 0 or not np.isfinite(hi):
            raise _singular(name, index, "exactly singular")
        raise _singular(name, index, f"numerically singular (reciprocal condition {lo / hi:.1e})")
    return get_linalg(xp).lu_factor(Q, check_finite=False), w


def _eig_inertia(w):
    """``(n_neg, 0, n_pos)`` and ``log|det|`` from the eigenvalues of a nonsingular pivot."""
    xp = get_array_module(w)
    neg = int(xp.count_nonzero(w < 0))
    return (neg, 0, int(w.size) - neg), float(xp.sum(xp.log(xp.abs(w))))


def _bd_left_T(A, X):
    """``blockdiag(A)ᵀ X`` for ``A`` (B, n, n_prev) and ``X`` (B*n, c)."""
    B, n, n_prev = A.shape
    return (A.transpose(0, 2, 1) @ X.reshape(B, n, -1)).reshape(B * n_prev, -1)


def _bd_right(X, A):
    """``X blockdiag(A)`` for ``X`` (r, B*n) and ``A`` (B, n, n_prev)."""
    B, n, n_prev = A.shape
    r = X.shape[0]
    Xt = X.reshape(r, B, n).transpose(1, 0, 2)  # (B, r, n)
    return (Xt @ A).transpose(1, 0, 2).reshape(r, B * n_prev)


class DenseStage:
    """One layer of the sweep with explicit blocks (any layer type).

    Parameters
    ----------
    A : ndarray (B, n, n_prev)
        ``∇_z f_l`` per sample.
    Bx : ndarray (B*n, p)
        ``∇_x f_l``, sample-major rows.
    Kzz : ndarray (B, n_prev, n_prev)
        ``DM Dzz`` block of layer ``l`` (block-diagonal over samples).
    Kxz : ndarray (p, B*n_prev)
        ``DD Dzx`` block (``K_zx = K_xzᵀ``).
    Kxx : ndarray (p, p)
        ``DD Dxx`` block, without damping.
    damping : float
        ``λ`` added to ``K_xx``.
    index : int
        1-based layer index (messages).
    name : str
        Layer name (messages).
    """

    def __init__(self, A, Bx, Kzz, Kxz, Kxx, damping, index, name):
        self.A, self.Bx, self.Kzz, self.Kxz, self.Kxx = A, Bx, Kzz, Kxz, Kxx
        self.damping, self.index, self.name = float(damping), index, name
        B, n, n_prev = A.shape
        self.n_in, self.n_out, self.p = B * n_prev, B * n, Bx.shape[1]
        self.nlayers = 1
        self.xp = get_array_module(A, Bx, Kzz, Kxz, Kxx)
        self.lapack = host_lapack(self.xp)
        self._eigs = None

    @property
    def inertia(self):
        """Inertia of the stage pivot ``Q_uu`` (Sylvester's law)."""
        if self._eigs is not None:
            self._inertia, self._logdet = _eig_inertia(self._eigs)
            self._eigs = None
        return self._inertia

    @property
    def logdet(self):
        """``log|det Q_uu|``."""
        self.inertia  # noqa: B018 - resolves the generic path's eigenvalues
        return self._logdet

    def _pivot_solve(self, rhs):
        """``Q_uu^{-1} rhs`` with the stored factorisation."""
        if self.lapack:
            sytrs = lapack.get_lapack_funcs("sytrs", (self.ldl,))
            return sytrs(self.ldl, self.ipiv, rhs, lower=1)[0]
        return get_linalg(self.xp).lu_solve(self.lu, rhs, check_finite=False)

    def factor(self, V):
        """One backward Riccati step: store the pivot, return ``V_{l-1}``."""
        xp, A, Bx = self.xp, self.A, self.Bx
        B, n_prev = A.shape[0], A.shape[2]
        Qss = xp.zeros((self.n_in, self.n_in), A.dtype)
        for s in range(B):  # block-diagonal K_zz
            sl = slice(s * n_prev, (s + 1) * n_prev)
            Qss[sl, sl] = self.Kzz[s]
        Quu = self.Kxx + self.damping * xp.eye(self.p, dtype=A.dtype)
        Qus = self.Kxz.copy()
        if V is not None:
            VA = _bd_right(V, A)  # (B n, B n_prev)
            Qss += _bd_left_T(A, VA)
            Qus += Bx.T @ VA
            Quu += Bx.T @ (V @ Bx)
        Quu = 0.5 * (Quu + Quu.T)
        if self.lapack:
            self.ldl, self.ipiv, self._inertia, self._logdet = sym_indefinite_factor(
                Quu, self.name, self.index
            )
        else:
            self.lu, self._eigs = sym_lu_factor(Quu, self.name, self.index)
        if self.p:
            self.X = self._pivot_solve(Qus)  # gain Q_uu^-1 Q_us
            Vp = Qss - Qus.T @ self.X
        else:
            self.X = xp.zeros((0, self.n_in), A.dtype)
            Vp = Qss
        return 0.5 * (Vp + Vp.T)  # symmetrise: 40x better residual (DESIGN.md)

    def backward(self, v, g):
        """Linear-term step: ``v_{l-1}`` and ``κ = Q_uu^{-1} q_u`` for ``g`` (p, k)."""
        qu = -g if v is None else self.Bx.T @ v - g
        if self.p:
            kappa = self._pivot_solve(qu)
        else:
            kappa = qu
        vp = -(self.X.T @ qu)
        if v is not None:
            vp += _bd_left_T(self.A, v)
        return vp, kappa

    def forward(self, s, kappa):
        """``u_l = -X s - κ`` and ``s_l = A s + B u``; ``s`` may be None (zero)."""
        u = -kappa if s is None else -(self.X @ s) - kappa
        snext = self.Bx @ u
        if s is not None:
            B, n, n_prev = self.A.shape
            snext += (self.A @ s.reshape(B, n_prev, -1)).reshape(B * n, -1)
        return u, snext


class StagewiseFactor:
    """Factor ``H + λI`` once by the backward sweep; solve many right-hand sides.

    Parameters
    ----------
    stages : list
        Stage objects in layer order (``DenseStage`` or the structured stages
        of :mod:`blockops.hessian.lowrank`), each covering ``nlayers``
        consecutive layers, with methods ``factor``, ``backward``,
        ``forward`` and attributes ``p``, ``inertia``, ``logdet``.
    """

    def __init__(self, stages):
        self.stages = list(stages)
        self.sizes = [st.p for st in self.stages]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int)
        self.n = int(self.offsets[-1])
        V = None
        for st in reversed(self.stages):
            V = st.factor(V)

    @property
    def inertia(self):
        neg = zero = pos = 0
        for st in self.stages:
            a, b, c = st.inertia
            neg, zero, pos = neg + a, zero + b, pos + c
        return (neg, zero, pos)

    @property
    def logdet(self):
        return float(sum(st.logdet for st in self.stages))

    def solve(self, G):
        """``(H + λI)^{-1} G`` for ``G`` of shape (n, k)."""
        off = self.offsets
        kappas = [None] * len(self.stages)
        v = None
        for j in range(len(self.stages) - 1, -1, -1):
            v, kappas[j] = self.stages[j].backward(v, G[off[j] : off[j + 1]])
        X = get_array_module(G).empty_like(G)
        s = None
        for j, st in enumerate(self.stages):
            X[off[j] : off[j + 1]], s = st.forward(s, kappas[j])
        return X


def _is_dense(layer, cache) -> bool:
    return type(layer).__name__ == "Dense" and all(
        key in cache.extra for key in ("W", "pre", "d1", "d2")
    )


def dense_stage(layer, cache, b, damping, index):
    """A :class:`DenseStage` from a layer's explicit blocks (eq. 24 pieces)."""
    A = layer.jacobian_z(cache)
    Bn, n_out, p = A.shape[0], A.shape[1], layer.n_params
    Bx = layer.jacobian_x(cache).reshape(Bn * n_out, p)
    Kzz, Kxz, Kxx = layer.hessian_blocks(cache, b)
    Kxz = Kxz.reshape(p, Bn * layer.n_in)
    return DenseStage(A, Bx, Kzz, Kxz, Kxx.reshape(p, p), damping, index, layer.name)


def stages_from_point(point, damping, structured=True):
    """Stage list for :class:`StagewiseFactor`: dense runs structured, the rest explicit."""
    from .lowrank import dense_segments

    layers, caches, bs = point.layers, point.caches, point.bs
    stages, j, L = [], 0, len(layers)
    while j < L:
        if structured and _is_dense(layers[j], caches[j]):
            e = j
            while e < L and _is_dense(layers[e], caches[e]):
                e += 1
            stages += dense_segments(layers[j:e], caches[j:e], bs[j:e], damping, j + 1)
            j = e
        else:
            stages.append(dense_stage(layers[j], caches[j], bs[j], damping, j + 1))
            j += 1
    return stages
