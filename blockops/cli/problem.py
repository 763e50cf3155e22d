"""The one place where the command line calls the library, and the one place it measures.

:func:`make_problem` builds the network and the task; the thin wrappers
(:func:`hessian_operator`, :func:`exact_inverse`, :func:`krylov`) call
:mod:`blockops.hessian` and :mod:`blockops.solvers` and say clearly when a
component is missing from the installed build; :func:`measure_case` times
gradient, fused HVP, exact factor and solve, and MINRES for one network size
(used by both ``demo`` and ``bench``, and by ``benchmarks/``).
"""

from __future__ import annotations

import importlib
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import as_backend, to_numpy, xp_for
from .data import RegressionTask, damped_oscillator
from .report import MissingDependency

__all__ = [
    "Problem",
    "Unwired",
    "best_time",
    "build_network",
    "exact_inverse",
    "hessian_operator",
    "krylov",
    "make_problem",
    "measure_case",
    "orthogonal_init",
    "positive_preconditioner",
    "relative_residual",
    "warm_up_kernels",
]


def warm_up_kernels(rep=None) -> float:
    """Compile (or load from numba's cache) the compiled sweeps before anything is timed.

    The first run on a machine compiles them (about 25 s on a loaded 2-core VM;
    a fresh demo reported its factorisation at 2700 HVPs because of it); later
    runs load them in under a second. One tiny factor and solve triggers all of
    them. Returns the seconds spent and says so when it was more than one.
    """
    from ..inverse import inverse_hessian
    from ..network import Dense, MSELoss, Pipeline

    t0 = time.perf_counter()
    net = Pipeline([Dense(4, 4), Dense(4, 4), MSELoss()])
    rng = np.random.default_rng(0)
    pt = net.linearize(net.init(), rng.standard_normal((1, 4)), rng.standard_normal((1, 4)))
    Hinv = inverse_hessian(pt, damping=1e-3)
    Hinv.matvec(pt.gradient)
    spent = time.perf_counter() - t0
    if rep is not None and spent > 1.0:
        rep.print(f"compiled the exact inverse's sweeps for this machine in {spent:.0f} s (once)")
    return spent


class Unwired(MissingDependency):
    """A blockops component the command needs is not in this build."""


