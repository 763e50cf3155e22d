r"""Losses: the last, scalar layer of a pipeline.

A loss ``f_L(z_{L-1}; targets)`` has no parameters (``n_params = 0``) and
``n_out = 1``: row ``s`` of its ``(B, 1)`` output is sample ``s``'s share
``ℓ(z_s, y_s) / B`` of the mean loss, so ``z_L`` is the column sum and
``b_L = 1`` for every row (see :mod:`blockops.network.layer`). Everything is
then per sample: ``∇_z f`` is ``(B, 1, n)`` with rows ``∇ℓ(z_s)/B``, and the
b-weighted ``K_zz[s] = b_s ∇²ℓ(z_s) / B``.

The input size ``n_in`` is taken from the previous layer when the loss is put
in a :class:`~blockops.network.Pipeline` (or given explicitly).

``scale`` (default 1) multiplies every sample's share: row ``s`` is
``scale · ℓ(z_s, y_s) / B``, and so the loss, the gradient, every derivative
and every Hessian block. It maps other conventions exactly: PyTorch's
``nn.MSELoss(reduction="mean")``, the mean of ``(z − y)²`` over all ``B n``
entries, is ``MSELoss(scale=2 / n)``; ``reduction="sum"`` is
``MSELoss(scale=2 B)`` and ``nn.CrossEntropyLoss(reduction="sum")`` is
``SoftmaxCrossEntropy(scale=B)`` (a ``B``-dependent scale fixes the batch
size the loss is meant for). All derivatives go through
``Cache.extra["inv_B"] = scale / B``.

Subclasses implement ``_value`` (per-sample ``ℓ``), ``_grad`` (``∇ℓ``),
``_hv`` (``∇²ℓ v`` for ``v`` of shape ``(k, B, n)``) and optionally
``_hess`` (explicit ``(B, n, n)``), all before the ``scale/B`` factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ._util import array_module as get_array_module
from ._util import check_forward, n_directions
from .layer import Cache, Layer

__all__ = ["CustomLoss", "Loss", "MSELoss", "SoftmaxCrossEntropy"]


def _check_scale(name: str, scale) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name}: scale must be a real number, got {type(scale).__name__}"
        ) from None
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name}: scale must be finite and > 0, got {scale!r}")
    return value


class Loss(Layer):
    """Base class of the scalar last layer (mean over the batch of ``scale · ℓ(z_s, y_s)``).

    Forward: ``dz_L[s] = scale ∇ℓ(z_s) dz_s / B``; adjoint:
    ``b ∇_z f = scale b_s ∇ℓ(z_s) / B``.

    Parameters
    ----------
    n_in : int, optional
        Input size (default: taken from the previous layer in a Pipeline).
    scale : float
        Factor ``> 0`` on every sample's share (default 1; see the module
        docstring for PyTorch's reductions).
    """

    is_loss = True
    n_params = 0
    n_out = 1
    scale = 1.0

    def __init__(self, n_in: int | None = None, scale: float = 1.0):
        self.n_in = None if n_in is None else int(n_in)
        self.name = type(self).__name__
        self.scale = _check_scale(self.name, scale)

    def describe(self) -> str:
        tail = "" if self.scale == 1.0 else f", scale {self.scale:.6g}"
        return f"{type(self).__name__} {self.n_in}->1{tail}"

    def bind(self, n_in: int) -> None:
        """Set the input size (called by the pipeline); a fixed size must match."""
        if self.n_in is not None and self.n_in != n_in:
            raise ValueError(f"{self.name}: built for input size {self.n_in}, got {n_in}")
        self.n_in = int(n_in)

    # -- per-sample pieces (subclasses) ------------------------------------------
    def _prepare(self, z_prev, targets) -> dict:
        raise NotImplementedError

    def _value(self, z_prev, extra):
        raise NotImplementedError

    def _grad(self, z_prev, extra):
        raise NotImplementedError

    def _hv(self, z_prev, extra, v):
        raise NotImplementedError

    def _hess(self, z_prev, extra):
        xp = get_array_module(z_prev)
        B, n = z_prev.shape
        eye = xp.eye(n, dtype=z_prev.dtype)
        cols = self._hv(z_prev, extra, xp.broadcast_to(eye[:, None, :], (n, B, n)))
        return xp.ascontiguousarray(cols.transpose(1, 2, 0))

    # -- the Layer interface -----------------------------------------------------
    def forward(self, z_prev, x, targets=None) -> Cache:
        if self.n_in is None:
            raise ValueError(f"{self.name}: input size unknown; put the loss in a Pipeline")
        check_forward(self, z_prev, x)
        if targets is None:
            raise ValueError(f"{self.name}: targets are required")
        B = z_prev.shape[0]
        extra = self._prepare(z_prev, targets)
        extra["inv_B"] = self.scale / B  # every derivative below goes through this factor
        extra["g"] = self._grad(z_prev, extra) * extra["inv_B"]  # ∇_z f rows, (B, n)
        z = (self._value(z_prev, extra) * extra["inv_B"])[:, None]
        return Cache(z_prev, x, z, extra)

    def jvp(self, cache, dz_prev, dx):
        k = n_directions(self, dz_prev, dx)
        xp = get_array_module(cache.z_prev)
        if dz_prev is None:
            return xp.zeros((k, cache.z_prev.shape[0], 1), dtype=cache.z.dtype)
        return (dz_prev * cache.extra["g"]).sum(axis=2, keepdims=True)

    def vjp(self, cache, b):
        xp = get_array_module(b)
        return b * cache.extra["g"], xp.zeros((b.shape[0], 0), dtype=b.dtype)

    def hvp(self, cache, b, dz_prev, dx):
        k = n_directions(self, dz_prev, dx)
        xp = get_array_module(b)
        z = cache.z_prev
        hx = xp.zeros((k, 0), dtype=z.dtype)
        if dz_prev is None:
            return xp.zeros((k, *z.shape), dtype=z.dtype), hx
        hz = self._hv(z, cache.extra, dz_prev) * (b * cache.extra["inv_B"])
        return hz, hx

    def jacobian_z(self, cache):
        return cache.extra["g"][:, None, :]

    def jacobian_x(self, cache):
        xp = get_array_module(cache.z_prev)
        return xp.zeros((cache.z_prev.shape[0], 1, 0), dtype=cache.z_prev.dtype)

    def hessian_blocks(self, cache, b):
        xp = get_array_module(cache.z_prev)
        z = cache.z_prev
        Kzz = self._hess(z, cache.extra) * (b[:, :, None] * cache.extra["inv_B"])
        Kxz = xp.zeros((0, *z.shape), dtype=z.dtype)
        return Kzz, Kxz, xp.zeros((0, 0), dtype=z.dtype)

    def djac_x(self, cache, dz_prev, dx):
        k = n_directions(self, dz_prev, dx)
        xp = get_array_module(cache.z_prev)
        return xp.zeros((k, cache.z_prev.shape[0], 1, 0), dtype=cache.z_prev.dtype)

    def djac_x_T(self, cache, T):
        xp = get_array_module(T)
        k = T.shape[0]
        return xp.zeros((k, *cache.z_prev.shape), dtype=T.dtype), xp.zeros((k, 0), dtype=T.dtype)

    def djac_z(self, cache, dz_prev, dx):
        k = n_directions(self, dz_prev, dx)
        xp = get_array_module(cache.z_prev)
        z = cache.z_prev
        if dz_prev is None:
            return xp.zeros((k, z.shape[0], 1, z.shape[1]), dtype=z.dtype)
        return (self._hv(z, cache.extra, dz_prev) * cache.extra["inv_B"])[:, :, None, :]

    def djac_z_T(self, cache, T):
        xp = get_array_module(T)
        # ∇²ℓ is symmetric, so the adjoint applies it again
        hz = self._hv(cache.z_prev, cache.extra, T[:, :, 0, :]) * cache.extra["inv_B"]
        return hz, xp.zeros((T.shape[0], 0), dtype=T.dtype)


class MSELoss(Loss):
    r"""Mean squared error ``(scale/B) Σ_s ½ ||z_s − y_s||²`` (``scale = 1`` by default).

    ``targets``: real array ``(B, n)`` (or ``(B,)`` when ``n = 1``).
    ``∇ℓ = z − y``, ``∇²ℓ = I``. ``Cache.extra``: ``y``, ``r = z − y``,
    ``g = scale r / B``.
    """

    def _prepare(self, z_prev, targets):
        xp = get_array_module(z_prev)
        y = xp.asarray(targets)
        if y.ndim == 1 and self.n_in == 1:
            y = y[:, None]
        if tuple(y.shape) != tuple(z_prev.shape):
            raise ValueError(
                f"{self.name}: targets have shape {tuple(y.shape)}; expected {tuple(z_prev.shape)}"
            )
        if y.dtype.kind not in "fiu":
            raise TypeError(f"{self.name}: targets have dtype {y.dtype}; expected a real dtype")
        y = y.astype(z_prev.dtype, copy=False)
        return {"y": y, "r": z_prev - y}

    def _value(self, z_prev, extra):
        r = extra["r"]
        return 0.5 * (r * r).sum(axis=1)

    def _grad(self, z_prev, extra):
        return extra["r"]

    def _hv(self, z_prev, extra, v):
        return v

    def _hess(self, z_prev, extra):
        xp = get_array_module(z_prev)
        B, n = z_prev.shape
        return xp.broadcast_to(xp.eye(n, dtype=z_prev.dtype), (B, n, n)).copy()


class SoftmaxCrossEntropy(Loss):
    r"""Softmax cross-entropy, integer labels: ``(scale/B) Σ_s (logsumexp(z_s) − z_{s,y_s})``.

    ``targets``: integer array ``(B,)`` with values in ``[0, n)``.
    ``∇ℓ = p − e_y``, ``∇²ℓ = diag(p) − p pᵀ`` (``p = softmax(z)``).
    ``Cache.extra``: ``y``, ``p``, ``lse`` (log-sum-exp), ``g``.
    """

    def _prepare(self, z_prev, targets):
        xp = get_array_module(z_prev)
        y = xp.asarray(targets)
        B, n = z_prev.shape
        if y.ndim != 1 or y.shape[0] != B:
            raise ValueError(f"{self.name}: labels have shape {tuple(y.shape)}; expected ({B},)")
        if y.dtype.kind not in "iu":
            raise TypeError(f"{self.name}: labels have dtype {y.dtype}; expected integers")
        if B and (int(y.min()) < 0 or int(y.max()) >= n):
            raise ValueError(
                f"{self.name}: labels out of range [{int(y.min())}, {int(y.max())}]; "
                f"expected integers in [0, {n - 1}]"
            )
        m = z_prev.max(axis=1, keepdims=True)
        ez = xp.exp(z_prev - m)
        se = ez.sum(axis=1, keepdims=True)
        p = ez / se
        lse = (m + xp.log(se))[:, 0]
        return {"y": y, "p": p, "lse": lse}

    def _value(self, z_prev, extra):
        xp = get_array_module(z_prev)
        zy = xp.take_along_axis(z_prev, extra["y"][:, None], axis=1)[:, 0]
        return extra["lse"] - zy

    def _grad(self, z_prev, extra):
        xp = get_array_module(z_prev)
        g = extra["p"].copy()
        g[xp.arange(g.shape[0]), extra["y"]] -= 1.0
        return g

    def _hv(self, z_prev, extra, v):
        p = extra["p"]
        return p * v - p * (p * v).sum(axis=-1, keepdims=True)

    def _hess(self, z_prev, extra):
        xp = get_array_module(z_prev)
        p = extra["p"]
        n = p.shape[1]
        return p[:, :, None] * xp.eye(n, dtype=p.dtype) - p[:, :, None] * p[:, None, :]


class CustomLoss(Loss):
    r"""A user-supplied smooth per-sample loss, averaged over the batch.

    Parameters
    ----------
    loss : callable
        ``loss(z, y) -> (B,)``: ``ℓ(z_s, y_s)`` per sample for ``z`` of shape
        ``(B, n)`` and the targets ``y`` as given.
    grad : callable
        ``grad(z, y) -> (B, n)``: ``∇ℓ(z_s, y_s)`` per sample.
    hvp : callable
        ``hvp(z, y, v) -> (B, n)``: ``∇²ℓ(z_s, y_s) v_s`` per sample for ``v``
        of shape ``(B, n)`` (called once per direction).
    name : str
        Name for descriptions and the spec.
    n_in : int, optional
        Input size (default: taken from the previous layer).

    The callables must be array-generic (``z.__array_namespace__()``) to run on
    every backend and in the JAX reference. ``Cache.extra``: ``y``, ``g``.
    """

    def __init__(
        self,
        loss: Callable,
        grad: Callable,
        hvp: Callable,
        name: str = "CustomLoss",
        n_in: int | None = None,
    ):
        for f, what in ((loss, "loss"), (grad, "grad"), (hvp, "hvp")):
            if not callable(f):
                raise TypeError(f"CustomLoss: {what} must be callable, got {type(f).__name__}")
        super().__init__(n_in)
        self.functions = (loss, grad, hvp)
        self.label = str(name)
        self.name = self.label

    def describe(self) -> str:
        return f"{self.label} {self.n_in}->1"

    def _prepare(self, z_prev, targets):
        return {"y": targets}

    def _call(self, what, f, *args, shape):
        out = f(*args)
        if tuple(out.shape) != shape:
            raise ValueError(
                f"{self.name}: {what} returned shape {tuple(out.shape)}; expected {shape}"
            )
        return out.astype(args[0].dtype, copy=False)

    def _value(self, z_prev, extra):
        return self._call("loss", self.functions[0], z_prev, extra["y"], shape=(z_prev.shape[0],))

    def _grad(self, z_prev, extra):
        return self._call("grad", self.functions[1], z_prev, extra["y"], shape=z_prev.shape)

    def _hv(self, z_prev, extra, v):
        xp = get_array_module(z_prev)
        hv = self.functions[2]
        return xp.stack(
            [
                self._call("hvp", hv, z_prev, extra["y"], v[j], shape=z_prev.shape)
                for j in range(v.shape[0])
            ]
        )
