r"""The Woodbury identity (eq. 28) as a matrix-free operator."""

from __future__ import annotations

from .._checks import check_finite, result_dtype
from ._common import BlockOperator, as_operator, common_backend, dense_inverse_of_sum

__all__ = ["Woodbury"]


class Woodbury(BlockOperator):
    r"""Inverse of a low-rank-updated operator by the Woodbury identity (eq. 28).

    .. math::
        W = (A + U^T Q U)^{-1} = A^{-1} - A^{-1} U^T C^{-1} U A^{-1},
        \qquad C = Q^{-1} + U A^{-1} U^T ,

    applied as :math:`t = A^{-1} y`, :math:`W y = t - A^{-1} U^T C^{-1} U t`.
    The adjoint is :math:`W^T = A^{-T} - A^{-T} U^T C^{-T} U A^{-T}`.

    Parameters
    ----------
    A_inv : operator or 2-D array ``(n, n)``
        Applies :math:`A^{-1}`.
    U : operator or 2-D array ``(m, n)``
    Q_inv : operator or 2-D array ``(m, m)``
        Applies :math:`Q^{-1}`.
    S_inv : operator or 2-D array ``(m, m)``, optional
        Applies :math:`C^{-1}` (the inverse capacitance matrix; the paper's
        :math:`S_H^{-1}`, eqs. 35-36). Omitted: :math:`C` is formed densely
        from the operators (``m`` applications of :math:`A^{-1}`) and
        LU-factored - for small ``m`` only.
    name : str, optional
        Name used in error messages.
    """

    def __init__(self, A_inv, U, Q_inv, S_inv=None, name: str = "Woodbury"):
        self.name = name
        raw = {"A_inv": A_inv, "U": U, "Q_inv": Q_inv}
        ops, xps = {}, []
        for key, A in raw.items():
            ops[key], xp = as_operator(name, key, A)
            xps.append(xp)
            if not hasattr(A, "matvec"):
                check_finite(name, key, A)
        self.A_inv, self.U, self.Q_inv = ops["A_inv"], ops["U"], ops["Q_inv"]
        m, n = self.U.shape
        for key, want in (("A_inv", (n, n)), ("Q_inv", (m, m))):
            if tuple(ops[key].shape) != want:
                raise ValueError(
                    f"{name}: {key} has shape {tuple(ops[key].shape)}; expected {want} "
                    f"for U of shape {(m, n)}"
                )
        if S_inv is not None:
            S_op, xp = as_operator(name, "S_inv", S_inv, shape=(m, m))
            xps.append(xp)
            if not hasattr(S_inv, "matvec"):
                check_finite(name, "S_inv", S_inv)
        self.xp = common_backend(name, xps)
        if S_inv is None:
            terms = [self.Q_inv, self.U @ self.A_inv @ self.U.H]
            S_op = dense_inverse_of_sum(terms, name, "capacitance matrix", self.xp)
        self.S_inv = S_op
        dtype = result_dtype(*[op.dtype for op in ops.values()], S_op.dtype)
        super().__init__(dtype=dtype, shape=(n, n), name=name)

    def capacitance(self):
        r"""The capacitance :math:`C = Q^{-1} + U A^{-1} U^T` as an operator."""
        return self.Q_inv + self.U @ self.A_inv @ self.U.H

    def _matmat(self, Y):
        T = self.A_inv.matmat(Y)
        V = self.S_inv.matmat(self.U.matmat(T))
        return (T - self.A_inv.matmat(self.U.rmatmat(V))).astype(self._out_dtype(Y), copy=False)

    def _rmatmat(self, Y):
        T = self.A_inv.rmatmat(Y)
        V = self.S_inv.rmatmat(self.U.matmat(T))
        return (T - self.A_inv.rmatmat(self.U.rmatmat(V))).astype(self._out_dtype(Y), copy=False)
