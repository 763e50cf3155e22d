"""The array-module facade: which array module, linear algebra and kernels apply.

Every other module asks this one for the array module of its data
(``xp = get_array_module(x)``) and for the matching dense and sparse linear
algebra, so the same operator code runs on the host and on a CUDA GPU.
CuPy is optional: importing blockops never imports it unless it is installed,
and nothing here fails when it is absent.
"""

from __future__ import annotations

import contextlib
import importlib
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "BACKENDS",
    "array_namespace",
    "as_backend",
    "available_backends",
    "backend_name",
    "cupy_available",
    "generic_linalg",
    "get_array_module",
    "get_linalg",
    "get_sparse_linalg",
    "host_lapack",
    "is_cupy_array",
    "same_backend",
    "to_numpy",
    "xp_for",
]

BACKENDS = ("numpy", "cupy")
_cupy: ModuleType | bool | None = False  # False: not probed yet; None: not usable


def _probe_cupy() -> ModuleType | None:
    """Import CuPy once and check that a CUDA device answers; else None."""
    global _cupy
    if _cupy is False:
        try:
            cp = importlib.import_module("cupy")
            cp.cuda.runtime.getDeviceCount()
            _cupy = cp
        except Exception:  # ImportError, CUDA driver/runtime errors: no usable GPU
            _cupy = None
    return _cupy  # type: ignore[return-value]


def cupy_available() -> bool:
    """True when CuPy imports and at least one CUDA device is present."""
    return _probe_cupy() is not None


def available_backends() -> tuple[str, ...]:
    """The backends usable on this machine, NumPy first."""
    return ("numpy", "cupy") if cupy_available() else ("numpy",)


def is_cupy_array(x: Any) -> bool:
    """True for a ``cupy.ndarray`` (without importing CuPy when it is absent)."""
    return type(x).__module__.split(".")[0] == "cupy"


def get_array_module(*arrays: Any) -> ModuleType:
    """Array module (``numpy`` or ``cupy``) of the given arrays.

    Non-array arguments (scalars, ``None``) are ignored. Mixing NumPy and CuPy
    arrays raises ``TypeError``: blockops never copies between host and
    device behind the caller's back.
    """
    kinds = {is_cupy_array(a) for a in arrays if a is not None and hasattr(a, "shape")}
    if len(kinds) > 1:
        raise TypeError(
            "blockops: mixed NumPy and CuPy arrays; move them to one backend first "
            "(blockops.backend.as_backend(x, 'numpy' | 'cupy'))"
        )
    if kinds == {True}:
        return _probe_cupy() or importlib.import_module("cupy")
    return np


array_namespace = get_array_module


def backend_name(xp: ModuleType) -> str:
    """``'numpy'`` or ``'cupy'`` for an array module (the inverse of :func:`xp_for`)."""
    return "numpy" if xp is np else "cupy"


def xp_for(backend: str) -> ModuleType:
    """Array module for a backend name (``'numpy'`` or ``'cupy'``)."""
    if backend == "numpy":
        return np
    if backend == "cupy":
        cp = _probe_cupy()
        if cp is None:
            raise RuntimeError(
                "blockops: backend 'cupy' requested but CuPy or a CUDA GPU is absent"
            )
        return cp
    raise ValueError(f"blockops: unknown backend {backend!r}; expected one of {BACKENDS}")


def same_backend(*arrays: Any) -> bool:
    """True when all arrays live on one backend."""
    try:
        get_array_module(*arrays)
    except TypeError:
        return False
    return True


def as_backend(x: Any, backend: str | ModuleType) -> Any:
    """Return ``x`` as an array of ``backend`` (a name or a module); copies only across."""
    xp = xp_for(backend) if isinstance(backend, str) else backend
    if xp is np:
        return to_numpy(x)
    return xp.asarray(x)


def to_numpy(x: Any) -> np.ndarray:
    """Host copy of ``x`` (no copy when ``x`` is already a NumPy array)."""
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)


def get_linalg(xp: ModuleType) -> ModuleType:
    """Dense linear algebra for ``xp``: ``scipy.linalg`` or ``cupyx.scipy.linalg``."""
    if xp is np:
        return importlib.import_module("scipy.linalg")
    return importlib.import_module("cupyx.scipy.linalg")


def get_sparse_linalg(xp: ModuleType) -> ModuleType:
    """Krylov solvers for ``xp``: ``scipy.sparse.linalg`` or ``cupyx.scipy.sparse.linalg``."""
    if xp is np:
        return importlib.import_module("scipy.sparse.linalg")
    return importlib.import_module("cupyx.scipy.sparse.linalg")


# -- generic (any-backend) factorisations -------------------------------------
# The exact-inverse factorisations use host LAPACK kernels (``sytrf``, ``gbtrf``,
# ``potrf`` via ``scipy.linalg.lapack``) on NumPy and backend-generic ones
# (``xp.linalg.solve`` / ``lu_factor`` / ``eigvalsh`` / block QR) elsewhere.
# ``generic_linalg()`` selects the generic kernels on NumPy too (tests, timings).
_force_generic = False


def host_lapack(xp: ModuleType) -> bool:
    """True when ``scipy.linalg.lapack`` kernels apply to arrays of ``xp``.

    False on CuPy, and on NumPy inside :func:`generic_linalg`.
    """
    return xp is np and not _force_generic


@contextlib.contextmanager
def generic_linalg(enabled: bool = True):
    """Context manager: factor with the backend-generic kernels even on NumPy."""
    global _force_generic
    old, _force_generic = _force_generic, bool(enabled)
    try:
        yield
    finally:
        _force_generic = old
