r"""A matrix given by a few dense blocks at arbitrary positions."""

from __future__ import annotations

import numpy as np
from pylops import LinearOperator

__all__ = ["BlockSparse"]


class BlockSparse(LinearOperator):
    r"""A matrix given by a few dense blocks at arbitrary positions.

    Forward :math:`y_{r} \mathrel{+}= B\, x_{c}` and adjoint
    :math:`x_{c} \mathrel{+}= B^T y_{r}` for every stored ``(r0, c0, B)``.
    Used for the off-diagonal blocks ``S_H12`` / ``S_H21`` of the
    repartitioned ``S_H`` (eqs. 39-43), whose rows ``z_k`` meet only
    ``x_k`` and ``x_{k+1}``.
    """

    def __init__(self, entries, shape, dtype, xp, name: str = "BlockSparse"):
        self.entries = list(entries)
        self.xp = xp
        super().__init__(dtype=np.dtype(dtype), shape=tuple(shape), name=name)

    def _matmat(self, X):
        out = self.xp.zeros((self.shape[0], X.shape[1]), dtype=np.result_type(self.dtype, X.dtype))
        for r0, c0, B in self.entries:
            out[r0 : r0 + B.shape[0]] += B @ X[c0 : c0 + B.shape[1]]
        return out

    def _rmatmat(self, Y):
        out = self.xp.zeros((self.shape[1], Y.shape[1]), dtype=np.result_type(self.dtype, Y.dtype))
        for r0, c0, B in self.entries:
            out[c0 : c0 + B.shape[1]] += B.T @ Y[r0 : r0 + B.shape[0]]
        return out

    def _matvec(self, x):
        return self._matmat(x[:, None])[:, 0]

    def _rmatvec(self, y):
        return self._rmatmat(y[:, None])[:, 0]

    def todense(self, backend=None):
        out = self.xp.zeros(self.shape, dtype=self.dtype)
        for r0, c0, B in self.entries:
            out[r0 : r0 + B.shape[0], c0 : c0 + B.shape[1]] += B
        return out
