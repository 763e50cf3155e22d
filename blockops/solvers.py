r"""Krylov solvers (CG, MINRES, GMRES) for blockops operators, with a record.

Thin wrappers over ``scipy.sparse.linalg`` (NumPy arrays) or
``cupyx.scipy.sparse.linalg`` (CuPy arrays), chosen by the backend of the
right-hand side (:func:`blockops.backend.get_sparse_linalg`). They accept
pylops / blockops ``LinearOperator`` objects or arrays, count iterations,
record the true relative residual ``‖b − A x_k‖ / ‖b‖`` per iteration (one
extra product per iteration; ``history=False`` skips it) and return a
:class:`SolveResult`.

Host-device traffic: on CuPy the operator products, the preconditioner and
the residual record stay on the device; the record is copied to the host once,
after the solve (``residuals``), and ``‖b‖`` is the one scalar read before it.
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

    Attributes
    ----------
    x : array
        The solution.
    info : int
        SciPy's flag: 0 converged, > 0 iteration limit reached, < 0 breakdown.
    iterations : int
        Number of iterations (callback calls).
    residuals : list of float
        True relative residual ``‖b − A x_k‖ / ‖b‖`` after each iteration
        (empty with ``history=False``).
    time : float
        Wall-clock seconds.
    """

    x: Any
    info: int
    iterations: int
    residuals: list = field(default_factory=list)
    time: float = 0.0

    @property
    def converged(self) -> bool:
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
    residuals: list = []  # device scalars until the solve ends
    count = [0]

    def callback(xk):
        count[0] += 1
        if history:
            residuals.append(xp.linalg.norm(b - Aop.matvec(xk)))

    t0 = time.perf_counter()
    solver = getattr(sla, name)
    kw[_tol_keyword(solver)] = rtol
    x, info = solver(Aop, b, x0=x0, maxiter=maxiter, M=Mop, callback=callback, **kw)
    record = (xp.stack(residuals) / nb).tolist() if residuals else []  # one copy to the host
    return SolveResult(x, int(info), count[0], record, time.perf_counter() - t0)


def _tol_keyword(solver):
    """``'rtol'`` (SciPy, newer CuPy) or ``'tol'`` (older CuPy signatures)."""
    try:
        params = inspect.signature(solver).parameters
    except (TypeError, ValueError):  # pragma: no cover - compiled callables
        return "rtol"
    return "rtol" if "rtol" in params or "tol" not in params else "tol"


def cg(A, b, x0=None, M=None, rtol=1e-8, maxiter=None, history=True):
    """Conjugate gradients for symmetric positive definite ``A`` (and ``M``)."""
    return _run("cg", A, b, x0, M, rtol, maxiter, history)


def minres(A, b, x0=None, M=None, rtol=1e-8, maxiter=None, history=True):
    """MINRES for symmetric (indefinite) ``A``; ``M`` must be positive definite."""
    return _run("minres", A, b, x0, M, rtol, maxiter, history)


def gmres(A, b, x0=None, M=None, rtol=1e-8, maxiter=None, restart=None, history=True):
    """Restarted GMRES for any nonsingular ``A``; any ``M``.

    ``iterations`` counts inner iterations (SciPy's ``callback_type='x'``
    calls the callback once per restart cycle, so the record is per cycle).
    """
    return _run("gmres", A, b, x0, M, rtol, maxiter, history, restart=restart, callback_type="x")


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
