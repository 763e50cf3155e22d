r"""Block-diagonal operator applied with batched ``matmul`` (no loop over blocks)."""

from __future__ import annotations

from .._checks import result_dtype
from ._common import (
    BlockOperator,
    apply_runs,
    as_blocks3,
    backend_of,
    block_size,
    check_runs_finite,
    make_runs,
)

__all__ = ["BlockDiagonal"]


class BlockDiagonal(BlockOperator):
    r"""Block-diagonal operator :math:`\mathrm{blockdiag}(A_0, \dots, A_{n-1})`.

    Forward and adjoint:

    .. math::
        y_i = A_i\, x_i, \qquad x_i = A_i^T\, y_i ,

    with :math:`x_i`, :math:`y_i` the consecutive slices of the flat input and
    output. This is the structure of the paper's :math:`D_x` (eq. 14) and of
    every per-sample Jacobian (block-diagonal over the batch).

    Parameters
    ----------
    blocks : array ``(n, r, c)`` or list
        A 3-D stack of ``n`` equal blocks (applied with one batched
        ``matmul``), or a list whose entries are 2-D ``(r, c)`` blocks or 3-D
        ``(G, r, c)`` stacks (meaning :math:`\mathrm{blockdiag}` over ``G``).
        Shapes may differ (ragged); consecutive entries of equal ``(r, c)`` are
        stacked once at construction into *runs*, each applied with one
        batched ``matmul``, so there is no Python loop over every block.
        A single 3-D stack (or a run of one entry) is referenced, not copied,
        as ``pylops.MatrixMult`` does: writing into it later changes the
        operator. Every block must be finite (checked here).
    name : str, optional
        Name used in error messages.

    Notes
    -----
    The operator holds the arrays given (no copy) when ``blocks`` is a 3-D
    stack; a list is stacked per run (one copy). The input is never modified.
    Its dtype is the common float dtype of the blocks and its backend the one
    of the blocks (mixing NumPy and CuPy raises ``TypeError``).
    """

    def __init__(self, blocks, name: str = "BlockDiagonal"):
        self.name = name
        if hasattr(blocks, "ndim"):
            if blocks.ndim != 3:
                raise ValueError(
                    f"{name}: blocks has shape {tuple(blocks.shape)}; expected a 3-D stack "
                    "(n, r, c) or a list of 2-D/3-D blocks"
                )
            blocks = [blocks]
        blocks = list(blocks)
        if not blocks:
            raise ValueError(f"{name}: needs at least one block")
        self.xp = xp = backend_of(name, blocks)
        b3 = as_blocks3(name, "blocks", blocks, xp)
        sizes = [block_size(b) for b in b3]
        self.row_sizes = [s[0] for s in sizes]
        self.col_sizes = [s[1] for s in sizes]
        self._runs = make_runs(xp, b3, sizes)
        check_runs_finite(name, "blocks", [r.blocks for r in self._runs], b3)
        shape = (sum(self.row_sizes), sum(self.col_sizes))
        dtype = result_dtype(*[b.dtype for b in b3])
        super().__init__(dtype=dtype, shape=shape, name=name)

    def _matmat(self, X):
        out = self.xp.empty((self.shape[0], X.shape[1]), dtype=self._out_dtype(X))
        return apply_runs(self.xp, self._runs, X, out)

    def _rmatmat(self, X):
        out = self.xp.empty((self.shape[1], X.shape[1]), dtype=self._out_dtype(X))
        return apply_runs(self.xp, self._runs, X, out, adjoint=True)
