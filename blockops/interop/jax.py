r"""Per-sample JAX functions as blockops layers and losses.

:class:`FunctionLayer` turns a function ``fn(z_prev, x) -> z`` written for
**one sample** in ``jax.numpy`` into a :class:`~blockops.network.Layer`: JAX
supplies ``forward`` (``vmap`` over the batch), ``jvp``, ``vjp``, the
``b``-contracted Hessian-vector product ``hvp`` (forward-over-reverse) and
the un-contracted ``djac_*`` hooks of the literal eq. 24 form (JVPs and VJPs
of the per-sample Jacobians), each vectorised over the ``k`` directions with
``vmap`` and jit-compiled once per shape (directions go in zero-padded
batches of 1, 4 or 16, so varying ``k`` does not recompile). Everything else (explicit blocks,
fused HVP, Gauss-Newton products, the exact inverse) comes from the
:class:`~blockops.network.Layer` defaults. :class:`JaxLoss` does the same for
a per-sample loss ``loss(z, y) -> scalar``, and :func:`from_jax` chains such
stages (and native layers) into a :class:`~blockops.network.Pipeline`.

Arrays: NumPy in, NumPy out (JAX runs on its default device, normally the
CPU); outputs are fresh writable NumPy arrays of the input's dtype.

Precision (float64)
-------------------
Importing this module does **not** change JAX's global configuration. JAX
computes in 32 bits unless ``jax_enable_x64`` is on, and would silently
round float64 inputs to float32; a FunctionLayer or JaxLoss called with
float64 arrays while the flag is off therefore raises a ``RuntimeError``
that says how to fix it: run

.. code-block:: python

    import jax
    jax.config.update("jax_enable_x64", True)

at start-up (before creating JAX arrays), or use float32 parameters and data
(``net.init(dtype=np.float32)``), which work in either mode. The flag is
read at every call, so turning it on after this import is fine.

Parameter layout
----------------
``params`` may be a flat 1-D array or any pytree of floating arrays (dicts,
lists, tuples, NamedTuples, the array part of an equinox module after
``eqx.partition(model, eqx.is_array)``, a flax ``variables["params"]``
dict). The layer's slice ``x_l`` of the pipeline's flat vector is the
pytree's leaves in ``jax.tree_util.tree_flatten`` order (dict keys sorted),
each raveled row-major and concatenated: exactly the layout of
``jax.flatten_util.ravel_pytree``. ``fn`` receives the parameters in the
structure given (a flat vector stays a flat vector), rebuilt from ``x_l`` by
:meth:`FunctionLayer.unravel`, which keeps the dtype of ``x_l`` (float64 in
a float64 pipeline even for float32 leaves). The initial values are stored
as float64; :meth:`FunctionLayer.init_params` returns them, so
``pipeline.init()`` starts from them.

A per-sample function can only express layers that treat samples
independently with shared parameters (the structure every blockops layer
has): batch statistics (BatchNorm in training mode) or any other mixing
across samples cannot be written this way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..backend import get_array_module
from ..network.layer import Cache, Layer
from ..network.losses import CustomLoss, Loss
from ..network.pipeline import Pipeline

__all__ = [
    "FunctionLayer",
    "JaxLoss",
    "from_jax",
    "initial_params",
    "split_params",
    "x64_enabled",
]


# -- precision and array conversion ------------------------------------------------
def x64_enabled() -> bool:
    """Whether JAX computes in 64 bits (``jax_enable_x64``), read now."""
    return bool(jax.config.jax_enable_x64)


def _check_precision(who: str, dtype) -> None:
    if np.dtype(dtype) == np.float64 and not x64_enabled():
        raise RuntimeError(
            f"{who}: float64 arrays given but JAX runs in 32-bit mode and would round "
            "them to float32; call jax.config.update('jax_enable_x64', True) at start-up "
            "(before creating JAX arrays), or use float32 parameters and data "
            "(e.g. net.init(dtype=np.float32))"
        )


def _check_numpy(who: str, *arrays) -> None:
    for a in arrays:
        if a is not None and get_array_module(a) is not np:
            raise TypeError(
                f"{who}: got a {type(a).__module__}.{type(a).__name__}; the JAX adapter "
                "takes NumPy arrays (run the pipeline on the NumPy backend)"
            )


def _jin(a, dtype):
    """A NumPy (or JAX) array as a JAX array of ``dtype``; ``None`` stays ``None``."""
    return None if a is None else jnp.asarray(a, dtype=dtype)


def _out(a, dtype):
    """A fresh, writable NumPy array of ``dtype`` (JAX's NumPy views are read-only)."""
    return np.array(a, dtype=dtype)


def _label(fn, name, default: str) -> str:
    if name is not None:
        return str(name)
    label = getattr(fn, "__name__", default)
    return default if label == "<lambda>" else label


# -- pytree parameters -------------------------------------------------------------
class _Layout:
    """Flat <-> pytree map with the leaf order and layout of ``ravel_pytree``.

    Unlike ``ravel_pytree``'s own ``unravel``, :meth:`unravel` keeps the dtype
    of the flat vector (a float64 pipeline may carry float32 leaves) and works
    on NumPy arrays, JAX arrays and tracers alike.
    """

    def __init__(self, who: str, params):
        leaves, self.treedef = jax.tree_util.tree_flatten(params)
        arrays = []
        for i, leaf in enumerate(leaves):
            try:
                a = np.asarray(leaf)
            except Exception as e:  # e.g. a tracer or an object without an array form
                raise TypeError(f"{who}: parameter leaf {i} ({type(leaf).__name__}): {e}") from e
            if a.dtype.kind != "f":
                raise TypeError(
                    f"{who}: parameter leaf {i} has dtype {a.dtype} ({type(leaf).__name__}); "
                    "every leaf must be a floating array. Pass only the trainable arrays, "
                    "e.g. params, static = eqx.partition(model, eqx.is_array)"
                )
            arrays.append(a)
        self.shapes = [a.shape for a in arrays]
        self.sizes = [int(a.size) for a in arrays]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)]).astype(int)
        self.size = int(self.offsets[-1])
        self.flat = (
            np.concatenate([a.ravel().astype(np.float64) for a in arrays])
            if arrays
            else np.zeros(0)
        )

    def unravel(self, v):
        o = self.offsets
        parts = [v[o[i] : o[i + 1]].reshape(s) for i, s in enumerate(self.shapes)]
        return jax.tree_util.tree_unflatten(self.treedef, parts)

    def ravel(self, tree) -> np.ndarray:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        if treedef != self.treedef:
            raise ValueError(f"ravel: pytree structure {treedef} differs from {self.treedef}")
        arrays = [np.asarray(a) for a in leaves]
        for a, s in zip(arrays, self.shapes):
            if a.shape != s:
                raise ValueError(f"ravel: a leaf has shape {a.shape}; expected {s}")
        if not arrays:
            return np.zeros(0)
        return np.concatenate([a.ravel() for a in arrays])


