r"""The ``Factorization`` interface and the fallback plan of the exact inverse.

A factorisation of ``H + λI`` is computed once and then answers
``solve(G)`` for ``(n, k)`` right-hand sides, ``logdet`` (``log|det|``) and
``inertia`` (``(n_neg, n_zero, n_pos)``). Two implement it:

``"riccati"`` (:class:`~blockops.inverse.stagewise.StagewiseFactor`)
    The stagewise sweep: fast, linear in depth, pivots inside each stage.
``"kkt"`` (:class:`~blockops.inverse.banded_kkt.BandedKKT`)
    Pivoted LU of the banded lifted KKT system: robust for singular stage
    pivots and ``λ = 0``; slower and more memory. Its inertia comes from a
    sweep with explicit (pivoted) stages.

:func:`plan` writes the fallback order of each ``method`` as data: an
ordered list of ``(factorisation, dtype)`` steps, tried until one succeeds.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from .banded_kkt import BandedKKT
from .stagewise import StagewiseFactor, stages_from_point

__all__ = ["FACTORIZATIONS", "METHODS", "Factorization", "banded_bytes", "plan"]

METHODS = ("auto", "kkt", "banded", "riccati", "woodbury")


class Factorization(Protocol):
    """Factor once; solve many right-hand sides; ``logdet``; ``inertia``."""

    def solve(self, G): ...

    @property
    def logdet(self) -> float: ...


def _stagewise(point, damping):
    return StagewiseFactor(stages_from_point(point, damping))


FACTORIZATIONS = {"riccati": _stagewise, "kkt": BandedKKT}


def plan(method: str, work_dtype, point_dtype) -> list[tuple[str, np.dtype]]:
    """Ordered ``(factorisation, dtype)`` steps for ``method``.

    ``"auto"`` tries the stagewise sweep, then (when it was asked in a lower
    precision) the sweep in the point's precision, then the banded KKT LU.
    ``"riccati"`` stops after the sweeps; ``"kkt"`` / ``"banded"`` is the
    banded LU alone.
    """
    work, full = np.dtype(work_dtype), np.dtype(point_dtype)
    sweeps = [("riccati", work)] + ([("riccati", full)] if work != full else [])
    return {
        "auto": [*sweeps, ("kkt", full)],
        "riccati": sweeps,
        "kkt": [("kkt", work)],
        "banded": [("kkt", work)],
    }[method]


def banded_bytes(point, dtype) -> int:
    """Memory of the banded KKT factor: ``(2 k_l + k_u + 1) N`` numbers.

    ``N = Σ_l p_l + 2 B n_l`` and the band is about the widest layer's
    ``p_l + B (n_{l-1} + n_l)`` (an upper estimate).
    """
    B, layers = point.batch_size, point.layers
    N = sum(ly.n_params + 2 * B * ly.n_out for ly in layers)
    band = max(ly.n_params + B * (ly.n_in + ly.n_out) for ly in layers)
    return 4 * band * N * np.dtype(dtype).itemsize


def available_bytes() -> int | None:
    """Physical memory of this machine (``None`` where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None
