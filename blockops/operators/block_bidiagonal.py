r"""The paper's :math:`M` (eqs. 7 and 14): block lower-bidiagonal, and its inverse."""

from __future__ import annotations

import numpy as np

from .._checks import SingularBlockError, result_dtype
from ..singular import pivot_rtol
from ._common import (
    BlockOperator,
    apply_runs,
    as_blocks3,
    backend_of,
    block_size,
    check_runs_finite,
    make_runs,
)

__all__ = ["BlockBidiagonal", "BlockBidiagonalInverse"]


def _as_list(owner: str, name: str, blocks):
    """A sequence of blocks; a 3-D/4-D array is a stack over its leading axis."""
    if blocks is None:
        return None, None
    if hasattr(blocks, "ndim"):
        if blocks.ndim not in (3, 4):
            raise ValueError(
                f"{owner}: {name} has shape {tuple(blocks.shape)}; expected a list of blocks, "
                "a 3-D stack (L, r, c) or a 4-D stack (L, G, r, c)"
            )
        stack = blocks if blocks.ndim == 4 else blocks[:, None]
        return [stack[i] for i in range(stack.shape[0])], stack
    return list(blocks), None


class BlockBidiagonal(BlockOperator):
    r"""Block lower-bidiagonal operator, the paper's :math:`M` (eqs. 7 and 14).

    .. math::
        M = \begin{bmatrix} D_0 & & & \\ S_0 & D_1 & & \\ & \ddots & \ddots & \\
            & & S_{L-2} & D_{L-1} \end{bmatrix},
        \qquad
        (M x)_l = D_l x_l + S_{l-1} x_{l-1},
        \qquad
        (M^T y)_l = D_l^T y_l + S_l^T y_{l+1},

    with :math:`D_l = I` unless ``diag`` says otherwise. For the paper's ``M``
    the caller passes :math:`S_{l-1} = -\nabla_z f_{l+1}` (blocks are placed
    literally, no sign is added). Row ``M^T b^T = e_L^T`` (eq. 7) is solved by
    ``M.inverse().rmatvec(e_L)``, and eq. 14's ``dz = M^{-1} D_x dx`` by
    ``M.inverse().matvec``.

    Parameters
    ----------
    sub : list or array
        Sub-diagonal blocks, ``sub[j]`` at block position ``(j+1, j)``,
        ``j = 0 .. L-2``. Each entry is a 2-D ``(r, c)`` block or a 3-D
        ``(G, r, c)`` stack meaning :math:`\mathrm{blockdiag}` over ``G`` (per-
        sample blocks ``(B, a_{l+1}, a_l)``; never densified). A 4-D array
        ``(L-1, G, r, c)`` (or 3-D ``(L-1, r, c)``) is the equal-shape fast
        path: the forward product is one batched ``matmul``.
    diag : list or array, optional
        Diagonal blocks (same forms; ``None`` entries mean identity). Default:
        all identity.
    name : str, optional
        Name used in error messages (default ``"M"``).
    block_sizes : int or list of int, optional
        Size of block 0 (int) or of every block (list, checked against the
        blocks). Needed only when no block determines a size (``L = 1`` with an
        identity diagonal).
    dtype : dtype, optional
        Dtype when no block fixes it (``L = 1``, identity diagonal); default
        float64. Otherwise the common float dtype of the blocks.

    Attributes
    ----------
    block_sizes : list of int
        ``[n_0, ..., n_{L-1}]``.
    offsets : list of int
        Start of each block in the flat vector (``L + 1`` entries).

    Notes
    -----
    Blocks may be ragged. Shapes are checked at construction; a mismatch
    raises ``ValueError`` naming the operator, the block and both shapes.
    """

    def __init__(self, sub, diag=None, name: str = "M", block_sizes=None, dtype=None):
        self.name = name
        sub_list, sub_stack = _as_list(name, "sub", sub)
        diag_list, diag_stack = _as_list(name, "diag", diag)
        self.xp = xp = backend_of(name, list(sub_list) + list(diag_list or []))
        sub3 = as_blocks3(name, "sub", sub_list, xp)
        if any(b is None for b in sub3):
            raise ValueError(f"{name}: sub-diagonal blocks may not be None")
        L = len(sub3) + 1
        if diag_list is None:
            diag_list = [None] * L
        if len(diag_list) != L:
            raise ValueError(
                f"{name}: {len(sub3)} sub-diagonal blocks need {L} diagonal blocks, "
                f"got {len(diag_list)}"
            )
        diag3 = as_blocks3(name, "diag", diag_list, xp)
        sizes = self._infer_sizes(name, sub3, diag3, block_sizes)
        self.block_sizes = sizes
        self.offsets = [int(v) for v in np.concatenate([[0], np.cumsum(sizes)])]
        self._sub3, self._diag3 = sub3, diag3
        self._sub_stack = sub_stack
        self._diag_stack = diag_stack
        # runs: D over the whole vector, S from x[: N - n_{L-1}] into y[n_0 :]
        if diag_stack is not None:
            self._druns = make_runs(xp, [diag_stack.reshape(-1, *diag_stack.shape[2:])], [(0, 0)])
            self._druns[0].nr = self._druns[0].nc = self.offsets[-1]
        else:
            self._druns = make_runs(xp, diag3, [(n, n) for n in sizes])
        if sub_stack is not None and L > 1:
            flat = sub_stack.reshape(-1, *sub_stack.shape[2:])
            self._sruns = make_runs(xp, [flat], [(0, 0)], r0=sizes[0])
            self._sruns[0].nr = self.offsets[-1] - sizes[0]
            self._sruns[0].nc = self.offsets[-2]
        else:
            self._sruns = make_runs(xp, sub3, [block_size(b) for b in sub3], r0=sizes[0])
        check_runs_finite(name, "sub", [r.blocks for r in self._sruns], sub3)
        check_runs_finite(name, "diag", [r.blocks for r in self._druns], diag3)
        dtypes = [b.dtype for b in sub3 + diag3 if b is not None] or [dtype or np.float64]
        self._inv = None
        N = self.offsets[-1]
        super().__init__(dtype=result_dtype(*dtypes), shape=(N, N), name=name)

    @staticmethod
    def _infer_sizes(name, sub3, diag3, block_sizes):
        L = len(diag3)
        sizes: list = [None] * L
        for j, S in enumerate(sub3):
            rows, cols = block_size(S)
            for l, n, what in ((j, cols, "columns"), (j + 1, rows, "rows")):
                if sizes[l] is not None and sizes[l] != n:
                    raise ValueError(
                        f"{name}: sub[{j}] has shape {tuple(S.shape)} ({rows}x{cols} as a block) "
                        f"but block {l} has size {sizes[l]}: its {what} must match"
                    )
                sizes[l] = n
        for l, D in enumerate(diag3):
            if D is None:
                continue
            rows, cols = block_size(D)
            if D.shape[1] != D.shape[2] or (sizes[l] is not None and sizes[l] != rows):
                raise ValueError(
                    f"{name}: diag[{l}] has shape {tuple(D.shape)}; expected square blocks of "
                    f"total size {sizes[l] if sizes[l] is not None else rows}"
                )
            sizes[l] = rows
        if block_sizes is not None:
            given = [int(block_sizes)] if np.ndim(block_sizes) == 0 else list(block_sizes)
            if np.ndim(block_sizes) != 0 and len(given) != L:
                raise ValueError(f"{name}: block_sizes has {len(given)} entries; expected {L}")
            for l, n in enumerate(given):
                if sizes[l] is not None and sizes[l] != n:
                    raise ValueError(
                        f"{name}: block_sizes[{l}] = {n} but the blocks give size {sizes[l]}"
                    )
                sizes[l] = n
        if any(s is None for s in sizes):
            raise ValueError(f"{name}: cannot infer the size of block 0; pass block_sizes")
        return [int(s) for s in sizes]

    @property
    def nblocks(self) -> int:
        return len(self.block_sizes)

    def _matmat(self, X):
        out = self.xp.empty((self.shape[0], X.shape[1]), dtype=self._out_dtype(X))
        apply_runs(self.xp, self._druns, X, out)
        return apply_runs(self.xp, self._sruns, X, out, add=True)

    def _rmatmat(self, X):
        out = self.xp.empty((self.shape[1], X.shape[1]), dtype=self._out_dtype(X))
        apply_runs(self.xp, self._druns, X, out, adjoint=True)
        return apply_runs(self.xp, self._sruns, X, out, adjoint=True, add=True)

    def inverse(self) -> BlockBidiagonalInverse:
        """Operator applying :math:`M^{-1}` (forward) and :math:`M^{-T}` (adjoint).

        Factors the non-identity diagonal blocks once (cached).
        """
        if self._inv is None:
            self._inv = BlockBidiagonalInverse(self)
        return self._inv