# -- the batched JAX transformations (traced inside jit) ----------------------------
def _lin_apply(g, Z, x, dZ, dx):
    """``vmap`` over ``k`` of the JVP of ``g(Z, x)`` along ``(dZ[j], dx[j])``."""
    return jax.vmap(lambda a, b: jax.jvp(g, (Z, x), (a, b))[1])(dZ, dx)


def _adj_apply(g, Z, x, T):
    """``vmap`` over ``k`` of the VJP of ``g(Z, x)`` with cotangents ``T[j]``: ``(tZ, tx)``."""
    _, pull = jax.vjp(g, Z, x)
    return jax.vmap(pull)(T)


def _bucket(k: int) -> int:
    """The smallest power of four ``>= k``: the batch sizes compiled for."""
    size = 1
    while size < k:
        size *= 4
    return size


def _in_batches(f, head, dirs, dtype, max_batch) -> list:
    """``f(*head, *dirs)`` for directions ``dirs`` (leading axis ``k``), as NumPy arrays.

    The ``k`` directions go in batches of a power of four (at most
    ``max_batch``; the last batch zero-padded), so a compiled ``f`` is reused
    for every ``k`` up to the same size: at most three compilations (batches
    of 1, 4 and 16) per function and dtype with the default ``max_batch = 16``.
    """
    head = [a if isinstance(a, jax.Array) else np.asarray(a, dtype=dtype) for a in head]
    k = dirs[0].shape[0]
    size = min(int(max_batch), _bucket(k))
    chunks = []
    for s in range(0, k, size):
        part = [np.asarray(d[s : s + size], dtype=dtype) for d in dirs]
        m = part[0].shape[0]
        if m < size:
            part = [np.concatenate([a, np.zeros((size - m, *a.shape[1:]), dtype)]) for a in part]
        res = f(*head, *part)
        chunks.append([np.asarray(r)[:m] for r in (res if isinstance(res, tuple) else (res,))])
    if len(chunks) == 1:
        return [np.array(r) for r in chunks[0]]  # writable copies
    return [np.concatenate(rs) for rs in zip(*chunks)]


