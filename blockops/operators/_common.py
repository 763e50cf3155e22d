"""Private helpers shared by the structured operators.

* :class:`BlockOperator` - the base class: one place that checks the backend
  and the length of every vector an operator is applied to, and routes
  ``matvec``/``rmatvec`` through the batched ``_matmat``/``_rmatmat``.
* block normalisation (``as_blocks3``) and *runs*: consecutive blocks of equal
  shape stacked into one ``(N, r, c)`` array so that a block-diagonal product
  is one batched ``matmul`` per run instead of one Python call per block.
* ``dense_inverse`` / ``dense_inverse_of_sum``: an LU-factored dense inverse
  for the small blocks (Schur complements, capacitance matrices) the caller
  did not supply.
* ``as_operator`` / ``common_backend``: arrays or operators as operators, and
  the one backend they share.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from pylops import LinearOperator
from scipy.sparse.linalg import LinearOperator as spLinearOperator

from .._checks import (
    SingularBlockError,
    check_dtype,
    check_finite,
    check_mixed_backends,
    check_on_backend,
    result_dtype,
)
from ..backend import backend_name, get_array_module, get_linalg, getrs_guard, is_cupy_array
from ..singular import singular_pivots

__all__ = [
    "ArrayOperands",
    "BlockOperator",
    "Run",
    "apply_runs",
    "as_blocks3",
    "as_operator",
    "backend_of",
    "block_size",
    "check_runs_finite",
    "common_backend",
    "dense_inverse",
    "dense_inverse_of_sum",
    "make_runs",
]


def backend_of(owner: str, arrays: list) -> Any:
    """Array module shared by ``arrays``; ``TypeError`` naming ``owner`` if mixed."""
    arrays = [a for a in arrays if a is not None and hasattr(a, "shape")]
    check_mixed_backends(owner, len({is_cupy_array(a) for a in arrays}) > 1)
    return get_array_module(*arrays)


def as_blocks3(owner: str, name: str, blocks: list, xp: Any) -> list:
    """Each block as a 3-D ``(G, r, c)`` array (a 2-D block is ``G = 1``); views, no copies."""
    out = []
    for i, b in enumerate(blocks):
        if b is None:
            out.append(None)
            continue
        if not hasattr(b, "shape") or b.ndim not in (2, 3):
            shape = getattr(b, "shape", type(b).__name__)
            raise ValueError(
                f"{owner}: {name}[{i}] has shape {shape}; expected a 2-D (r, c) block "
                "or a 3-D (G, r, c) stack meaning blockdiag over G"
            )
        check_dtype(owner, f"{name}[{i}]", b)
        out.append(b[None] if b.ndim == 2 else b)
    return out


def block_size(b3) -> tuple[int, int]:
    """(rows, cols) of the block-diagonal matrix a ``(G, r, c)`` stack stands for."""
    g, r, c = b3.shape
    return g * r, g * c


@dataclass
class Run:
    """Consecutive blocks of one shape: rows ``[r0, r0 + N r)``, cols ``[c0, c0 + N c)``.

    ``blocks`` is ``(N, r, c)``; ``None`` means an identity copy of length ``n``.
    """

    blocks: Any
    r0: int
    c0: int
    nr: int
    nc: int


def make_runs(xp: Any, blocks3: list, sizes: list[tuple[int, int]], r0: int = 0, c0: int = 0):
    """Group consecutive blocks of equal ``(r, c)`` into stacked runs.

    ``blocks3[i]`` is ``(G, r, c)`` or ``None`` (identity of size ``sizes[i]``).
    Blocks of one run are concatenated once here (one copy at construction),
    which turns the product into one batched ``matmul`` per run.
    """
    runs: list[Run] = []
    group: list = []
    pos = [r0, c0]

    def close():
        if not group:
            return
        nr = sum(s[0] for _, s in group)
        nc = sum(s[1] for _, s in group)
        first = group[0][0]
        if first is None or len(group) == 1:
            stacked = first
        else:
            stacked = xp.concatenate([b for b, _ in group], axis=0)
        runs.append(Run(stacked, pos[0], pos[1], nr, nc))
        pos[0] += nr
        pos[1] += nc
        group.clear()

    for b, s in zip(blocks3, sizes):
        key = None if b is None else b.shape[1:]
        if group:
            prev = group[-1][0]
            prev_key = None if prev is None else prev.shape[1:]
            if (prev is None) != (b is None) or prev_key != key:
                close()
        group.append((b, s))
    close()
    return runs


def check_runs_finite(owner: str, name: str, stacks: list, blocks: list) -> None:
    """Refuse NaN/Inf blocks: one scan per stacked run, not one per block.

    ``stacks`` are the arrays the operator applies (runs, ``None`` for
    identities), ``blocks`` the caller's blocks they were built from; only on
    failure are the blocks scanned one by one to name the first bad one. A
    non-finite block would otherwise surface as NaN far from its cause.
    """
    xp = backend_of(owner, [b for b in stacks if b is not None] or [np.zeros(0)])
    if all(b is None or bool(xp.all(xp.isfinite(b))) for b in stacks):
        return
    for i, b in enumerate(blocks):
        if b is not None:
            check_finite(owner, f"{name}[{i}]", b)


def apply_runs(xp: Any, runs: list, X, out, adjoint: bool = False, add: bool = False):
    """``out[rows of run] (+)= run @ X[cols of run]`` for every run; ``X`` is ``(n, k)``.

    With ``adjoint`` the roles of rows and columns swap and each block is
    transposed (real arithmetic: transpose = adjoint); with ``add`` the
    products are added to ``out`` instead of written.
    """
    k = X.shape[1]
    for run in runs:
        r0, c0, nr, nc = run.r0, run.c0, run.nr, run.nc
        if adjoint:
            r0, c0, nr, nc = c0, r0, nc, nr
        if run.blocks is None:
            y = X[c0 : c0 + nc]
        else:
            B = xp.swapaxes(run.blocks, -1, -2) if adjoint else run.blocks
            n, _, c = B.shape
            y = xp.matmul(B, X[c0 : c0 + nc].reshape(n, c, k)).reshape(nr, k)
        if add:
            out[r0 : r0 + nr] += y
        else:
            out[r0 : r0 + nr] = y
    return out


class ArrayOperands:
    """Mixin for LinearOperators: lists and tuples become arrays of the operator's backend.

    pylops reads ``x.shape`` before any check of ours, so a list used to fail
    with a bare ``AttributeError``. Anything else without a shape is refused
    with a ``TypeError`` naming the operator. Needs ``self.xp`` (``None``: NumPy).
    """

    def _operand(self, x):
        if hasattr(x, "shape") or isinstance(x, (LinearOperator, spLinearOperator)):
            return x
        if isinstance(x, (list, tuple)):
            return (self.xp or np).asarray(x)
        raise TypeError(
            f"{self.name}: expected an array (NumPy or CuPy) or a LinearOperator, "
            f"got {type(x).__name__}"
        )

    def dot(self, x):
        return super().dot(self._operand(x))

    def matvec(self, x):
        return super().matvec(self._operand(x))

    def rmatvec(self, x):
        return super().rmatvec(self._operand(x))

    def matmat(self, X):
        return super().matmat(self._operand(X))

    def rmatmat(self, X):
        return super().rmatmat(self._operand(X))


class BlockOperator(ArrayOperands, LinearOperator):
    """Base class: backend and length checks, vectors routed through ``_matmat``.

    Subclasses set ``self.xp`` (``None``: follow the input's backend) and
    implement ``_matmat(X)`` / ``_rmatmat(X)`` for ``X`` of shape ``(n, k)``.
    """

    xp: Any = np

    def _check_input(self, x, n: int, what: str):
        if not hasattr(x, "shape"):
            raise TypeError(f"{self.name}: {what} must be an array, got {type(x).__name__}")
        if self.xp is not None:
            check_on_backend(self.name, what, x, self.xp)
        if x.ndim not in (1, 2) or x.shape[0] != n:
            raise ValueError(
                f"{self.name}: {what} has shape {tuple(x.shape)}; expected ({n},) or ({n}, k) "
                f"for an operator of shape {self.shape}"
            )

    def matvec(self, x):
        self._check_input(x, self.shape[1], "x")
        return super().matvec(x)

    def rmatvec(self, x):
        self._check_input(x, self.shape[0], "x")
        return super().rmatvec(x)

    def matmat(self, X):
        self._check_input(X, self.shape[1], "X")
        return super().matmat(X)

    def rmatmat(self, X):
        self._check_input(X, self.shape[0], "X")
        return super().rmatmat(X)

    def _matvec(self, x):
        return self._matmat(x.reshape(-1, 1)).reshape(-1)

    def _rmatvec(self, x):
        return self._rmatmat(x.reshape(-1, 1)).reshape(-1)

    def _out_dtype(self, X):
        return result_dtype(self.dtype, X.dtype)


class _DenseLU(BlockOperator):
    """``A^-1`` of a small dense square matrix through one LU factorisation."""

    def __init__(self, A, owner: str, what: str, scale: float = 0.0):
        self.xp = xp = get_array_module(A)
        check_finite(owner, what, A)
        n = A.shape[0]
        self._lu_mod = get_linalg(xp)
        # pivots are judged against the scale of A and of the terms A was formed from
        scale = max(scale, float(xp.max(xp.abs(A))) if A.size else 0.0)
        try:
            with warnings.catch_warnings():  # an exact zero pivot is reported below, by name
                warnings.simplefilter("ignore", getattr(self._lu_mod, "LinAlgWarning", Warning))
                self._lu = self._lu_mod.lu_factor(A, check_finite=False)
        except (np.linalg.LinAlgError, ValueError) as err:  # pragma: no cover - LAPACK path
            raise SingularBlockError(f"{owner}: {what} ({n}x{n}) is singular: {err}") from None
        piv = xp.abs(xp.diagonal(self._lu[0]))
        if n and bool(singular_pivots(float(xp.min(piv)), scale, A.dtype)):
            raise SingularBlockError(
                f"{owner}: {what} ({n}x{n}) is singular or numerically singular "
                f"(smallest LU pivot {float(xp.min(piv)):.3g}); add damping or pass an explicit "
                "inverse operator"
            )
        super().__init__(dtype=A.dtype, shape=(n, n), name=f"{owner}.{what}^-1")

    def _matmat(self, X):
        with getrs_guard(self.xp):  # host getrs is not thread-safe (backend.kernels)
            return self._lu_mod.lu_solve(self._lu, X, trans=0, check_finite=False)

    def _rmatmat(self, X):
        with getrs_guard(self.xp):
            return self._lu_mod.lu_solve(self._lu, X, trans=1, check_finite=False)


def dense_inverse(op_or_array, owner: str, what: str, xp: Any = None) -> BlockOperator:
    """LU-factored inverse of a small operator or array (forms it densely: small sizes only).

    ``xp`` is the backend used to densify an operator (default NumPy).
    """
    return dense_inverse_of_sum([op_or_array], owner, what, xp)


def dense_inverse_of_sum(terms: list, owner: str, what: str, xp: Any = None) -> BlockOperator:
    """LU-factored inverse of ``sum(terms)`` formed densely (small sizes only).

    A pivot is declared zero relative to the largest term, so a Schur
    complement ``A22 - A21 A11^-1 A12`` that cancels to rounding noise is
    reported singular.
    """
    backend = "numpy" if xp is None else backend_name(xp)
    dense = [t.todense(backend=backend) if isinstance(t, LinearOperator) else t for t in terms]
    for t in dense:
        if t.ndim != 2 or t.shape[0] != t.shape[1]:
            raise ValueError(
                f"{owner}: {what} has shape {tuple(t.shape)}; expected a square matrix"
            )
    A = dense[0]
    for t in dense[1:]:
        A = A + t
    mod = get_array_module(A)
    scale = max(float(mod.max(mod.abs(t))) if t.size else 0.0 for t in dense)
    return _DenseLU(A, owner, what, scale=scale)


def as_operator(owner: str, name: str, A, shape: tuple | None = None) -> tuple[LinearOperator, Any]:
    """An operator for ``A`` (arrays wrapped in ``pylops.MatrixMult``) and its backend.

    The backend is ``None`` when an operator does not reveal it.
    """
    from pylops import MatrixMult

    if isinstance(A, LinearOperator):
        op, xp = A, getattr(A, "xp", None)
        if xp is None:
            arr = getattr(A, "A", None)
            xp = get_array_module(arr) if arr is not None and hasattr(arr, "shape") else None
    elif hasattr(A, "shape") and A.ndim == 2:
        check_dtype(owner, name, A)
        op, xp = MatrixMult(A, dtype=A.dtype), get_array_module(A)
    else:
        raise TypeError(
            f"{owner}: {name} must be a 2-D array or a pylops LinearOperator, "
            f"got {type(A).__name__} {getattr(A, 'shape', '')}"
        )
    if shape is not None and tuple(op.shape) != tuple(shape):
        raise ValueError(f"{owner}: {name} has shape {tuple(op.shape)}; expected {tuple(shape)}")
    return op, xp


def common_backend(owner: str, xps: list) -> Any:
    """The one backend among ``xps`` (``None`` entries ignored); ``TypeError`` if mixed."""
    known = {id(x): x for x in xps if x is not None}
    check_mixed_backends(owner, len(known) > 1)
    return next(iter(known.values()), None)
