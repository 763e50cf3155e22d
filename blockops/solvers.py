r"""Krylov solvers (CG, MINRES, GMRES) for blockops operators, with a record.

Thin wrappers over ``scipy.sparse.linalg`` (NumPy arrays) or
``cupyx.scipy.sparse.linalg`` (CuPy arrays), chosen by the backend of the
right-hand side (:func:`blockops.backend.get_sparse_linalg`). They accept
pylops / blockops ``LinearOperator`` objects or arrays, count iterations
(GMRES: inner iterations), record a relative residual per iteration (CG and
MINRES: the true ``‖b − A x_k‖ / ‖b‖``, one extra product per iteration;
GMRES: the solver's own estimate, free; ``history=False`` skips the record)
and return a :class:`SolveResult`.

``converged`` is not the solver's flag: after every solve the true relative
residual ``‖b − A x‖ / ‖b‖`` of the returned ``x`` is computed once (one extra
product) and ``converged`` is ``residual <= rtol``. The solver's own verdict
stays in ``info`` / ``solver_converged``; the two differ when the solver's
recursively updated residual drifts from the true one (MINRES on indefinite,
ill-conditioned ``A`` reports success far above ``rtol``).

Host-device traffic: on CuPy the operator products, the preconditioner and
the residual record stay on the device; the record is copied to the host once,
after the solve (``residuals``); ``‖b‖`` before the solve and the final true
residual after it are the other scalar reads.
The convergence test inside ``cupyx.scipy.sparse.linalg`` itself reads one
scalar per iteration (the library's own loop; not avoidable from here). The
tolerance keyword is passed as ``rtol`` or, to the CuPy solvers that still
call it so (``minres``; ``cg`` before CuPy 14), ``tol``.

Which preconditioner fits which solver (``M`` approximates ``A⁻¹``):

* **CG** needs ``A`` and ``M`` symmetric positive definite: use it for
  ``H + λI`` only when that is PD (convex region, or large ``λ``), with ``M`` =
  :func:`~blockops.inverse.inverse_hessian` of the same (or a nearby)
  point, or :func:`positive_preconditioner`.
* **MINRES** takes a symmetric indefinite ``A`` but needs a symmetric
  **positive definite** ``M``: the exact inverse of an indefinite ``H`` is not
  allowed. Use :func:`positive_preconditioner`, the exact inverse of the damped
  generalized Gauss-Newton matrix ``G + λI`` (PSD for convex losses, so PD for
  ``λ > 0``; ``|H|`` would be the ideal choice but is not available in
  factored form).
* **GMRES** takes any nonsingular ``A`` and any ``M``: the exact inverse
  ``(H + λI)⁻¹`` of an indefinite ``H`` makes it converge in one or two
  iterations (a second point's inverse is a strong preconditioner in a
  Newton loop).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._checks import check_finite
from .backend import get_array_module, get_sparse_linalg

__all__ = ["SolveResult", "cg", "gmres", "minres", "positive_preconditioner"]


@dataclass
class SolveResult:
    """What a Krylov solve returned and how it got there.

    ``converged`` is decided here, not by the solver: after the solve the
    wrapper computes the true relative residual ``‖b − A x‖ / ‖b‖`` of the
    returned ``x`` once (one extra operator product) and sets
    ``converged = residual <= rtol``. The solvers' own tests use other
    quantities — CG its recursively updated residual, MINRES a recursively
    updated estimate scaled by ``‖A‖‖x‖ + ‖b‖`` (which drifts from, and is
    weaker than, the true residual on indefinite or ill-conditioned ``A``),
    GMRES the left-preconditioned residual — so the solver may report success
    (``info == 0``, ``solver_converged``) at a true residual above ``rtol``;
    then ``converged`` is False.

    Attributes
    ----------
    x : array
        The solution.
    info : int
        The solver's own flag: 0 converged (by its own test), > 0 iteration
        limit reached, < 0 breakdown.
    iterations : int
        Number of iterations: CG / MINRES iterations, GMRES *inner* (Arnoldi)
        iterations summed over the restart cycles.
    residuals : list of float
        Per-iteration record (empty with ``history=False``). CG, MINRES: the
        true relative residual ``‖b − A x_k‖ / ‖b‖`` after each iteration (one
        extra product per iteration). GMRES: the solver's own relative residual
        estimate, free — SciPy: one per inner iteration, the
        (left-)preconditioned residual norm over ``‖b‖`` (the true relative
        residual, up to rounding, only when ``M`` is None); CuPy: one per
        restart cycle, the true relative residual after that cycle.
    time : float
        Wall-clock seconds (the final residual check included).
    residual : float
        True relative residual ``‖b − A x‖ / ‖b‖`` of the returned ``x``
        (``‖b − A x‖`` when ``b = 0``), computed once after the solve.
    converged : bool
        ``residual <= rtol``: the true residual met the requested tolerance.
    rtol : float
        The requested relative tolerance.
    solver_residual : float or None
        The solver's own final residual estimate where it reports one (GMRES:
        the last entry of its callback, as in ``residuals``); None for CG and
        MINRES, whose SciPy / CuPy interfaces do not return it.
    """

    x: Any
    info: int
    iterations: int
    residuals: list = field(default_factory=list)
    time: float = 0.0
    residual: float = float("nan")
    converged: bool = False
    rtol: float = float("nan")
    solver_residual: float | None = None

    @property
    def solver_converged(self) -> bool:
        """The solver's own verdict (``info == 0``); see ``converged``."""
        return self.info == 0


