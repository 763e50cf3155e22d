r"""The lifted KKT system of ``H + λI`` as a banded matrix, solved by pivoted LU.

With ``dz = M⁻¹ Dx dx`` and a multiplier ``μ`` (docs: derivation, "The
general exact route"), ``(H + λI) dx = g`` is equivalent to

.. math::

    \begin{bmatrix} K_{zz} & K_{zx} & M^T \\ K_{xz} & K_{xx} + λI & -D_x^T \\
    M & -D_x & 0 \end{bmatrix}
    \begin{bmatrix} dz \\ dx \\ μ \end{bmatrix} =
    \begin{bmatrix} 0 \\ g \\ 0 \end{bmatrix},

``K_zz = Pᵀ DM Dzz P``, ``K_zx = Pᵀ DM Dxz``, ``K_xz = DD Dzx P``,
``K_xx = DD Dxx`` (eq. 24's pieces; ``M`` of eq. 14, ``Dx`` its right-hand
side). Ordered layer by layer as ``(dx_l, μ_l, dz_l)`` the matrix is
block-tridiagonal: the only couplings between layers are ``dz_{l-1}`` with
``dx_l`` (``K_xz``) and with ``μ_l`` (``−∇_z f_l``). It is stored in LAPACK
band form and factored by ``gbtrf`` (LU with partial pivoting), so it is
exact for indefinite ``H``, singular stage pivots and ``λ = 0``, whenever
``H + λI`` is nonsingular; time and memory are linear in depth (memory
``≈ 3 w N`` numbers with ``w ≈ p_l + 2 B n_l``, so it suits narrow nets and
small batches; the stagewise sweep is the fast route).

Since ``M`` is unit lower block-triangular, eliminating ``dz`` and ``μ``
leaves ``H + λI`` with ``|det M| = 1``: ``|det KKT| = |det(H + λI)|``, so
``log|det(H + λI)|`` is the sum of ``log|U_ii|`` of the LU factor. The LU
factor does not give the inertia (only the sign of the determinant);
:class:`~blockops.inverse.InverseHessian` takes it from the stagewise sweep.

Backends: the backend's kernel (:func:`blockops.backend.factor_symmetric_banded`)
factors the pieces: ``gbtrf`` on host LAPACK; on CuPy (or NumPy inside
:func:`blockops.backend.generic_linalg`) block elimination with a QR of each
2-block panel, one block row per layer ``(dx_l, μ_l, dz_l)``: orthogonal
steps need no pivoting and ``|det KKT| = Π |diag R_kk|`` gives ``log|det|``.
A singular block row (the criterion of :mod:`blockops.singular`, relative to
that layer's rows) raises :class:`~blockops.SingularBlockError` naming the layer.
"""

from __future__ import annotations

import numpy as np

from .._checks import layer_dampings
from ..backend import factor_symmetric_banded, get_array_module
from ..singular import SingularBlockError, damping_hint, singular_pivots

__all__ = ["BandedKKT", "kkt_inertia"]


def _block_diagonal(xp, blocks, rows, cols):
    """``blockdiag(blocks)`` of a ``(B, r, c)`` stack as one ``(B r, B c)`` matrix."""
    out = xp.zeros((rows, cols), blocks.dtype)
    Bn, r, c = blocks.shape
    for s in range(Bn):
        out[s * r : (s + 1) * r, s * c : (s + 1) * c] = blocks[s]
    return out


