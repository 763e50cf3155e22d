r"""Three optimisers for the demo, run from the same start on the same objective.

* :func:`gradient_descent`: ``x ← x - η g``.
* :func:`adam`: Kingma & Ba (2015) with bias correction.
* :func:`damped_newton`: the exact damped Newton step ``d = (H + λI)⁻¹ g``
  (Levenberg-Marquardt damping adaptation, a trust-region method in disguise):
  the step is accepted when the loss falls; after an accepted step ``λ``
  follows the ratio ``ρ = (f(x) - f(x - d)) / (m(0) - m(-d))`` of actual to
  predicted reduction (Nielsen's rule ``λ ← λ max(1/3, 1 - (2ρ - 1)³)``),
  after a rejected one it grows tenfold (Marquardt). The quadratic model's
  reduction needs no extra Hessian product: from ``(H + λI) d = g``, ``dᵀH d = gᵀd - λ‖d‖²`` and so
  ``m(0) - m(-d) = gᵀd - ½ dᵀH d = ½ (gᵀd + λ‖d‖²)``.

Every optimiser takes ``objective(x) -> point`` with ``point.loss`` (float)
and ``point.gradient`` (flat array), a step budget and an optional wall-clock
budget, and returns the final iterate and a :class:`History` (loss and elapsed
time at every iterate, the start included).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["History", "adam", "damped_newton", "gradient_descent"]


@dataclass
class History:
    """Loss and elapsed wall-clock time at each iterate (entry 0 is the start)."""

    name: str
    loss: list[float] = field(default_factory=list)
    time: list[float] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.loss) - 1

    @property
    def final_loss(self) -> float:
        return self.loss[-1]

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "steps": self.steps,
            "loss": list(self.loss),
            "time": list(self.time),
            **self.notes,
        }


class _Clock:
    """Elapsed time since construction, and whether a budget is spent."""

    def __init__(self, time_budget: float | None):
        self.t0 = time.perf_counter()
        self.budget = time_budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def spent(self) -> bool:
        return self.budget is not None and self.elapsed() >= self.budget


def _check_budget(owner: str, max_steps: int, time_budget: float | None) -> None:
    if max_steps < 0:
        raise ValueError(f"{owner}: max_steps must be >= 0, got {max_steps}")
    if time_budget is not None and not time_budget > 0:
        raise ValueError(f"{owner}: time_budget must be > 0 seconds, got {time_budget}")


def _start(hist: History, objective, x0, time_budget: float | None) -> tuple:
    """Start the clock, evaluate a copy of ``x0`` and record it as iterate 0."""
    clock = _Clock(time_budget)
    x = x0.copy()
    pt = objective(x)
    _record(hist, pt, clock)
    return clock, x, pt


def _record(hist: History, pt, clock: _Clock) -> None:
    hist.loss.append(float(pt.loss))
    hist.time.append(clock.elapsed())


def _first_order(hist: History, objective, x0, max_steps, time_budget, step) -> tuple:
    """The loop shared by the first-order methods: ``x ← step(k, x, g)``, k = 1, 2, ..."""
    clock, x, pt = _start(hist, objective, x0, time_budget)
    for k in range(1, max_steps + 1):
        if clock.spent() or not math.isfinite(hist.loss[-1]):
            break
        x = step(k, x, pt.gradient)
        pt = objective(x)
        _record(hist, pt, clock)
    return x, hist


def gradient_descent(
    objective: Callable,
    x0,
    lr: float,
    max_steps: int,
    time_budget: float | None = None,
) -> tuple[Any, History]:
    """Plain gradient descent ``x ← x - lr · g`` for ``max_steps`` steps or ``time_budget`` s."""
    _check_budget("gradient_descent", max_steps, time_budget)
    hist = History("gradient descent", notes={"lr": lr})
    return _first_order(hist, objective, x0, max_steps, time_budget, lambda k, x, g: x - lr * g)


def adam(
    objective: Callable,
    x0,
    lr: float,
    max_steps: int,
    time_budget: float | None = None,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> tuple[Any, History]:
    """Adam (bias-corrected moments) for ``max_steps`` steps or ``time_budget`` seconds."""
    _check_budget("adam", max_steps, time_budget)
    hist = History("Adam", notes={"lr": lr, "beta1": beta1, "beta2": beta2})
    moments = {"m": 0.0 * x0, "v": 0.0 * x0}

    def step(k, x, g):
        m = moments["m"] = beta1 * moments["m"] + (1.0 - beta1) * g
        v = moments["v"] = beta2 * moments["v"] + (1.0 - beta2) * (g * g)
        mhat = m / (1.0 - beta1**k)
        vhat = v / (1.0 - beta2**k)
        return x - lr * mhat / ((vhat**0.5) + eps)

    return _first_order(hist, objective, x0, max_steps, time_budget, step)


def damped_newton(
    objective: Callable,
    newton_direction: Callable,
    x0,
    damping: float,
    max_steps: int,
    time_budget: float | None = None,
    damping_bounds: tuple[float, float] = (1e-9, 1e9),
) -> tuple[Any, History]:
    """Exact damped Newton with Levenberg-Marquardt adaptation of ``λ``.

    Parameters
    ----------
    objective : callable
        ``objective(x) -> point`` with ``.loss`` and ``.gradient``.
    newton_direction : callable
        ``newton_direction(point, lam) -> d`` solving ``(H + λI) d = g`` at
        ``point`` (the exact inverse); may return ``(d, info)``. It returns
        ``None`` when it knows ``H + λI`` is not positive definite (e.g.
        from the inertia of the exact factorisation). ``λ`` is then raised
        tenfold without a loss evaluation, as in an exact trust-region
        method (Moré & Sorensen 1983), whose step needs ``H + λI ⪰ 0``; the
        same happens when the predicted reduction is not positive (negative
        curvature along ``d``).
    x0 : array
        Start.
    damping : float
        Initial ``λ > 0``.
    max_steps : int
        Number of trial steps (a rejected trial counts as a step: it costs a
        solve and a loss evaluation).
    time_budget : float, optional
        Stop when this many seconds have passed.
    damping_bounds : (float, float)
        ``λ`` is kept in this interval.

    Returns
    -------
    x : array
        Last accepted iterate.
    History
        Loss after every trial (unchanged after a rejected one); ``notes``
        holds the ``λ`` used at each trial, which trials were accepted and
        how many found ``H + λI`` indefinite.
    """
    _check_budget("damped_newton", max_steps, time_budget)
    if not damping > 0:
        raise ValueError(f"damped_newton: damping must be > 0, got {damping}")
    lam = float(damping)
    hist = History(
        "exact damped Newton (LM)", notes={"damping": [], "accepted": [], "indefinite": 0}
    )
    clock, x, pt = _start(hist, objective, x0, time_budget)
    for _ in range(max_steps):
        if clock.spent():
            break
        x, pt, lam = _newton_trial(objective, newton_direction, x, pt, lam, damping_bounds, hist)
        _record(hist, pt, clock)  # the loss is unchanged after a rejected trial
    return x, hist


def _newton_trial(objective, newton_direction, x, pt, lam, bounds, hist) -> tuple:
    """One trial step of :func:`damped_newton`: the next ``(x, point, λ)``, noted in ``hist``."""
    lo, hi = bounds
    d = newton_direction(pt, lam)
    if isinstance(d, tuple):
        d = d[0]
    hist.notes["damping"].append(lam)
    predicted = -1.0 if d is None else 0.5 * (float(pt.gradient @ d) + lam * float(d @ d))
    if not predicted > 0:  # H + λI indefinite (the model has no minimum): raise λ
        hist.notes["accepted"].append(False)
        hist.notes["indefinite"] += 1
        return x, pt, min(lam * 10.0, hi)
    trial = objective(x - d)
    actual = float(pt.loss) - float(trial.loss)
    ok = math.isfinite(float(trial.loss)) and actual > 0
    hist.notes["accepted"].append(bool(ok))
    if not ok:  # each trial costs a factorisation: raise λ fast (Marquardt's factor 10)
        return x, pt, min(lam * 10.0, hi)
    rho = actual / predicted
    return x - d, trial, min(max(lam * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3), lo), hi)