def _as_operator(sla, A, n, dtype):
    """A SciPy / CuPy LinearOperator view of an operator or array."""
    if A is None:
        return None
    if hasattr(A, "shape") and not hasattr(A, "matvec"):
        return sla.aslinearoperator(A)
    mv = A.matvec
    rmv = getattr(A, "rmatvec", mv)
    return sla.LinearOperator((n, n), matvec=mv, rmatvec=rmv, dtype=dtype)


def _run(name, A, b, x0, M, rtol, maxiter, history, **kw):
    xp = get_array_module(b)
    sla = get_sparse_linalg(xp)
    b = xp.asarray(b)
    if b.ndim != 1:
        raise ValueError(f"blockops.solvers.{name}: b has shape {tuple(b.shape)}; expected (n,)")
    n = b.shape[0]
    if tuple(A.shape) != (n, n):
        raise ValueError(f"blockops.solvers.{name}: A has shape {tuple(A.shape)}; b has length {n}")
    check_finite(f"blockops.solvers.{name}", "b", b)
    dtype = np.result_type(b.dtype, getattr(A, "dtype", b.dtype))
    Aop = _as_operator(sla, A, n, dtype)
    Mop = _as_operator(sla, M, n, dtype)
    nb = float(xp.linalg.norm(b)) or 1.0
    record: list = []  # relative residuals, device scalars until the solve ends
    count = [0]
    last = [None]  # GMRES: the solver's latest residual estimate
    # GMRES reports its own residual estimate: SciPy once per inner iteration,
    # CuPy once per restart cycle of exactly ``restart`` inner iterations.
    gmres_step = 1
    if name == "gmres":
        kw["callback_type"] = "pr_norm"
        if xp is not np:
            gmres_step = min(kw.get("restart") or 20, n)  # CuPy's default restart is 20

    def callback(arg):
        count[0] += 1
        if name == "gmres":
            last[0] = arg
            if history:
                record.append(arg)
        elif history:
            record.append(xp.linalg.norm(b - Aop.matvec(arg)) / nb)

    t0 = time.perf_counter()
    solver = getattr(sla, name)
    kw[_tol_keyword(solver)] = rtol
    x, info = solver(Aop, b, x0=x0, maxiter=maxiter, M=Mop, callback=callback, **kw)
    res = float(xp.linalg.norm(b - Aop.matvec(x))) / nb  # the one extra product
    # one copy of the record to the host
    residuals = xp.stack([xp.asarray(r) for r in record]).tolist() if record else []
    return SolveResult(
        x,
        int(info),
        count[0] * gmres_step,
        residuals,
        time.perf_counter() - t0,
        residual=res,
        converged=bool(res <= rtol),
        rtol=rtol,
        solver_residual=None if last[0] is None else float(last[0]),
    )


