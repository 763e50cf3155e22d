r"""The layer interface: one stage ``z_l = f_l(z_{l-1}; x_l)`` of a pipeline.

Shapes and conventions
----------------------
(The package-wide conventions are in the docs: architecture, "Conventions".)

* A batch of ``B`` samples is stacked in the activations: ``z_prev`` has shape
  ``(B, n_in)`` and ``z = f(z_prev; x)`` has shape ``(B, n_out)``. Flat
  vectors are sample-major (``z.ravel()``).
* The parameters ``x`` of a layer are one flat vector of length ``n_params``
  shared by all samples. Each layer documents its layout.
* Every layer acts on each sample separately with shared parameters, so
  ``∇_z f`` is block-diagonal over samples and is stored ``(B, n_out, n_in)``.
* A loss is the last layer: it has ``n_out == 1`` and row ``s`` of its output
  is sample ``s``'s contribution to the scalar loss (``ℓ(z_s, y_s) / B`` for a
  mean). The scalar ``z_L`` is the sum of that column, so ``b_L = 1`` for every
  row, and all per-sample structure below carries over to losses unchanged.
* **Directions** carry a leading axis of size ``k`` (how many directions are
  pushed at once): ``dz_prev`` is ``(k, B, n_in)``, ``dx`` is ``(k, n_params)``,
  ``dz`` is ``(k, B, n_out)``. ``k = 1`` for a single vector.
* ``b`` (the back-propagated row ``b_l = ∂z_L/∂z_l`` of eq. 2) has the shape of
  ``z``: ``(B, n_out)``.

The second-order pieces of eq. 24 for layer ``l``, all at ``(z_{l-1}, x_l)``:

* ``K_l`` is the Hessian of the scalar ``Σ_{s,i} b_{s,i} f_{s,i}(z_{l-1}; x_l)``
  with respect to ``(z_{l-1}, x_l)``; its blocks are ``K_zz = DM Dzz``,
  ``K_zx = DM Dxz``, ``K_xz = DD Dzx``, ``K_xx = DD Dxx`` of the paper.
* ``djac_x(dz_prev, dx)`` is the directional derivative of the Jacobian
  ``∇_x f`` (as a ``(B, n_out, n_params)`` array) along ``(dz_prev, dx)``:
  ``Dzx dz_prev + Dxx dx`` of eq. 12 before ``vec``. ``djac_z`` likewise for
  ``∇_z f`` (``(B, n_out, n_in)``, eq. 22). Their adjoints map such arrays back.
  Contracting ``djac_x`` with ``b`` over ``(s, i)`` gives ``K_xz dz + K_xx dx``.

The contract
------------
Every hook the rest of blockops calls is declared on :class:`Layer` below,
with a generic default where one exists. A new layer type implements
``forward``, ``jvp``, ``vjp`` and ``hvp`` and gets everything else: the
explicit blocks (``jacobian_z``, ``jacobian_x``, ``hessian_blocks``) fall back
to ``n_in + n_params`` directions of those actions, the fused HVP to
``jvp`` + ``hvp`` + ``vjp``, the exact inverse to a generic stage built from
the explicit blocks. ``djac_*`` are needed only for the literal eq. 24 form.

A layer may register fast paths beside itself (see ``docs/adding_a_layer``):

* ``jvp_keep`` / ``hvp_vjp``: the fused HVP's per-layer steps;
* ``stack_key`` / ``stacked_sweep``: consecutive layers with one key are
  swept together by the fused HVP (the dense layer's stacked runs);
* ``stage_key`` / ``structured_stages``: consecutive layers with one key form
  structured stages of the exact inverse (the dense layer's low-rank stage),
  objects following :class:`InverseStage`.

No module outside :mod:`blockops.network` names a concrete layer class or
reads a cache's ``extra``: what a fast path needs from a cache, its layer
reads.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..backend import get_array_module

__all__ = ["Cache", "InverseStage", "Layer", "fused_steps"]


def _cast(a, dtype):
    if isinstance(a, Cache):
        return a.astype(dtype)
    return a.astype(dtype) if hasattr(a, "dtype") and a.dtype.kind == "f" else a


@dataclass
class Cache:
    """What a layer's forward pass keeps for its derivatives.

    ``z_prev`` and ``x`` are the inputs, ``z`` the output; ``extra`` holds
    layer-specific intermediates (e.g. a dense layer's ``W``, pre-activation
    ``pre``, ``d1 = act'(pre)``, ``d2 = act''(pre)``). Caches are read-only.
    """

    z_prev: Any
    x: Any
    z: Any
    extra: dict = field(default_factory=dict)

    def astype(self, dtype) -> Cache:
        """A copy with every floating array (nested caches included) cast to ``dtype``."""
        return Cache(
            _cast(self.z_prev, dtype),
            _cast(self.x, dtype),
            _cast(self.z, dtype),
            {k: _cast(v, dtype) for k, v in self.extra.items()},
        )


class InverseStage(Protocol):
    """One stage of the stagewise sweep of the exact inverse (``blockops.inverse``).

    A stage covers ``nlayers`` consecutive layers with ``p`` parameters in
    all; its state ``s`` is ``dz`` at its input (``n_in`` rows) and its value
    matrix ``V`` lives on ``dz`` at its output (``n_out`` rows).

    ``factor(V)``
        One backward Riccati step: store the pivots, return ``V`` at the
        input (``V = None`` means zero, at the top of the sweep).
    ``backward(v, g)``
        Linear-term step for right-hand sides ``g`` (``(p, k)``): returns
        ``(v_in, ctx)``.
    ``forward(s, ctx)``
        Returns ``(u, s_out)``: the solution's ``(p, k)`` rows and the state
        at the output (``s = None`` means zero).
    ``inertia``, ``logdet``
        Of the stage pivots (Haynsworth: they add up over stages).
    """

    p: int
    nlayers: int

    def factor(self, V): ...

    def backward(self, v, g): ...

    def forward(self, s, ctx): ...

    @property
    def inertia(self) -> tuple: ...

    @property
    def logdet(self) -> float: ...


class Layer:
    """One stage ``z = f(z_prev; x)`` of a layered pipeline (abstract).

    Attributes
    ----------
    n_in, n_out, n_params : int
        Features per sample in and out, and the length of ``x``.
    name : str
        Human-readable name used in error messages (set by the pipeline to
        e.g. ``"layer 3 (Dense 16->16, tanh)"``).
    is_loss : bool
        True for the scalar last layer.
    """

    n_in: int
    n_out: int
    n_params: int
    is_loss: bool = False
    name: str = "layer"

    # -- set-up --------------------------------------------------------------
    def init_params(self, rng: np.random.Generator, dtype=np.float64) -> np.ndarray:
        """A random parameter vector (NumPy; the pipeline moves it to a backend)."""
        return np.zeros(self.n_params, dtype=dtype)

    def describe(self) -> str:
        """Short description, e.g. ``"Dense 16->16, tanh"``."""
        return f"{type(self).__name__} {self.n_in}->{self.n_out}"

    # -- zeroth and first order ------------------------------------------------
    def forward(self, z_prev, x, targets=None) -> Cache:
        """Evaluate ``z = f(z_prev; x)`` for a ``(B, n_in)`` batch; return the cache."""
        raise NotImplementedError

    def jvp(self, cache: Cache, dz_prev, dx):
        """``dz = ∇_z f dz_prev + ∇_x f dx`` (eq. 53), shapes ``(k, B, ·)``, ``(k, p)``.

        Either argument may be ``None`` (zero).
        """
        raise NotImplementedError

    def vjp(self, cache: Cache, b):
        """``(b ∇_z f, b ∇_x f)`` for ``b`` of shape ``(k, B, n_out)``.

        Returns ``(bz, bx)`` of shapes ``(k, B, n_in)`` and ``(k, n_params)``
        (eqs. 4-5).
        """
        raise NotImplementedError

    # -- second order, contracted with b ---------------------------------------
    def hvp(self, cache: Cache, b, dz_prev, dx):
        """``K [dz_prev; dx]`` with ``K`` the Hessian of ``Σ b·f`` in ``(z_prev, x)``.

        ``b`` is ``(B, n_out)`` (one weighting for all directions); ``dz_prev``
        ``(k, B, n_in)`` and ``dx`` ``(k, n_params)`` (either may be ``None``).
        Returns ``(hz, hx)`` with ``hz = K_zz dz + K_zx dx`` of shape
        ``(k, B, n_in)`` and ``hx = K_xz dz + K_xx dx`` of shape
        ``(k, n_params)``.
        """
        raise NotImplementedError

    # -- explicit blocks (generic fallbacks; structured layers override) -------
    def jacobian_z(self, cache: Cache):
        """``∇_z f`` per sample, shape ``(B, n_out, n_in)``."""
        xp = get_array_module(cache.z_prev)
        B = cache.z_prev.shape[0]
        eye = xp.eye(self.n_in, dtype=cache.z_prev.dtype)
        dz = xp.broadcast_to(eye[:, None, :], (self.n_in, B, self.n_in))
        out = self.jvp(cache, dz, None)  # (n_in, B, n_out)
        return xp.ascontiguousarray(xp.transpose(out, (1, 2, 0)))

    def jacobian_x(self, cache: Cache):
        """``∇_x f`` per sample, shape ``(B, n_out, n_params)``."""
        xp = get_array_module(cache.z_prev)
        eye = xp.eye(self.n_params, dtype=cache.z_prev.dtype)
        out = self.jvp(cache, None, eye)  # (p, B, n_out)
        return xp.ascontiguousarray(xp.transpose(out, (1, 2, 0)))

    def hessian_blocks(self, cache: Cache, b):
        """Explicit ``(K_zz, K_xz, K_xx)`` for weighting ``b`` of shape ``(B, n_out)``.

        Shapes ``(B, n_in, n_in)`` (block-diagonal over samples),
        ``(n_params, B, n_in)`` and ``(n_params, n_params)``; ``K_zx`` is the
        transpose of ``K_xz``.
        """
        xp = get_array_module(cache.z_prev)
        B, n, p = cache.z_prev.shape[0], self.n_in, self.n_params
        dt = cache.z_prev.dtype
        eye_n = xp.eye(n, dtype=dt)
        dz = xp.broadcast_to(eye_n[:, None, :], (n, B, n))
        hz, _ = self.hvp(cache, b, dz, None)  # hz[j, s, :] = K_zz[s, :, j]
        Kzz = xp.ascontiguousarray(xp.transpose(hz, (1, 2, 0)))
        hz_x, hx = self.hvp(cache, b, None, xp.eye(p, dtype=dt))  # directions over x
        Kxx = hx.T.copy()
        Kxz = xp.ascontiguousarray(hz_x)  # hz_x[j, s, :] = K_zx[s, :, j] = K_xz[j, s, :]
        return Kzz, Kxz, Kxx

    # -- un-contracted second derivatives (literal eq. 24) ---------------------
    def djac_x(self, cache: Cache, dz_prev, dx):
        """Directional derivative of ``∇_x f``: ``(k, B, n_out, n_params)`` (eq. 12)."""
        raise NotImplementedError(f"{type(self).__name__} has no djac_x (literal eq. 24 form)")

    def djac_x_T(self, cache: Cache, T):
        """Adjoint of :meth:`djac_x`: ``T (k, B, n_out, p) -> (dz_prev, dx)``."""
        raise NotImplementedError(f"{type(self).__name__} has no djac_x_T (literal eq. 24 form)")

    def djac_z(self, cache: Cache, dz_prev, dx):
        """Directional derivative of ``∇_z f``: ``(k, B, n_out, n_in)`` (eq. 22)."""
        raise NotImplementedError(f"{type(self).__name__} has no djac_z (literal eq. 24 form)")

    def djac_z_T(self, cache: Cache, T):
        """Adjoint of :meth:`djac_z`: ``T (k, B, n_out, n_in) -> (dz_prev, dx)``."""
        raise NotImplementedError(f"{type(self).__name__} has no djac_z_T (literal eq. 24 form)")

    # -- the fused HVP's per-layer steps (generic defaults) -----------------------
    def jvp_keep(self, cache: Cache, dz_prev, dx):
        """``jvp`` without input checks, plus what :meth:`hvp_vjp` may reuse.

        Returns ``(dz, keep)``; the default keeps nothing (``keep = None``).
        """
        return self.jvp(cache, dz_prev, dx), None

    def hvp_vjp(self, cache: Cache, b, dz_prev, dx, bprime=None, keep=None, out=None):
        """``hvp(b, dz_prev, dx) + vjp(bprime)`` in one step: ``(hz + bz, hx + bx)``.

        ``bprime`` (``(k, B, n_out)``) may be ``None`` (zero); ``keep`` is what
        :meth:`jvp_keep` returned; a layer may write ``hx`` into ``out``
        (``(k, n_params)``) and return it. The default calls :meth:`hvp` and
        :meth:`vjp`.
        """
        hz, hx = self.hvp(cache, b, dz_prev, dx)
        if bprime is None:
            return hz, hx
        bz, bx = self.vjp(cache, bprime)
        if self.n_params:
            hx = hx + bx
        return hz + bz, hx

    # -- registered fast paths (none by default) ------------------------------------
    def stack_key(self) -> Hashable | None:
        """Key under which consecutive layers are swept together by the fused HVP.

        ``None`` (the default): per-layer steps. Layers ``l0 .. l1-1`` with one
        non-``None`` key (and not the loss) are handed to ``stacked_sweep``.
        """
        return None

    @classmethod
    def stacked_sweep(cls, caches, bs, cols):
        """The stacked sweep of layers returning one :meth:`stack_key`.

        Returns an object with ``forward(g_in, V) -> (g_out, state)`` and
        ``backward(state, bprime, out, second_order=True) -> b'_in`` (see
        :mod:`blockops.network.dense_sweep`); ``cols`` is the slice of the
        run's parameters in the flat vector.
        """
        raise TypeError(f"{cls.__name__} returns a stack_key but defines no stacked_sweep")

    def stage_key(self) -> Hashable | None:
        """Key under which consecutive layers form structured stages of the exact inverse.

        ``None`` (the default): a generic stage from the explicit blocks.
        """
        return None

    @classmethod
    def structured_stages(cls, layers, caches, bs, damping, first_index) -> list:
        """:class:`InverseStage` objects for consecutive layers returning one :meth:`stage_key`."""
        raise TypeError(f"{cls.__name__} returns a stage_key but defines no structured_stages")


@functools.cache
def _fusable(cls) -> tuple[bool, bool]:
    def owner(name):
        return next(k for k in cls.__mro__ if name in vars(k))

    def fusable(fused, *parts):
        f = owner(fused)
        return all(issubclass(f, owner(p)) for p in parts)

    return fusable("jvp_keep", "jvp"), fusable("hvp_vjp", "hvp", "vjp")


def fused_steps(layer: Layer):
    """``(jvp_keep, hvp_vjp)`` of ``layer`` as the fused HVP may call them.

    A layer's own fused steps stand in for ``jvp`` / ``hvp`` + ``vjp`` only
    when they are defined at least as far down the class tree as the methods
    they fuse: a subclass that overrides ``hvp`` but inherits ``hvp_vjp``
    keeps its own ``hvp`` through the generic defaults.
    """
    keep_ok, step_ok = _fusable(type(layer))
    jvp_keep = layer.jvp_keep if keep_ok else functools.partial(Layer.jvp_keep, layer)
    hvp_vjp = layer.hvp_vjp if step_ok else functools.partial(Layer.hvp_vjp, layer)
    return jvp_keep, hvp_vjp