class FunctionLayer(Layer):
    r"""A layer ``z_s = fn(z_prev_s, params)`` from a per-sample JAX function.

    Parameters
    ----------
    fn : callable
        ``fn(z_prev, params) -> z`` for **one** sample, in ``jax.numpy``:
        ``z_prev`` of shape ``(n_in,)``, ``params`` in the structure of the
        ``params`` argument (a flat ``(p,)`` vector if that is what was
        given), returning shape ``(n_out,)``. It must be traceable by
        ``jax.jit`` / ``vmap`` / ``jvp`` / ``grad`` (no Python control flow
        on values) and twice differentiable where it is evaluated.
    n_in, n_out : int
        Features per sample in and out.
    params : array or pytree
        The initial parameters: a flat 1-D array or a pytree of floating
        arrays (``None`` or an empty pytree: no parameters). The flat layout
        is that of ``jax.flatten_util.ravel_pytree`` (see the module
        docstring); :meth:`unravel` / :meth:`ravel` map between the two.
    name : str, optional
        Label for descriptions (default: ``fn.__name__``, or
        ``"FunctionLayer"`` for a lambda).

    Notes
    -----
    Derivatives, with ``F(Z, x) = vmap(fn)(Z, x)`` the batched layer:
    ``jvp`` is ``jax.jvp`` of ``F``; ``vjp`` is ``jax.vjp``; ``hvp_vjp`` is
    the JVP of ``grad Σ b ⊙ F`` in ``(Z, x)`` (forward-over-reverse), i.e.
    ``K [dz_prev; dx]``, plus the VJP of ``bprime`` in the same compiled
    program (``hvp`` is it with ``bprime = 0``); ``djac_x`` / ``djac_z`` are
    JVPs of the per-sample Jacobians (``vmap`` of ``jacfwd`` or ``jacrev`` of
    ``fn``, whichever is narrower) and their adjoints VJPs of the same, so
    the literal (eq. 24) and lifted (eq. 26) forms work too. A direction
    given as ``None`` is passed as zeros (one program per hook).

    Every hook is ``vmap``-ed over the ``k`` directions and wrapped in one
    ``jax.jit`` per layer instance (created on first use), whose cache
    compiles once per shapes and dtype and then reuses the executable. The
    directions go in zero-padded batches of a power of four up to
    :attr:`max_batch` (default 16; larger ``k`` loop over batches of that
    size), so a hook compiles at most three times per dtype however many
    different ``k`` the Hessian forms ask for. The explicit blocks and the
    inverse stage are the :class:`~blockops.network.Layer` defaults. Caches
    hold no JAX state (``Cache.extra`` is empty), so ``precision="mixed"``
    re-runs the same functions in float32 (one more compilation each).
    """

    #: Most directions per compiled call: ``k`` is padded with zeros to the next
    #: power of four up to this, and larger ``k`` go in batches of this size
    #: (lower it to bound memory for wide layers).
    max_batch: int = 16

    def __init__(self, fn: Callable, n_in: int, n_out: int, params=None, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"FunctionLayer: fn must be callable, got {type(fn).__name__}")
        for what, v in (("n_in", n_in), ("n_out", n_out)):
            if int(v) != v or int(v) < 1:
                raise ValueError(f"FunctionLayer: {what} must be a positive integer, got {v!r}")
        self.fn = fn
        self.n_in, self.n_out = int(n_in), int(n_out)
        self.label = _label(fn, name, "FunctionLayer")
        self.name = self.describe()
        self._layout = _Layout(self.name, params)
        self.n_params = self._layout.size
        self.params = self._layout.flat  # initial flat values, float64
        self._jit = None
        self._check_shape()

    # -- set-up ------------------------------------------------------------------
    def describe(self) -> str:
        return f"FunctionLayer[{self.label}] {self.n_in}->{self.n_out}"

    def init_params(self, rng: np.random.Generator, dtype=np.float64) -> np.ndarray:
        """The initial parameters given at construction (``rng`` is not used)."""
        return self.params.astype(dtype)

    def unravel(self, x):
        """The layer's slice ``x_l`` (NumPy or JAX) as the parameter pytree (dtype kept)."""
        if tuple(x.shape) != (self.n_params,):
            raise ValueError(
                f"{self.name}: unravel got shape {tuple(x.shape)}; expected ({self.n_params},)"
            )
        return self._layout.unravel(x)

    def ravel(self, tree) -> np.ndarray:
        """A pytree of the parameters' structure as the flat NumPy vector ``x_l``."""
        return self._layout.ravel(tree)

    def _sample_fn(self, u, x):
        z = self.fn(u, self._layout.unravel(x))
        if tuple(jnp.shape(z)) != (self.n_out,):
            raise ValueError(
                f"{self.name}: fn returned shape {tuple(jnp.shape(z))} for one sample; "
                f"expected ({self.n_out},)"
            )
        return jnp.asarray(z).astype(u.dtype)

    def _check_shape(self) -> None:
        """Trace ``fn`` once (no compile) so a wrong output shape fails here."""
        jax.eval_shape(
            self._sample_fn,
            jax.ShapeDtypeStruct((self.n_in,), jnp.float32),
            jax.ShapeDtypeStruct((self.n_params,), jnp.float32),
        )

    def __getstate__(self):
        """Pickle without the compiled functions (rebuilt on first use; ``fn`` must pickle)."""
        return {**self.__dict__, "_jit": None}

    # -- the compiled functions ---------------------------------------------------
    def _fns(self) -> dict:
        if self._jit is None:
            self._jit = {k: jax.jit(f) for k, f in self._build().items()}
        return self._jit

    def _build(self) -> dict:
        f = self._sample_fn
        F = jax.vmap(f, in_axes=(0, None))  # (B, n_in), (p,) -> (B, n_out)

        def jac(argnums, n_cols):
            j = jax.jacfwd if n_cols <= self.n_out else jax.jacrev
            return jax.vmap(j(f, argnums=argnums), in_axes=(0, None))  # (B, n_out, n_cols)

        Jx, Jz = jac(1, self.n_params), jac(0, self.n_in)

        def hvp_vjp(Z, x, b, dZ, dx, bp):
            def grad_phi(Z, x):  # ∇ of Σ b ⊙ F in (Z, x)
                return jax.grad(lambda Z, x: jnp.sum(b * F(Z, x)), argnums=(0, 1))(Z, x)

            hz, hx = _lin_apply(grad_phi, Z, x, dZ, dx)
            bz, bx = _adj_apply(F, Z, x, bp)
            return hz + bz, hx + bx

        return {
            "forward": F,
            "jvp": lambda Z, x, dZ, dx: _lin_apply(F, Z, x, dZ, dx),
            "vjp": lambda Z, x, T: _adj_apply(F, Z, x, T),
            "hvp_vjp": hvp_vjp,
            "djac_x": lambda Z, x, dZ, dx: _lin_apply(Jx, Z, x, dZ, dx),
            "djac_x_T": lambda Z, x, T: _adj_apply(Jx, Z, x, T),
            "djac_z": lambda Z, x, dZ, dx: _lin_apply(Jz, Z, x, dZ, dx),
            "djac_z_T": lambda Z, x, T: _adj_apply(Jz, Z, x, T),
        }

    def _directions(self, cache, dz_prev, dx):
        """``(dz_prev, dx)`` checked, ``None`` replaced by zeros (one compiled program)."""
        if dz_prev is not None:
            if dz_prev.ndim != 3 or dz_prev.shape[2] != self.n_in:
                raise ValueError(
                    f"{self.name}: dz_prev has shape {tuple(dz_prev.shape)}; "
                    f"expected (k, B, {self.n_in})"
                )
            if dx is not None and dx.shape[0] != dz_prev.shape[0]:
                raise ValueError(
                    f"{self.name}: dz_prev has {dz_prev.shape[0]} directions but dx "
                    f"has {dx.shape[0]}"
                )
        if dx is not None and (dx.ndim != 2 or dx.shape[1] != self.n_params):
            raise ValueError(
                f"{self.name}: dx has shape {tuple(dx.shape)}; expected (k, {self.n_params})"
            )
        if dz_prev is None and dx is None:
            raise ValueError(f"{self.name}: give dz_prev or dx (both are None)")
        dt = cache.z_prev.dtype
        k = dz_prev.shape[0] if dz_prev is not None else dx.shape[0]
        if dz_prev is None:
            dz_prev = np.zeros((k, *cache.z_prev.shape), dt)
        if dx is None:
            dx = np.zeros((k, self.n_params), dt)
        return dz_prev, dx

    def _check_call(self, *arrays):
        _check_precision(self.name, arrays[0].dtype)
        _check_numpy(self.name, *arrays)

    def _batched(self, what, cache, fixed, dirs) -> list:
        """Compiled ``what(z_prev, x, *fixed, *dirs)`` over the ``k`` directions of ``dirs``."""
        self._check_call(cache.z_prev, cache.x, *fixed, *dirs)
        head = (cache.z_prev, cache.x, *fixed)
        return _in_batches(self._fns()[what], head, dirs, cache.z_prev.dtype, self.max_batch)

    def _zeros_zx(self, cache, k):
        dt = cache.z_prev.dtype
        return np.zeros((k, *cache.z_prev.shape), dt), np.zeros((k, self.n_params), dt)

    # -- the Layer contract --------------------------------------------------------
    def forward(self, z_prev, x, targets=None) -> Cache:
        if getattr(z_prev, "ndim", None) != 2 or z_prev.shape[1] != self.n_in:
            raise ValueError(
                f"{self.name}: input z_prev has shape {tuple(getattr(z_prev, 'shape', ()))}; "
                f"expected (B, {self.n_in})"
            )
        if getattr(x, "ndim", None) != 1 or x.shape[0] != self.n_params:
            raise ValueError(
                f"{self.name}: parameters x have shape {tuple(getattr(x, 'shape', ()))}; "
                f"expected ({self.n_params},)"
            )
        self._check_call(z_prev, x)
        dt = z_prev.dtype
        z = self._fns()["forward"](np.asarray(z_prev), np.asarray(x, dtype=dt))
        return Cache(z_prev, x, _out(z, dt))

    def jvp(self, cache, dz_prev, dx):
        """``dz = ∇_z f dz_prev + ∇_x f dx`` by ``jax.jvp``: ``(k, B, n_out)``."""
        dz_prev, dx = self._directions(cache, dz_prev, dx)
        if dx.shape[0] == 0:
            return np.zeros((0, *cache.z.shape), dtype=cache.z_prev.dtype)
        return self._batched("jvp", cache, (), (dz_prev, dx))[0]

    def vjp(self, cache, b):
        """``(b ∇_z f, b ∇_x f)`` by ``jax.vjp``: ``(k, B, n_in)``, ``(k, p)``."""
        if b.shape[0] == 0:
            return self._zeros_zx(cache, 0)
        bz, bx = self._batched("vjp", cache, (), (b,))
        return bz, bx

    def hvp(self, cache, b, dz_prev, dx):
        """``K [dz_prev; dx]``: JVP of ``∇ Σ b ⊙ f`` in ``(z_prev, x)`` (forward-over-reverse)."""
        return self.hvp_vjp(cache, b, dz_prev, dx)

    def hvp_vjp(self, cache, b, dz_prev, dx, bprime=None, keep=None, out=None):
        """``hvp`` plus ``vjp`` of ``bprime`` (``None``: zero) in one compiled call."""
        dz_prev, dx = self._directions(cache, dz_prev, dx)
        k = dx.shape[0]
        if k == 0:
            return self._zeros_zx(cache, 0)
        if bprime is None:
            bprime = np.zeros((k, *cache.z.shape), cache.z_prev.dtype)
        hz, hx = self._batched("hvp_vjp", cache, (b,), (dz_prev, dx, bprime))
        return hz, hx

    def _djac(self, what, cache, dz_prev, dx, n_cols):
        dz_prev, dx = self._directions(cache, dz_prev, dx)
        k = dx.shape[0]
        if k == 0 or n_cols == 0:
            return np.zeros((k, cache.z_prev.shape[0], self.n_out, n_cols), cache.z_prev.dtype)
        return self._batched(what, cache, (), (dz_prev, dx))[0]

    def _djac_T(self, what, cache, T):
        if T.shape[0] == 0 or T.shape[-1] == 0:
            return self._zeros_zx(cache, T.shape[0])
        tz, tx = self._batched(what, cache, (), (T,))
        return tz, tx

    def djac_x(self, cache, dz_prev, dx):
        """JVP of the per-sample ``∇_x f`` along ``(dz_prev, dx)``: ``(k, B, n_out, p)``."""
        return self._djac("djac_x", cache, dz_prev, dx, self.n_params)

    def djac_x_T(self, cache, T):
        """Adjoint of :meth:`djac_x` (VJP of ``∇_x f``): ``(dz_prev, dx)``."""
        return self._djac_T("djac_x_T", cache, T)

    def djac_z(self, cache, dz_prev, dx):
        """JVP of the per-sample ``∇_z f`` along ``(dz_prev, dx)``: ``(k, B, n_out, n_in)``."""
        return self._djac("djac_z", cache, dz_prev, dx, self.n_in)

    def djac_z_T(self, cache, T):
        """Adjoint of :meth:`djac_z` (VJP of ``∇_z f``): ``(dz_prev, dx)``."""
        return self._djac_T("djac_z_T", cache, T)


