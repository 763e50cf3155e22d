"""What counts as a singular pivot, and the error raised for one.

One criterion serves every factorisation in blockops (stage pivots of the
stagewise sweep, block rows of the banded and block-QR factorisations, the
blocks of the paper's route): a block is **numerically singular** when its
smallest pivot magnitude is at most ``PIVOT_RTOL_FACTOR * eps`` times the
largest scale *of the same block*,

.. math:: \\min_i |u_i| \\le 10\\, \\varepsilon \\max_i s_i ,

where the ``u_i`` are the block's pivots (``|diag U|`` of an LU, squared
``diag L`` of a Cholesky factor, or eigenvalue magnitudes) and the ``s_i``
the same pivots or the row scales of the block before factoring. It is
relative to the block, not to the whole matrix, so scaling one layer's
curvature (large targets, a large learning signal) does not make another
layer look singular. Above this threshold one step of iterative refinement
still contracts; NaN pivots count as singular.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "PIVOT_RTOL_FACTOR",
    "SingularBlockError",
    "damping_hint",
    "pivot_rtol",
    "singular_pivots",
    "upper_first",
]

PIVOT_RTOL_FACTOR = 10.0


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

    def __reduce__(self):
        return type(self), (self.args[0] if self.args else "", self.layer)


def pivot_rtol(dtype) -> float:
    """``10 eps`` of ``dtype``: the relative pivot size below which a block is singular."""
    return PIVOT_RTOL_FACTOR * float(np.finfo(dtype).eps)


def singular_pivots(small, big, dtype):
    """Boolean (array): ``small <= 10 eps * big``, or either is NaN.

    ``small`` and ``big`` are per-block smallest pivot magnitude and largest
    scale (arrays of the same shape, any backend, or floats).
    """
    return np.logical_not(small > pivot_rtol(dtype) * big)  # NaN compares False: singular


def damping_hint(damping: float, dtype) -> str:
    """The remedy for a singular ``H + λI``, relative to the damping already given.

    The useful damping grows with the working precision's ``eps``: about
    ``1e-6 ||H||`` keeps float64 pivots well clear of the criterion, about
    ``1e-3 ||H||`` float32 ones.
    """
    if isinstance(damping, tuple):  # per-layer: the smallest one is the suspect
        damping = min(damping)
    if damping < 0:
        return (
            f"the shift sigma = {-damping:.6g} (damping {damping:.1e}) is at or very near an "
            "eigenvalue of H: move it slightly"
        )
    scale = "1e-3" if np.dtype(dtype) == np.float32 else "1e-6"
    now = f"above the current {damping:.1e}" if damping > 0 else "(now 0)"
    return f"increase damping {now}, e.g. to {scale} * ||H|| in {np.dtype(dtype).name}"


def upper_first(text: str) -> str:
    """``text`` with its first letter upper case (``str.capitalize`` lowers the rest)."""
    return text[:1].upper() + text[1:]
