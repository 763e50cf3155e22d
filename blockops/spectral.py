r"""Exact spectral information from the factorisation of a shifted Hessian.

Factoring ``H − σI`` (``inverse_hessian(point, damping=-σ)``) gives its
inertia by Haynsworth additivity over the stage pivots, and Sylvester's law
of inertia makes that a statement about ``H``:

.. math::

    \#\{\,i : λ_i(H) < σ\,\} = n_-(H − σI),

so :func:`count_eigenvalues` and :func:`spectral_histogram` are exact
integers at the cost of one factorisation per edge (no Lanczos, no
probing). :func:`eigsh_near` runs Lanczos on ``(H − σI)⁻¹`` (shift-invert:
the eigenvalues ``θ = 1 / (λ − σ)`` nearest ``σ`` become the largest) with
the exact factorisation as the operator, then certifies each pair by the
residual ``‖H v − λ v‖`` of one fused HVP.

``kind="ggn"`` works on the generalized Gauss-Newton matrix instead.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse.linalg as spla

from ._checks import KINDS, check_choice, check_int
from .backend import backend_name, to_numpy
from .inverse import InverseHessian

__all__ = ["count_eigenvalues", "eigsh_near", "spectral_histogram"]


def _shifted(point, sigma, kind, method, check=True):
    """The factored ``(H − σI)⁻¹`` (refined solves; inertia on request)."""
    return InverseHessian(point, damping=-sigma, method=method, kind=kind, check=check)


def _below(point, sigma, kind, method):
    """``#{λ_i(H) < σ}``: ``0`` and ``n`` at ``∓∞``, else the inertia of ``H − σI``."""
    if sigma == -np.inf:
        return 0
    if sigma == np.inf:
        return point.n_params
    return _shifted(point, sigma, kind, method).inertia[0]


def _check_edge(name, value):
    value = float(value)
    if np.isnan(value):
        raise ValueError(f"count_eigenvalues: {name} is NaN")
    return value


def count_eigenvalues(point, lo, hi, kind="hessian", method="auto"):
    """Exact number of eigenvalues of ``H`` (or the GGN) in ``[lo, hi)``.

    ``n₋(H − hi I) − n₋(H − lo I)`` by Sylvester's law of inertia: two
    factorisations (none for an infinite end). An end that is an eigenvalue
    (to working precision) makes ``H − σI`` singular and raises
    :class:`~blockops.SingularBlockError`: move it slightly.

    Parameters
    ----------
    point : Point
        The linearised pipeline.
    lo, hi : float
        Interval ends, ``lo < hi``; ``±inf`` allowed.
    kind : {"hessian", "ggn"}
    method : {"auto", "riccati", "kkt"}
        Factorisation (as :func:`~blockops.inverse.inverse_hessian`).
    """
    check_choice("count_eigenvalues", "kind", kind, KINDS)
    lo, hi = _check_edge("lo", lo), _check_edge("hi", hi)
    if not lo < hi:
        raise ValueError(f"count_eigenvalues: expected lo < hi, got [{lo}, {hi})")
    return _below(point, hi, kind, method) - _below(point, lo, kind, method)


def spectral_histogram(point, edges, kind="hessian", method="auto"):
    """Exact eigenvalue counts of ``H`` in the bins ``[edges[i], edges[i+1])``.

    One factorisation per finite edge. ``edges`` must increase strictly; use
    ``-inf`` / ``inf`` ends to count everything.

    Returns
    -------
    counts : ndarray of int, ``(len(edges) - 1,)``
    """
    check_choice("spectral_histogram", "kind", kind, KINDS)
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.isnan(edges).any():
        raise ValueError("spectral_histogram: edges must be a 1-D sequence of >= 2 numbers")
    if not np.all(np.diff(edges) > 0):
        raise ValueError("spectral_histogram: edges must increase strictly")
    below = np.array([_below(point, e, kind, method) for e in edges])
    return np.diff(below)


def _eigsh(xp):
    """SciPy's ``eigsh`` on host arrays; CuPy's (``cupyx``) on the device."""
    if backend_name(xp) == "cupy":  # pragma: no cover - needs a GPU
        import cupyx.scipy.sparse.linalg as cspla

        return cspla.eigsh, cspla.LinearOperator
    return spla.eigsh, spla.LinearOperator


def eigsh_near(point, sigma, k=6, kind="hessian", method="auto", tol=0.0, maxiter=None):
    r"""The ``k`` eigenpairs of ``H`` (or the GGN) nearest ``σ``, by exact shift-invert Lanczos.

    Lanczos (ARPACK through SciPy's ``eigsh``; ``cupyx`` on CuPy) on
    ``(H − σI)⁻¹`` as a matrix-free operator whose every application is an
    exact, refined solve with one factorisation of ``H − σI``; each
    ``θ`` gives ``λ = σ + 1/θ``. E.g. the most negative curvature directions
    of a saddle point (``σ`` below the spectrum) for a saddle-free Newton step.

    Parameters
    ----------
    point : Point
    sigma : float
        The shift; must not be an eigenvalue (``SingularBlockError`` says so).
    k : int
        Number of pairs, ``1 <= k < n``.
    kind, method
        As :func:`~blockops.inverse.inverse_hessian`.
    tol : float
        Lanczos tolerance on ``θ`` (0: machine precision).
    maxiter : int, optional
        Lanczos restarts limit (ARPACK's default when ``None``).

    Returns
    -------
    eigenvalues : ndarray (k,)
        Sorted by distance to ``σ``, nearest first.
    eigenvectors : array (n, k)
        Orthonormal columns, on the point's backend.
    residuals : ndarray (k,)
        ``‖H v_i − λ_i v_i‖₂`` (unit ``v_i``), from one fused HVP each.
    """
    check_choice("eigsh_near", "kind", kind, KINDS)
    n = point.n_params
    k = check_int("eigsh_near", "k", k, 1)
    if k >= n:
        raise ValueError(f"eigsh_near: k={k}; expected k < n = {n} (use numpy.linalg.eigh)")
    sigma = float(sigma)
    if not np.isfinite(sigma):
        raise ValueError(f"eigsh_near: sigma={sigma}; expected a finite shift")
    # no per-application certificate (one more HVP each): each pair is certified below
    Hinv = _shifted(point, sigma, kind, method, check=False)
    eigsh, LinOp = _eigsh(point.xp)
    op = LinOp((n, n), matvec=Hinv.solve, matmat=Hinv.solve, dtype=point.dtype)
    theta, V = eigsh(op, k=k, which="LM", tol=tol, maxiter=maxiter)
    lam = sigma + 1.0 / to_numpy(theta)
    order = np.argsort(np.abs(lam - sigma), kind="stable")
    lam = lam[order]
    V = V[:, point.xp.asarray(order)]
    # (H − σI) V − (λ − σ) V = H V − λ V
    R = Hinv._apply_H(V) - V * point.xp.asarray(lam - sigma, dtype=V.dtype)[None, :]
    res = to_numpy(point.xp.linalg.norm(R, axis=0))
    return lam, V, res