def _tol_keyword(solver):
    """``'rtol'`` (SciPy, newer CuPy) or ``'tol'`` (older CuPy signatures)."""
    try:
        params = inspect.signature(solver).parameters
    except (TypeError, ValueError):  # pragma: no cover - compiled callables
        return "rtol"
    return "rtol" if "rtol" in params or "tol" not in params else "tol"


def cg(A, b, x0=None, M=None, rtol=1e-8, maxiter=None, history=True):
    """Conjugate gradients for symmetric positive definite ``A`` (and ``M``).

    ``converged`` means ``‖b − A x‖ / ‖b‖ <= rtol`` for the returned ``x``,
    checked with one extra product after the solve (see :class:`SolveResult`).
    """
    return _run("cg", A, b, x0, M, rtol, maxiter, history)


def minres(A, b, x0=None, M=None, rtol=1e-8, maxiter=None, history=True):
    """MINRES for symmetric (indefinite) ``A``; ``M`` must be positive definite.

    The solver stops on its own recursively updated estimate, relative to
    ``‖A‖‖x‖ + ‖b‖``; on indefinite or ill-conditioned ``A`` it can report
    success (``info == 0``) far above ``rtol`` in the true residual. ``converged``
    is therefore ``‖b − A x‖ / ‖b‖ <= rtol``, checked with one extra product
    after the solve (see :class:`SolveResult`).
    """
    return _run("minres", A, b, x0, M, rtol, maxiter, history)


def gmres(A, b, x0=None, M=None, rtol=1e-8, maxiter=None, restart=None, history=True):
    """Restarted GMRES for any nonsingular ``A``; any ``M``.

    ``iterations`` counts inner (Arnoldi) iterations summed over the restart
    cycles. SciPy (``callback_type='pr_norm'``) calls back once per inner
    iteration with its relative residual estimate, recorded in ``residuals``.
    CuPy calls back once per restart cycle and always runs a cycle to its end,
    so there ``iterations`` is ``restart`` (default ``min(20, n)``) times the
    number of cycles and ``residuals`` has one entry per cycle. ``maxiter`` is
    passed through as is: SciPy counts restart cycles, CuPy inner iterations.
    ``converged`` means ``‖b − A x‖ / ‖b‖ <= rtol``, checked with one extra
    product after the solve (see :class:`SolveResult`).
    """
    return _run("gmres", A, b, x0, M, rtol, maxiter, history, restart=restart)


def positive_preconditioner(point, damping, method="auto", refine=0):
    """Exact ``(G + λI)⁻¹`` of the damped Gauss-Newton matrix: a PD preconditioner.

    ``G = Jᵀ ∇²ℓ J`` is positive semi-definite for convex losses (MSE, softmax
    cross-entropy), so ``G + λI`` is positive definite for ``λ > 0``: the
    preconditioner MINRES needs for an indefinite ``H + λI``. Factored by the
    same stagewise sweep as the Hessian (zero weightings ``b_l`` on hidden
    layers leave exactly the GGN's stage blocks).
    """
    from .inverse import InverseHessian

    if not damping > 0:
        raise ValueError(
            f"positive_preconditioner: damping must be > 0 (G is only semi-definite), got {damping}"
        )
    return InverseHessian(point, damping, method=method, refine=refine, check=False, kind="ggn")
