r"""The block down-shift :math:`P` of eq. 15."""

from __future__ import annotations

import numpy as np

from .._checks import FLOAT_DTYPES
from ..backend import get_array_module, xp_for
from ._common import BlockOperator

__all__ = ["Shift"]


class Shift(BlockOperator):
    r"""Block down-shift :math:`P` (eq. 15): :math:`(z_1..z_L) \mapsto (0, z_1..z_{L-1})`.

    For block sizes ``sizes = [n_0, n_1, ..., n_L]``

    .. math::
        P \begin{bmatrix} z_1 \\ \vdots \\ z_L \end{bmatrix}
        = \begin{bmatrix} 0_{n_0} \\ z_1 \\ \vdots \\ z_{L-1} \end{bmatrix},
        \qquad
        P^T \begin{bmatrix} y_0 \\ \vdots \\ y_{L-1} \end{bmatrix}
        = \begin{bmatrix} y_1 \\ \vdots \\ y_{L-1} \\ 0_{n_L} \end{bmatrix},

    so :math:`P` has shape :math:`(\sum_{l<L} n_l) \times (\sum_{l\ge 1} n_l)`;
    it is rectangular when :math:`n_0 \ne n_L`. In eq. 24 it makes the
    :math:`z`-derivatives of layer :math:`l` meet :math:`dz_{l-1}`.

    Parameters
    ----------
    sizes : list of int
        ``[n_0, ..., n_L]`` (at least two entries; zeros allowed).
    dtype : dtype, optional
        float64 (default) or float32.
    backend : {None, "numpy", "cupy"}, optional
        ``None`` (default): follow the backend of each input vector.
    name : str, optional
        Name used in error messages (default ``"P"``).
    """

    def __init__(self, sizes, dtype=np.float64, backend: str | None = None, name: str = "P"):
        self.name = name
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 0:
            raise ValueError(f"{name}: sizes {sizes} must list n_0 .. n_L (>= 2 entries, >= 0)")
        if np.dtype(dtype) not in FLOAT_DTYPES:
            raise TypeError(f"{name}: dtype {np.dtype(dtype)}; expected float32 or float64")
        self.sizes = sizes
        self.xp = None if backend is None else xp_for(backend)
        n_in, n_out = sum(sizes[1:]), sum(sizes[:-1])
        super().__init__(dtype=np.dtype(dtype), shape=(n_out, n_in), name=name)

    def _matmat(self, X):
        xp = get_array_module(X)
        n0, nL = self.sizes[0], self.sizes[-1]
        zeros = xp.zeros((n0, X.shape[1]), dtype=self._out_dtype(X))
        return xp.concatenate([zeros, X[: X.shape[0] - nL].astype(zeros.dtype)], axis=0)

    def _rmatmat(self, X):
        xp = get_array_module(X)
        n0, nL = self.sizes[0], self.sizes[-1]
        zeros = xp.zeros((nL, X.shape[1]), dtype=self._out_dtype(X))
        return xp.concatenate([X[n0:].astype(zeros.dtype), zeros], axis=0)
