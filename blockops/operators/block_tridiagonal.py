r"""Block-tridiagonal operator with a pivoted factorisation and its inverse."""

from __future__ import annotations

import numpy as np

from .._checks import check_dtype, check_finite, result_dtype
from ..backend import factor_banded
from ._common import BlockOperator, apply_runs, backend_of, make_runs

__all__ = ["BlockTridiagonal", "BlockTridiagonalInverse"]


def _blocks2(owner, name, blocks):
    if blocks is None:
        return None
    if hasattr(blocks, "ndim"):
        if blocks.ndim != 3:
            raise ValueError(
                f"{owner}: {name} has shape {tuple(blocks.shape)}; expected a list of 2-D "
                "blocks or a 3-D stack (L, r, c)"
            )
        return [blocks[i] for i in range(blocks.shape[0])]
    out = list(blocks)
    for i, b in enumerate(out):
        if not hasattr(b, "ndim") or b.ndim != 2:
            raise ValueError(
                f"{owner}: {name}[{i}] has shape {getattr(b, 'shape', None)}; expected a 2-D block"
            )
    return out


class BlockTridiagonal(BlockOperator):
    r"""Block-tridiagonal operator (general or symmetric), ragged blocks allowed.

    .. math::
        A = \begin{bmatrix} D_0 & U_0 & & \\ L_0 & D_1 & U_1 & \\
            & \ddots & \ddots & \ddots \\ & & L_{L-2} & D_{L-1} \end{bmatrix},
        \qquad
        (A x)_k = L_{k-1} x_{k-1} + D_k x_k + U_k x_{k+1},

    and the adjoint :math:`(A^T y)_k = U_{k-1}^T y_{k-1} + D_k^T y_k +
    L_k^T y_{k+1}`. This is the layer-by-layer form of the KKT system of the
    exact inverse route (docs: architecture; eqs. 24-26 with the constraint of eq. 14).

    Parameters
    ----------
    lower : list of 2-D arrays or 3-D stack
        ``lower[k]`` of shape ``(n_{k+1}, n_k)`` at block position ``(k+1, k)``.
    diag : list of 2-D arrays or 3-D stack
        ``L`` square blocks ``(n_k, n_k)``.
    upper : list or 3-D stack, optional
        ``upper[k]`` of shape ``(n_k, n_{k+1})`` at ``(k, k+1)``. ``None``
        (default): ``upper[k] = lower[k]^T`` (symmetric when every ``D_k`` is).
    name : str, optional
        Name used in error messages.

    Notes
    -----
    :meth:`factor` returns a reusable factorisation with partial pivoting:
    LAPACK banded LU (``?gbtrf``/``?gbtrs``) on NumPy, block elimination with
    a QR factorisation of each stacked 2-block panel on any backend (the
    CuPy route; select it on NumPy with ``method="block"``). Both cost time
    linear in the number of blocks. A singular matrix raises
    :class:`~blockops.SingularBlockError` naming the block row where the
    elimination broke down.
    """

    def __init__(self, lower, diag, upper=None, name: str = "BlockTridiagonal"):
        self.name = name
        diag = _blocks2(name, "diag", diag)
        lower = _blocks2(name, "lower", lower)
        upper = _blocks2(name, "upper", upper)
        self.xp = xp = backend_of(name, diag + lower + (upper or []))
        L = len(diag)
        if L == 0:
            raise ValueError(f"{name}: needs at least one diagonal block")
        for what, blist in (("lower", lower), ("upper", upper)):
            if blist is not None and len(blist) != L - 1:
                raise ValueError(
                    f"{name}: {L} diagonal blocks need {L - 1} {what} blocks, got {len(blist)}"
                )
        sizes = []
        for k, D in enumerate(diag):
            if D.shape[0] != D.shape[1]:
                raise ValueError(f"{name}: diag[{k}] has shape {tuple(D.shape)}; expected square")
            sizes.append(int(D.shape[0]))
        for k in range(L - 1):
            want = (sizes[k + 1], sizes[k])
            if tuple(lower[k].shape) != want:
                raise ValueError(
                    f"{name}: lower[{k}] has shape {tuple(lower[k].shape)}; expected {want} "
                    f"(diag[{k + 1}] is {sizes[k + 1]}x{sizes[k + 1]}, diag[{k}] is "
                    f"{sizes[k]}x{sizes[k]})"
                )
            if upper is not None and tuple(upper[k].shape) != want[::-1]:
                raise ValueError(
                    f"{name}: upper[{k}] has shape {tuple(upper[k].shape)}; expected {want[::-1]}"
                )
        blocks = diag + lower + (upper or [])
        for i, b in enumerate(blocks):
            check_dtype(name, f"block {i} (shape {tuple(b.shape)})", b)
        self.diag, self.lower, self.upper = diag, lower, upper
        self.symmetric_form = upper is None
        self.block_sizes = sizes
        self.offsets = [int(v) for v in np.concatenate([[0], np.cumsum(sizes)])]
        N = self.offsets[-1]
        self._druns = make_runs(xp, [d[None] for d in diag], [(n, n) for n in sizes])
        lsz = [(sizes[k + 1], sizes[k]) for k in range(L - 1)]
        self._lruns = make_runs(xp, [b[None] for b in lower], lsz, r0=sizes[0])
        self._uruns = None
        if upper is not None:
            usz = [(a, b) for b, a in lsz]
            self._uruns = make_runs(xp, [b[None] for b in upper], usz, c0=sizes[0])
        self._factor = None
        dtype = result_dtype(*[b.dtype for b in blocks])
        super().__init__(dtype=dtype, shape=(N, N), name=name)

    def upper_blocks(self) -> list:
        """The super-diagonal blocks (``lower[k].T`` in the symmetric form)."""
        return self.upper if self.upper is not None else [b.T for b in self.lower]

    def iter_blocks(self):
        """Yield ``(row0, col0, block)`` for every stored block."""
        off = self.offsets
        for k, D in enumerate(self.diag):
            yield off[k], off[k], D
        for k, (lo, up) in enumerate(zip(self.lower, self.upper_blocks())):
            yield off[k + 1], off[k], lo
            yield off[k], off[k + 1], up

    def _matmat(self, X):
        xp = self.xp
        out = xp.empty((self.shape[0], X.shape[1]), dtype=self._out_dtype(X))
        apply_runs(xp, self._druns, X, out)
        apply_runs(xp, self._lruns, X, out, add=True)
        if self._uruns is None:
            return apply_runs(xp, self._lruns, X, out, adjoint=True, add=True)
        return apply_runs(xp, self._uruns, X, out, add=True)

    def _rmatmat(self, X):
        xp = self.xp
        out = xp.empty((self.shape[1], X.shape[1]), dtype=self._out_dtype(X))
        apply_runs(xp, self._druns, X, out, adjoint=True)
        apply_runs(xp, self._lruns, X, out, adjoint=True, add=True)
        if self._uruns is None:
            return apply_runs(xp, self._lruns, X, out, add=True)
        return apply_runs(xp, self._uruns, X, out, adjoint=True, add=True)

    def todense(self, backend: str | None = None):
        """The dense matrix, assembled from the blocks (always on the operator's backend)."""
        A = self.xp.zeros(self.shape, dtype=self.dtype)
        for r0, c0, b in self.iter_blocks():
            A[r0 : r0 + b.shape[0], c0 : c0 + b.shape[1]] = b
        return A

    def factor(self, method: str = "auto"):
        """Factorise once with pivoting; the result has ``.solve(rhs, trans=False)``.

        Parameters
        ----------
        method : {"auto", "banded", "block"}
            ``"banded"``: LAPACK banded LU (NumPy only); ``"block"``: block
            elimination with panel QR (any backend); ``"auto"``: banded on
            NumPy, block otherwise. The ``"auto"`` result is cached.
        """
        if method not in ("auto", "banded", "block"):
            raise ValueError(f"{self.name}: unknown method {method!r}; use auto, banded or block")
        if method == "auto" and self._factor is not None:
            return self._factor
        for k, (_, _, b) in enumerate(self.iter_blocks()):
            check_finite(self.name, f"block {k} (shape {tuple(b.shape)})", b)
        fac = factor_banded(self, method)
        if method == "auto":
            self._factor = fac
        return fac

    def solve(self, rhs, method: str = "auto"):
        """Solve ``A x = rhs`` for ``(n,)`` or ``(n, k)`` right-hand sides."""
        self._check_input(rhs, self.shape[0], "rhs")
        return self.factor(method).solve(rhs)

    def inverse(self, method: str = "auto") -> BlockTridiagonalInverse:
        """Operator applying :math:`A^{-1}` (forward) and :math:`A^{-T}` (adjoint)."""
        return BlockTridiagonalInverse(self, self.factor(method))


class BlockTridiagonalInverse(BlockOperator):
    r"""Inverse of a :class:`BlockTridiagonal` through its factorisation.

    Forward :math:`y \mapsto A^{-1} y`, adjoint :math:`y \mapsto A^{-T} y`,
    both with the factors computed once (``?gbtrs`` with ``trans`` on the
    banded route; reversed sweeps on the block route).
    """

    def __init__(self, A: BlockTridiagonal, factorization):
        self.A, self.factorization, self.xp = A, factorization, A.xp
        super().__init__(dtype=A.dtype, shape=A.shape, name=f"{A.name}^-1")

    def _matmat(self, X):
        return self.factorization.solve(X.astype(self.dtype, copy=False))

    def _rmatmat(self, X):
        return self.factorization.solve(X.astype(self.dtype, copy=False), trans=True)

    def inverse(self) -> BlockTridiagonal:
        return self.A
