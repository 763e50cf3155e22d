r"""The exact ``(H + λI)⁻¹`` of a pipeline as a factor-once LinearOperator.

``(H + λI) dx = g`` is the stationarity condition of the lifted saddle-point
(KKT) system of ``DESIGN.md`` ("The general exact route"), built from the
pieces of eq. 24 (``M``, ``Dx`` and the ``K`` blocks of ``Q``). Ordered
layer by layer it is block-tridiagonal and is solved exactly by

* ``method="riccati"``: the stagewise (Riccati) sweep of
  :mod:`blockops.hessian.stagewise`, with the structured dense-layer stage of
  :mod:`blockops.hessian.lowrank` (fast; pivots only inside a stage);
* ``method="kkt"`` (alias ``"banded"``): pivoted banded LU of the lifted
  system (:mod:`blockops.hessian.banded`; robust for singular stage pivots
  and ``λ = 0``, slower, more memory);
* ``method="auto"``: the sweep, falling back to the banded LU when a stage
  pivot is singular or badly conditioned;
* ``method="woodbury"``: the paper's own route (eqs. 25-43, corrected), see
  :mod:`blockops.hessian.woodbury`.

Every solve ends with ``refine`` steps of iterative refinement
``x ← x + F⁻¹(g − (H + λI) x)`` against the fused HVP, and the relative
residual ``‖(H + λI) x − g‖ / ‖g‖`` is the certificate.

Backends: the point's array module is used throughout. On NumPy the stage
pivots and the banded route use host LAPACK (``sytrf``, ``gesv``/``potrf``,
``gbtrf``); on CuPy (or NumPy inside :func:`blockops.backend.generic_linalg`)
the same factorisations run with backend-generic kernels (LU /
``xp.linalg.solve``, ``xp.linalg.eigvalsh`` for inertia and ``log|det|``, block
QR for the lifted KKT system). A factorisation moves a few scalars to the host
(pivot checks); a solve with ``check=False`` moves nothing, and with
``check=True`` two scalars (the NaN/Inf scan of ``g`` and the worst final
residual).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pylops import LinearOperator
from threadpoolctl import threadpool_limits

from .._checks import SingularBlockError, check_finite, check_vector
from ..backend import get_array_module
from ..network.layer import Cache
from .banded import BandedKKT
from .stagewise import StagewiseFactor, stages_from_point

__all__ = ["InverseHessian", "inverse_hessian"]

METHODS = ("auto", "kkt", "banded", "riccati", "woodbury")


@dataclass
class _CastPoint:
    """The parts of a Point the factorisations read, in another dtype."""

    layers: list
    caches: list
    bs: list
    batch_size: int
    dtype: Any
    extra: dict = field(default_factory=dict)


def _cast(a, dt):
    return a.astype(dt) if hasattr(a, "dtype") and a.dtype.kind == "f" else a


def _cast_point(point, dt):
    """``point`` with every float array cast to ``dt`` (for float32 factorisation)."""
    if np.dtype(point.dtype) == np.dtype(dt):
        return point
    caches = [
        Cache(
            _cast(c.z_prev, dt),
            _cast(c.x, dt),
            _cast(c.z, dt),
            {k: _cast(v, dt) for k, v in c.extra.items()},
        )
        for c in point.caches
    ]
    bs = [_cast(b, dt) for b in point.bs]
    return _CastPoint(point.layers, caches, bs, point.batch_size, np.dtype(dt))


class InverseHessian(LinearOperator):
    r"""``(H + λI)⁻¹`` of a pipeline at a point, factored once.

    Forward and adjoint: ``x = (H + λI)⁻¹ g`` (symmetric, so ``rmatvec =
    matvec``); ``matmat`` solves all columns of ``G`` (n, k) at once. Each
    solve applies ``refine`` steps of iterative refinement against the fused
    HVP (eq. 24 fused) and, with ``check=True``, warns (``RuntimeWarning``)
    when the final relative residual exceeds ``rtol``.

    Attributes
    ----------
    method : str
        ``"riccati"`` or ``"kkt"`` (what actually factored).
    inertia : tuple
        ``(n_neg, n_zero, n_pos)`` of ``H + λI`` (Haynsworth additivity over
        the stage pivots; Sylvester's law).
    logdet : float
        ``log|det(H + λI)|``.
    info : dict
        Timings, fallback reason, last residuals.
    """

    def __init__(
        self,
        point,
        damping=0.0,
        method="auto",
        refine=1,
        precision="float64",
        check=True,
        rtol=None,
        threads=1,
        kind="hessian",
    ):
        if kind not in ("hessian", "ggn"):
            raise ValueError(f"inverse_hessian: kind {kind!r}; expected 'hessian' or 'ggn'")
        if method not in METHODS:
            raise ValueError(
                f"inverse_hessian: unknown method {method!r}; expected one of {METHODS}"
            )
        if precision not in ("float64", "mixed", "float32"):
            raise ValueError(
                f"inverse_hessian: precision {precision!r}; "
                "expected 'float64', 'mixed' or 'float32'"
            )
        damping = float(damping)
        if not np.isfinite(damping) or damping < 0:
            raise ValueError(f"inverse_hessian: damping must be finite and >= 0, got {damping}")
        self.point, self.damping, self.kind = point, damping, kind
        self.refine, self.check, self.threads = int(refine), check, threads
        dt = np.dtype(point.dtype)
        self.work_dtype = np.dtype(np.float32) if precision in ("mixed", "float32") else dt
        if precision == "float32":
            dt = np.dtype(np.float32)
        self.out_dtype = dt
        # sqrt(eps) of what the caller receives: 1.5e-8 in float64, 3.5e-4 in float32
        # (a float32 result cannot have a residual much below cond * 6e-8).
        self.rtol = float(np.sqrt(np.finfo(dt).eps)) if rtol is None else float(rtol)
        n = int(point.pipeline.n_params) if hasattr(point, "pipeline") else len(point.gradient)
        super().__init__(dtype=dt, shape=(n, n), name="Hinv")
        self.info = {"precision": precision, "damping": damping}
        t0 = time.perf_counter()
        with threadpool_limits(threads):
            fpoint = self._working_point(self.work_dtype)
            if method in ("auto", "riccati"):
                try:
                    self._factor = StagewiseFactor(stages_from_point(fpoint, damping))
                    self.method = "riccati"
                except SingularBlockError as err:
                    if method == "riccati" and self.work_dtype == np.dtype(point.dtype):
                        raise
                    self.info["fallback"] = str(err)
                    if self.work_dtype != np.dtype(point.dtype):
                        # float32 pivots too ill-conditioned: redo the sweep in full precision
                        self.work_dtype = np.dtype(point.dtype)
                        fpoint = self._working_point(self.work_dtype)
                        try:
                            self._factor = StagewiseFactor(stages_from_point(fpoint, damping))
                            self.method = "riccati"
                        except SingularBlockError as err2:
                            if method == "riccati":
                                raise
                            self.info["fallback"] = str(err2)
                            method = "kkt"
                    else:
                        method = "kkt"
            if method in ("kkt", "banded"):
                self._factor = BandedKKT(fpoint, damping)
                self.method = "kkt"
            self._fpoint = fpoint
        self.info["factor_time"] = time.perf_counter() - t0
        self._inertia = None

    def _working_point(self, dt):
        """The point in the factorisation dtype (GGN: zero hidden weightings)."""
        fpoint = _cast_point(self.point, dt)
        if self.kind == "ggn":
            # The GGN keeps only the loss layer's curvature: K_l is linear in b_l, so
            # zero weightings on the hidden layers give exactly the GGN's stages.
            zero = [b * 0 for b in fpoint.bs[:-1]] + [fpoint.bs[-1]]
            fpoint = _CastPoint(fpoint.layers, fpoint.caches, zero, fpoint.batch_size, np.dtype(dt))
        return fpoint

    # -- certificates ----------------------------------------------------------
    def _apply_H(self, X):
        from .hessian import ggn_vp, hvp

        prod = ggn_vp if self.kind == "ggn" else hvp
        return prod(self.point, X) + self.damping * X

    def residual(self, g, x=None):
        """Relative residual ``‖(H + λI) x − g‖ / ‖g‖`` (one fused HVP).

        ``x`` defaults to ``self @ g``. Per column for a matrix ``g``.
        """
        g = self._check_rhs(g)
        if x is None:
            x = self.matmat(g) if g.ndim == 2 else self.matvec(g)
        return self._residual(g, x)

    def _residual(self, g, x):
        """:meth:`residual` of a checked ``g``."""
        xp = get_array_module(g)
        r = self._apply_H(x.astype(self.point.dtype)) - g
        nr, ng = xp.linalg.norm(r, axis=0), xp.linalg.norm(g, axis=0)
        return nr / xp.where(ng == 0, 1.0, ng)

    @property
    def logdet(self):
        return self._factor.logdet

    @property
    def inertia(self):
        if self._inertia is None:
            if isinstance(self._factor, StagewiseFactor):
                self._inertia = self._factor.inertia
            else:
                self._inertia = self._inertia_fallback()
        return self._inertia

    def _inertia_fallback(self):
        """Inertia when the banded LU factored: a sweep with generic (pivoted) stages."""
        try:
            with threadpool_limits(self.threads):
                return StagewiseFactor(stages_from_point(self._fpoint, self.damping, False)).inertia
        except SingularBlockError:
            pass
        n = self.shape[0]
        if n > 4000:
            raise SingularBlockError(
                "InverseHessian.inertia: the stage pivots are singular (the banded LU gives no "
                "inertia) and n > 4000 is too large for a dense eigenvalue count; add damping."
            )
        xp = getattr(self.point, "xp", np)
        Hd = self._apply_H(xp.eye(n, dtype=self.point.dtype))
        w = xp.linalg.eigvalsh(0.5 * (Hd + Hd.T))
        tol = n * np.finfo(w.dtype).eps * float(xp.abs(w).max())
        return (int((w < -tol).sum()), int((abs(w) <= tol).sum()), int((w > tol).sum()))

    # -- solves ------------------------------------------------------------------
    def _check_rhs(self, g):
        xp = getattr(self.point, "xp", np)
        g = xp.asarray(g)
        check_vector("InverseHessian", g, self.shape[0], name="g")
        if self.check:  # a device-to-host scalar: skipped with check=False
            check_finite("InverseHessian", "g", g)
        return g

    def solve(self, G):
        """``(H + λI)⁻¹ G`` for ``G`` (n,) or (n, k), refined and checked."""
        G = self._check_rhs(G)
        vec = G.ndim == 1
        G2 = G[:, None] if vec else G
        wt = self.work_dtype
        hd = np.dtype(self.point.dtype)
        t0 = time.perf_counter()
        with threadpool_limits(self.threads):
            X = self._factor.solve(G2.astype(wt)).astype(hd)
            Gh = G2.astype(hd)
            res = None
            for _ in range(self.refine):
                R = Gh - self._apply_H(X)
                X += self._factor.solve(R.astype(wt)).astype(hd)
            X = X.astype(self.out_dtype, copy=False)
            if self.check:  # certify what the caller receives, after any cast
                res = self._residual(Gh, X)  # G was checked on entry
        self.info["solve_time"] = time.perf_counter() - t0
        if res is not None:
            self.info["residual"] = res
            worst = float(res.max()) if res.size else 0.0  # the one scalar sync of a check
            if worst > self.rtol:
                warnings.warn(
                    f"InverseHessian ({self.method}): relative residual {worst:.2e} exceeds "
                    f"rtol={self.rtol:.0e}; H + damping*I may be ill-conditioned. Increase "
                    "refine, add damping or use method='kkt'.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return X[:, 0] if vec else X

    def _matvec(self, x):
        return self.solve(x)

    def _rmatvec(self, x):
        return self.solve(x)

    def _matmat(self, X):
        return self.solve(X)

    def _rmatmat(self, X):
        return self.solve(X)


def inverse_hessian(
    point,
    *args,
    damping=0.0,
    method="auto",
    refine=1,
    precision="float64",
    check=True,
    rtol=None,
    threads=1,
    kind="hessian",
):
    """Exact ``(H + λI)⁻¹`` of a pipeline as an :class:`InverseHessian` operator.

    Parameters
    ----------
    point : Point or Pipeline
        A linearised pipeline, or a ``Pipeline`` followed by ``params`` and
        ``(X, y)`` (``inverse_hessian(net, x, (X, y), damping=...)``).
    damping : float
        ``λ ≥ 0``.
    method : {"auto", "riccati", "kkt", "banded", "woodbury"}
        See the module docstring. ``"auto"`` runs the stagewise sweep and
        falls back to the pivoted banded LU on a singular stage pivot.
    refine : int
        Iterative-refinement steps per solve (one fused HVP each).
    precision : {"float64", "mixed", "float32"}
        ``"mixed"`` factors in float32 and refines in the point's precision.
    check : bool
        Scan ``g`` for NaN/Inf, compute the final residual (one more HVP) and
        warn above ``rtol``. ``check=False`` skips all three: no device-to-host
        transfer in a solve on CuPy.
    rtol : float, optional
        Residual above which a solve warns; default ``√ε`` of the output dtype
        (1.5e-8 for float64, 3.5e-4 for float32).
    threads : int
        BLAS threads inside factor and solve (one is fastest for the small
        per-layer products; try 2 for batch 32 and up).
    kind : {"hessian", "ggn"}
        Invert the Hessian or the generalized Gauss-Newton matrix (eq. 24 with
        only the loss layer's curvature; positive semi-definite for a convex
        loss, so ``G + λI`` with ``λ > 0`` is positive definite).

    Notes
    -----
    ``method="woodbury"`` is the paper's route
    (:func:`~blockops.hessian.woodbury.woodbury_inverse`): Hessian only,
    float64, no refinement; ``rtol`` bounds its predicted error (a condition
    estimate) instead of a residual. ``kind``, ``refine`` and ``precision``
    must keep their defaults with it.
    """
    if hasattr(point, "linearize"):
        if len(args) != 2:
            raise TypeError(
                "inverse_hessian(pipeline, params, (X, y), ...): expected params and (X, y)"
            )
        params, (X, y) = args
        point = point.linearize(params, X, y)
    elif args:
        raise TypeError("inverse_hessian(point, ...): extra positional arguments after a Point")
    if method == "woodbury":
        from .woodbury import woodbury_inverse  # written separately (issue 7)

        unsupported = {
            "kind": (kind, "hessian"),
            "refine": (refine, 1),
            "precision": (precision, "float64"),
        }
        bad = [k for k, (v, default) in unsupported.items() if v != default]
        if bad:
            raise ValueError(
                f"inverse_hessian(method='woodbury'): {', '.join(bad)} not supported by the "
                "paper's route; use method='auto' (stagewise) for these options."
            )
        return woodbury_inverse(point, damping, rtol=rtol)  # there: predicted-error bound
    return InverseHessian(point, damping, method, refine, precision, check, rtol, threads, kind)
