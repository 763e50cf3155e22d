r"""The Laplace approximation on the Gauss-Newton matrix, with the exact evidence.

Model
-----
The point is a pipeline linearised at trained (MAP) parameters
:math:`\theta^\star` on the **whole** training set, and its loss is read as
the negative log-likelihood, :math:`-\log p(\mathcal D\mid\theta) =
L(\theta) + c`, with :math:`L` = ``point.loss`` and the constant :math:`c`:

* ``MSELoss(scale=s)``: :math:`L = \frac{s}{B}\sum_i \tfrac12\lVert
  f(x_i) - y_i\rVert^2`, the Gaussian likelihood
  :math:`\mathcal N(y_i \mid f(x_i), \sigma^2 I_m)` with noise variance
  :math:`\sigma^2 = B/s` (:attr:`LaplaceGGN.noise_variance`), so
  :math:`c = \tfrac{Bm}{2}\log(2\pi\sigma^2)`. For a noise level
  :math:`\sigma` build the loss as ``MSELoss(scale=B / sigma**2)``; the
  default ``scale=1`` means :math:`\sigma^2 = B`.
* ``SoftmaxCrossEntropy(scale=s)``: :math:`L = \frac{s}{B}\sum_i
  -\log\operatorname{softmax}(f(x_i))_{y_i}`; ``scale=B`` is the categorical
  likelihood, any other scale the tempered likelihood :math:`p^{1/T}` with
  temperature :math:`T = B/s`, whose log is taken as :math:`-L`; :math:`c = 0`.
* any other loss: :math:`-L` is the log-likelihood up to a constant,
  :math:`c = 0`.

The prior is :math:`\theta_\ell \sim \mathcal N(0, \delta_\ell^{-1}
I_{p_\ell})` per layer, :math:`D = \operatorname{diag}(\delta_\ell
I_{p_\ell})` (one :math:`\delta` for all layers, or one per layer). The
Laplace posterior on the generalized Gauss-Newton matrix is
:math:`\mathcal N(\theta^\star, \Sigma)`, :math:`\Sigma = (G + D)^{-1}`,
:math:`G = J^\top H_\ell J = \sum_i J_i^\top H_i J_i` with :math:`J_i` the
Jacobian of the network output (the loss input) of sample :math:`i` and
:math:`H_i` the loss Hessian in it (positive semi-definite for MSE and
softmax cross-entropy).

Evidence and its gradient
-------------------------
With :math:`\theta^\star` held fixed,

.. math::

   \log p(\mathcal D \mid \delta) \approx -L(\theta^\star) - c
   - \tfrac12 \sum_\ell \delta_\ell \lVert\theta^\star_\ell\rVert^2
   + \tfrac12 \sum_\ell p_\ell \log\delta_\ell
   - \tfrac12 \log\det(G + D),

   \frac{\partial}{\partial\delta_\ell} \log p(\mathcal D \mid \delta)
   = -\tfrac12\lVert\theta^\star_\ell\rVert^2 + \frac{p_\ell}{2\delta_\ell}
   - \tfrac12 \operatorname{tr}_\ell (G + D)^{-1}.

:math:`\log\det` comes from the exact factorisation
(:func:`~blockops.inverse.inverse_hessian`, ``kind="ggn"``, per-layer
damping :math:`D`) and the layer traces from the exact diagonal of the
inverse (selected inversion), not from a stochastic estimate.

Samples and predictions
-----------------------
:math:`\theta = \theta^\star + \Sigma (J^\top R\,\xi_1 + D^{1/2}\xi_2)`,
:math:`\xi_1, \xi_2` standard normal and :math:`R_i R_i^\top = H_i`, has
covariance :math:`\Sigma (J^\top H_\ell J + D) \Sigma = \Sigma`: one
Jacobian-transpose product and one solve per sample, all samples in one
batched solve. The linearised predictive variance of output :math:`o` at a
test input :math:`x` is :math:`e_o^\top J_x \Sigma J_x^\top e_o`, all test
points and outputs in one batched solve.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._backprop import check_inputs, forward_caches, per_sample_cotangents, vjp_sweep
from ._checks import check_choice, check_int, per_layer_values
from .backend import as_backend, to_numpy
from .inverse import inverse_diagonal, inverse_hessian
from .network import Point

__all__ = ["LaplaceGGN"]

_OWNER = "LaplaceGGN"
_CACHE_SIZE = 4  # factorisations kept: the current prior and a few recently queried ones


def _nll_constant(point) -> tuple[float, float | None]:
    """``(c, σ²)``: the NLL constant and the Gaussian noise variance (``None`` if not MSE)."""
    spec = point.pipeline.spec()[-1]
    if spec["kind"] != "MSELoss":
        return 0.0, None
    B, m = point.batch_size, spec["n_in"]
    sigma2 = B / spec["scale"]
    return 0.5 * B * m * math.log(2.0 * math.pi * sigma2), sigma2


class LaplaceGGN:
    r"""Laplace approximation :math:`\mathcal N(\theta^\star, (G + D)^{-1})` at a trained point.

    See the module docstring for the likelihood each loss stands for, the
    evidence and its gradient.

    Parameters
    ----------
    point : Point
        The pipeline linearised at the MAP parameters on the full training
        set (its loss is the negative log-likelihood).
    prior_precision : float or sequence of float
        :math:`\delta > 0` of the prior :math:`\mathcal N(0, \delta^{-1} I)`,
        or one value per layer of ``point.layers`` (entries of
        parameter-free layers, e.g. the loss, are ignored).
    method : {"auto", "riccati", "kkt"}
        Factorisation of :math:`G + D` (see
        :func:`~blockops.inverse.inverse_hessian`).
    refine, threads : int
        Refinement steps per solve and BLAS threads, as in
        :func:`~blockops.inverse.inverse_hessian`.

    Attributes
    ----------
    nll_constant : float
        :math:`c` above.
    noise_variance : float or None
        :math:`\sigma^2 = B/s` for ``MSELoss(scale=s)``, else ``None``.
    info : dict
        ``"optimize"``: what :meth:`optimize_prior_precision` did.
    """

    def __init__(self, point, prior_precision=1.0, *, method="auto", refine=1, threads=1):
        if not isinstance(point, Point):
            raise TypeError(
                f"{_OWNER}: point is a {type(point).__name__}; expected a Point "
                "(net.linearize(params, X, y) at the trained parameters)"
            )
        loss = point.layers[-1]
        if loss.n_params:
            raise ValueError(
                f"{_OWNER}: the loss {loss.name} has {loss.n_params} parameter(s) of its own; "
                "the prior and the output Jacobian here cover network parameters only: use a "
                "loss without parameters (MSELoss, SoftmaxCrossEntropy, CustomLoss)"
            )
        if point.n_params == 0:
            raise ValueError(f"{_OWNER}: the pipeline has no parameters")
        check_choice(_OWNER, "method", method, ("auto", "riccati", "kkt", "banded"))
        self.point = point
        self.options = {
            "method": method,
            "refine": check_int(_OWNER, "refine", refine, 0),
            "threads": check_int(_OWNER, "threads", threads, 1),
        }
        self.sizes = np.array([ly.n_params for ly in point.layers])
        self.offsets = list(point.pipeline.offsets)
        # |θ*_l|² per layer, on the host (a handful of scalars)
        self.sq_norms = np.array([float(to_numpy((xl * xl).sum())) for xl in point.xs])
        self.nll_constant, self.noise_variance = _nll_constant(point)
        self.info: dict[str, Any] = {}
        self._cache: dict[tuple, dict] = {}
        self._root = None
        self.prior_precision = prior_precision

    # -- the prior ---------------------------------------------------------------
    @property
    def prior_precision(self):
        """:math:`\\delta` (a float), or per layer :math:`\\delta_\\ell` (an array; 0: unused)."""
        if self._scalar:
            return float(self._delta[self.sizes > 0][0])
        return self._delta.copy()

    @prior_precision.setter
    def prior_precision(self, value):
        delta, scalar = self._check_prior(value)
        self._posterior(delta)  # factor now: a bad prior fails here and leaves the old one
        self._delta, self._scalar = delta, scalar

    def _check_prior(self, prior) -> tuple[np.ndarray, bool]:
        """Per-layer ``δ`` (0 for parameter-free layers) and whether one value was given."""
        return per_layer_values(_OWNER, "prior_precision", prior, self.point.layers, positive=True)

    def _resolve(self, prior) -> np.ndarray:
        return self._delta if prior is None else self._check_prior(prior)[0]

    # -- the posterior -----------------------------------------------------------
    def _posterior(self, delta) -> dict:
        """``{"inverse": (G + D)⁻¹, "diag": its diagonal or None}``, factored once per ``δ``."""
        key = tuple(float(d) for d in delta)
        entry = self._cache.get(key)
        if entry is not None:
            return entry
        Hinv = inverse_hessian(self.point, damping=list(key), kind="ggn", **self.options)
        n = self.point.n_params
        if tuple(Hinv.inertia) != (0, 0, n):
            raise ValueError(
                f"{_OWNER}: G + D has inertia {Hinv.inertia} (negative, zero, positive); it is "
                "not positive definite, so the loss Hessian in the network outputs is not "
                "positive semi-definite at this point: use a loss convex in its input "
                "(MSELoss, SoftmaxCrossEntropy)"
            )
        current = tuple(float(d) for d in getattr(self, "_delta", delta))
        while len(self._cache) >= _CACHE_SIZE:  # drop the oldest entry but the current prior's
            old = next(k for k in self._cache if k != current)
            del self._cache[old]
        entry = self._cache[key] = {"inverse": Hinv, "diag": None}
        return entry

    @property
    def covariance(self):
        """:math:`\\Sigma = (G + D)^{-1}` at the current prior, a factored InverseHessian."""
        return self._posterior(self._delta)["inverse"]

    def _traces(self, delta) -> np.ndarray:
        """Per-layer :math:`\\operatorname{tr}_\\ell (G + D)^{-1}` from the exact diagonal."""
        entry = self._posterior(delta)
        if entry["diag"] is None:
            entry["diag"] = to_numpy(inverse_diagonal(entry["inverse"]))
        o = self.offsets
        return np.array([entry["diag"][o[l] : o[l + 1]].sum() for l in range(len(self.sizes))])

    # -- evidence ------------------------------------------------------------------
    def _lml(self, delta) -> float:
        used = self.sizes > 0
        logdet = float(self._posterior(delta)["inverse"].logdet)
        prior = -0.5 * float(delta @ self.sq_norms)
        prior += 0.5 * float(self.sizes[used] @ np.log(delta[used]))
        return -self.point.loss - self.nll_constant + prior - 0.5 * logdet

    def _lml_grad(self, delta) -> np.ndarray:
        used = self.sizes > 0
        grad = np.zeros(len(self.sizes))
        tr = self._traces(delta)
        grad[used] = 0.5 * (-self.sq_norms[used] + self.sizes[used] / delta[used] - tr[used])
        return grad

    def log_marginal_likelihood(self, prior_precision=None) -> float:
        r"""Laplace evidence :math:`\log p(\mathcal D\mid\delta)` (module docstring).

        ``prior_precision`` evaluates it at another prior (as the constructor
        takes it) without changing :attr:`prior_precision`.
        """
        return self._lml(self._resolve(prior_precision))

    def log_marginal_likelihood_gradient(self, prior_precision=None):
        r""":math:`\partial \log p(\mathcal D\mid\delta) / \partial\delta`, exact.

        A float for one shared :math:`\delta` (the sum of the per-layer
        derivatives), else an array with one entry per layer (0 for
        parameter-free layers). One selected inversion of :math:`G + D`.
        """
        delta = self._resolve(prior_precision)
        scalar = self._scalar if prior_precision is None else np.ndim(prior_precision) == 0
        grad = self._lml_grad(delta)
        return float(grad.sum()) if scalar else grad

    def optimize_prior_precision(
        self, method="lbfgs", *, tol=1e-8, max_iter=100, bounds=(1e-8, 1e8)
    ):
        r"""Maximise the evidence in :math:`\delta` (one shared, or per layer as now set).

        Parameters
        ----------
        method : {"lbfgs", "mackay"}
            ``"lbfgs"``: SciPy's L-BFGS-B on :math:`\log\delta` with the exact
            gradient. ``"mackay"``: MacKay's fixed point
            :math:`\delta_\ell \leftarrow \gamma_\ell / \lVert\theta_\ell\rVert^2`,
            :math:`\gamma_\ell = p_\ell - \delta_\ell \operatorname{tr}_\ell \Sigma`
            (the effective number of parameters), whose fixed points are the
            zeros of the gradient.
        tol : float
            ``"mackay"``: stop when no :math:`\log\delta_\ell` moves by more;
            ``"lbfgs"``: SciPy's ``gtol`` on the log-space gradient.
        max_iter : int
            Iterations (factorisations and selected inversions) at most.
        bounds : (float, float)
            Range of :math:`\delta` for ``"lbfgs"``.

        Returns
        -------
        float or array
            The optimised prior precision, also set as :attr:`prior_precision`.
        """
        check_choice(_OWNER, "method", method, ("lbfgs", "mackay"))
        max_iter = check_int(_OWNER, "max_iter", max_iter, 1)
        used = self.sizes > 0
        sq = self.sq_norms[used]
        if (sq.sum() == 0) if self._scalar else bool(np.any(sq == 0)):
            raise ValueError(
                f"{_OWNER}: some parameters are all zero at the point; the evidence then grows "
                "without bound as their prior precision grows: nothing to optimise"
            )
        run = self._mackay if method == "mackay" else self._lbfgs
        delta, record = run(self._delta.copy(), tol, max_iter, bounds)
        self.info["optimize"] = {"method": method, **record}
        self.prior_precision = delta if not self._scalar else float(delta[used][0])
        return self.prior_precision

    def _mackay(self, delta, tol, max_iter, bounds):
        used = self.sizes > 0
        iterations = 0
        for _ in range(max_iter):
            iterations += 1
            gamma = self.sizes - delta * self._traces(delta)
            new = delta.copy()
            if self._scalar:
                new[used] = gamma[used].sum() / self.sq_norms[used].sum()
            else:
                new[used] = gamma[used] / self.sq_norms[used]
            step = float(np.abs(np.log(new[used]) - np.log(delta[used])).max())
            delta = new
            if step <= tol:
                break
        return delta, {"iterations": iterations, "last_step": step}

    def _lbfgs(self, delta, tol, max_iter, bounds):
        from scipy.optimize import minimize

        used = self.sizes > 0

        def unpack(u):
            d = np.zeros(len(self.sizes))
            d[used] = np.exp(u[0]) if self._scalar else np.exp(u)
            return d

        def objective(u):
            d = unpack(u)
            g = self._lml_grad(d)[used] * d[used]  # chain rule: ∂/∂ log δ = δ ∂/∂δ
            return -self._lml(d), -(np.array([g.sum()]) if self._scalar else g)

        u0 = np.log(delta[used][:1] if self._scalar else delta[used])
        lo, hi = np.log(bounds[0]), np.log(bounds[1])
        res = minimize(
            objective,
            u0,
            jac=True,
            method="L-BFGS-B",
            bounds=[(lo, hi)] * len(u0),
            # ftol at rounding level: stop on the gradient (gtol), not on a stalled decrease
            options={"maxiter": max_iter, "gtol": tol, "ftol": 1e-15},
        )
        return unpack(res.x), {"iterations": int(res.nit), "message": str(res.message)}

    # -- samples ---------------------------------------------------------------------
    def _loss_root(self):
        """Per-sample ``R_i`` ``(B, m, m)`` with ``R_i R_iᵀ = H_i`` (eigen-decomposition)."""
        if self._root is None:
            pt = self.point
            Kzz = pt.layers[-1].hessian_blocks(pt.caches[-1], pt.bs[-1])[0]
            xp = pt.xp
            w, V = xp.linalg.eigh(0.5 * (Kzz + Kzz.transpose(0, 2, 1)))
            scale = float(xp.abs(w).max()) if w.size else 0.0
            floor = 100 * w.shape[1] * np.finfo(w.dtype).eps * scale
            if float(w.min()) < -floor:
                raise ValueError(
                    f"{_OWNER}: the loss Hessian in the network outputs has an eigenvalue "
                    f"{float(w.min()):.3g} < 0 at some sample, so the GGN has no factor "
                    "JᵀR: use a loss convex in its input (MSELoss, SoftmaxCrossEntropy)"
                )
            self._root = V * xp.sqrt(xp.maximum(w, 0))[:, None, :]
        return self._root

    def _sample_rhs(self, xi1, xi2):
        """``Jᵀ R ξ₁ + D^{1/2} ξ₂`` ``(n, k)`` for ``ξ₁`` ``(k, B, m)`` and ``ξ₂`` ``(n, k)``."""
        pt = self.point
        xp = pt.xp
        U = xp.einsum("sij,ksj->ksi", self._loss_root(), xi1)
        JtU = vjp_sweep(pt.layers[:-1], pt.caches[:-1], self.offsets, U, pt.n_params)
        sqrt_d = xp.asarray(np.repeat(np.sqrt(self._delta), self.sizes), dtype=pt.dtype)
        return JtU.T + sqrt_d[:, None] * xi2

    def sample(self, k, rng=None):
        r"""``k`` exact samples ``(k, n_params)`` of :math:`\mathcal N(\theta^\star, \Sigma)`.

        ``rng``: a seed or ``numpy.random.Generator`` (the normals are drawn
        on the host). One batched Jacobian-transpose product and one batched
        solve for all ``k``; the solve's residual certificate is in
        ``self.covariance.info["residual"]``.
        """
        k = check_int(_OWNER, "k", k, 1)
        rng = np.random.default_rng(rng)
        pt = self.point
        m = pt.zs[-2].shape[1]
        xi1 = rng.standard_normal((k, pt.batch_size, m))
        xi2 = rng.standard_normal((pt.n_params, k))
        cast = lambda a: as_backend(a, pt.xp).astype(pt.dtype, copy=False)  # noqa: E731
        S = self.covariance @ self._sample_rhs(cast(xi1), cast(xi2))
        return pt.params[None, :] + S.T

    # -- predictions -----------------------------------------------------------------
    def predict(self, X, chunk=64):
        r"""Network outputs and their linearised variance at inputs ``X`` ``(B*, n_0)``.

        Returns ``(mean, variance)``, both ``(B*, m)``: :math:`f(x)` and
        :math:`\operatorname{diag}(J_x \Sigma J_x^\top)` per input and output
        (for MSE add :attr:`noise_variance` for the variance of a new
        target). The :math:`B^* m` rows of the per-sample Jacobians are built
        by Jacobian-transpose products, ``chunk`` inputs at a time, and solved
        in one batched solve (memory: ``n_params × B* m`` numbers).
        """
        owner = f"{_OWNER}.predict"
        chunk = check_int(owner, "chunk", chunk, 1)
        pt = self.point
        X = check_inputs(owner, pt, X)
        layers, xs = pt.layers[:-1], pt.xs[:-1]
        means, rows = [], []
        for i in range(0, X.shape[0], chunk):
            caches = forward_caches(layers, xs, X[i : i + chunk])
            z = caches[-1].z
            U = per_sample_cotangents(pt.xp, z.shape[0], z.shape[1], pt.dtype)
            rows.append(vjp_sweep(layers, caches, self.offsets, U, pt.n_params))
            means.append(z)
        Jt = pt.xp.concatenate(rows).T  # (n, B* m): column s·m + o is ∇_θ f_o(x_s)
        S = self.covariance @ Jt
        mean = pt.xp.concatenate(means)
        return mean, (Jt * S).sum(axis=0).reshape(mean.shape)

    def predictive_variance(self, X, chunk=64):
        """:math:`\\operatorname{diag}(J_x \\Sigma J_x^\\top)` ``(B*, m)`` (see :meth:`predict`)."""
        return self.predict(X, chunk)[1]
