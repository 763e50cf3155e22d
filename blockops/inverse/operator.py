r"""The exact ``(H + λI)⁻¹`` of a pipeline as a factor-once LinearOperator.

``(H + λI) dx = g`` is the stationarity condition of the lifted saddle-point
(KKT) system (docs: derivation, "The general exact route"), built from the
pieces of eq. 24 (``M``, ``Dx`` and the ``K`` blocks of ``Q``). Ordered
layer by layer it is block-tridiagonal and is solved exactly by

* ``method="riccati"``: the stagewise (Riccati) sweep of
  :mod:`blockops.inverse.stagewise`, with the structured stages layers
  register (the dense layer's: :mod:`blockops.network.dense_stage`; fast;
  pivots only inside a stage);
* ``method="kkt"`` (alias ``"banded"``): pivoted banded LU of the lifted
  system (:mod:`blockops.inverse.banded_kkt`; robust for singular stage
  pivots and ``λ = 0``, slower, more memory);
* ``method="auto"``: the sweep, falling back to the banded LU when a stage
  pivot is singular or badly conditioned (the order is data:
  :func:`blockops.inverse.factorization.plan`);
* ``method="woodbury"``: the paper's own route (eqs. 25-43, corrected), see
  :mod:`blockops.woodbury`.

Every solve ends with ``refine`` steps of iterative refinement
``x ← x + F⁻¹(g − (H + λI) x)`` against the fused HVP, and the relative
residual ``‖(H + λI) x − g‖ / ‖g‖`` is the certificate.

Backends: the point's array module is used throughout, and the backend
layer's kernels (:mod:`blockops.backend`) choose host LAPACK (``sytrf``,
``potrf``/``gesv``, ``gbtrf``) on NumPy and generic array code on CuPy (or on
NumPy inside :func:`blockops.backend.generic_linalg`: LU /
``xp.linalg.solve``, ``xp.linalg.eigvalsh`` for inertia and ``log|det|``, block
QR for the lifted KKT system). A factorisation moves a few scalars to the host
(pivot checks); a solve with ``check=False`` moves nothing, and with
``check=True`` two scalars (the NaN/Inf scan of ``g`` and the worst final
residual).
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from pylops import LinearOperator

from .._checks import (
    KINDS,
    PRECISIONS,
    check_choice,
    check_finite,
    check_int,
    check_layer_damping,
    check_vector,
    layer_dampings,
)
from ..backend import blas_threads, get_array_module
from ..hessian import ggn_vp, hvp
from ..network import Pipeline
from ..operators._common import ArrayOperands
from ..singular import SingularBlockError, damping_hint
from .banded_kkt import kkt_inertia
from .factorization import FACTORIZATIONS, METHODS, available_bytes, banded_bytes, plan
from .stagewise import StagewiseFactor, stages_from_point

__all__ = ["InverseHessian", "inverse_hessian"]


def _check_rtol(rtol, dt) -> float:
    """``rtol`` as a float; default ``√ε`` of what the caller receives.

    1.5e-8 in float64, 3.5e-4 in float32: a float32 result cannot have a
    residual much below ``cond * 6e-8``.
    """
    if rtol is None:
        return float(np.sqrt(np.finfo(dt).eps))
    rtol = float(rtol)
    if not np.isfinite(rtol) or rtol <= 0:
        raise ValueError(f"inverse_hessian: rtol={rtol}; expected a finite value > 0")
    return rtol


class InverseHessian(ArrayOperands, LinearOperator):
    r"""``(H + λI)⁻¹`` of a pipeline at a point, factored once.

    Forward and adjoint: ``x = (H + λI)⁻¹ g`` (symmetric, so ``rmatvec =
    matvec``); ``matmat`` solves all columns of ``G`` (n, k) at once. Each
    solve applies ``refine`` steps of iterative refinement against the fused
    HVP (eq. 24 fused) and, with ``check=True``, warns (``RuntimeWarning``)
    when the final relative residual exceeds ``rtol``. Parameters as
    :func:`inverse_hessian`.

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
        owner = "inverse_hessian"
        self.kind = check_choice(owner, "kind", kind, KINDS)
        check_choice(owner, "method", method, tuple(m for m in METHODS if m != "woodbury"))
        check_choice(owner, "precision", precision, PRECISIONS)
        self.damping = check_layer_damping(owner, damping, point.layers)
        self.refine = check_int(owner, "refine", refine, 0)
        self.threads = check_int(owner, "threads", threads, 1)
        self.point, self.check = point, bool(check)
        dt = np.dtype(point.dtype)
        self.work_dtype = np.dtype(np.float32) if precision in ("mixed", "float32") else dt
        self.out_dtype = np.dtype(np.float32) if precision == "float32" else dt
        self.rtol = _check_rtol(rtol, self.out_dtype)
        n = point.n_params
        super().__init__(dtype=self.out_dtype, shape=(n, n), name="Hinv")
        self.info = {"precision": precision, "damping": self.damping}
        t0 = time.perf_counter()
        with blas_threads(self.threads):
            self._factorize(plan(method, self.work_dtype, dt))
        self.info["factor_time"] = time.perf_counter() - t0
        self._inertia = None

    def __getstate__(self):
        """Pickle the factor itself: unpickling (a Dask worker, a process pool) never factors.

        The result solves exactly as this operator does (same factor, same refinement).
        The working point, a cast or Gauss-Newton copy of :attr:`point`, is rebuilt on
        unpickling instead of shipped.
        """
        return {**self.__dict__, "_fpoint": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fpoint = self._working_point(self.work_dtype)

    @property
    def xp(self):
        return self.point.xp

    def _factorize(self, steps):
        """Try the plan's ``(factorisation, dtype)`` steps in order; keep the first error."""
        first = None
        for name, dt in steps:
            if name == "kkt" and first is not None:
                self._check_banded_memory(first, dt)
            fpoint = self._working_point(dt)
            try:
                self._factor = FACTORIZATIONS[name](fpoint, self.damping)
            except SingularBlockError as err:
                first = first or err
                self.info["fallback"] = str(err)
                continue
            self.method, self.work_dtype, self._fpoint = name, dt, fpoint
            if dt != steps[0][1]:
                self.info["fallback_dtype"] = str(dt)
                warnings.warn(
                    f"inverse_hessian: the {steps[0][1]} factorisation failed ({first}); "
                    f"factored in {dt} instead, at {dt}'s cost.",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return
        raise first

    def _check_banded_memory(self, err, dt):
        """Refuse a banded fallback that cannot fit, keeping the sweep's clear error."""
        need, have = banded_bytes(self.point, dt), available_bytes()
        if have is not None and need > have // 2:
            raise SingularBlockError(
                f"{err} (The banded KKT fallback would need about {need / 2**30:.1f} GiB of "
                f"the {have / 2**30:.1f} GiB of this machine, so it was not tried.)",
                layer=err.layer,
            ) from err

    def _working_point(self, dt):
        """The point in the factorisation dtype (GGN: zero hidden weightings)."""
        fpoint = self.point.astype(dt)
        return fpoint.gauss_newton() if self.kind == "ggn" else fpoint

    # -- certificates ----------------------------------------------------------
    def _apply_H(self, X):
        prod = ggn_vp if self.kind == "ggn" else hvp
        return prod(self.point, X) + self._damping_column() * X

    def _damping_column(self):
        """``λ`` as a scalar, or per layer as an ``(n, 1)`` column of ``λ_l`` repeated ``p_l``."""
        if not isinstance(self.damping, tuple):
            return self.damping
        if getattr(self, "_lam_col", None) is None:
            sizes = [ly.n_params for ly in self.point.layers]
            lam = np.repeat(layer_dampings(self.damping, len(sizes)), sizes)
            self._lam_col = self.xp.asarray(lam, dtype=self.point.dtype)[:, None]
        return self._lam_col

    def residual(self, g, x=None):
        """Relative residual ``‖(H + λI) x − g‖ / ‖g‖`` (one fused HVP).

        ``x`` defaults to ``self @ g`` and must have ``g``'s shape. Per column
        for a matrix ``g``; a float for a vector.
        """
        g = self._check_rhs(g)
        if x is None:
            x = self.matmat(g) if g.ndim == 2 else self.matvec(g)
        elif tuple(getattr(x, "shape", ())) != tuple(g.shape):
            raise ValueError(
                f"InverseHessian.residual: x has shape {tuple(getattr(x, 'shape', ()))}; "
                f"expected {tuple(g.shape)} (the shape of g)"
            )
        r = self._residual(g if g.ndim == 2 else g[:, None], x if x.ndim == 2 else x[:, None])
        return r if g.ndim == 2 else float(r[0])

    def _residual(self, g, x):
        """Per-column relative residuals of checked ``(n, k)`` arrays."""
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
        """Inertia when the banded LU factored: explicit (pivoted) stages, else the lifted KKT.

        The sweep's ordering stops at a singular stage pivot; the lifted KKT's
        block ``LDLᵀ`` (:func:`~blockops.inverse.banded_kkt.kkt_inertia`) keeps
        the multipliers and states in every block and so goes through those.
        """
        with blas_threads(self.threads):
            try:
                return StagewiseFactor(stages_from_point(self._fpoint, self.damping, False)).inertia
            except SingularBlockError:
                pass
            try:
                return kkt_inertia(self._fpoint, self.damping)
            except SingularBlockError:
                pass
        n = self.shape[0]
        if n > 4000:
            raise SingularBlockError(
                "InverseHessian.inertia: the stage pivots and the lifted KKT Schur complements "
                "are singular (the banded LU gives no inertia) and n > 4000 is too large for a "
                "dense eigenvalue count; add damping."
            )
        xp = self.point.xp
        Hd = self._apply_H(xp.eye(n, dtype=self.point.dtype))
        w = xp.linalg.eigvalsh(0.5 * (Hd + Hd.T))
        tol = n * np.finfo(w.dtype).eps * float(xp.abs(w).max())
        return (int((w < -tol).sum()), int((abs(w) <= tol).sum()), int((w > tol).sum()))

    def diagonal(self):
        """``diag((H + λI)⁻¹)`` exactly (:func:`~blockops.inverse.inverse_diagonal`)."""
        from .selected import inverse_diagonal

        return inverse_diagonal(self)

    def diagonal_blocks(self):
        """Per-layer ``[(H + λI)⁻¹]_{ll}`` (:func:`~blockops.inverse.inverse_diagonal_blocks`)."""
        from .selected import inverse_diagonal_blocks

        return inverse_diagonal_blocks(self)

    # -- solves ------------------------------------------------------------------
    def _check_rhs(self, g):
        xp = self.point.xp
        if not hasattr(g, "shape"):
            g = xp.asarray(g)
        if getattr(g, "dtype", np.dtype(float)).kind == "c":
            raise TypeError(
                "InverseHessian: g is complex; H is real, so solve the real and imaginary "
                "parts separately (Hinv @ g.real + 1j * (Hinv @ g.imag))"
            )
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
        wt, hd = self.work_dtype, np.dtype(self.point.dtype)
        t0 = time.perf_counter()
        with blas_threads(self.threads):
            X = self._factor.solve(G2.astype(wt, copy=False)).astype(hd, copy=False)
            if self.check or self.refine:  # the refinement's HVP would scan X anyway
                self._check_overflow(X)
            Gh = G2.astype(hd, copy=False)
            res = None
            for _ in range(self.refine):
                R = Gh - self._apply_H(X)
                X += self._factor.solve(R.astype(wt, copy=False)).astype(hd, copy=False)
            X = X.astype(self.out_dtype, copy=False)
            if self.check:  # certify what the caller receives, after any cast
                res = self._residual(Gh, X)  # G was checked on entry
        self.info["solve_time"] = time.perf_counter() - t0
        if res is not None:
            worst = float(res.max()) if res.size else 0.0  # the one scalar sync of a check
            self.info["residual"] = worst if vec else res
            self._warn_residual(worst)
        return X[:, 0] if vec else X

    def _check_overflow(self, X):
        """A solve that overflowed names the cause instead of failing later in the HVP."""
        xp = self.point.xp
        if not bool(xp.all(xp.isfinite(X))):
            raise SingularBlockError(
                f"InverseHessian ({self.method}): the solve overflowed to inf/NaN in "
                f"{self.work_dtype}: H + damping*I is too ill-conditioned for it; "
                f"{damping_hint(self.damping, self.work_dtype)}, or use precision='float64'."
            )

    def _warn_residual(self, worst):
        if worst > self.rtol:
            warnings.warn(
                f"InverseHessian ({self.method}): relative residual {worst:.2e} exceeds "
                f"rtol={self.rtol:.0e}; H + damping*I may be ill-conditioned. Increase "
                "refine, add damping or use method='kkt'.",
                RuntimeWarning,
                stacklevel=4,
            )

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
    damping : float or sequence of float
        ``λ``: one real number, or one per layer of ``point.layers`` (``H + D``
        with ``D = diag(λ_l I_{p_l})``, e.g. a per-layer prior precision;
        parameter-free layers' entries are unused). Any sign: a negative value
        factors ``H − σI`` with ``σ = −λ``, whose ``inertia`` counts the
        eigenvalues of ``H`` below ``σ`` (Sylvester's law; see
        :mod:`blockops.spectral`). ``H + λI`` must be nonsingular.
    method : {"auto", "riccati", "kkt", "banded", "woodbury"}
        See the module docstring. ``"auto"`` runs the stagewise sweep and
        falls back to the pivoted banded LU on a singular stage pivot.
    refine : int
        Iterative-refinement steps per solve (one fused HVP each), ``>= 0``.
    precision : {"float64", "mixed", "float32"}
        ``"mixed"`` factors in float32 and refines in the point's precision:
        each refinement step shrinks the error by about ``κ · 6e-8`` (``κ``
        the condition number of ``H + λI``), so one step suffices only for
        ``κ`` up to about ``1e4``, a few steps to about ``1e6``, and beyond
        ``κ ≈ 1e7`` it does not converge: use ``"float64"`` there. The
        residual certificate says what a solve reached. When the float32
        sweep meets a singular pivot it is redone in float64 (with a
        ``RuntimeWarning``). ``"float32"`` returns float32 results.
    check : bool
        Scan ``g`` for NaN/Inf, compute the final residual (one more HVP) and
        warn above ``rtol``. ``check=False`` skips all three: no device-to-host
        transfer in a solve on CuPy.
    rtol : float, optional
        Residual above which a solve warns; default ``√ε`` of the output dtype
        (1.5e-8 for float64, 3.5e-4 for float32).
    threads : int
        BLAS threads inside factor and solve, ``>= 1`` (one is fastest for the
        small per-layer products; try 2 for batch 32 and up).
    kind : {"hessian", "ggn"}
        Invert the Hessian or the generalized Gauss-Newton matrix (eq. 24 with
        only the loss layer's curvature; positive semi-definite for a convex
        loss, so ``G + λI`` with ``λ > 0`` is positive definite).

    Notes
    -----
    ``method="woodbury"`` is the paper's route
    (:func:`~blockops.woodbury.woodbury_inverse`): Hessian only, float64, no
    refinement; ``rtol`` bounds its predicted error (a condition estimate)
    instead of a residual. ``kind``, ``refine`` and ``precision`` must keep
    their defaults with it.
    """
    if isinstance(point, Pipeline):
        if len(args) != 2:
            raise TypeError(
                "inverse_hessian(pipeline, params, (X, y), ...): expected params and (X, y)"
            )
        params, (X, y) = args
        point = point.linearize(params, X, y)
    elif args:
        raise TypeError("inverse_hessian(point, ...): extra positional arguments after a Point")
    if method == "woodbury":
        return _woodbury(point, damping, rtol, kind=kind, refine=refine, precision=precision)
    return InverseHessian(point, damping, method, refine, precision, check, rtol, threads, kind)


def _woodbury(point, damping, rtol, **options):
    """The paper's route, refusing the options it cannot honour."""
    from ..woodbury import woodbury_inverse

    defaults = {"kind": "hessian", "refine": 1, "precision": "float64"}
    bad = [k for k, v in options.items() if v != defaults[k]]
    if bad:
        raise ValueError(
            f"inverse_hessian(method='woodbury'): {', '.join(bad)} not supported by the "
            "paper's route; use method='auto' (stagewise) for these options."
        )
    return woodbury_inverse(point, damping, rtol=rtol)  # there: predicted-error bound
