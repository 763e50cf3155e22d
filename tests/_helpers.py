"""Helpers shared by the test modules (imported as ``_helpers``; ``tests/`` is on the path)."""

from __future__ import annotations

import numpy as np
import pytest
from pylops.utils import dottest

from blockops.backend import cupy_available

requires_cupy = pytest.mark.skipif(
    not cupy_available(), reason="CuPy with a CUDA GPU is not available on this machine"
)


def bname(xp) -> str:
    """Backend name of an array module."""
    return "numpy" if xp is np else "cupy"


def tol(dtype, n=None) -> float:
    """Rounding bound ``20 n eps`` for ``n``-sized products/solves, or a per-dtype default."""
    if n is not None:
        return 20 * max(n, 1) * np.finfo(dtype).eps
    return 1e-4 if np.dtype(dtype) == np.float32 else 1e-11


def dot_test(op, xp, dtype, scale) -> None:
    """``pylops.utils.dottest`` with the rounding bound as tolerance.

    ``|v.(Op u) - (Op^T v).u| <= c n eps |v| |Op| |u|``; ``scale`` is the
    Frobenius norm of the dense reference (so near-cancelling inner products
    do not fail a purely relative test in float32).
    """
    m, n = op.shape
    atol = tol(dtype, m + n) * scale * np.sqrt(m * n)
    dottest(op, rtol=tol(dtype, m + n), atol=atol, backend=bname(xp))
