r"""Four optimisers for the demo, run from the same start on the same objective.

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
* :func:`inertia_newton`: exact Newton whose shift ``λ`` is chosen from the
  inertia of the factorisation of ``H + λI`` (raised until it is positive
  definite, as interior-point solvers do), with an Armijo line search and a
  trust-region ratio that adapts ``λ``; see its docstring.

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

__all__ = [
    "History",
    "InertiaOptions",
    "adam",
    "armijo_backtracking",
    "damped_newton",
    "gradient_descent",
    "inertia_newton",
    "positive_definite_shift",
]


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


# -- inertia-controlled Newton -------------------------------------------------------------
@dataclass(frozen=True)
class InertiaOptions:
    """The knobs of :func:`inertia_newton`, with their defaults.

    Attributes
    ----------
    damping : float
        ``λ`` at which the first step's search starts (1).
    damping_floor : float
        No step starts below it (1e-3; the demo passes ``--damping``).
    damping_cap : float
        A search that would pass it raises ``RuntimeError`` (1e12).
    grow : float
        ``γ``: the tenfold ladder of the inertia search and of the ratio test (10).
    armijo : float
        ``c`` of the sufficient-decrease test (1e-4).
    max_backtracks : int
        Halvings of ``α`` before a step is given up and ``λ`` grows (30).
    """

    damping: float = 1.0
    damping_floor: float = 1e-3
    damping_cap: float = 1e12
    grow: float = 10.0
    armijo: float = 1e-4
    max_backtracks: int = 30


def inertia_newton(
    objective: Callable,
    factor: Callable,
    x0,
    max_steps: int,
    time_budget: float | None = None,
    hvp: Callable | None = None,
    options: InertiaOptions | None = None,
) -> tuple[Any, History]:
    r"""Exact Newton whose shift ``λ`` is set by the inertia of ``H + λI``.

    At ``x`` with gradient ``g`` and Hessian ``H``, one step is:

    1. **Shift by inertia.** Factor ``H + λI`` exactly and read its inertia
       ``(n₋, n₀, n₊)``; while ``n₋ + n₀ > 0``, ``λ ← γλ`` and refactor. The
       factorisation gives the inertia for free: its pivots ``P_l`` (Schur
       complements) satisfy ``inertia(H + λI) = Σ_l inertia(P_l)`` (Haynsworth
       additivity, Sylvester's law), so ``H + λI ≻ 0`` is certified, which no
       Krylov method can do. Started below ``-μ_min(H)``, the search stops at
       ``-μ_min(H) < λ ≤ -γ μ_min(H)``, as the inertia correction of
       interior-point solvers does (Wächter & Biegler 2006).
    2. **Newton step** ``d = (H + λI)⁻¹ g``. As ``H + λI ≻ 0``, ``gᵀd > 0``
       (descent), and ``-d`` minimises ``m(s) = f + gᵀs + ½ sᵀH s`` over
       ``‖s‖ ≤ ‖d‖`` (Moré & Sorensen 1983).
    3. **Armijo backtracking:** the first ``α = 1, ½, ¼, …`` with
       ``f(x - αd) ≤ f(x) - c α gᵀd``; it exists for a descent direction, so
       the loss never rises, and a backtrack costs a loss evaluation, not a
       factorisation.
    4. **Trust-region ratio** ``ρ = (f(x) - f(x - d)) / (gᵀd - ½ dᵀH d)`` (the
       predicted reduction with one HVP when ``hvp`` is given, else
       ``½ (gᵀd + λ‖d‖²)`` from ``(H + λI) d = g``). The next search starts
       at ``λ/γ`` if ``α = 1`` and ``ρ > ¾``, at ``λ`` if ``α = 1`` and
       ``ρ ≥ ¼``, else at ``γλ`` (never below ``damping_floor``).

    Near a minimum with ``H ≻ 0`` the shift falls to the floor and the steps
    become Newton's. A step costs ``k`` factorisations (``k - 1`` rejected by
    their inertia), a solve, an HVP and ``1 +`` backtracks loss evaluations.

    ``objective(x) -> point`` (``.loss``, ``.gradient``); ``factor(point, λ)
    -> F`` with ``F.matvec`` applying ``(H + λI)⁻¹`` and ``F.inertia``
    (:func:`blockops.inverse.inverse_hessian`); ``hvp(point, v) -> H v``;
    ``options``: :class:`InertiaOptions`. Stops after ``max_steps`` steps or
    ``time_budget`` seconds. Returns the last iterate and a :class:`History`
    whose ``notes`` hold per step the accepted ``damping``, ``tried`` (``[λ,
    [n₋, n₀, n₊]]`` of every factorisation), ``factorizations``,
    ``step_size`` ``α`` and ``ratio`` ``ρ`` (``None`` after a backtrack).
    """
    _check_budget("inertia_newton", max_steps, time_budget)
    opt = options or InertiaOptions()
    if not (0 < opt.damping_floor <= opt.damping_cap and opt.grow > 1 and opt.damping > 0):
        raise ValueError(f"inertia_newton: need 0 < damping_floor <= damping_cap, grow > 1: {opt}")
    hist = History("inertia-controlled Newton", notes={k: [] for k in _INERTIA_NOTES})
    clock, x, pt = _start(hist, objective, x0, time_budget)
    lam = opt.damping
    for _ in range(max_steps):
        if clock.spent():
            break
        x, pt, lam = _inertia_step(objective, factor, hvp, x, pt, lam, opt, hist)
        _record(hist, pt, clock)
    return x, hist


_INERTIA_NOTES = ("damping", "tried", "factorizations", "step_size", "ratio")


def positive_definite_shift(factor: Callable, point, lam: float, grow: float, cap: float):
    """Raise ``λ`` by ``grow`` until the inertia of ``H + λI`` is ``(0, 0, n)``.

    Returns ``(F, λ, tried)``: the factorisation at the accepted ``λ`` and the
    ``[λ, inertia]`` of every factorisation made. ``RuntimeError`` past ``cap``.
    """
    tried = []
    while True:
        F = factor(point, lam)
        inertia = [int(v) for v in F.inertia]
        tried.append([lam, inertia])
        if inertia[0] == 0 and inertia[1] == 0:
            return F, lam, tried
        if lam * grow > cap:
            raise RuntimeError(f"H + λI is not positive definite up to λ = {lam:g}: {tried}")
        lam *= grow


def armijo_backtracking(objective, x, f0: float, d, slope: float, c: float, max_backtracks: int):
    """``(α, point)`` for the first ``α = 2⁻ᵏ`` with ``f(x - αd) ≤ f0 - c α slope``.

    ``(0, None)`` when none of ``α = 1, …, 2^-max_backtracks`` decreases enough.
    """
    alpha = 1.0
    for _ in range(max_backtracks + 1):
        trial = objective(x - alpha * d)
        loss = float(trial.loss)
        if math.isfinite(loss) and loss <= f0 - c * alpha * slope:
            return alpha, trial
        alpha *= 0.5
    return 0.0, None


def _inertia_step(objective, factor, hvp, x, pt, lam, opt: InertiaOptions, hist) -> tuple:
    """One step of :func:`inertia_newton`: the next ``(x, point, λ_start)``, noted in ``hist``."""
    lam = max(lam, opt.damping_floor)
    F, lam, tried = positive_definite_shift(factor, pt, lam, opt.grow, opt.damping_cap)
    g = pt.gradient
    d = F.matvec(g)
    gd = float(g @ d)
    dHd = float(d @ hvp(pt, d)) if hvp is not None else gd - lam * float(d @ d)
    predicted = gd - 0.5 * dHd
    f0 = float(pt.loss)
    alpha, trial = armijo_backtracking(objective, x, f0, d, gd, opt.armijo, opt.max_backtracks)
    rho = (f0 - float(trial.loss)) / predicted if alpha == 1.0 and predicted > 0 else None
    for key, v in zip(_INERTIA_NOTES, (lam, tried, len(tried), alpha, rho)):
        hist.notes[key].append(v)
    if trial is None:  # no decrease along d within round-off: stay, shift more
        return x, pt, min(lam * opt.grow, opt.damping_cap)
    if rho is not None and rho > 0.75:
        nxt = lam / opt.grow
    elif rho is not None and rho >= 0.25:
        nxt = lam
    else:
        nxt = lam * opt.grow
    return x - alpha * d, trial, min(max(nxt, opt.damping_floor), opt.damping_cap)