# -- losses --------------------------------------------------------------------------
class JaxLoss(CustomLoss):
    r"""A :class:`~blockops.network.CustomLoss` from a per-sample JAX loss.

    Parameters
    ----------
    fn : callable
        ``fn(z, y) -> scalar`` for **one** sample: ``z`` of shape ``(n,)`` and
        ``y`` that sample's target (row ``s`` of the targets: a vector for
        regression, a 0-d integer for labels). The pipeline's loss is the
        mean over the batch, like the built-in losses.
    name : str, optional
        Label (default: ``fn.__name__``, or ``"JaxLoss"`` for a lambda).
    n_in : int, optional
        Input size (default: taken from the previous layer).

    Notes
    -----
    ``∇ℓ`` is ``jax.grad``, ``∇²ℓ v`` the JVP of it (all ``k`` directions in
    one ``vmap``); each is jit-compiled once per shape. The three callables
    handed to :class:`~blockops.network.CustomLoss` (and listed by
    ``Pipeline.spec()``) take NumPy or JAX arrays of the whole batch and
    return the same kind, so a JAX reference built from the spec can trace
    them. Floating targets are cast to the activations' dtype; integer
    targets are kept.
    """

    def __init__(self, fn: Callable, name: str | None = None, n_in: int | None = None):
        if not callable(fn):
            raise TypeError(f"JaxLoss: fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        super().__init__(*self._compiled(fn), name=_label(fn, name, "JaxLoss"), n_in=n_in)

    def _compiled(self, fn) -> tuple:
        """The jitted pieces; sets ``_hv_k`` and returns the three CustomLoss callables."""
        value, grad, hv, hv_k = (jax.jit(f) for f in self._build(fn))
        self._hv_k = hv_k
        return self._generic(value), self._generic(grad), self._generic(hv)

    def __getstate__(self):
        """Pickle ``fn`` only; the compiled functions are rebuilt on unpickling."""
        return {**self.__dict__, "functions": None, "_hv_k": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.functions = self._compiled(self.fn)

    @staticmethod
    def _build(fn):
        def value(Z, Y):
            return jax.vmap(fn)(Z, Y)

        def grad(Z, Y):
            return jax.vmap(jax.grad(fn))(Z, Y)

        def hv_one(z, y, v):
            return jax.jvp(lambda z_: jax.grad(fn)(z_, y), (z,), (v,))[1]

        def hv(Z, Y, V):
            return jax.vmap(hv_one)(Z, Y, V)

        def hv_k(Z, Y, V):  # V (k, B, n)
            return jax.vmap(hv, in_axes=(None, None, 0))(Z, Y, V)

        return value, grad, hv, hv_k

    @staticmethod
    def _generic(f):
        """JAX in, JAX out (traceable); NumPy in, NumPy out."""

        def call(z, y, *rest):
            if isinstance(z, jax.Array):
                return f(z, y, *rest)
            dt = z.dtype
            args = [_jin(a, dt) for a in (z, *rest)]
            return _out(f(args[0], _targets(y, dt), *args[1:]), dt)

        call.__name__ = getattr(f, "__name__", "call")
        return call

    def _prepare(self, z_prev, targets):
        _check_numpy(self.name, z_prev)
        _check_precision(self.name, z_prev.dtype)
        y = np.asarray(targets)
        if y.ndim < 1 or y.shape[0] != z_prev.shape[0]:
            raise ValueError(
                f"{self.name}: targets have shape {tuple(y.shape)}; expected a leading axis "
                f"of the batch size {z_prev.shape[0]}"
            )
        return {"y": targets}

    def _hv(self, z_prev, extra, v):
        dt = z_prev.dtype
        if v.shape[0] == 0:
            return np.zeros(v.shape, dt)
        _check_numpy(self.name, v)
        head = (np.asarray(z_prev), _targets(extra["y"], dt))
        return _in_batches(self._hv_k, head, (v,), dt, FunctionLayer.max_batch)[0]


def _targets(y, dtype):
    """Targets for JAX: floating ones in the activations' dtype, others as they are."""
    a = np.asarray(y) if not isinstance(y, jax.Array) else y
    return jnp.asarray(a, dtype=dtype) if a.dtype.kind == "f" else jnp.asarray(a)


# -- pipelines -------------------------------------------------------------------------
def _stage(i, s) -> Layer:
    if isinstance(s, Layer):
        if s.is_loss:
            raise ValueError(f"from_jax: stage {i + 1} is a loss; pass the loss as `loss`")
        return s
    if isinstance(s, tuple) and len(s) in (4, 5):
        return FunctionLayer(*s)
    raise TypeError(
        f"from_jax: stage {i + 1} is a {type(s).__name__}; expected a FunctionLayer, a "
        "blockops Layer or a tuple (fn, n_in, n_out, params[, name])"
    )


def from_jax(stages: Sequence, loss) -> Pipeline:
    """A :class:`~blockops.network.Pipeline` from per-sample JAX stages and a loss.

    Parameters
    ----------
    stages : sequence
        In order, each a :class:`FunctionLayer`, a tuple
        ``(fn, n_in, n_out, params)`` or ``(fn, n_in, n_out, params, name)``
        (made into a :class:`FunctionLayer`), or a native blockops layer
        (e.g. :class:`~blockops.network.Dense`) to mix in.
    loss : Loss or callable
        A blockops loss (``MSELoss()``, ``SoftmaxCrossEntropy()``,
        ``CustomLoss(...)``) or a per-sample JAX function
        ``loss(z, y) -> scalar``, made into a :class:`JaxLoss`.

    Returns
    -------
    Pipeline
        Its flat parameter vector is the stages' parameters concatenated in
        order; :func:`initial_params` gives the initial one and
        :func:`split_params` maps a flat vector back to per-stage pytrees.
    """
    layers = [_stage(i, s) for i, s in enumerate(stages)]
    if isinstance(loss, Loss):
        pass
    elif callable(loss):
        loss = JaxLoss(loss)
    else:
        raise TypeError(
            f"from_jax: loss is a {type(loss).__name__}; expected a blockops Loss or a "
            "per-sample JAX function loss(z, y) -> scalar"
        )
    return Pipeline([*layers, loss])


def initial_params(pipeline: Pipeline, seed: int = 0, dtype=np.float64) -> np.ndarray:
    """The initial flat parameter vector of ``pipeline`` (NumPy, ``(n_params,)``).

    The concatenation, in layer order, of every :class:`FunctionLayer`'s
    initial ``params`` (raveled); native layers in the chain get their
    seeded random initialisation. Equal to ``pipeline.init(seed, dtype)``.
    """
    return np.asarray(pipeline.init(seed=seed, dtype=dtype))


def split_params(pipeline: Pipeline, x) -> list[Any]:
    """Per layer, the parameters in ``x`` (flat, e.g. a gradient or a Newton step).

    A :class:`FunctionLayer`'s part comes back in its pytree structure (leaves
    are NumPy views of ``x``); every other layer's is its flat slice.
    """
    return [
        ly.unravel(xl) if isinstance(ly, FunctionLayer) else xl
        for ly, xl in zip(pipeline.layers, pipeline.split(x))
    ]
