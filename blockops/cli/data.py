r"""The demo's regression task: a damped oscillator, generated (no downloads).

A unit mass on a spring with damping ratio ``ζ`` and natural frequency
``ω₀``, released at rest from ``u(0) = 1``, moves as

.. math::

    u(t; ζ) = e^{-ζ ω₀ t} \left(\cos ω_d t + \frac{ζ ω₀}{ω_d} \sin ω_d t\right),
    \qquad ω_d = ω₀ \sqrt{1 - ζ^2} .

The network learns ``(t, ζ) ↦ u(t; ζ)`` (both inputs scaled to ``[-1, 1]``)
from a few trajectories: a smooth, oscillating two-input target that a deep,
narrow network fits only with some effort, so the optimisers' curves differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RegressionTask", "damped_oscillator"]

T_MAX = 4.0 * np.pi  # two to three periods of the fastest trajectory
OMEGA0 = 1.5
ZETA_RANGE = (0.05, 0.5)


@dataclass(frozen=True)
class RegressionTask:
    """Inputs ``X`` of shape ``(B, n_in)`` and targets ``y`` of shape ``(B, n_out)``."""

    name: str
    description: str
    X: np.ndarray
    y: np.ndarray

    @property
    def n_in(self) -> int:
        return self.X.shape[1]

    @property
    def n_out(self) -> int:
        return self.y.shape[1]


def oscillator(t: np.ndarray, zeta: np.ndarray, omega0: float = OMEGA0) -> np.ndarray:
    """Displacement ``u(t; ζ)`` of the under-damped oscillator released at rest from 1."""
    wd = omega0 * np.sqrt(1.0 - zeta**2)
    decay = np.exp(-zeta * omega0 * t)
    return decay * (np.cos(wd * t) + (zeta * omega0 / wd) * np.sin(wd * t))


def damped_oscillator(
    n_samples: int, seed: int = 0, noise: float = 0.0, dtype=np.float64
) -> RegressionTask:
    """``n_samples`` points ``((t, ζ), u(t; ζ))`` drawn at random (seeded).

    Parameters
    ----------
    n_samples : int
        Batch size ``B`` (at least 1).
    seed : int
        Seed of the generator that draws ``t`` and ``ζ`` (and the noise).
    noise : float
        Standard deviation of Gaussian noise added to the targets.
    dtype : numpy dtype
        float64 or float32.

    Returns
    -------
    RegressionTask
        ``X`` of shape ``(n_samples, 2)`` with ``t`` and ``ζ`` scaled to
        ``[-1, 1]``; ``y`` of shape ``(n_samples, 1)``.
    """
    if int(n_samples) < 1:
        raise ValueError(f"damped_oscillator: n_samples must be >= 1, got {n_samples}")
    rng = np.random.default_rng(seed)
    t = rng.uniform(0.0, T_MAX, n_samples)
    zeta = rng.uniform(*ZETA_RANGE, n_samples)
    u = oscillator(t, zeta) + noise * rng.standard_normal(n_samples)
    lo, hi = ZETA_RANGE
    X = np.stack([2.0 * t / T_MAX - 1.0, 2.0 * (zeta - lo) / (hi - lo) - 1.0], axis=1)
    return RegressionTask(
        name="damped oscillator",
        description=(
            f"u(t; ζ) of a damped spring (ω₀ = {OMEGA0}, ζ ∈ [{lo}, {hi}], t ∈ [0, 4π]), "
            f"{n_samples} samples, seed {seed}"
        ),
        X=X.astype(dtype),
        y=u[:, None].astype(dtype),
    )
