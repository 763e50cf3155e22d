"""Small helpers shared by the layers: shape checks and direction handling."""

from __future__ import annotations

import numpy as np

from .._checks import check_dtype
from ..backend import get_array_module

__all__ = ["array_module", "check_forward", "n_directions", "zeros_dx"]


def array_module(a):
    """``get_array_module(a)`` with a fast exit for NumPy arrays.

    Called once per layer and pass; at width 16 the generic probe costs as much
    as the layer's arithmetic.
    """
    return np if type(a) is np.ndarray else get_array_module(a)


def check_forward(layer, z_prev, x) -> None:
    """Cheap structural checks of a layer's ``forward`` inputs (no data pass).

    Finiteness is checked once per pipeline call, not per layer, to keep the
    per-layer overhead low; errors name ``layer.name``.
    """
    if getattr(z_prev, "ndim", None) != 2 or z_prev.shape[1] != layer.n_in:
        raise ValueError(
            f"{layer.name}: input z_prev has shape {tuple(getattr(z_prev, 'shape', ()))}; "
            f"expected (B, {layer.n_in})"
        )
    if getattr(x, "ndim", None) != 1 or x.shape[0] != layer.n_params:
        raise ValueError(
            f"{layer.name}: parameters x have shape {tuple(getattr(x, 'shape', ()))}; "
            f"expected ({layer.n_params},)"
        )
    check_dtype(layer.name, "z_prev", z_prev)
    if layer.n_params:
        check_dtype(layer.name, "x", x)


def n_directions(layer, dz_prev, dx) -> int:
    """Number ``k`` of directions in ``(dz_prev, dx)``; at least one must be given."""
    if dz_prev is not None:
        if dz_prev.ndim != 3 or dz_prev.shape[2] != layer.n_in:
            raise ValueError(
                f"{layer.name}: dz_prev has shape {tuple(dz_prev.shape)}; "
                f"expected (k, B, {layer.n_in})"
            )
        k = dz_prev.shape[0]
        if dx is not None and dx.shape[0] != k:
            raise ValueError(f"{layer.name}: dz_prev has {k} directions but dx has {dx.shape[0]}")
    if dx is not None and (dx.ndim != 2 or dx.shape[1] != layer.n_params):
        raise ValueError(
            f"{layer.name}: dx has shape {tuple(dx.shape)}; expected (k, {layer.n_params})"
        )
    if dz_prev is None and dx is None:
        raise ValueError(f"{layer.name}: give dz_prev or dx (both are None)")
    return dz_prev.shape[0] if dz_prev is not None else dx.shape[0]


def zeros_dx(xp, k: int, p: int, dtype):
    """A ``(k, p)`` zero block (parameter part of a layer without parameters)."""
    return xp.zeros((k, p), dtype=dtype)
