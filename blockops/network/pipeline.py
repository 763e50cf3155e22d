r"""A layered pipeline ``z_l = f_l(z_{l-1}; x_l)``, ``l = 1..L``, ending in a scalar loss.

The gradient is backprop written as the back-substitution of eq. 7,
``b M = e_L``: ``M`` is block lower-bidiagonal with identity diagonal and
``-∇_z f_{l+1}`` at block ``(l+1, l)``, so ``b = e_L M⁻¹`` (i.e.
``Mᵀ bᵀ = e_Lᵀ``, solved from the last block up), and then
``∂z_L/∂x_l = b_l ∇_x f_l`` (eqs. 2, 6). Two implementations:

``method="vjp"`` (default)
    The same back substitution done matrix-free, one layer VJP per step
    (``b_{l-1} = b_l ∇_z f_l``); no Jacobian is formed.
``method="bidiagonal"``
    Eq. 7 literally: the explicit blocks ``∇_z f_l`` (``(B, a_l, a_{l-1})``
    each) are put into :class:`blockops.operators.BlockBidiagonal` and its
    inverse applies ``M⁻ᵀ e_L``.

Measured (width 16, batch 32, depth 256 dense tanh + MSE, float64, one BLAS
thread, on a 2-core CPU shared with other jobs, so +-50 %;
``benchmarks/bench_gradient.py``): ``jax.jit(jax.grad)`` 20.5 ms,
``"vjp"`` 14.2 ms (0.69x JAX), ``"bidiagonal"`` 41.3 ms (2.0x JAX); over
several runs the VJP path was 0.6-1.1x JAX and the bidiagonal path 2-2.9x.
``"vjp"`` is the default: it never forms the ``(B, a, a)`` Jacobian blocks.
Both agree with JAX to 3e-16.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .._checks import FLOAT_DTYPES, check_dtype, check_finite, check_same_backend, result_dtype
from ..backend import as_backend, backend_name, get_array_module, xp_for
from .layer import Layer
from .losses import Loss

__all__ = ["METHODS", "Pipeline", "Point"]

METHODS = ("vjp", "bidiagonal")
DEFAULT_METHOD = "vjp"


@dataclass(frozen=True, eq=False)
class Point:
    """A pipeline linearised at ``(params, X, y)``: forward and backward pass results.

    The protocol the Hessian and inverse rooms read: the attributes below,
    :meth:`jacobians_z` / :meth:`jacobians_x` (built once), :meth:`astype`,
    :meth:`gauss_newton` and :attr:`memo`, a public cache in which those
    rooms keep what they derive from the point once (stacked sweeps, sizes).
    A point holds private copies of the caller's arrays and never changes.

    Attributes
    ----------
    pipeline : Pipeline
    params : array ``(n_params,)``
        A private copy of the parameters (the caches hold views of it).
    xs : list of arrays
        Per-layer views ``x_l`` of ``params``.
    X, y
        Inputs ``(B, n_0)`` and targets as passed to the loss (private copies).
    caches : list of Cache
        ``caches[l]`` for layer ``l + 1`` (0-based list, 1-based names).
    zs : list of arrays
        ``z_0 = X, z_1, ..., z_L`` (``z_L`` is ``(B, 1)``: per-sample loss shares).
    bs : list of arrays
        ``b_1, ..., b_L``, ``b_l = ∂z_L/∂z_l`` of shape ``(B, n_out_l)``;
        ``b_L = ones((B, 1))``.
    loss : float
        ``z_L`` summed over the batch.
    gradient : array ``(n_params,)``
    batch_size : int
    dtype : numpy dtype
    backend : str
        ``"numpy"`` or ``"cupy"`` (:attr:`xp` is its array module).
    memo : dict
        Objects derived from the point once and kept (read-only for users).
    """

    pipeline: Any
    params: Any
    xs: list
    X: Any
    y: Any
    caches: list
    zs: list
    bs: list
    loss: float
    gradient: Any
    batch_size: int
    dtype: Any
    backend: str
    memo: dict = field(default_factory=dict, repr=False)

    @property
    def xp(self):
        """The array module of the point's arrays."""
        return xp_for(self.backend)

    @property
    def layers(self) -> list:
        return self.pipeline.layers

    @property
    def n_layers(self) -> int:
        return len(self.caches)

    @property
    def n_params(self) -> int:
        return self.pipeline.n_params

    def jacobians_z(self) -> list:
        """``[∇_z f_l]``, each ``(B, n_out_l, n_in_l)`` (computed once, then kept in memo)."""
        if "jz" not in self.memo:
            self.memo["jz"] = [ly.jacobian_z(c) for ly, c in zip(self.layers, self.caches)]
        return self.memo["jz"]

    def jacobians_x(self) -> list:
        """``[∇_x f_l]``, each ``(B, n_out_l, n_params_l)`` (computed once, then kept in memo)."""
        if "jx" not in self.memo:
            self.memo["jx"] = [ly.jacobian_x(c) for ly, c in zip(self.layers, self.caches)]
        return self.memo["jx"]

    def __getstate__(self):
        """Pickle without :attr:`memo` (derived objects hold array modules; rebuilt on use)."""
        return {**self.__dict__, "memo": {}}

    def __setstate__(self, state):
        for k, v in state.items():
            object.__setattr__(self, k, v)

    def astype(self, dtype) -> Point:
        """The point with every floating array cast to ``dtype`` (itself if already so)."""
        dt = np.dtype(dtype)
        if dt == np.dtype(self.dtype):
            return self
        cast = [c.astype(dt) for c in self.caches]
        return replace(
            self,
            params=self.params.astype(dt),
            xs=[c.x for c in cast],
            X=self.X.astype(dt),
            caches=cast,
            zs=[cast[0].z_prev] + [c.z for c in cast],
            bs=[b.astype(dt) for b in self.bs],
            gradient=self.gradient.astype(dt),
            dtype=dt,
            memo={},
        )

    def gauss_newton(self) -> Point:
        """The point with every hidden weighting ``b_l`` (``l < L``) set to zero.

        Each layer's second-order block ``K_l`` is linear in ``b_l``, so every
        second-order piece of eq. 24 at this point keeps only the loss layer's
        curvature: the Hessian of the result is the generalized Gauss-Newton
        matrix of this point. First-order quantities are unchanged.
        """
        bs = [b * 0 for b in self.bs[:-1]] + [self.bs[-1]]
        return replace(self, bs=bs, memo={})


