r"""A 2x2 partitioned operator and its Schur-complement inverse (eqs. 29, 40-43)."""

from __future__ import annotations

from .._checks import check_finite, result_dtype
from ..backend import get_array_module
from ._common import (
    BlockOperator,
    as_operator,
    common_backend,
    dense_inverse,
    dense_inverse_of_sum,
)

__all__ = ["Partitioned2x2", "Partitioned2x2Inverse"]


class Partitioned2x2(BlockOperator):
    r"""The 2x2 partitioned operator :math:`A = [A_{11}, A_{12}; A_{21}, A_{22}]`.

    Forward and adjoint:

    .. math::
        A \begin{bmatrix} x_1 \\ x_2 \end{bmatrix} =
        \begin{bmatrix} A_{11} x_1 + A_{12} x_2 \\ A_{21} x_1 + A_{22} x_2 \end{bmatrix},
        \qquad
        A^T \begin{bmatrix} y_1 \\ y_2 \end{bmatrix} =
        \begin{bmatrix} A_{11}^T y_1 + A_{21}^T y_2 \\ A_{12}^T y_1 + A_{22}^T y_2 \end{bmatrix}.

    :meth:`inverse` applies :math:`A^{-1}` matrix-free through a Schur
    complement (eq. 29 with pivot ``"22"``, eqs. 40-43 with pivot ``"11"``).

    Parameters
    ----------
    A11, A12, A21, A22 : 2-D arrays or pylops LinearOperators
        The blocks (arrays are wrapped in :class:`pylops.MatrixMult`); shapes
        ``(n1, m1)``, ``(n1, m2)``, ``(n2, m1)``, ``(n2, m2)``.
    name : str, optional
        Name used in error messages.
    """

    def __init__(self, A11, A12, A21, A22, name: str = "Partitioned2x2"):
        self.name = name
        raw = {"A11": A11, "A12": A12, "A21": A21, "A22": A22}
        ops, xps = {}, []
        for key, A in raw.items():
            ops[key], xp = as_operator(name, key, A)
            xps.append(xp)
        self.xp = common_backend(name, xps)
        self._arrays = {k: A for k, A in raw.items() if not hasattr(A, "matvec")}
        s = {k: tuple(op.shape) for k, op in ops.items()}
        checks = [
            ("A12", 0, "A11", 0, "rows"),
            ("A22", 0, "A21", 0, "rows"),
            ("A21", 1, "A11", 1, "columns"),
            ("A22", 1, "A12", 1, "columns"),
        ]
        for a, i, b, j, what in checks:
            if s[a][i] != s[b][j]:
                raise ValueError(
                    f"{name}: {a} has shape {s[a]} but {b} has shape {s[b]}; their {what} "
                    "must match"
                )
        self.A11, self.A12, self.A21, self.A22 = ops["A11"], ops["A12"], ops["A21"], ops["A22"]
        self.n1, self.m1 = s["A11"]
        self.n2, self.m2 = s["A22"]
        dtype = result_dtype(*[op.dtype for op in ops.values()])
        super().__init__(dtype=dtype, shape=(self.n1 + self.n2, self.m1 + self.m2), name=name)

    def _matmat(self, X):
        X1, X2 = X[: self.m1], X[self.m1 :]
        Y1 = self.A11.matmat(X1) + self.A12.matmat(X2)
        Y2 = self.A21.matmat(X1) + self.A22.matmat(X2)
        return _stack(Y1, Y2, self._out_dtype(X))

    def _rmatmat(self, Y):
        Y1, Y2 = Y[: self.n1], Y[self.n1 :]
        X1 = self.A11.rmatmat(Y1) + self.A21.rmatmat(Y2)
        X2 = self.A12.rmatmat(Y1) + self.A22.rmatmat(Y2)
        return _stack(X1, X2, self._out_dtype(Y))

    def _pivot_inverse(self, which: str, given):
        """The inverse of A11 or A22: the caller's operator, or a dense LU (small sizes)."""
        if given is not None:
            op, xp = as_operator(self.name, f"{which}_inv", given)
            common_backend(self.name, [self.xp, xp])
            n = getattr(self, "n1" if which == "A11" else "n2")
            if tuple(op.shape) != (n, n):
                raise ValueError(
                    f"{self.name}: {which}_inv has shape {tuple(op.shape)}; expected {(n, n)}"
                )
            if not hasattr(given, "matvec"):
                check_finite(self.name, f"{which}_inv", given)
            return op
        block = self._arrays.get(which, getattr(self, which))
        return dense_inverse(block, self.name, which, self.xp)

    def schur_complement(self, pivot: str = "11", A11_inv=None, A22_inv=None):
        r"""The Schur complement as an operator.

        Pivot ``"11"``: :math:`S = A_{22} - A_{21} A_{11}^{-1} A_{12}` (eq. 40);
        pivot ``"22"``: :math:`S = A_{11} - A_{12} A_{22}^{-1} A_{21}` (eq. 29).
        """
        self._check_square(pivot)
        if pivot == "11":
            inv = self._pivot_inverse("A11", A11_inv)
            return self.A22 - self.A21 @ inv @ self.A12
        inv = self._pivot_inverse("A22", A22_inv)
        return self.A11 - self.A12 @ inv @ self.A21

    def _check_square(self, pivot):
        if pivot not in ("11", "22"):
            raise ValueError(f"{self.name}: pivot must be '11' or '22', got {pivot!r}")
        if self.n1 != self.m1 or self.n2 != self.m2:
            raise ValueError(
                f"{self.name}: the inverse needs square diagonal blocks; A11 is "
                f"{(self.n1, self.m1)} and A22 is {(self.n2, self.m2)}"
            )

    def inverse(self, A11_inv=None, A22_inv=None, S_inv=None, pivot: str = "11"):
        r"""Operator applying :math:`A^{-1}` through a Schur complement.

        Parameters
        ----------
        A11_inv, A22_inv : operator or array, optional
            Inverse of the pivot block (``A11`` for pivot ``"11"``, ``A22`` for
            ``"22"``). Omitted: the block is formed densely and LU-factored
            (small sizes only).
        S_inv : operator or array, optional
            Inverse of the Schur complement. Omitted: :math:`S` is formed
            densely from the operators and LU-factored (small sizes only).
        pivot : {"11", "22"}
            Which diagonal block is eliminated first.
        """
        self._check_square(pivot)
        for key, A in self._arrays.items():
            check_finite(self.name, key, A)
        which = "A11" if pivot == "11" else "A22"
        piv_inv = self._pivot_inverse(which, A11_inv if pivot == "11" else A22_inv)
        if pivot == "11":
            base, update = self.A22, self.A21 @ piv_inv @ self.A12
        else:
            base, update = self.A11, self.A12 @ piv_inv @ self.A21
        S = base - update
        if S_inv is None:
            what = f"Schur complement (pivot {pivot})"
            S_inv = dense_inverse_of_sum([base, -1.0 * update], self.name, what, self.xp)
        else:
            n = self.n2 if pivot == "11" else self.n1
            S_inv, xp = as_operator(self.name, "S_inv", S_inv, shape=(n, n))
            common_backend(self.name, [self.xp, xp])
        return Partitioned2x2Inverse(self, piv_inv, S_inv, S, pivot)