class BlockBidiagonalInverse(BlockOperator):
    r"""Inverse of a :class:`BlockBidiagonal` by block substitution.

    Forward (forward substitution, :math:`z = M^{-1} y`):

    .. math::
        z_0 = D_0^{-1} y_0, \qquad z_l = D_l^{-1}\,(y_l - S_{l-1} z_{l-1}),

    adjoint (back substitution, :math:`w = M^{-T} v`):

    .. math::
        w_{L-1} = D_{L-1}^{-T} v_{L-1}, \qquad w_l = D_l^{-T}\,(v_l - S_l^T w_{l+1}).

    Each step is one batched ``matmul`` over the groups (samples) and the
    right-hand sides; nothing is formed densely. Non-identity diagonal blocks
    are inverted once here (batched); a singular one raises
    :class:`~blockops.SingularBlockError` whose ``layer`` is the 1-based block
    index. (NaN or Inf blocks are refused by the constructor.)
    """

    def __init__(self, M: BlockBidiagonal):
        self.M = M
        self.xp = xp = M.xp
        name = f"{M.name}^-1"  # blocks were checked finite when M was built
        # factor once: one batched inverse for a stacked diagonal, else one per block
        if M._diag_stack is not None:
            self._dinv = list(self._invert(M.name, M._diag_stack, 0, xp))
        else:
            self._dinv = [
                None if D is None else self._invert(M.name, D[None], l, xp)[0]
                for l, D in enumerate(M._diag3)
            ]
        # per step: slices of block l-1 and l, S_{l-1}, its transpose (a view), group shape
        off = M.offsets
        self._steps = [
            (
                slice(off[j], off[j + 1]),
                slice(off[j + 1], off[j + 2]),
                S,
                xp.swapaxes(S, -1, -2),
                *S.shape,
            )
            for j, S in enumerate(M._sub3)
        ]
        super().__init__(dtype=M.dtype, shape=M.shape, name=name)

    @staticmethod
    def _invert(owner, D4, first: int, xp):
        """Inverses of ``D4`` ``(n, G, r, r)`` (diagonal blocks ``first ..``), all at once.

        A block is singular by the criterion of :mod:`blockops.singular` applied
        to its reciprocal 1-norm condition number (or, when the inverse fails,
        its smallest and largest singular values); the first such block raises
        ``SingularBlockError``.
        """
        rtol = pivot_rtol(D4.dtype)
        try:
            Dinv = xp.linalg.inv(D4)
            n1 = xp.max(xp.sum(xp.abs(D4), axis=-2), axis=-1)
            n1i = xp.max(xp.sum(xp.abs(Dinv), axis=-2), axis=-1)
            ok = xp.isfinite(n1i) & (n1 * n1i * rtol < 1)  # (n, G): rcond > 10 eps
        except np.linalg.LinAlgError:  # NumPy raises for an exactly singular matrix
            Dinv, s = None, xp.linalg.svd(D4, compute_uv=False)
            ok = s[..., -1] > rtol * s[..., 0]
        ok_blocks = xp.all(ok, axis=-1)
        if Dinv is not None and bool(xp.all(ok_blocks)):
            return Dinv
        bad = int(xp.argmin(ok_blocks.astype(xp.int8)))
        group = int(xp.argmin(ok[bad].astype(xp.int8)))
        l = first + bad
        raise SingularBlockError(
            f"{owner}: diagonal block {l + 1} (layer {l + 1}, 0-based index {l}) of shape "
            f"{tuple(D4.shape[1:])} is singular or numerically singular (group {group}); "
            "the operator is not invertible: add damping or check the block",
            layer=l + 1,
        )

    def _dsolve(self, l, T, trans: bool):
        Dinv = self._dinv[l]
        if Dinv is None:
            return T
        g, r, _ = Dinv.shape
        if trans:
            Dinv = self.xp.swapaxes(Dinv, -1, -2)
        return self.xp.matmul(Dinv, T.reshape(g, r, -1)).reshape(T.shape)

    def _matmat(self, Y):
        xp, k = self.xp, Y.shape[1]
        Z = xp.empty((self.shape[0], k), dtype=self._out_dtype(Y))
        first = slice(self.M.offsets[0], self.M.offsets[1])
        Z[first] = self._dsolve(0, Y[first], False)
        for l, (prev, cur, S, _, g, r, c) in enumerate(self._steps, start=1):
            t = Y[cur] - xp.matmul(S, Z[prev].reshape(g, c, k)).reshape(g * r, k)
            Z[cur] = t if self._dinv[l] is None else self._dsolve(l, t, False)
        return Z

    def _rmatmat(self, V):
        xp, k = self.xp, V.shape[1]
        W = xp.empty((self.shape[0], k), dtype=self._out_dtype(V))
        L = self.M.nblocks
        last = slice(self.M.offsets[L - 1], self.M.offsets[L])
        W[last] = self._dsolve(L - 1, V[last], True)
        for l in range(L - 1, 0, -1):
            prev, cur, _, ST, g, r, c = self._steps[l - 1]
            t = V[prev] - xp.matmul(ST, W[cur].reshape(g, r, k)).reshape(g * c, k)
            W[prev] = t if self._dinv[l - 1] is None else self._dsolve(l - 1, t, True)
        return W

    def inverse(self) -> BlockBidiagonal:
        """The operator :math:`M` itself."""
        return self.M
