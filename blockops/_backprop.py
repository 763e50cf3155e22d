r"""Forward passes on new inputs and batched reverse sweeps, for the Laplace and influence rooms.

Two pieces, both written against the :class:`~blockops.network.Layer`
contract only:

* :func:`forward_caches`: the caches of a pipeline's layers at parameters
  ``xs`` for inputs ``X`` (a loss layer needs targets), without a backward
  pass: what the network outputs and Jacobians at test inputs need.
* :func:`vjp_sweep`: ``Σ_l b_l ∇_x f_l`` for ``k`` cotangents at the output of
  the last given layer, back-propagated by the layers' ``vjp``
  (``b_{l-1} = b_l ∇_z f_l``): one Jacobian-transpose product per direction,
  all ``k`` directions at once. With the network output ``f = z_{L-1}`` and
  ``J = ∂ vec(f)/∂x``, sweeping from the last hidden layer gives ``Jᵀ U``.

:func:`per_sample_cotangents` builds the one-hot cotangents that turn the
batch-summed products into per-sample ones: direction ``(s, o)`` is
``e_s ⊗ e_o``, so row ``s·m + o`` of the result is ``∇_x f_{s,o}``.
"""

from __future__ import annotations

from ._checks import check_dtype, check_finite, check_on_backend
from .backend import get_array_module

__all__ = ["check_inputs", "forward_caches", "per_sample_cotangents", "vjp_sweep"]


def check_inputs(owner: str, point, X):
    """``X`` as a ``(B, n_0)`` array of the point's backend and dtype (a copy, never a view)."""
    xp = point.xp
    if not hasattr(X, "shape"):
        X = xp.asarray(X)
    check_on_backend(owner, "X", X, xp)
    check_dtype(owner, "inputs X", X)
    n0 = point.pipeline.n_in
    if X.ndim != 2 or X.shape[1] != n0 or X.shape[0] < 1:
        raise ValueError(
            f"{owner}: inputs X have shape {tuple(X.shape)}; expected (B, {n0}), B >= 1 "
            "(one row per input, as the pipeline was linearised with)"
        )
    check_finite(owner, "inputs X", X)
    return X.astype(point.dtype, copy=True)


def forward_caches(layers, xs, X, y=None) -> list:
    """Caches of ``layers`` (consecutive, from the first) at parameters ``xs`` and inputs ``X``."""
    caches, z = [], X
    for ly, xl in zip(layers, xs):
        c = ly.forward(z, xl, y if ly.is_loss else None)
        caches.append(c)
        z = c.z
    return caches


def vjp_sweep(layers, caches, offsets, b, n_params: int):
    """``(k, n_params)``: ``Σ_l b_l ∇_x f_l``, ``b`` ``(k, B, n_out)`` at the last layer's output.

    ``offsets[l]`` is where layer ``l``'s parameters start in the flat
    vector; rows of parameters outside ``layers`` stay zero.
    """
    xp = get_array_module(b)
    out = xp.zeros((b.shape[0], n_params), dtype=b.dtype)
    for l in range(len(layers) - 1, -1, -1):
        b, bx = layers[l].vjp(caches[l], b)
        if layers[l].n_params:
            out[:, offsets[l] : offsets[l + 1]] = bx
    return out


def per_sample_cotangents(xp, B: int, m: int, dtype, weight=1.0):
    """``(B m, B, m)`` one-hot cotangents: direction ``s·m + o`` is ``weight · e_s ⊗ e_o``."""
    return (weight * xp.eye(B * m, dtype=dtype)).reshape(B * m, B, m)