def _stack(Y1, Y2, dtype):
    xp = get_array_module(Y1, Y2)
    return xp.concatenate([Y1.astype(dtype, copy=False), Y2.astype(dtype, copy=False)], axis=0)


class Partitioned2x2Inverse(BlockOperator):
    r"""Inverse of a :class:`Partitioned2x2` through a Schur complement.

    Pivot ``"11"`` (eqs. 40-43), :math:`S = A_{22} - A_{21} A_{11}^{-1} A_{12}`:

    .. math::
        t = A_{11}^{-1} y_1,\quad u = S^{-1}(y_2 - A_{21} t),\quad
        x_2 = u,\quad x_1 = t - A_{11}^{-1} A_{12} u .

    Pivot ``"22"`` (eq. 29), :math:`S = A_{11} - A_{12} A_{22}^{-1} A_{21}`:

    .. math::
        x_1 = S^{-1}(y_1 - A_{12} A_{22}^{-1} y_2),\quad
        x_2 = A_{22}^{-1}(y_2 - A_{21} x_1).

    The adjoint applies the same formulas to :math:`A^T` (blocks transposed,
    :math:`A_{12} \leftrightarrow A_{21}`, inverses by their adjoints).
    """

    def __init__(self, A: Partitioned2x2, piv_inv, S_inv, S, pivot: str):
        self.A, self.piv_inv, self.S_inv, self.S, self.pivot = A, piv_inv, S_inv, S, pivot
        self.xp = A.xp
        dtype = result_dtype(A.dtype, piv_inv.dtype, S_inv.dtype)
        super().__init__(dtype=dtype, shape=A.shape, name=f"{A.name}^-1")

    def _solve(self, Y, trans: bool):
        A, n1 = self.A, self.A.n1
        Y1, Y2 = Y[:n1], Y[n1:]
        inv = self.piv_inv.rmatmat if trans else self.piv_inv.matmat
        S_inv = self.S_inv.rmatmat if trans else self.S_inv.matmat
        A12 = A.A21.rmatmat if trans else A.A12.matmat  # (A^T)_12 = A21^T
        A21 = A.A12.rmatmat if trans else A.A21.matmat  # (A^T)_21 = A12^T
        if self.pivot == "11":
            T = inv(Y1)
            U = S_inv(Y2 - A21(T))
            return _stack(T - inv(A12(U)), U, self._out_dtype(Y))
        X1 = S_inv(Y1 - A12(inv(Y2)))
        return _stack(X1, inv(Y2 - A21(X1)), self._out_dtype(Y))

    def _matmat(self, Y):
        return self._solve(Y, trans=False)

    def _rmatmat(self, Y):
        return self._solve(Y, trans=True)

    def schur_complement(self):
        """The Schur complement :math:`S` used by this inverse (an operator)."""
        return self.S
