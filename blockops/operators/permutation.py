r"""Permutation operator :math:`y_i = x_{\pi(i)}`."""

from __future__ import annotations

import numpy as np
from pylops import LinearOperator

__all__ = ["Permutation"]


class Permutation(LinearOperator):
    r"""Permutation :math:`y_i = x_{\pi(i)}`; adjoint :math:`x_{\pi(i)} = y_i`.

    Used to move the ``S_H`` space between the natural order ``(z, x)`` of
    eq. 35 and the repartitioned order of eqs. 40-43 (see
    :class:`~blockops.woodbury.WoodburyRoute`).
    """

    def __init__(self, perm, dtype=np.float64, name: str = "Pi"):
        self.perm = perm
        n = int(perm.shape[0])
        super().__init__(dtype=np.dtype(dtype), shape=(n, n), name=name)

    def _matvec(self, x):
        return x[self.perm]

    def _rmatvec(self, y):
        out = y.copy()
        out[self.perm] = y
        return out

    def _matmat(self, X):
        return X[self.perm]

    def _rmatmat(self, Y):
        out = Y.copy()
        out[self.perm] = Y
        return out
