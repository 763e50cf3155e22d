"""Input checks shared by every operator, layer and solver.

All validation lives here so that error messages read the same everywhere:
they name the operator (or layer), the argument, what was expected and what
came, and, for singular blocks, the layer and the usual remedy (damping).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import get_array_module, is_cupy_array
from .singular import SingularBlockError

__all__ = [
    "FLOAT_DTYPES",
    "KINDS",
    "PRECISIONS",
    "SingularBlockError",
    "check_choice",
    "check_damping",
    "check_dtype",
    "check_finite",
    "check_int",
    "check_layer_damping",
    "check_mixed_backends",
    "check_on_backend",
    "check_same_backend",
    "check_shape",
    "check_vector",
    "layer_dampings",
    "per_layer_values",
    "result_dtype",
]

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
KINDS = ("hessian", "ggn")
PRECISIONS = ("float64", "mixed", "float32")


def check_choice(owner: str, name: str, value: Any, choices: tuple) -> Any:
    """Require ``value`` to be one of ``choices`` (``kind``, ``method``, ``form``, ...)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"{owner}: {name}={value!r}; expected one of {', '.join(map(repr, choices))}"
        )
    return value


def check_damping(owner: str, damping: Any) -> float:
    """``λ`` as a float; it must be real, finite and ``>= 0``."""
    try:
        lam = float(damping)
    except (TypeError, ValueError):
        raise TypeError(f"{owner}: damping={damping!r}; expected a real number >= 0") from None
    if not np.isfinite(lam) or lam < 0:
        raise ValueError(f"{owner}: damping={lam}; expected a finite value >= 0")
    return lam


def per_layer_values(owner: str, name: str, value: Any, layers, positive: bool = False):
    """One real number, or one per layer, checked; ``(values, scalar_given)``.

    ``values`` is a float64 array with one entry per layer, 0 for
    parameter-free layers (whose entries are not checked). Finite always;
    ``> 0`` with ``positive``.
    """
    want = "a finite value > 0" if positive else "a finite value"
    used = np.array([ly.n_params > 0 for ly in layers], dtype=bool)
    if np.ndim(value) == 0:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{owner}: {name}={value!r}; expected a real number") from None
        if not np.isfinite(v) or (positive and v <= 0):
            raise ValueError(f"{owner}: {name}={v}; expected {want}")
        return np.where(used, v, 0.0), True
    try:
        values = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{owner}: {name} is not a sequence of real numbers") from None
    if values.shape != (len(layers),):
        raise ValueError(
            f"{owner}: {name} has shape {values.shape}; expected a number or one value per "
            f"layer ({len(layers)},) (parameter-free layers' entries are unused)"
        )
    for l in np.flatnonzero(used):
        v = values[l]
        if not np.isfinite(v) or (positive and v <= 0):
            raise ValueError(f"{owner}: {name}[{l}] = {v} ({layers[l].name}); expected {want}")
    return np.where(used, values, 0.0), False


def check_layer_damping(owner: str, damping: Any, layers) -> float | tuple:
    """``λ`` of the exact inverse: one real number, or one per layer; any sign.

    A negative value factors ``H − σI`` with ``σ = −λ`` (a signed shift: the
    inertia then counts the eigenvalues of ``H`` below ``σ``). A sequence holds
    one value per entry of ``layers`` (those of parameter-free layers are
    unused); all equal collapses to the float.
    """
    values, scalar = per_layer_values(owner, "damping", damping, layers)
    if scalar:
        return float(damping)
    used = values[[ly.n_params > 0 for ly in layers]]
    if used.size == 0 or np.all(used == used[0]):
        return float(used[0]) if used.size else 0.0
    return tuple(float(v) for v in values)


def layer_dampings(damping, n_layers: int) -> tuple:
    """Per-layer ``λ_l`` of a checked damping (a float or a per-layer tuple)."""
    if isinstance(damping, tuple):
        return damping
    return (float(damping),) * n_layers


def check_int(owner: str, name: str, value: Any, minimum: int) -> int:
    """``value`` as an int ``>= minimum``; floats, bools and ``None`` are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{owner}: {name}={value!r}; expected an integer >= {minimum}")
    return int(value)


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
        raise TypeError(f"{owner}: arrays live on different backends {kinds}; {_MOVE}") from None


def check_on_backend(owner: str, name: str, x: Any, xp: Any) -> None:
    """Require ``x`` to live on the array module ``xp`` (NumPy or CuPy)."""
    if is_cupy_array(x) != (xp is not np):
        raise TypeError(
            f"{owner}: {name} is a {type(x).__module__.split('.')[0]} array but {owner} holds "
            f"{xp.__name__} arrays; move it to one backend first (blockops.backend.as_backend)"
        )


_MOVE = "move them to one backend first (blockops.backend.as_backend)"


def check_mixed_backends(owner: str, mixed: bool) -> None:
    """Raise the one mixed-backend error for blocks of an operator when ``mixed``."""
    if mixed:
        raise TypeError(f"{owner}: blocks live on different backends (NumPy and CuPy); {_MOVE}")


def check_vector(owner: str, x: Any, n: int, name: str = "x") -> None:
    """Require a vector of length ``n`` or a matrix ``(n, k)`` of ``k`` columns."""
    if x.ndim not in (1, 2) or x.shape[0] != n:
        raise ValueError(f"{owner}: {name} has shape {tuple(x.shape)}; expected ({n},) or ({n}, k)")
