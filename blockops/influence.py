r"""Exact influence scores :math:`-\nabla\ell_{\text{test}}^\top (H + \lambda I)^{-1}\nabla\ell_i`.

The influence of up-weighting training sample :math:`i` by :math:`\varepsilon`
on a test loss (Cook & Weisberg; Koh & Liang 2017), at a minimum
:math:`\theta^\star` of :math:`L(\theta) + \tfrac\lambda2\lVert\theta\rVert^2`
(:math:`L` the mean training loss, :math:`H` its Hessian), is

.. math::

   \mathcal I(i, \text{test}) = \frac{d L_{\text{test}}}{d\varepsilon}\Big|_0
   = -\nabla\ell_{\text{test}}^\top (H + \lambda I)^{-1} \nabla\ell_i ;

removing sample :math:`i` (:math:`\varepsilon = -1/B`) changes the test loss
by about :math:`-\mathcal I / B`. :func:`influence_scores` returns the whole
``(n_test, n_train)`` matrix from **one** batched exact solve with the
smaller set of gradients (``H`` is symmetric, so either side may be solved)
and the residual certificate of that solve. :func:`per_sample_gradients`
gives the columns :math:`\nabla\ell_i` of a point by one batched reverse sweep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._backprop import forward_caches, per_sample_cotangents, vjp_sweep
from ._checks import check_finite, check_int, check_on_backend, check_vector
from .inverse import InverseHessian, inverse_hessian
from .network import Point

__all__ = ["InfluenceScores", "influence_scores", "per_sample_gradients"]


@dataclass(frozen=True)
class InfluenceScores:
    """Influence scores and the certificate of the solve that produced them.

    Attributes
    ----------
    scores : array ``(n_test, n_train)``
        :math:`-g_{\\text{test}}^\\top (H + \\lambda I)^{-1} g_{\\text{train}}`.
    residuals : array ``(k,)``
        Relative residual :math:`\\lVert (H + \\lambda I) s - g\\rVert / \\lVert g\\rVert`
        of each solved column (``k`` = the size of the solved side).
    solved : str
        ``"test"`` or ``"train"``: the side whose gradients were solved.
    inverse : InverseHessian
        The factorisation (reuse it for more scores).
    """

    scores: Any
    residuals: Any
    solved: str
    inverse: Any

    @property
    def residual(self) -> float:
        """The worst relative residual of the solve."""
        return float(self.residuals.max()) if self.residuals.size else 0.0


def _check_grads(owner: str, name: str, G, n: int, xp):
    if not hasattr(G, "shape") or not hasattr(G, "dtype"):
        raise TypeError(f"{owner}: {name} must be an array (n_params,) or (n_params, k)")
    check_on_backend(owner, name, G, xp)
    check_vector(owner, G, n, name=name)
    if G.dtype.kind not in "fiu":
        raise TypeError(f"{owner}: {name} has dtype {G.dtype}; expected a real dtype")
    check_finite(owner, name, G)
    return G[:, None] if G.ndim == 1 else G


def influence_scores(
    point,
    train_grads,
    test_grads,
    *,
    damping=None,
    kind=None,
    method=None,
    refine=None,
    threads=None,
) -> InfluenceScores:
    r"""Influence scores ``(n_test, n_train)`` from one batched exact solve.

    Parameters
    ----------
    point : Point or InverseHessian
        The pipeline linearised at the trained parameters on the training set
        (then :math:`H + \lambda I` is factored here), or a factorisation to
        reuse (then ``damping``, ``kind``, ``method``, ``refine`` and
        ``threads`` must not be given: they are the operator's).
    train_grads, test_grads : array ``(n_params,)`` or ``(n_params, k)``
        Gradients as columns (e.g. :func:`per_sample_gradients`); never
        modified.
    damping : float or sequence of float
        :math:`\lambda` (weight decay), or one value per layer; default 0.
    kind : {"hessian", "ggn"}
        Invert the Hessian (default) or the Gauss-Newton matrix.
    method, refine, threads
        As :func:`~blockops.inverse.inverse_hessian` (its defaults when not given).

    Returns
    -------
    InfluenceScores
        ``scores`` :math:`= -G_{\text{test}}^\top (H + \lambda I)^{-1}
        G_{\text{train}}`, and the residuals of the solve of the smaller side.
    """
    owner = "influence_scores"
    options = {"damping": damping, "kind": kind, "method": method, "refine": refine}
    options = {k: v for k, v in {**options, "threads": threads}.items() if v is not None}
    if isinstance(point, InverseHessian):
        if options:
            bad = list(options)
            raise ValueError(
                f"{owner}: {', '.join(bad)} given with a factorisation; they are the "
                "operator's own: pass the Point instead to factor with them"
            )
        Hinv = point
    elif isinstance(point, Point):
        Hinv = inverse_hessian(point, **options)
    else:
        raise TypeError(
            f"{owner}: point is a {type(point).__name__}; expected a Point or an InverseHessian"
        )
    n, xp = Hinv.shape[0], Hinv.point.xp
    train = _check_grads(owner, "train_grads", train_grads, n, xp)
    test = _check_grads(owner, "test_grads", test_grads, n, xp)
    solve_test = test.shape[1] <= train.shape[1]
    rhs = test if solve_test else train
    S = Hinv @ rhs
    if Hinv.check:  # the solve certified itself (one residual per column)
        residuals = xp.atleast_1d(xp.asarray(Hinv.info["residual"]))
    else:
        residuals = Hinv.residual(rhs, S)
    scores = -(S.T @ train) if solve_test else -(test.T @ S)
    return InfluenceScores(scores, residuals, "test" if solve_test else "train", Hinv)


def per_sample_gradients(point, chunk=64):
    r"""Per-sample loss gradients as columns, ``(n_params, B)``.

    Column :math:`i` is :math:`\nabla_\theta\, s\,\ell(f(x_i), y_i)`, the
    gradient of the pipeline's loss on sample :math:`i` alone (``s`` the
    loss's ``scale``); the columns average to ``point.gradient``. One reverse
    sweep with one-hot cotangents per ``chunk`` samples (each chunk is
    re-evaluated forward on its own, so the cost is linear in ``B``).
    """
    if not isinstance(point, Point):
        raise TypeError(
            f"per_sample_gradients: point is a {type(point).__name__}; expected a Point"
        )
    chunk = check_int("per_sample_gradients", "chunk", chunk, 1)
    xp, layers = point.xp, point.layers
    cols = []
    for i in range(0, point.batch_size, chunk):
        if chunk >= point.batch_size:  # the point's own forward pass is this chunk's
            caches = point.caches
        else:
            X, y = point.X[i : i + chunk], point.y[i : i + chunk]
            caches = forward_caches(layers, point.xs, X, y)
        c = caches[0].z_prev.shape[0]
        # the loss row of sample s is s·ℓ_s / c: the cotangent c·e_s picks s·ℓ_s
        b = per_sample_cotangents(xp, c, 1, point.dtype, weight=c)
        cols.append(vjp_sweep(layers, caches, point.pipeline.offsets, b, point.n_params))
    return xp.concatenate(cols).T
