r"""Pivoted factorisations of a block-tridiagonal matrix (used by ``BlockTridiagonal``).

Two routes, same interface (``solve(rhs, trans=False)`` for ``(n,)`` or
``(n, k)`` right-hand sides, factor once / solve many):

* :class:`BandedLU` (NumPy): the matrix in LAPACK band storage, ``?gbtrf``
  (LU with partial pivoting) once and ``?gbtrs`` per solve.
* :class:`BlockQR` (any backend): block elimination in which each step takes
  an orthogonal (Householder QR) factorisation of the stacked 2-block panel
  :math:`[\tilde D_k; L_k]`. Orthogonal steps need no pivoting to be stable;
  the fill is one extra super-diagonal block, as with row-pivoted block LU.

Both flag a zero or tiny pivot (``|pivot| <= N eps max|A|``) with
:class:`~blockops.SingularBlockError` naming the 1-based block row.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
from scipy.linalg import get_lapack_funcs

from .._checks import SingularBlockError
from ..backend import get_linalg

__all__ = ["BandedLU", "BlockQR"]


def _singular(owner, k, L, pivot, method):
    return SingularBlockError(
        f"{owner}: the matrix is singular or numerically singular: {method} broke down in "
        f"block row {k + 1} of {L} (1-based; smallest pivot {pivot:.3g}); add damping or "
        "check that block row",
        layer=k + 1,
    )


class BandedLU:
    """LU with partial pivoting in LAPACK band storage (NumPy only)."""

    method = "banded"

    def __init__(self, T):
        xp, off, N = T.xp, T.offsets, T.shape[0]
        sizes = T.block_sizes
        pairs = [a + b - 1 for a, b in pairwise(sizes)]
        self.kl = kl = max([s - 1 for s in sizes] + pairs)
        self.ku = ku = kl
        ab = xp.zeros((2 * kl + ku + 1, N), dtype=T.dtype)
        for r0, c0, blk in T.iter_blocks():
            r, c = blk.shape
            rows = r0 + np.arange(r)[:, None]
            cols = c0 + np.arange(c)[None, :]
            ab[kl + ku + rows - cols, cols] = blk
        scale = float(xp.max(xp.abs(ab))) if N else 0.0
        gbtrf, self._gbtrs = get_lapack_funcs(("gbtrf", "gbtrs"), (ab,))
        self.lu, self.piv, info = gbtrf(ab, kl, ku, overwrite_ab=True)
        piv = np.abs(self.lu[kl + ku])
        bad = info - 1 if info > 0 else int(np.argmin(piv)) if N else 0
        tol = N * np.finfo(T.dtype).eps * scale
        if N and (info > 0 or not np.isfinite(piv[bad]) or piv[bad] <= tol):
            k = int(np.searchsorted(off, bad, side="right") - 1)
            raise _singular(T.name, k, len(sizes), float(piv[bad]), "banded LU (gbtrf)")

    def solve(self, rhs, trans: bool = False):
        b = rhs.reshape(rhs.shape[0], -1)
        x, info = self._gbtrs(self.lu, self.kl, self.ku, b, self.piv, trans=int(trans))
        if info != 0:  # pragma: no cover - only for invalid arguments
            raise ValueError(f"gbtrs failed with info={info}")
        return x.reshape(rhs.shape)


class BlockQR:
    r"""Block elimination with a QR factorisation of each 2-block panel (any backend).

    Step :math:`k` factors :math:`[\tilde D_k; L_k] = Q_k [R_{kk}; 0]` and
    applies :math:`Q_k^T` to the rest of the two block rows, giving
    :math:`R_{k,k+1}, R_{k,k+2}` and the updated :math:`\tilde D_{k+1},
    \tilde U_{k+1}`. Then :math:`A = Q_0 \cdots Q_{L-1} R` with :math:`R` block
    upper triangular of bandwidth two.
    """

    method = "block"

    def __init__(self, T):
        self.xp = xp = T.xp
        self.off, self.sizes = T.offsets, T.block_sizes
        self._linalg = get_linalg(xp)
        L, n = len(self.sizes), self.sizes
        D, Lo, Up = T.diag, T.lower, T.upper_blocks()
        scale = max(float(xp.max(xp.abs(b))) for _, _, b in T.iter_blocks() if b.size)
        tol = T.shape[0] * np.finfo(T.dtype).eps * scale
        self.Q, self.R, self.R1, self.R2 = [], [], [], []
        Dt, Ut = D[0], Up[0] if L > 1 else None
        for k in range(L):
            if k == L - 1:
                Q, R = xp.linalg.qr(Dt, mode="complete")
            else:
                Q, R = xp.linalg.qr(xp.concatenate([Dt, Lo[k]], axis=0), mode="complete")
                n2 = n[k + 2] if k + 2 < L else 0
                top = xp.concatenate([Ut, xp.zeros((n[k], n2), dtype=T.dtype)], axis=1)
                bottom = D[k + 1] if n2 == 0 else xp.concatenate([D[k + 1], Up[k + 1]], axis=1)
                W = Q.T @ xp.concatenate([top, bottom], axis=0)
                self.R1.append(W[: n[k], : n[k + 1]])
                self.R2.append(W[: n[k], n[k + 1] :])
                Dt, Ut = W[n[k] :, : n[k + 1]], W[n[k] :, n[k + 1] :]
            Rkk = R[: n[k]]
            piv = xp.abs(xp.diagonal(Rkk))
            if n[k] and (not bool(xp.all(xp.isfinite(piv))) or float(xp.min(piv)) <= tol):
                raise _singular(T.name, k, L, float(xp.min(piv)), "block QR elimination")
            self.Q.append(Q)
            self.R.append(Rkk)

    def _tri(self, R, b, trans):
        return self._linalg.solve_triangular(R, b, trans=int(trans), lower=False)

    def solve(self, rhs, trans: bool = False):
        xp, off, L = self.xp, self.off, len(self.sizes)
        C = xp.array(rhs.reshape(rhs.shape[0], -1), copy=True)
        if not trans:  # x = R^-1 Q_{L-1}^T ... Q_0^T rhs
            for k in range(L):
                sl = slice(off[k], off[min(k + 2, L)])
                C[sl] = self.Q[k].T @ C[sl]
            for k in range(L - 1, -1, -1):
                t = C[off[k] : off[k + 1]]
                if k + 1 < L:
                    t = t - self.R1[k] @ C[off[k + 1] : off[k + 2]]
                if k + 2 < L:
                    t = t - self.R2[k] @ C[off[k + 2] : off[k + 3]]
                C[off[k] : off[k + 1]] = self._tri(self.R[k], t, False)
            return C.reshape(rhs.shape)
        # A^T = R^T Q_{L-1}^T ... Q_0^T: forward substitution with R^T, then Q_0 ... Q_{L-1}
        for k in range(L):
            t = C[off[k] : off[k + 1]]
            if k >= 1:
                t = t - self.R1[k - 1].T @ C[off[k - 1] : off[k]]
            if k >= 2:
                t = t - self.R2[k - 2].T @ C[off[k - 2] : off[k - 1]]
            C[off[k] : off[k + 1]] = self._tri(self.R[k], t, True)
        for k in range(L - 1, -1, -1):
            sl = slice(off[k], off[min(k + 2, L)])
            C[sl] = self.Q[k] @ C[sl]
        return C.reshape(rhs.shape)
