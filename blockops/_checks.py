"""Input checks shared by every operator, layer and solver.

All validation lives here so that error messages read the same everywhere:
they name the operator (or layer), the argument, what was expected and what
came, and, for singular blocks, the layer and the usual remedy (damping).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import get_array_module

__all__ = [
    "FLOAT_DTYPES",
    "SingularBlockError",
    "check_dtype",
    "check_finite",
    "check_same_backend",
    "check_shape",
    "check_vector",
    "result_dtype",
]

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class SingularBlockError(np.linalg.LinAlgError, ValueError):
    """A block that must be inverted is singular (or numerically so).

    Attributes
    ----------
    layer : int or None
        Index of the layer (or block) where the breakdown happened.
    """

    def __init__(self, message: str, layer: int | None = None):
        super().__init__(message)
        self.layer = layer


def check_dtype(owner: str, name: str, x: Any) -> np.dtype:
    """Require a float32 or float64 array; return its dtype."""
    dt = np.dtype(x.dtype)
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{owner}: {name} has dtype {dt}; expected float32 or float64")
    return dt


def result_dtype(*dtypes: Any) -> np.dtype:
    """Common float dtype (float32 only when every input is float32)."""
    dt = np.result_type(*[np.dtype(d) for d in dtypes if d is not None], np.float32)
    return np.dtype(np.float64) if dt not in FLOAT_DTYPES else dt


def check_shape(owner: str, name: str, x: Any, expected: tuple) -> None:
    """Require ``x.shape == expected`` (``None`` entries match any length)."""
    shape = tuple(x.shape)
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{owner}: {name} has shape {shape}; expected {want}")


def check_finite(owner: str, name: str, x: Any) -> None:
    """Require every entry of ``x`` to be finite (no NaN or Inf)."""
    xp = get_array_module(x)
    if not bool(xp.all(xp.isfinite(x))):
        bad = int(x.size - xp.count_nonzero(xp.isfinite(x)))
        raise ValueError(f"{owner}: {name} contains {bad} NaN or Inf entries")


def check_same_backend(owner: str, **arrays: Any) -> Any:
    """Require all arrays on one backend; return its array module."""
    try:
        return get_array_module(*arrays.values())
    except TypeError:
        kinds = {k: type(v).__module__.split(".")[0] for k, v in arrays.items() if v is not None}
        raise TypeError(
            f"{owner}: arrays live on different backends {kinds}; "
            "move them to one backend first (blockops.backend.as_backend)"
        ) from None


def check_vector(owner: str, x: Any, n: int, name: str = "x") -> None:
    """Require a vector of length ``n`` or a matrix ``(n, k)`` of ``k`` columns."""
    if x.ndim not in (1, 2) or x.shape[0] != n:
        raise ValueError(f"{owner}: {name} has shape {tuple(x.shape)}; expected ({n},) or ({n}, k)")
