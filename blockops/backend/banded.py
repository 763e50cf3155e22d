r"""Pivoted factorisations of block-banded matrices: the backend's banded kernels.

Two kernels, one interface (``solve(rhs, trans=False)`` for ``(n,)`` or
``(n, k)`` right-hand sides; factor once, solve many; ``logdet``):

* :class:`BandedLU` (host LAPACK): the matrix in LAPACK band storage,
  ``?gbtrf`` (LU with partial pivoting) once and ``?gbtrs`` per solve. The
  band is the tightest one that holds the given dense pieces, so a caller
  that knows its sparsity (the lifted KKT system) passes small pieces.
* :class:`BlockQR` (any backend): block elimination of a block-tridiagonal
  matrix in which each step takes an orthogonal (Householder QR)
  factorisation of the stacked 2-block panel :math:`[\tilde D_k; L_k]`.
  Orthogonal steps need no pivoting to be stable; the fill is one extra
  super-diagonal block, as with row-pivoted block LU.

:func:`factor_banded` picks one (LAPACK on NumPy, block QR elsewhere or
inside :func:`~blockops.backend.generic_linalg`). Both apply the one
singular-pivot criterion of :mod:`blockops.singular` per block row: the
smallest pivot of block row ``k`` against the largest row scale of that
block row of the matrix, so a large scale elsewhere does not hide or fake a
singular block. A singular block row raises
:class:`~blockops.SingularBlockError` with its 1-based index.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import get_lapack_funcs

from ..singular import SingularBlockError, singular_pivots
from .arrays import get_linalg, host_lapack

__all__ = ["BandedLU", "BlockQR", "factor_banded", "factor_symmetric_banded"]


def _singular(owner, k, L, pivot, method):
    return SingularBlockError(
        f"{owner}: the matrix is singular or numerically singular: {method} broke down in "
        f"block row {k + 1} of {L} (1-based; smallest pivot {pivot:.3g}); add damping or "
        "check that block row",
        layer=k + 1,
    )


def _first_singular_row(small, big, dtype):
    """Index of the first block row flagged by the singular-pivot criterion, or None."""
    bad = np.flatnonzero(singular_pivots(small, big, dtype))
    return int(bad[0]) if bad.size else None


def _equilibration(entries, N, dtype):
    """Row and column scalings ``R``, ``C`` (powers of two) with rows and columns of
    ``R A C`` of largest entry in ``(1/2, 1]`` (LAPACK ``geequ``'s idea).

    Without them a block row of a large scale (a layer weighted by large targets)
    makes the pivots of another look singular; with them every row and column
    has scale one and the pivot criterion is scale-invariant. Zero rows keep 1.
    """
    row = np.zeros(N, dtype=dtype)
    for r0, _, blk in entries:
        if blk.size:
            h = blk.shape[0]
            np.maximum(row[r0 : r0 + h], np.abs(blk).max(axis=1), out=row[r0 : r0 + h])
    row = _power_of_two_inverse(row)
    col = np.zeros(N, dtype=dtype)
    for r0, c0, blk in entries:
        if blk.size:
            h, w = blk.shape
            colmax = (np.abs(blk) * row[r0 : r0 + h, None]).max(axis=0)
            np.maximum(col[c0 : c0 + w], colmax, out=col[c0 : c0 + w])
    return row, _power_of_two_inverse(col)


def _power_of_two_inverse(scale):
    """``2^-ceil(log2 s)`` per entry (exact scaling: no rounding is added); 1 for ``s = 0``."""
    out = np.ones_like(scale)
    pos = scale > 0
    out[pos] = np.exp2(-np.ceil(np.log2(scale[pos])))
    return out


class BandedLU:
    """LU with partial pivoting in LAPACK band storage (NumPy only).

    Parameters
    ----------
    entries : iterable of ``(row0, col0, block)``
        Dense pieces of the matrix (summed where they overlap).
    offsets : sequence of int
        Block-row boundaries ``0 = o_0 < ... < o_L = N`` (for the pivot
        criterion and error messages).
    dtype : dtype
    name : str
        Owner named in errors.
    """

    method = "banded"

    def __init__(self, entries, offsets, dtype, name="BandedLU"):
        entries = list(entries)
        off = np.asarray(offsets)
        N = int(off[-1])
        self.kl = kl = max([r0 + b.shape[0] - 1 - c0 for r0, c0, b in entries] + [0])
        self.ku = ku = max([c0 + b.shape[1] - 1 - r0 for r0, c0, b in entries] + [0])
        self.row, self.col = _equilibration(entries, N, dtype)
        ab = np.zeros((2 * kl + ku + 1, N), dtype=dtype)
        for r0, c0, blk in entries:
            h, w = blk.shape
            rows = r0 + np.arange(h)[:, None]
            cols = c0 + np.arange(w)[None, :]
            scaled = blk * self.row[r0 : r0 + h, None] * self.col[None, c0 : c0 + w]
            ab[kl + ku + rows - cols, cols] += scaled
        gbtrf, self._gbtrs = get_lapack_funcs(("gbtrf", "gbtrs"), (ab,))
        self.lu, self.piv, info = gbtrf(ab, kl, ku, overwrite_ab=True)
        piv = np.abs(self.lu[kl + ku])
        self.logdet = 0.0
        if N == 0:
            return
        # the equilibrated rows have scale 1, so a block row's pivots are judged against 1
        small = np.minimum.reduceat(piv, off[:-1])
        if info > 0:
            small[int(np.searchsorted(off, info - 1, side="right") - 1)] = 0.0
        k = _first_singular_row(small, np.ones_like(small), dtype)
        if k is not None:
            raise _singular(name, k, len(off) - 1, float(small[k]), "banded LU (gbtrf)")
        self.logdet = float(
            np.sum(np.log(piv)) - np.sum(np.log(self.row)) - np.sum(np.log(self.col))
        )

    @classmethod
    def of_block_tridiagonal(cls, T):
        """Factor a :class:`~blockops.operators.BlockTridiagonal`-like ``T``."""
        return cls(T.iter_blocks(), T.offsets, T.dtype, T.name)

    def __getstate__(self):
        """Pickle without LAPACK's gbtrs (a routine does not pickle; fetched again)."""
        return {k: v for k, v in self.__dict__.items() if k != "_gbtrs"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._gbtrs = get_lapack_funcs("gbtrs", (self.lu,))

    def solve(self, rhs, trans: bool = False):
        # A = R^-1 (R A C) C^-1: solve with the equilibrated factor, then undo the scaling
        b = rhs.reshape(rhs.shape[0], -1)
        left, right = (self.col, self.row) if trans else (self.row, self.col)
        x, info = self._gbtrs(
            self.lu, self.kl, self.ku, left[:, None] * b, self.piv, trans=int(trans)
        )
        if info != 0:  # pragma: no cover - only for invalid arguments
            raise ValueError(f"gbtrs failed with info={info}")
        return (right[:, None] * x).reshape(rhs.shape)


class BlockQR:
    r"""Block elimination with a QR factorisation of each 2-block panel (any backend).

    Step :math:`k` factors :math:`[\tilde D_k; L_k] = Q_k [R_{kk}; 0]` and
    applies :math:`Q_k^T` to the rest of the two block rows, giving
    :math:`R_{k,k+1}, R_{k,k+2}` and the updated :math:`\tilde D_{k+1},
    \tilde U_{k+1}`. Then :math:`A = Q_0 \cdots Q_{L-1} R` with :math:`R` block
    upper triangular of bandwidth two, and :math:`|\det A| = \prod |\operatorname{diag} R|`.

    Parameters
    ----------
    lower, diag, upper : lists of 2-D arrays
        ``lower[k]`` at block ``(k+1, k)``, ``diag[k]`` at ``(k, k)``,
        ``upper[k]`` at ``(k, k+1)``.
    name : str
        Owner named in errors.
    """

    method = "block"

    def __init__(self, lower, diag, upper, name="BlockQR"):
        from .arrays import get_array_module

        self.xp = xp = get_array_module(*diag)
        n = [int(D.shape[0]) for D in diag]
        self.sizes = n
        self.off = np.concatenate([[0], np.cumsum(n)]).astype(int)
        self._linalg = get_linalg(xp)
        L, dt = len(n), diag[0].dtype
        scale = [float(xp.max(xp.abs(D))) if D.size else 0.0 for D in diag]
        for k in range(L - 1):  # a block row's scale: the largest entry of its blocks
            if lower[k].size:
                scale[k + 1] = max(scale[k + 1], float(xp.max(xp.abs(lower[k]))))
            if upper[k].size:
                scale[k] = max(scale[k], float(xp.max(xp.abs(upper[k]))))
        self.Q, self.R, self.R1, self.R2 = [], [], [], []
        Dt, Ut = diag[0], upper[0] if L > 1 else None
        for k in range(L):
            if k == L - 1:
                Q, R = xp.linalg.qr(Dt, mode="complete")
            else:
                Q, R = xp.linalg.qr(xp.concatenate([Dt, lower[k]], axis=0), mode="complete")
                n2 = n[k + 2] if k + 2 < L else 0
                top = xp.concatenate([Ut, xp.zeros((n[k], n2), dtype=dt)], axis=1)
                bottom = (
                    diag[k + 1] if n2 == 0 else xp.concatenate([diag[k + 1], upper[k + 1]], axis=1)
                )
                W = Q.T @ xp.concatenate([top, bottom], axis=0)
                self.R1.append(W[: n[k], : n[k + 1]])
                self.R2.append(W[: n[k], n[k + 1] :])
                Dt, Ut = W[n[k] :, : n[k + 1]], W[n[k] :, n[k + 1] :]
            Rkk = R[: n[k]]
            if n[k]:
                small = float(xp.min(xp.abs(xp.diagonal(Rkk))))  # one scalar per block row
                if singular_pivots(small, scale[k], dt):
                    raise _singular(name, k, L, small, "block QR elimination")
            self.Q.append(Q)
            self.R.append(Rkk)
        self.logdet = float(sum(xp.sum(xp.log(xp.abs(xp.diagonal(R)))) for R in self.R))

    def __getstate__(self):
        """Pickle without the array module and its linalg (modules do not pickle)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("xp", "_linalg")}

    def __setstate__(self, state):
        from .arrays import get_array_module

        self.__dict__.update(state)
        self.xp = get_array_module(*self.R)
        self._linalg = get_linalg(self.xp)

    @classmethod
    def of_entries(cls, entries, offsets, dtype, xp, name="BlockQR"):
        """Factor a symmetric block-tridiagonal matrix given as dense pieces.

        Pieces in block rows ``k`` and columns ``k`` or ``k - 1`` are summed
        into the diagonal and lower blocks; upper blocks are the transposes.
        """
        off = np.asarray(offsets)
        sizes = np.diff(off)
        diag = [xp.zeros((int(s), int(s)), dtype) for s in sizes]
        lower = [xp.zeros((int(a), int(b)), dtype) for a, b in zip(sizes[1:], sizes[:-1])]
        for r0, c0, blk in entries:
            bi = int(np.searchsorted(off, r0, side="right")) - 1
            bj = int(np.searchsorted(off, c0, side="right")) - 1
            r, c = r0 - off[bi], c0 - off[bj]
            h, w = blk.shape
            if bi == bj:
                diag[bi][r : r + h, c : c + w] += blk
            elif bi == bj + 1:
                lower[bj][r : r + h, c : c + w] += blk
        return cls(lower, diag, [Lk.T for Lk in lower], name)

    @classmethod
    def of_block_tridiagonal(cls, T):
        """Factor a :class:`~blockops.operators.BlockTridiagonal`-like ``T``."""
        L = len(T.diag)
        return cls(T.lower, T.diag, T.upper_blocks() if L > 1 else [], T.name)

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


def factor_banded(T, method: str = "auto"):
    """Factor a block-tridiagonal ``T`` (``BlockTridiagonal``-like) with pivoting.

    ``method="auto"``: :class:`BandedLU` where host LAPACK applies
    (:func:`~blockops.backend.host_lapack`), else :class:`BlockQR`;
    ``"banded"`` or ``"block"`` force one.
    """
    use = method if method != "auto" else ("banded" if host_lapack(T.xp) else "block")
    if use == "banded" and T.xp is not np:
        raise ValueError(f"{T.name}: method 'banded' needs NumPy arrays; use 'block'")
    kernel = BandedLU if use == "banded" else BlockQR
    return kernel.of_block_tridiagonal(T)


def factor_symmetric_banded(entries, offsets, dtype, xp, name):
    """Factor a symmetric block-tridiagonal matrix given as its dense pieces.

    ``entries``: ``(row0, col0, block)`` for every nonzero piece (both
    triangles); ``offsets``: block-row boundaries. Host LAPACK:
    :class:`BandedLU` on the tightest band holding the pieces; otherwise
    :class:`BlockQR` on the assembled blocks.
    """
    if host_lapack(xp):
        return BandedLU(entries, offsets, dtype, name)
    return BlockQR.of_entries(entries, offsets, dtype, xp, name)