def _component(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Unwired(f"{what} ({module}) is not available in this build: {exc}") from exc


def _sync(xp) -> None:
    """Wait for queued device work, so that timings cover it (no-op on NumPy)."""
    cuda = getattr(xp, "cuda", None)
    if cuda is not None:
        cuda.get_current_stream().synchronize()


def best_time(
    fn: Callable[[], Any], repeat: int = 1, xp=np, budget: float = 2.0
) -> tuple[float, Any]:
    """Best wall-clock time of up to ``repeat`` calls of ``fn`` and the last result.

    Repeats stop once ``budget`` seconds have been spent (a slow call is
    timed once: its noise is small relative to its length).
    """
    best, out, spent = math.inf, None, 0.0
    for _ in range(max(1, repeat)):
        _sync(xp)
        t0 = time.perf_counter()
        out = fn()
        _sync(xp)
        t = time.perf_counter() - t0
        best, spent = min(best, t), spent + t
        if spent >= budget:
            break
    return best, out


# -- the network and the task ---------------------------------------------------------
def build_network(depth: int, width: int, n_in: int, n_out: int, activation: str = "tanh"):
    """``depth`` dense layers (``depth - 1`` of them ``activation``, the last linear) and MSE.

    ``n_in -> width -> ... -> width -> n_out``; ``depth = 1`` is a linear model.
    """
    net_mod = _component("blockops.network", "the pipeline")
    Dense, MSELoss, Pipeline = net_mod.Dense, net_mod.MSELoss, net_mod.Pipeline
    if depth < 1 or width < 1:
        raise ValueError(f"build_network: depth and width must be >= 1, got {depth}, {width}")
    sizes = [n_in] + [width] * (depth - 1) + [n_out]
    layers = [Dense(sizes[i], sizes[i + 1], activation) for i in range(depth - 1)]
    layers.append(Dense(sizes[-2], sizes[-1], None))
    return Pipeline([*layers, MSELoss()])


def orthogonal_init(net, seed: int = 0, gain: float = 1.0, dtype=np.float64) -> np.ndarray:
    """Orthogonal weights times ``gain``, zero biases (NumPy; the documented Dense layout).

    Deep tanh networks with Gaussian fan-in weights and nonzero biases map all
    samples onto one point within a hundred layers (output spread 1e-14 at
    depth 256): the loss then sits on the plateau of the mean predictor for
    every optimiser. Orthogonal weights near gain 1 with zero biases keep the
    input-output Jacobian well conditioned in depth (dynamical isometry,
    Saxe et al. 2014; Pennington et al. 2017), so the comparison means
    something. A non-square ``W`` gets orthonormal rows or columns.
    """
    rng = np.random.default_rng(seed)
    parts = []
    for ly in net.layers:
        if ly.n_params == 0:
            continue
        a, b = ly.n_out, ly.n_in
        q, r = np.linalg.qr(rng.standard_normal((max(a, b), min(a, b))))
        q = q * np.sign(np.diag(r))  # Haar-distributed
        W = q if a >= b else q.T
        parts += [gain * W.ravel(), np.zeros(a)]
    return np.concatenate(parts).astype(dtype)


@dataclass
class Problem:
    """A network, its data on a backend, and a seeded start ``x0``."""

    net: Any
    task: RegressionTask
    X: Any
    y: Any
    x0: Any
    xp: Any
    depth: int
    width: int
    batch: int

    @property
    def n_params(self) -> int:
        return int(self.net.n_params)

    def point(self, x=None):
        """``net.linearize(x, X, y)`` (``x0`` by default): loss, gradient, caches."""
        return self.net.linearize(self.x0 if x is None else x, self.X, self.y)

    def describe(self) -> str:
        return (
            f"{self.depth} dense layers, width {self.width}, tanh, MSE; batch {self.batch}; "
            f"{self.n_params:,} parameters"
        )


def make_problem(
    depth: int,
    width: int,
    batch: int,
    seed: int = 0,
    backend: str = "numpy",
    dtype=np.float64,
    init: str = "orthogonal",
) -> Problem:
    """The demo / bench problem: a tanh network on ``batch`` damped-oscillator samples.

    ``init``: ``"orthogonal"`` (:func:`orthogonal_init`, default) or
    ``"default"`` (the layers' own fan-in Gaussian ``Pipeline.init``).
    """
    task = damped_oscillator(batch, seed=seed, dtype=dtype)
    net = build_network(depth, width, task.n_in, task.n_out)
    xp = xp_for(backend)
    if init == "orthogonal":
        x0 = as_backend(orthogonal_init(net, seed=seed, dtype=dtype), backend)
    elif init == "default":
        x0 = net.init(seed=seed, dtype=dtype, backend=backend)
    else:
        raise ValueError(f"make_problem: init={init!r}; expected 'orthogonal' or 'default'")
    return Problem(
        net=net,
        task=task,
        X=as_backend(task.X, backend),
        y=as_backend(task.y, backend),
        x0=x0,
        xp=xp,
        depth=depth,
        width=width,
        batch=batch,
    )


# -- wrappers over the library ------------------------------------------------------------
def hessian_operator(point, damping: float = 0.0, kind: str = "hessian", form: str = "fused"):
    """``H + λI`` (or ``G + λI``) as a LinearOperator (:func:`blockops.hessian`)."""
    mod = _component("blockops.hessian", "the Hessian operators")
    return mod.hessian(point, damping=damping, form=form, kind=kind)


def exact_inverse(point, damping: float, **kw):
    """The exact ``(H + λI)⁻¹`` operator (:func:`blockops.inverse.inverse_hessian`).

    It runs with as many BLAS threads as the caller allows (the command line
    sets them with ``--threads``), unless ``threads=`` is given.
    """
    mod = _component("blockops.inverse", "the exact inverse Hessian")
    kw.setdefault("threads", _blas_threads())
    if "kind" in kw and "kind" not in inspect.signature(mod.inverse_hessian).parameters:
        # the operator class takes kind= ("hessian" | "ggn") where the factory does not yet
        return mod.InverseHessian(point, damping, **kw)
    return mod.inverse_hessian(point, damping=damping, **kw)


def _blas_threads() -> int:
    from threadpoolctl import threadpool_info

    counts = [i.get("num_threads") or 1 for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(1, min(counts)) if counts else 1


def krylov(method: str, A, b, tol: float, maxiter: int, **kw):
    """``blockops.solvers.<method>(A, b, rtol=tol, ...)``: a SolveResult.

    The per-iteration residual history is off (it costs one product per
    iteration and would distort the timing); callers recompute the final
    true residual with :func:`relative_residual`.
    """
    mod = _component("blockops.solvers", "the Krylov solvers")
    kw.setdefault("history", False)
    return getattr(mod, method)(A, b, rtol=tol, maxiter=maxiter, **kw)


def positive_preconditioner(point, damping: float):
    """Exact ``(G + λI)⁻¹`` of the damped Gauss-Newton matrix (positive definite for ``λ > 0``)."""
    mod = _component("blockops.solvers", "the Krylov solvers")
    return mod.positive_preconditioner(point, damping)


def relative_residual(A, x, g) -> float:
    """``‖A x - g‖ / ‖g‖`` computed here (not by the solver that produced ``x``)."""
    r = to_numpy(A.matvec(x) - g)
    return float(np.linalg.norm(r) / np.linalg.norm(to_numpy(g)))


# -- measurements (shared by demo, bench and benchmarks/) ---------------------------------------
def measure_case(
    depth: int,
    width: int,
    batch: int,
    damping: float = 1e-3,
    seed: int = 0,
    backend: str = "numpy",
    repeat: int = 1,
    minres: bool = True,
    minres_tol: float = 1e-8,
    minres_maxiter: int = 2000,
    minres_time: float | None = None,
) -> dict:
    """Time every piece once for one network size; return a flat record.

    Keys: ``depth, width, batch, n_params, damping`` and times in seconds
    ``gradient`` (forward + backward, i.e. ``linearize``), ``hvp`` (one fused
    ``H v``), ``factor`` (building the exact ``(H + λI)⁻¹``), ``solve`` (one
    ``(H + λI)⁻¹ g``), ``residual`` (``‖(H + λI) x - g‖ / ‖g‖`` computed here
    with the fused HVP), and with ``minres``: ``minres`` (time),
    ``minres_iterations``, ``minres_residual`` (true relative residual) and
    ``minres_converged``. With ``minres_time``, MINRES gets at most
    ``minres_time / hvp`` iterations (one HVP each; at least 10), recorded as
    ``minres_maxiter``. A piece that fails leaves ``None`` and its message
    under ``error``.
    """
    prob = make_problem(depth, width, batch, seed=seed, backend=backend)
    xp = prob.xp
    rec: dict[str, Any] = {
        "depth": depth,
        "width": width,
        "batch": batch,
        "damping": damping,
        "n_params": prob.n_params,
        "backend": backend,
    }
    rec["gradient"], pt = best_time(prob.point, repeat, xp)
    g = pt.gradient
    A = hessian_operator(pt, damping=damping)
    v = xp.asarray(np.random.default_rng(seed).standard_normal(prob.n_params), dtype=g.dtype)
    rec["hvp"], _ = best_time(lambda: A.matvec(v), repeat, xp)
    _measure_exact(rec, pt, A, damping, repeat, xp)
    if minres:
        if minres_time is not None:
            minres_maxiter = min(minres_maxiter, max(10, int(minres_time / rec["hvp"])))
        _measure_minres(rec, A, g, minres_tol, minres_maxiter, xp)
    return rec


def _measure_exact(rec: dict, pt, A, damping: float, repeat: int, xp) -> None:
    """Factor, solve and residual into ``rec``; a failure is recorded, not raised."""
    g = pt.gradient
    try:
        rec["factor"], Hinv = best_time(lambda: exact_inverse(pt, damping), repeat, xp)
        rec["solve"], x = best_time(lambda: Hinv.matvec(g), repeat, xp)
        rec["residual"] = relative_residual(A, x, g)
    except Unwired:
        raise
    except Exception as exc:  # e.g. a singular block: record it, keep benchmarking
        rec.update(factor=None, solve=None, residual=None, error=f"{type(exc).__name__}: {exc}")


def _measure_minres(rec: dict, A, g, tol: float, maxiter: int, xp) -> None:
    rec["minres_maxiter"] = maxiter
    t0 = time.perf_counter()
    res = krylov("minres", A, g, tol=tol, maxiter=maxiter)
    _sync(xp)
    rec["minres"] = time.perf_counter() - t0
    rec["minres_iterations"] = int(res.iterations)
    rec["minres_residual"] = relative_residual(A, res.x, g)
    rec["minres_converged"] = bool(rec["minres_residual"] <= 10 * tol)