class BandedKKT:
    """Pivoted banded LU of the lifted KKT system of a :class:`~blockops.network.Point`.

    Parameters
    ----------
    point : Point
        The linearised pipeline.
    damping : float or tuple
        ``λ`` (any sign), or one per layer.
    """

    def __init__(self, point, damping=0.0):
        layers = point.layers
        self._layout(point, damping)
        offs, pos = self._offs, self.N
        entries = list(self._entries(point))
        try:
            self._fac = factor_symmetric_banded(entries, [*offs, pos], self.dtype, self.xp, "KKT")
        except SingularBlockError as err:
            l = err.layer
            raise SingularBlockError(
                f"BandedKKT: the pivoted factorisation of the lifted KKT system is numerically "
                f"singular in block row {l} ({layers[l - 1].name}): H + damping*I is singular "
                f"or nearly so; {damping_hint(self.damping, self.dtype)}.",
                layer=l,
            ) from None
        self.logdet = self._fac.logdet

    def _layout(self, point, damping):
        """Where each layer's ``(dx_l, μ_l, dz_l)`` rows sit in the lifted system."""
        layers = point.layers
        self.layers, self.dtype = layers, np.dtype(point.dtype)
        self.damping = damping if isinstance(damping, tuple) else float(damping)
        self._lams = layer_dampings(self.damping, len(layers))
        self.xp = get_array_module(point.params)
        offs, pos, xidx = [], 0, []
        for ly in layers:  # dx_l at pos, mu_l at pos + p, dz_l at pos + p + B n_out
            offs.append(pos)
            xidx.append(np.arange(pos, pos + ly.n_params))
            pos += ly.n_params + 2 * point.batch_size * ly.n_out
        self.N, self._offs = pos, offs
        self.xidx = np.concatenate(xidx)
        self.n = self.xidx.size
        self._xsel = self.xp.asarray(self.xidx)

    def __getstate__(self):
        """Pickle without the array module (a module does not pickle)."""
        return {k: v for k, v in self.__dict__.items() if k != "xp"}

    def __setstate__(self, state):
        """Restore a pickled factor; its array module is that of its arrays."""
        self.__dict__.update(state)
        self.xp = get_array_module(self._xsel)

    def _entries(self, point):
        """Yield ``(row0, col0, dense block)`` of the symmetric lifted matrix."""
        xp, dt, Bn = self.xp, self.dtype, point.batch_size
        prev_z = None  # where dz_{l-1} sits
        for l, (ly, c, b, lam) in enumerate(zip(point.layers, point.caches, point.bs, self._lams)):
            p, n_in, n_out = ly.n_params, Bn * ly.n_in, Bn * ly.n_out
            Bx = xp.asarray(ly.jacobian_x(c), dt).reshape(n_out, p)
            Kzz, Kxz, Kxx = ly.hessian_blocks(c, b)
            x0 = self._offs[l]
            m0, z0 = x0 + p, x0 + p + n_out
            eye = xp.eye(n_out, dtype=dt)
            yield x0, x0, xp.asarray(Kxx, dt).reshape(p, p) + lam * xp.eye(p, dtype=dt)
            yield x0, m0, -Bx.T
            yield m0, x0, -Bx
            yield m0, z0, eye
            yield z0, m0, eye
            if prev_z is not None:
                Ablk = _block_diagonal(xp, xp.asarray(ly.jacobian_z(c), dt), n_out, n_in)
                Kxz = xp.asarray(Kxz, dt).reshape(p, n_in)
                yield prev_z, prev_z, _block_diagonal(xp, xp.asarray(Kzz, dt), n_in, n_in)
                yield x0, prev_z, Kxz
                yield prev_z, x0, Kxz.T
                yield m0, prev_z, -Ablk
                yield prev_z, m0, -Ablk.T
            prev_z = z0

    def solve(self, G):
        """``(H + λI)^{-1} G`` for ``G`` of shape (n, k)."""
        rhs = self.xp.zeros((self.N, G.shape[1]), self.dtype)
        rhs[self._xsel] = G
        return self._fac.solve(rhs)[self._xsel]


def kkt_inertia(point, damping=0.0):
    r"""Inertia of ``H + λI`` from the lifted KKT matrix ``K`` by block ``LDLᵀ``.

    ``K = [[H_lift, Aᵀ], [A, 0]]`` with the constraint Jacobian ``A = [M, −D_x]``
    of full row rank ``m = Σ_l B n_l`` (``M`` is unit block-triangular) and null
    space ``Z = [M⁻¹ D_x; I]``, whose reduced Hessian ``Zᵀ H_lift Z`` is
    ``H + λI``. Hence (Gould 1985; Haynsworth)
    ``In(K) = In(H + λI) + (m, 0, m)``, and ``In(K)`` is the sum of the inertias
    of the Schur complements ``S_l = K_ll − K_{l,l-1} S_{l-1}⁻¹ K_{l-1,l}`` of the
    block-tridiagonal layer ordering, each factored by Bunch-Kaufman. Unlike the
    stagewise sweep this ordering keeps ``μ_l`` and ``dz_l`` in every block, so a
    singular ``Q_uu`` (an undamped low-rank stage) does not stop it.

    Raises :class:`~blockops.SingularBlockError` when some ``S_l`` is singular.
    """
    from ..backend import factor_symmetric

    lay = BandedKKT.__new__(BandedKKT)
    lay._layout(point, damping)
    xp, dt, offs = lay.xp, lay.dtype, [*lay._offs, lay.N]
    L = len(offs) - 1
    diag = [xp.zeros((offs[l + 1] - offs[l],) * 2, dt) for l in range(L)]
    sub = [None] * L  # K_{l, l-1}: rows of block l, columns of block l-1
    block = np.searchsorted(offs, np.arange(lay.N), side="right") - 1
    for r0, c0, E in lay._entries(point):
        br, bc = int(block[r0]), int(block[c0])
        rs = slice(r0 - offs[br], r0 - offs[br] + E.shape[0])
        cs = slice(c0 - offs[bc], c0 - offs[bc] + E.shape[1])
        if br == bc:
            diag[br][rs, cs] += E
        elif br == bc + 1:
            if sub[br] is None:
                sub[br] = xp.zeros((offs[br + 1] - offs[br], offs[bc + 1] - offs[bc]), dt)
            sub[br][rs, cs] += E
    neg = zero = pos = 0
    S_inv_cols = None  # S_{l-1}⁻¹ K_{l-1,l}, from the previous factor
    for l in range(L):
        S = diag[l]
        if sub[l] is not None:
            S = S - sub[l] @ S_inv_cols
        fac = factor_symmetric(0.5 * (S + S.T))
        if fac.rcond == 0 or singular_pivots(fac.rcond, 1.0, dt):
            raise SingularBlockError(
                f"inertia: the lifted KKT Schur complement of {point.layers[l].name} is "
                f"singular (reciprocal condition {fac.rcond:.1e}); add damping.",
                layer=l + 1,
            )
        a, b, c = fac.inertia
        neg, zero, pos = neg + a, zero + b, pos + c
        if l + 1 < L and sub[l + 1] is not None:
            S_inv_cols = fac.solve(sub[l + 1].T)
    m = sum(point.batch_size * ly.n_out for ly in point.layers)
    return (neg - m, zero, pos - m)
