"""The backend layer: the array-module facade and the kernels chosen per backend.

Every other module asks this one for the array module of its data
(``xp = get_array_module(x)``), the matching dense and sparse linear algebra,
and the small factorisations the exact inverse runs (symmetric indefinite
with inertia, Cholesky-or-LU, banded LU or block QR), so the same code runs
on the host and on a CUDA GPU and nothing else branches on the backend.
CuPy is optional: importing blockops never imports it unless it is
installed, and nothing here fails when it is absent.
"""

from .arrays import (
    BACKENDS,
    array_namespace,
    as_backend,
    available_backends,
    backend_name,
    cupy_available,
    generic_linalg,
    get_array_module,
    get_linalg,
    get_sparse_linalg,
    host_lapack,
    is_cupy_array,
    same_backend,
    to_numpy,
    xp_for,
)
from .banded import BandedLU, BlockQR, factor_banded, factor_symmetric_banded
from .kernels import (
    count_negative,
    factor_symmetric,
    getrs_guard,
    pivot_factorizer,
    pivot_magnitudes,
    pivot_solver,
)
from .threads import blas_threads

__all__ = [
    "BACKENDS",
    "BandedLU",
    "BlockQR",
    "array_namespace",
    "as_backend",
    "available_backends",
    "backend_name",
    "blas_threads",
    "count_negative",
    "cupy_available",
    "factor_banded",
    "factor_symmetric",
    "factor_symmetric_banded",
    "generic_linalg",
    "get_array_module",
    "get_linalg",
    "get_sparse_linalg",
    "getrs_guard",
    "host_lapack",
    "is_cupy_array",
    "pivot_factorizer",
    "pivot_magnitudes",
    "pivot_solver",
    "same_backend",
    "to_numpy",
    "xp_for",
]