class Pipeline:
    """A chain of layers ending in a loss: ``z_l = f_l(z_{l-1}; x_l)``.

    Parameters
    ----------
    layers : sequence of Layer
        The stages in order; the last must be a loss (``is_loss``), no other.
        Sizes must chain (``n_out`` of one is ``n_in`` of the next); a loss
        without a size takes it from the previous layer. Each layer's
        ``name`` is set to e.g. ``"layer 3 (Dense 16->16, tanh)"``.

    Notes
    -----
    The flat parameter vector is ``concat(x_1, ..., x_L)`` (``offsets[l]`` is
    where ``x_{l+1}`` starts). Layers are owned by one pipeline: their names
    and a loss's input size are set here.
    """

    def __init__(self, layers):
        layers = list(layers)
        if not layers:
            raise ValueError("Pipeline: no layers given")
        for i, ly in enumerate(layers):
            if not isinstance(ly, Layer):
                raise TypeError(f"Pipeline: item {i + 1} is a {type(ly).__name__}, not a Layer")
        if not layers[-1].is_loss:
            raise ValueError(
                f"Pipeline: the last layer ({layers[-1].describe()}) is not a loss; "
                "end the pipeline with MSELoss(), SoftmaxCrossEntropy() or CustomLoss(...)"
            )
        for i, ly in enumerate(layers[:-1]):
            if ly.is_loss:
                raise ValueError(
                    f"Pipeline: layer {i + 1} ({ly.describe()}) is a loss but not the last layer"
                )
        if len(layers) == 1 and layers[0].n_in is None:
            raise ValueError("Pipeline: a loss alone needs its input size (e.g. MSELoss(n_in=3))")
        for i in range(1, len(layers)):
            prev, ly = layers[i - 1], layers[i]
            if isinstance(ly, Loss) and ly.n_in is None:
                ly.bind(prev.n_out)
            if ly.n_in != prev.n_out:
                raise ValueError(
                    f"Pipeline: sizes do not chain: layer {i} ({prev.describe()}) outputs "
                    f"{prev.n_out} features but layer {i + 1} ({ly.describe()}) takes {ly.n_in}"
                )
        for i, ly in enumerate(layers):
            ly.name = f"layer {i + 1} ({ly.describe()})"
        self.layers = layers
        self.offsets = [0]
        for ly in layers:
            self.offsets.append(self.offsets[-1] + ly.n_params)
        self.n_params = self.offsets[-1]
        self.n_in = layers[0].n_in
        self.sizes = [layers[0].n_in] + [ly.n_out for ly in layers]

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        inner = ", ".join(ly.describe() for ly in self.layers)
        return f"Pipeline([{inner}], n_params={self.n_params})"

    # -- parameters ------------------------------------------------------------
    def split(self, x) -> list:
        """Per-layer views ``[x_1, ..., x_L]`` of a flat ``(n_params,)`` vector."""
        self._check_params_shape(x)
        o = self.offsets
        return [x[o[i] : o[i + 1]] for i in range(len(self.layers))]

    def concat(self, xs) -> Any:
        """Flat vector from per-layer parts (the inverse of :meth:`split`)."""
        xs = list(xs)
        if len(xs) != len(self.layers):
            raise ValueError(f"Pipeline.concat: got {len(xs)} parts; expected {len(self.layers)}")
        for ly, xl in zip(self.layers, xs):
            if tuple(xl.shape) != (ly.n_params,):
                raise ValueError(
                    f"{ly.name}: part has shape {tuple(xl.shape)}; expected ({ly.n_params},)"
                )
        xp = get_array_module(*xs)
        return xp.concatenate([xp.asarray(xl) for xl in xs])

    def init(self, seed: int = 0, dtype=np.float64, backend="numpy"):
        """Seeded random parameters (each layer's fan-in scaled ``init_params``)."""
        dt = np.dtype(dtype)
        if dt not in FLOAT_DTYPES:
            raise TypeError(f"Pipeline.init: dtype {dt} not supported; expected float32 or float64")
        rng = np.random.default_rng(seed)
        x = np.concatenate([np.asarray(ly.init_params(rng, dt), dtype=dt) for ly in self.layers])
        return as_backend(x, backend)

    def spec(self) -> list:
        """A plain description of the layers (for references and serialisation).

        One dict per layer with ``kind`` (class name), ``n_in``, ``n_out``,
        ``n_params``, ``activation`` (name, or ``None`` for losses),
        ``activation_params`` (e.g. leaky ReLU's slope, else ``None``),
        ``scale`` (a loss's factor on every sample's share, else ``None``),
        ``functions`` (the user callables of a custom activation or
        ``CustomLoss``, else ``None``) and ``h`` (residual step, else ``None``).
        """
        out = []
        for ly in self.layers:
            act = getattr(ly, "act", None)
            funcs = (
                getattr(ly, "functions", None) if ly.is_loss else getattr(act, "functions", None)
            )
            out.append(
                {
                    "kind": type(ly).__name__,
                    "n_in": ly.n_in,
                    "n_out": ly.n_out,
                    "n_params": ly.n_params,
                    "activation": None if act is None else act.name,
                    "activation_params": None if act is None else act.params,
                    "functions": funcs,
                    "h": getattr(ly, "h", None),
                    "scale": getattr(ly, "scale", None) if ly.is_loss else None,
                }
            )
        return out

    # -- checks ----------------------------------------------------------------
    def _check_params_shape(self, x) -> None:
        if not hasattr(x, "shape"):
            raise TypeError(
                f"Pipeline: parameters must be a 1-D array (NumPy or CuPy), got "
                f"{type(x).__name__}; e.g. np.asarray(x) or net.init()"
            )
        if getattr(x, "ndim", None) != 1 or x.shape[0] != self.n_params:
            parts = " + ".join(f"{ly.n_params} ({ly.name})" for ly in self.layers if ly.n_params)
            raise ValueError(
                f"Pipeline: parameter vector has shape {tuple(getattr(x, 'shape', ()))}; "
                f"expected ({self.n_params},) = {parts}"
            )

    def _check(self, x, X, y):
        """Validate and cast ``(x, X, y)``; returns them with the array module and dtype."""
        xp = check_same_backend("Pipeline", x=x, X=X)
        self._check_params_shape(x)
        check_dtype("Pipeline", "parameters x", x)
        first = self.layers[0]
        check_dtype(first.name, "inputs X", X)
        if X.ndim != 2 or X.shape[1] != self.n_in or X.shape[0] < 1:
            raise ValueError(
                f"{first.name}: inputs X have shape {tuple(X.shape)}; "
                f"expected (B, {self.n_in}), B >= 1"
            )
        dt = result_dtype(x.dtype, X.dtype)
        x = x.astype(dt, copy=False)
        X = X.astype(dt, copy=False)
        check_finite(first.name, "inputs X", X)
        if not bool(xp.all(xp.isfinite(x))):
            for ly, xl in zip(self.layers, self.split(x)):
                check_finite(ly.name, "parameters", xl)
        if y is None:
            raise ValueError(f"{self.layers[-1].name}: targets y are required")
        if hasattr(y, "dtype") and hasattr(y, "shape") and y.dtype.kind == "f":
            check_same_backend("Pipeline", x=x, y=y)
            check_finite(self.layers[-1].name, "targets y", y)
        return x, X, y, xp, dt

    # -- passes ------------------------------------------------------------------
    def _forward(self, x, X, y):
        caches = []
        z = X
        for ly, xl in zip(self.layers, self.split(x)):
            c = ly.forward(z, xl, y if ly.is_loss else None)
            caches.append(c)
            z = c.z
        return caches

    def _backward_vjp(self, caches, xp, dt):
        """Back substitution of eq. 7 by layer VJPs: ``b_{l-1} = b_l ∇_z f_l``."""
        L = len(caches)
        B = caches[0].z_prev.shape[0]
        bs = [None] * L
        grads = [None] * L
        b = xp.ones((B, 1), dtype=dt)
        for i in range(L - 1, -1, -1):
            bs[i] = b
            bz, bx = self.layers[i].vjp(caches[i], b[None])
            grads[i] = bx[0]
            b = bz[0]
        return bs, grads

    def _backward_bidiagonal(self, caches, xp, dt):
        """Eq. 7 literally: ``b = e_L M⁻¹`` with ``M`` a :class:`BlockBidiagonal`."""
        from ..operators import BlockBidiagonal

        L = len(caches)
        B = caches[0].z_prev.shape[0]
        sizes = [B * ly.n_out for ly in self.layers]
        eL = xp.zeros(sum(sizes), dtype=dt)
        eL[-sizes[-1] :] = 1.0
        if L == 1:
            b_flat = eL
        else:
            sub = [-self.layers[j + 1].jacobian_z(caches[j + 1]) for j in range(L - 1)]
            b_flat = BlockBidiagonal(sub).inverse().rmatvec(eL)
        bs, grads, o = [], [], 0
        for ly, c, m in zip(self.layers, caches, sizes):
            b = b_flat[o : o + m].reshape(B, ly.n_out)
            o += m
            bs.append(b)
            grads.append(ly.vjp(c, b[None])[1][0])
        return bs, grads

    def _backward(self, caches, xp, dt, method):
        method = DEFAULT_METHOD if method is None else method
        if method == "vjp":
            return self._backward_vjp(caches, xp, dt)
        if method == "bidiagonal":
            return self._backward_bidiagonal(caches, xp, dt)
        raise ValueError(f"Pipeline: unknown gradient method {method!r}; expected one of {METHODS}")

    # -- public evaluation ---------------------------------------------------------
    def forward(self, x, X, y) -> float:
        """The loss ``z_L`` at parameters ``x``, inputs ``X (B, n_0)`` and targets ``y``."""
        x, X, y, _, _ = self._check(x, X, y)
        return float(self._forward(x, X, y)[-1].z.sum())

    def loss(self, x, X, y) -> float:
        """Same as :meth:`forward`."""
        return self.forward(x, X, y)

    def gradient(self, x, X, y, method: str | None = None):
        """``∂z_L/∂x`` (flat, ``(n_params,)``) by backprop (eq. 7).

        ``method``: ``"vjp"`` (default, the faster) or ``"bidiagonal"``.
        """
        x, X, y, xp, dt = self._check(x, X, y)
        caches = self._forward(x, X, y)
        _, grads = self._backward(caches, xp, dt, method)
        return xp.concatenate(grads)

    def linearize(self, x, X, y, method: str | None = None) -> Point:
        """Forward and backward pass at ``(x, X, y)``: a :class:`Point`."""
        x, X, y, xp, dt = self._check(x, X, y)
        params = x.copy()  # caches hold views: isolate them from later caller edits
        X = X.copy()
        y = xp.array(y, copy=True)  # the loss keeps y: a later edit by the caller must not move H
        caches = self._forward(params, X, y)
        bs, grads = self._backward(caches, xp, dt, method)
        return Point(
            pipeline=self,
            params=params,
            xs=self.split(params),
            X=X,
            y=y,
            caches=caches,
            zs=[X] + [c.z for c in caches],
            bs=bs,
            loss=float(caches[-1].z.sum()),
            gradient=xp.concatenate(grads),
            batch_size=X.shape[0],
            dtype=np.dtype(dt),
            backend=backend_name(xp),
        )
