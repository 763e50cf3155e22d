r"""The lifted KKT system of ``H + λI`` as a banded matrix, solved by pivoted LU.

With ``dz = M⁻¹ Dx dx`` and a multiplier ``μ`` (``DESIGN.md``, "The general
exact route"), ``(H + λI) dx = g`` is equivalent to

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
:class:`~blockops.hessian.kkt.InverseHessian` takes it from the stagewise sweep.

Backends: ``gbtrf`` is host LAPACK. On CuPy (or NumPy inside
:func:`blockops.backend.generic_linalg`) the same lifted matrix is assembled
as a :class:`~blockops.operators.BlockTridiagonal` with one block row per layer
``(dx_l, μ_l, dz_l)`` and factored by block elimination with a QR of each
2-block panel (``factor(method="block")``): orthogonal steps need no
pivoting, ``|det KKT| = Π |diag R_kk|`` gives ``log|det|``, and a breakdown
raises the same :class:`~blockops.SingularBlockError` (``BandedKKT: ...``).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg.lapack as lapack

from .._checks import SingularBlockError
from ..backend import get_array_module, host_lapack

__all__ = ["BandedKKT"]


class BandedKKT:
    """Pivoted banded LU of the lifted KKT system of a :class:`~blockops.network.Point`.

    Parameters
    ----------
    point : Point
        The linearised pipeline.
    damping : float
        ``λ ≥ 0``.
    dtype : numpy dtype, optional
        Working precision (default: the point's).
    """

    def __init__(self, point, damping=0.0, dtype=None):
        layers, caches, bs = point.layers, point.caches, point.bs
        dt = np.dtype(dtype or point.dtype)
        self.layers, self.damping, self.dtype = layers, float(damping), dt
        self.xp = xp = get_array_module(*(c.z_prev for c in caches))
        Bn = point.batch_size
        blocks, offs, pos = [], [], 0
        self.xidx = []  # where each layer's dx_l sits in the lifted vector
        for ly, c, b in zip(layers, caches, bs):
            p, n_in, n_out = ly.n_params, Bn * ly.n_in, Bn * ly.n_out
            A = xp.asarray(ly.jacobian_z(c), dt)
            Bx = xp.asarray(ly.jacobian_x(c), dt).reshape(n_out, p)
            Kzz, Kxz, Kxx = ly.hessian_blocks(c, b)
            blocks.append(
                (
                    A,
                    Bx,
                    xp.asarray(Kzz, dt),
                    xp.asarray(Kxz, dt).reshape(p, n_in),
                    xp.asarray(Kxx, dt).reshape(p, p),
                    p,
                    n_in,
                    n_out,
                )
            )
            offs.append(pos)  # dx_l at pos, mu_l at pos + p, dz_l at pos + p + n_out
            self.xidx.append(np.arange(pos, pos + p))
            pos += p + 2 * n_out
        self.N = N = pos
        self._offs = offs
        self.xidx = np.concatenate(self.xidx)
        self.n = self.xidx.size
        entries = list(self._blocks(blocks, offs))
        self._fac = None  # the generic route's block factorisation
        if not host_lapack(xp):
            self._factor_block(entries)
            return
        kl = max(int(r0 + h - 1 - c0) for r0, c0, h, w, _ in entries)
        ku = max(int(c0 + w - 1 - r0) for r0, c0, h, w, _ in entries)
        kl, ku = max(kl, 0), max(ku, 0)
        ab = np.zeros((2 * kl + ku + 1, N), dt)
        for r0, c0, h, w, blk in entries:
            i = np.arange(r0, r0 + h)[:, None]
            j = np.arange(c0, c0 + w)[None, :]
            ab[kl + ku + i - j, j] += blk
        gbtrf = lapack.get_lapack_funcs("gbtrf", (ab,))
        lu, piv, info = gbtrf(ab, kl, ku, overwrite_ab=1)
        self.kl, self.ku, self.lu, self.piv = kl, ku, lu, piv
        diag = np.abs(lu[kl + ku])
        if info > 0:
            raise self._singular(info - 1, "exactly singular")
        tiny = diag.max() * 10 * np.finfo(dt).eps  # pivot ratio below 10 eps: singular
        if diag.min() <= tiny:
            raise self._singular(int(np.argmin(diag)), "numerically singular")
        self.logdet = float(np.sum(np.log(diag)))

    def _factor_block(self, entries):
        """Generic route: block-tridiagonal assembly (one block per layer), block QR."""
        from ..operators import BlockTridiagonal

        xp, offs = self.xp, np.asarray([*self._offs, self.N])
        sizes = np.diff(offs)
        diag = [xp.zeros((int(s), int(s)), self.dtype) for s in sizes]
        lower = [xp.zeros((int(a), int(b)), self.dtype) for a, b in zip(sizes[1:], sizes[:-1])]
        for r0, c0, h, w, blk in entries:
            bi = int(np.searchsorted(offs, r0, side="right")) - 1
            bj = int(np.searchsorted(offs, c0, side="right")) - 1
            r, c = r0 - offs[bi], c0 - offs[bj]
            if bi == bj:
                diag[bi][r : r + h, c : c + w] += blk
            elif bi == bj + 1:  # the upper blocks are their transposes (symmetric matrix)
                lower[bj][r : r + h, c : c + w] += blk
        try:
            fac = BlockTridiagonal(lower, diag, name="BandedKKT").factor(method="block")
        except SingularBlockError as err:
            l = err.layer
            raise SingularBlockError(
                f"BandedKKT: the block QR elimination of the lifted KKT system is numerically "
                f"singular at block row {l} ({self.layers[l - 1].name}): H + damping*I is "
                "singular; add damping (e.g. damping=1e-8 * ||H||).",
                layer=l,
            ) from None
        self._fac, self._xsel = fac, xp.asarray(self.xidx)
        # |det KKT| = prod |diag R_kk| (the Q_k are orthogonal); one scalar to the host
        self.logdet = float(sum(xp.sum(xp.log(xp.abs(xp.diagonal(R)))) for R in fac.R))

    def _singular(self, row, detail):
        l = int(np.searchsorted(np.asarray(self._offs), row, side="right"))  # 1-based
        name = self.layers[l - 1].name
        return SingularBlockError(
            f"BandedKKT: the pivoted LU of the lifted KKT system is {detail} at row {row} "
            f"({name}): H + damping*I is singular; add damping (e.g. damping=1e-8 * ||H||).",
            layer=l,
        )

    def _blocks(self, blocks, offs):
        """Yield ``(row0, col0, h, w, dense block)`` of the symmetric lifted matrix."""
        xp, lam = self.xp, self.damping
        for l, (A, Bx, _, Kxz, Kxx, p, n_in, n_out) in enumerate(blocks):
            x0, m0 = offs[l], offs[l] + p
            z0 = m0 + n_out
            yield x0, x0, p, p, Kxx + lam * xp.eye(p, dtype=Kxx.dtype)
            yield x0, m0, p, n_out, -Bx.T
            yield m0, x0, n_out, p, -Bx
            yield m0, z0, n_out, n_out, xp.eye(n_out, dtype=Kxx.dtype)
            yield z0, m0, n_out, n_out, xp.eye(n_out, dtype=Kxx.dtype)
            if l == 0:
                continue
            zp = offs[l - 1] + blocks[l - 1][5] + 2 * blocks[l - 1][7] - n_in  # dz_{l-1}
            Bn, nn, ni = A.shape
            Ablk = xp.zeros((n_out, n_in), A.dtype)
            Kzz = xp.zeros((n_in, n_in), A.dtype)
            for s in range(Bn):
                Ablk[s * nn : (s + 1) * nn, s * ni : (s + 1) * ni] = A[s]
                Kzz[s * ni : (s + 1) * ni, s * ni : (s + 1) * ni] = blocks[l][2][s]
            yield zp, zp, n_in, n_in, Kzz
            yield x0, zp, p, n_in, Kxz
            yield zp, x0, n_in, p, Kxz.T
            yield m0, zp, n_out, n_in, -Ablk
            yield zp, m0, n_in, n_out, -Ablk.T

    def solve(self, G):
        """``(H + λI)^{-1} G`` for ``G`` of shape (n, k)."""
        if self._fac is not None:  # generic route: stays on the device
            rhs = self.xp.zeros((self.N, G.shape[1]), self.dtype)
            rhs[self._xsel] = G
            return self._fac.solve(rhs)[self._xsel]
        rhs = np.zeros((self.N, G.shape[1]), self.dtype)
        rhs[self.xidx] = G
        gbtrs = lapack.get_lapack_funcs("gbtrs", (self.lu,))
        sol, _ = gbtrs(self.lu, self.kl, self.ku, rhs, self.piv)
        return sol[self.xidx]
