r"""PyTorch models as blockops pipelines, and blockops operators on torch tensors.

Importing this module imports ``torch`` (the ``torch`` extra); importing
:mod:`blockops` never does.

:func:`from_torch` ``(model, loss, X, y)``
    An ``nn.Sequential`` and an ``nn.MSELoss`` / ``nn.CrossEntropyLoss``
    linearised at the model's current parameters: a
    :class:`~blockops.network.Point` for :func:`blockops.hessian.hessian`,
    :func:`blockops.inverse.inverse_hessian` and the rest.
:func:`torch_pipeline` ``(model, loss, X)``
    The :class:`~blockops.network.Pipeline` and its parameter vector.
:class:`TorchLayer` ``(module, n_in, n_out)``
    Any per-sample block as a :class:`~blockops.network.Layer` through
    ``torch.func`` (``jvp``, ``vjp``, forward-over-reverse for ``hvp``).
:class:`TorchOperator` ``(op)``
    A blockops / pylops ``LinearOperator`` (``H``, ``H⁻¹``) that takes and
    returns torch tensors.

Translation of an ``nn.Sequential`` (children in order)
-------------------------------------------------------

* ``nn.Linear`` (with bias) followed by an activation module becomes one
  :class:`~blockops.network.Dense` ``(in, out, act)``; a ``Linear`` not
  followed by one, ``Dense(in, out, "identity")``. Blockops' dense layout
  ``concat(W.ravel(), c)`` with ``W`` ``(out, in)`` row-major is the layout
  of ``Linear.weight`` and ``Linear.bias``.
* ``nn.Linear(bias=False)`` has no bias to put in a ``Dense`` layer: it goes
  through :class:`TorchLayer` (parameters ``W`` only), and an activation after
  it becomes an :class:`~blockops.network.Elementwise` layer.
* An activation not after a ``Linear`` becomes ``Elementwise(n, act)``.
  Activations (exact module types; a subclass goes through ``TorchLayer``):

  ========================================  ===========================================
  ``nn.Tanh``, ``nn.Sigmoid``, ``nn.ReLU``  ``"tanh"``, ``"sigmoid"``, ``"relu"``
  ``nn.LeakyReLU(negative_slope=a)``        :func:`~blockops.network.leaky_relu` ``(a)``
  ``nn.GELU(approximate="tanh")``           ``"gelu"`` (blockops' GELU is the tanh form)
  ``nn.GELU()`` (``approximate="none"``)    :data:`GELU_ERF`: ``t Φ(t)``, the erf form
  ``nn.SiLU``                               :data:`SILU`: ``t σ(t)``
  ``nn.Softplus(beta=1)``                   ``"softplus"``
  ``nn.Softplus(beta=β)``                   :func:`softplus` ``(β)``
  ========================================  ===========================================

  The erf GELU is a custom activation rather than a ``TorchLayer``: it keeps
  the ``Dense`` layer (and its structured inverse stage). ReLU and leaky
  ReLU use the left derivative at the kink, as torch does.

  *Softplus threshold.* torch's ``Softplus(beta, threshold=20)`` returns the
  input itself where ``beta·t > threshold``; blockops evaluates the smooth
  ``log(1 + e^{βt})/β`` everywhere. Below the threshold the two agree to
  rounding; above it they differ by ``log(1 + e^{-βt})/β < e^{-threshold}/β``
  in the value, ``σ(-βt) < e^{-threshold}`` in the first derivative (2.1e-9
  at the default threshold) and less in the second. So for pre-activations
  beyond the threshold blockops has the Hessian of the smooth softplus, not
  of torch's piecewise function (whose second derivative is 0 there).
* ``nn.Identity``, and dropout modules in eval mode (or with ``p = 0``), are
  dropped (identities).
* A nested ``nn.Sequential`` whose leaves all translate natively is flattened
  into the chain; any other nested ``nn.Sequential`` is one block.
* Any other child becomes a :class:`TorchLayer` when it is a per-sample
  block: ``from_torch`` runs it on the batch and checks that it maps
  ``(B, n_in)`` to ``(B, n_out)``, is deterministic, does not change its
  input in place, and gives each sample's row when run on that sample alone.
  ``BatchNorm`` in training mode (batch statistics couple the samples) and
  dropout in training mode (random) are refused with the module named;
  ``model.eval()`` turns both into per-sample maps.

The parameter vector is ``model.parameters()`` in order (each ``Linear``'s
``weight, bias``; each ``TorchLayer`` block's ``module.parameters()``), so
:func:`parameters_vector` and :func:`load_parameters_vector` (or
``torch.nn.utils.vector_to_parameters``) move vectors, e.g. a Newton step,
between the two worlds. Parameters shared between children (tied weights)
or registered on the ``Sequential`` itself are refused: blockops' vector
holds each layer's parameters once per layer.

Losses
------

Blockops' losses are ``(scale/B) Σ_s ℓ(z_s, y_s)`` (:mod:`blockops.network.losses`):

* ``nn.MSELoss(reduction="mean")``: ``mean((z - y)²)`` over all ``B n``
  entries ``= MSELoss(scale=2/n)`` (blockops' ``ℓ`` is ``½‖z_s - y_s‖²``);
  ``reduction="sum"``: ``MSELoss(scale=2B)``.
* ``nn.CrossEntropyLoss`` with integer class targets ``(B,)``:
  ``reduction="mean"`` is ``SoftmaxCrossEntropy()``, ``"sum"`` is
  ``SoftmaxCrossEntropy(scale=B)``. Class weights, label smoothing,
  probability targets and targets equal to ``ignore_index`` are refused.
* ``reduction="none"`` is refused (the loss must be a scalar).

With ``reduction="sum"`` the scale depends on ``B``: a pipeline from
:func:`torch_pipeline` is meant for batches of the size of its ``X``
(:func:`from_torch` builds one per call).

Array exchange
--------------

CPU NumPy arrays and tensors share memory (``torch.from_numpy``,
``Tensor.numpy()``); CuPy arrays and CUDA tensors go through DLPack. The
CUDA branches are small and untested here (no GPU was available when this
module was written); they need CuPy.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.func import jvp as _func_jvp
from torch.func import vjp as _func_vjp

from .._checks import check_int
from ..backend import get_array_module
from ..network import (
    Activation,
    Dense,
    Elementwise,
    Layer,
    MSELoss,
    Pipeline,
    SoftmaxCrossEntropy,
    get_activation,
    leaky_relu,
)
from ..network._util import check_forward, n_directions
from ..network.layer import Cache

__all__ = [
    "GELU_ERF",
    "SILU",
    "TorchLayer",
    "TorchOperator",
    "from_torch",
    "load_parameters_vector",
    "parameters_vector",
    "softplus",
    "torch_activation",
    "torch_pipeline",
]

_FLOAT = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
_NP_OF = {v: k for k, v in _FLOAT.items()}


# -- activations with no built-in counterpart ---------------------------------------------
# Array-generic (NumPy, CuPy, jax.numpy: the JAX reference evaluates them) and
# written without cancellation where the naive forms lose digits.
def _ns(t):
    """The array namespace of ``t`` (``numpy``, ``cupy`` or ``jax.numpy``)."""
    get = getattr(t, "__array_namespace__", None)
    if get is not None:
        return get()
    from ..backend import get_array_module

    return get_array_module(t)


def _special(t):
    """``scipy.special`` for the namespace of ``t`` (``erf``/``erfc`` are outside the array API)."""
    name = _ns(t).__name__
    if name.startswith("numpy"):
        import scipy.special as sp
    elif name.startswith("cupy"):
        import cupyx.scipy.special as sp
    elif name.startswith("jax"):
        import jax.scipy.special as sp
    else:  # pragma: no cover - other namespaces
        raise TypeError(f"no erf for arrays of namespace {name}")
    return sp


def _sigma(xp, t):
    """``σ(t) = 1 / (1 + e^{-t})`` without overflow."""
    return xp.exp(-xp.logaddexp(0.0 * t, -t))


def _dsigma(xp, t):
    """``σ'(t) = σ(t) σ(-t) = sech²(t/2) / 4`` without cancellation (``e = e^{-|t|}``)."""
    e = xp.exp(-xp.abs(t))
    return e / ((1.0 + e) * (1.0 + e))


_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu_erf_derivs(t):
    # Φ(t) = erfc(-t/√2)/2 (accurate for t << 0, where 1 + erf cancels)
    xp = _ns(t)
    Phi = 0.5 * _special(t).erfc(-_SQRT1_2 * t)
    phi = _INV_SQRT_2PI * xp.exp(-0.5 * t * t)
    return t * Phi, Phi + t * phi, phi * (2.0 - t * t)


def _silu_derivs(t):
    # f = t σ(t); f' = σ(t) + t σ'(t); f'' = σ'(t) (2 - t tanh(t/2)), with σ(t) - σ(-t) = tanh(t/2)
    xp = _ns(t)
    s, ds = _sigma(xp, t), _dsigma(xp, t)
    return t * s, s + t * ds, ds * (2.0 - t * xp.tanh(0.5 * t))


def _custom(name, derivs, params=None):
    fns = (
        lambda t: derivs(t)[0],
        lambda t: derivs(t)[1],
        lambda t: derivs(t)[2],
    )
    return Activation(name, derivs, fns, params)


GELU_ERF = _custom("gelu_erf", _gelu_erf_derivs)
"""``t Φ(t)`` (torch's default ``nn.GELU()``), ``Φ`` the standard normal CDF.

``σ' = Φ + t φ``, ``σ'' = φ (2 - t²)`` with ``Φ(t) = erfc(-t/√2)/2``.
"""

SILU = _custom("silu", _silu_derivs)
"""``t σ(t)`` (``nn.SiLU``): ``σ' = σ(t) + t σ'(t)``, ``σ'' = σ'(t) (2 - t tanh(t/2))``."""


def softplus(beta: float = 1.0) -> Activation:
    """``log(1 + e^{βt}) / β`` (``nn.Softplus(beta)``, without torch's threshold).

    ``σ' = σ(βt)``, ``σ'' = β σ'(βt)``. ``beta = 1`` returns blockops' built-in
    ``"softplus"``.
    """
    b = float(beta)
    if not (math.isfinite(b) and b > 0):
        raise ValueError(f"softplus: beta must be finite and > 0, got {beta!r}")
    if b == 1.0:
        return get_activation("softplus")

    def derivs(t):
        xp = _ns(t)
        u = b * t
        return xp.logaddexp(0.0 * u, u) / b, _sigma(xp, u), b * _dsigma(xp, u)

    return _custom(f"softplus(beta={b:g})", derivs, {"beta": b})


def torch_activation(module) -> Activation | None:
    """The blockops :class:`~blockops.network.Activation` of an activation module, else ``None``.

    Exact types only (a subclass may change ``forward``). ``nn.Identity`` is
    ``"identity"``.
    """
    t = type(module)
    if t is nn.Tanh:
        return get_activation("tanh")
    if t is nn.Sigmoid:
        return get_activation("sigmoid")
    if t is nn.ReLU:
        return get_activation("relu")
    if t is nn.LeakyReLU:
        return leaky_relu(module.negative_slope)
    if t is nn.GELU:
        if module.approximate == "tanh":
            return get_activation("gelu")
        if module.approximate == "none":
            return GELU_ERF
        return None
    if t is nn.SiLU:
        return SILU
    if t is nn.Softplus:
        return softplus(module.beta)
    if t is nn.Identity:
        return get_activation("identity")
    return None


# -- array exchange ---------------------------------------------------------------------
def _to_torch(a, dtype=None):
    """A tensor sharing ``a``'s memory (NumPy: ``from_numpy``; CuPy: DLPack), cast if asked."""
    if isinstance(a, torch.Tensor):
        t = a.detach()
    elif isinstance(a, np.ndarray):
        try:
            if a.flags.writeable:
                t = torch.from_numpy(a)
            else:  # read-only (e.g. broadcast) inputs: torch only warns; nothing writes to them
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    t = torch.from_numpy(a)
        except ValueError:  # negative strides
            t = torch.from_numpy(np.ascontiguousarray(a))
    elif hasattr(a, "__dlpack__"):  # CuPy (untested here: no GPU)
        t = torch.from_dlpack(a)
    else:
        t = torch.as_tensor(np.asarray(a))
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t


def _from_torch(t, like, inputs=()):
    """``t`` as an array of ``like``'s kind, sharing memory; copied if it aliases an input."""
    t = t.detach()
    if isinstance(like, np.ndarray):
        a = t.numpy()
        if any(isinstance(i, np.ndarray) and np.may_share_memory(a, i) for i in inputs):
            a = a.copy()
        return a
    import cupy  # pragma: no cover - CUDA branch, untested here (no GPU)

    a = cupy.from_dlpack(t)  # pragma: no cover
    if any(isinstance(i, cupy.ndarray) and cupy.may_share_memory(a, i) for i in inputs):
        a = a.copy()  # pragma: no cover
    return a  # pragma: no cover


def _np_dtype(dtype) -> np.dtype:
    if dtype is None:
        return np.dtype(np.float64)
    if isinstance(dtype, torch.dtype):
        if dtype not in _NP_OF:
            raise TypeError(f"dtype {dtype} not supported; expected float32 or float64")
        return _NP_OF[dtype]
    dt = np.dtype(dtype)
    if dt not in _FLOAT:
        raise TypeError(f"dtype {dt} not supported; expected float32 or float64")
    return dt


def _as_numpy(a, dtype=None):
    """A NumPy copy-free view where possible (CPU tensors), cast to ``dtype`` if given."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        if a.dtype in (torch.bfloat16, torch.float16):
            a = a.to(torch.float32)
        a = a.numpy()
    a = np.asarray(a)
    return a if dtype is None else a.astype(dtype, copy=False)


# -- parameters -------------------------------------------------------------------------
def parameters_vector(model, dtype=np.float64) -> np.ndarray:
    """``model.parameters()`` flattened and concatenated (a NumPy copy), the pipeline's order."""
    dt = _np_dtype(dtype)
    parts = [p.detach().cpu().reshape(-1).to(_FLOAT[dt]) for p in model.parameters()]
    if not parts:
        return np.zeros(0, dtype=dt)
    return torch.cat(parts).numpy()


def load_parameters_vector(model, x) -> None:
    """Copy the flat vector ``x`` (NumPy or tensor) into ``model.parameters()`` in place.

    Unlike ``torch.nn.utils.vector_to_parameters``, each parameter keeps its
    dtype and device and does not alias ``x``.
    """
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    v = _to_torch(x) if not isinstance(x, torch.Tensor) else x.detach()
    if v.ndim != 1 or v.shape[0] != n:
        raise ValueError(
            f"load_parameters_vector: vector has shape {tuple(v.shape)}; expected ({n},)"
        )
    o = 0
    with torch.no_grad():
        for p in params:
            k = p.numel()
            p.copy_(v[o : o + k].reshape(p.shape))
            o += k


# -- TorchLayer -------------------------------------------------------------------------
def _coupling_reason(m) -> str | None:
    """Why module ``m`` is not per-sample (BatchNorm on batch statistics, random dropout)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if m.training:
            return (
                f"{type(m).__name__} is in training mode: it normalises with the statistics "
                "of the batch, which couples the samples (no per-sample layered form). "
                "Call model.eval() first: it then uses its running statistics, a per-sample "
                "affine map, and goes through TorchLayer"
            )
        if m.running_mean is None:
            return (
                f"{type(m).__name__} has track_running_stats=False: it normalises with the "
                "statistics of the batch even in eval mode, which couples the samples"
            )
    if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
        return (
            f"{type(m).__name__} is in training mode: it is random (a new mask per call), "
            "so there is no Hessian to take. Call model.eval() first (dropout is then "
            "the identity)"
        )
    return None


def _static_check(module, label: str, owner: str) -> None:
    for name, m in module.named_modules():
        why = _coupling_reason(m)
        if why is not None:
            where = label if not name else f"{label}.{name}"
            raise ValueError(f"{owner}: {where} is not a per-sample block: {why}")


class TorchLayer(Layer):
    r"""A per-sample PyTorch block ``z = module(z_prev)`` as a blockops layer.

    The layer's parameters are ``module.parameters()`` flattened and
    concatenated in order (``n_params`` = their total size); a flat ``x`` is
    split into views of those shapes and passed with
    ``torch.func.functional_call``. Derivatives come from ``torch.func``:

    * ``jvp``: ``torch.func.jvp`` in ``(z_prev, x)``;
    * ``vjp``: the pull-back of ``torch.func.vjp``;
    * ``hvp`` and the fused ``hvp_vjp``: forward-over-reverse, the ``jvp``
      of ``(z, x, w) ↦ w ∇f(z, x)`` (the pull-back) at ``w = b`` along
      ``(dz_prev, dx, b')``, which is ``K [dz_prev; dx] + b' ∇f`` in one pass;

    each ``vmap``-ed over the ``k`` directions. Explicit blocks and the exact
    inverse come from the :class:`~blockops.network.Layer` defaults.

    Parameters
    ----------
    module : torch.nn.Module
        Maps a ``(B, n_in)`` tensor to ``(B, n_out)``, each sample on its own,
        deterministically, without changing its input in place. Kept as a
        private deep copy (buffers such as running statistics are frozen at
        construction); its parameter values serve only :meth:`init_params`.
    n_in : int
    n_out : int, optional
        Inferred by running the module on one ``(1, n_in)`` sample.
    name : str, optional
        Label of the module in descriptions (default: its class name).
    chunk_size : int, optional
        ``vmap`` chunk size over directions (default: all at once).

    Notes
    -----
    Computation follows the data: float64 arrays run a float64 copy of the
    module, float32 arrays (``precision="mixed"``) a float32 copy; NumPy
    arrays are shared with torch without copies. Nothing torch-specific is
    kept in the :class:`~blockops.network.Cache` (each derivative call
    re-runs the forward pass inside ``torch.func``). Raises ``ValueError``
    for BatchNorm or dropout in training mode.
    """

    def __init__(self, module, n_in: int, n_out: int | None = None, *, name=None, chunk_size=None):
        if not isinstance(module, nn.Module):
            raise TypeError(f"TorchLayer: expected a torch.nn.Module, got {type(module).__name__}")
        self.label = str(name) if name is not None else type(module).__name__
        _static_check(module, self.label, "TorchLayer")
        self.n_in = check_int("TorchLayer", "n_in", n_in, 1)
        self.module = copy.deepcopy(module)
        self.module.requires_grad_(False)
        named = list(self.module.named_parameters())
        for nm, p in named:
            if not p.is_floating_point():
                raise TypeError(f"TorchLayer: parameter {nm!r} of {self.label} has dtype {p.dtype}")
        self._names = [nm for nm, _ in named]
        self._shapes = [tuple(p.shape) for _, p in named]
        self._sizes = [p.numel() for _, p in named]
        self.n_params = int(sum(self._sizes))
        self.chunk_size = chunk_size
        self._copies: dict = {}
        self.n_out = 1  # provisional, for the probe below
        self.name = f"TorchLayer ({self.label})"
        if n_out is None:
            probe = np.random.default_rng(0).standard_normal((1, self.n_in))
            with torch.no_grad():
                out = self._call(_to_torch(probe), _to_torch(self.init_params()))
            if out.ndim != 2 or out.shape[0] != 1:
                raise ValueError(
                    f"TorchLayer: {self.label} maps a (1, {self.n_in}) input to shape "
                    f"{tuple(out.shape)}; a layer must map (B, n_in) to (B, n_out) "
                    "(end the block with nn.Flatten())"
                )
            n_out = out.shape[1]
        self.n_out = check_int("TorchLayer", "n_out", n_out, 1)
        self.name = self.describe()

    def __getstate__(self):
        return {**self.__dict__, "_copies": {}}

    def describe(self) -> str:
        return f"TorchLayer {self.n_in}->{self.n_out} ({self.label})"

    def init_params(self, rng=None, dtype=np.float64) -> np.ndarray:
        """The module's own parameters, flattened in ``module.parameters()`` order (no ``rng``)."""
        return parameters_vector(self.module, dtype)

    # -- the function -------------------------------------------------------------------
    def _module_for(self, dtype, device):
        """The private copy of the module in ``dtype`` on ``device`` (made once)."""
        key = (dtype, str(device))
        m = self._copies.get(key)
        if m is None:
            m = copy.deepcopy(self.module).to(device=device, dtype=dtype)
            self._copies[key] = m
        return m

    def _call(self, z, x):
        """``f(z, x)`` with the flat ``x`` split into the module's parameters."""
        m = self._module_for(z.dtype, z.device)
        params, o = {}, 0
        for nm, shape, k in zip(self._names, self._shapes, self._sizes):
            params[nm] = x[o : o + k].view(shape)
            o += k
        return functional_call(m, params, (z,))

    def _vmap(self, fn):
        return vmap(fn, chunk_size=self.chunk_size)

    def _tensors(self, cache, *arrays):
        """``z_prev``, ``x`` and the given arrays as tensors of the cache's dtype (None kept)."""
        z = _to_torch(cache.z_prev)
        dt = z.dtype
        self._module_for(dt, z.device)  # made here: a module cannot be cast inside torch.func
        rest = (None if a is None else _to_torch(a, dt) for a in arrays)
        return (z, _to_torch(cache.x, dt), *rest)

    def _jvp_dirs(self, fun, primals, tangents):
        """``vmap`` over directions of ``jvp(fun)`` in the primals whose tangent is given."""
        active = [i for i, t in enumerate(tangents) if t is not None]

        def restricted(*vals):
            args = list(primals)
            for i, v in zip(active, vals):
                args[i] = v
            return fun(*args)

        def one(*ts):
            return _func_jvp(restricted, tuple(primals[i] for i in active), ts)[1]

        return self._vmap(one)(*(tangents[i] for i in active))

    def _pullback(self, z, x, w):
        """``(w ∇_z f, w ∇_x f)`` at ``(z, x)`` for one weighting ``w`` ``(B, n_out)``."""
        return _func_vjp(self._call, z, x)[1](w)

    # -- the Layer contract -------------------------------------------------------------
    def forward(self, z_prev, x, targets=None) -> Cache:
        check_forward(self, z_prev, x)
        zt = _to_torch(z_prev)
        with torch.no_grad():
            out = self._call(zt, _to_torch(x, zt.dtype))
        B = z_prev.shape[0]
        if tuple(out.shape) != (B, self.n_out):
            raise ValueError(
                f"{self.name}: the module maps a ({B}, {self.n_in}) input to shape "
                f"{tuple(out.shape)}; expected ({B}, {self.n_out})"
            )
        return Cache(z_prev, x, _from_torch(out, z_prev, (z_prev, x)), {})

    def jvp(self, cache, dz_prev, dx):
        k = n_directions(self, dz_prev, dx)
        if dx is not None and not self.n_params:
            dx = None
        if dz_prev is None and dx is None:
            xp = get_array_module(cache.z)
            return xp.zeros((k, *cache.z.shape), dtype=cache.z.dtype)
        z, x, dzt, dxt = self._tensors(cache, dz_prev, dx)
        out = self._jvp_dirs(self._call, (z, x), (dzt, dxt))
        return _from_torch(out, cache.z_prev, (cache.z_prev, cache.x, cache.z))

    def vjp(self, cache, b):
        z, x, bt = self._tensors(cache, b)
        pull = _func_vjp(self._call, z, x)[1]
        bz, bx = self._vmap(pull)(bt)
        ins = (cache.z_prev, cache.x, b)
        return _from_torch(bz, cache.z_prev, ins), _from_torch(bx, cache.z_prev, ins)

    def hvp(self, cache, b, dz_prev, dx):
        n_directions(self, dz_prev, dx)
        return self.hvp_vjp(cache, b, dz_prev, dx)

    def hvp_vjp(self, cache, b, dz_prev, dx, bprime=None, keep=None, out=None):
        """``hvp(b, dz_prev, dx) + vjp(bprime)`` as one forward-over-reverse pass.

        The ``jvp`` of the pull-back ``(z, x, w) ↦ (w ∇_z f, w ∇_x f)`` at
        ``(z_prev, x, b)`` along ``(dz_prev, dx, bprime)``.
        """
        if dx is not None and not self.n_params:
            dx = None
        tangents = (dz_prev, dx, bprime)
        given = [t for t in tangents if t is not None]
        dt = cache.z_prev.dtype
        if not given:
            xp = get_array_module(cache.z_prev)
            k = 1 if out is None else out.shape[0]
            return (
                xp.zeros((k, *cache.z_prev.shape), dtype=dt),
                xp.zeros((k, self.n_params), dtype=dt),
            )
        z, x, bt, *tt = self._tensors(cache, b, *tangents)
        hz, hx = self._jvp_dirs(self._pullback, (z, x, bt), tuple(tt))
        ins = (cache.z_prev, cache.x, b, *given)
        return _from_torch(hz, cache.z_prev, ins), _from_torch(hx, cache.z_prev, ins)


# -- from_torch ---------------------------------------------------------------------------
def _is_identity(m) -> bool:
    if type(m) is nn.Identity:
        return True
    return isinstance(m, nn.modules.dropout._DropoutNd) and (not m.training or m.p == 0)


def _native(m) -> bool:
    if _is_identity(m) or torch_activation(m) is not None:
        return True
    if type(m) is nn.Linear and m.bias is not None:
        return True
    return type(m) is nn.Sequential and all(_native(c) for c in m)


def _leaves(seq, label):
    """``(label, module)`` children in order, all-native nested Sequentials flattened."""
    out = []
    for i, m in enumerate(seq):
        lab = f"{label}[{i}]"
        if type(m) is nn.Sequential and _native(m):
            out.extend(_leaves(m, lab))
        else:
            out.append((lab, m))
    return out


def _loss_layer(loss, n: int, B: int):
    if isinstance(loss, nn.Module) and type(loss) is nn.MSELoss:
        red = loss.reduction
        if red == "mean":
            return MSELoss(n_in=n, scale=2.0 / n)
        if red == "sum":
            return MSELoss(n_in=n, scale=2.0 * B)
        raise ValueError(
            f"from_torch: MSELoss(reduction={red!r}) is not a scalar loss; use 'mean' or 'sum'"
        )
    if isinstance(loss, nn.Module) and type(loss) is nn.CrossEntropyLoss:
        if loss.weight is not None:
            raise ValueError("from_torch: CrossEntropyLoss with class weights is not supported")
        if loss.label_smoothing:
            raise ValueError("from_torch: CrossEntropyLoss with label_smoothing is not supported")
        red = loss.reduction
        if red == "mean":
            return SoftmaxCrossEntropy(n_in=n)
        if red == "sum":
            return SoftmaxCrossEntropy(n_in=n, scale=float(B))
        raise ValueError(
            f"from_torch: CrossEntropyLoss(reduction={red!r}) is not a scalar loss; "
            "use 'mean' or 'sum'"
        )
    raise TypeError(
        f"from_torch: loss {type(loss).__name__} is not supported; expected nn.MSELoss or "
        "nn.CrossEntropyLoss (or build a Pipeline with blockops.network.CustomLoss)"
    )


def _targets(loss, y, B: int, n: int, dt):
    if type(loss) is nn.MSELoss:
        yn = _as_numpy(y)
        if yn.dtype.kind not in "fiu":
            raise TypeError(f"from_torch: MSELoss targets have dtype {yn.dtype}")
        yn = yn.astype(dt, copy=False)
        if yn.shape == (B,) and n == 1:
            yn = yn[:, None]
        if yn.shape != (B, n):
            raise ValueError(
                f"from_torch: MSELoss targets have shape {yn.shape}; expected the model "
                f"output's shape ({B}, {n})"
            )
        return yn
    yn = _as_numpy(y)
    if yn.dtype.kind not in "iu" or yn.shape != (B,):
        raise ValueError(
            f"from_torch: CrossEntropyLoss targets must be integer class indices of shape "
            f"({B},), got dtype {yn.dtype} and shape {yn.shape} (probability targets are "
            "not supported)"
        )
    if np.any(yn == loss.ignore_index):
        raise ValueError(
            f"from_torch: CrossEntropyLoss targets contain ignore_index={loss.ignore_index}; "
            "drop those samples first"
        )
    return yn.astype(np.int64, copy=False)


def _check_block(layer: TorchLayer, z: np.ndarray, xl: np.ndarray, label: str) -> np.ndarray:
    """Run a candidate block on the batch: per-sample, deterministic, input untouched."""
    z0 = z.copy()
    try:
        out = layer.forward(z, xl).z
    except Exception as e:
        raise ValueError(
            f"from_torch: {label} ({layer.label}) fails on the batch of shape {z.shape}: {e}"
        ) from e
    if not np.array_equal(z, z0):
        raise ValueError(
            f"from_torch: {label} ({layer.label}) changes its input in place "
            "(e.g. inplace=True); blockops layers must not modify their inputs"
        )
    again = layer.forward(z, xl).z
    scale = max(1.0, float(np.abs(out).max(initial=0.0)))
    tol = 1e3 * np.finfo(z.dtype).eps * scale
    if np.abs(again - out).max(initial=0.0) > tol:
        raise ValueError(
            f"from_torch: {label} ({layer.label}) is not deterministic (two calls differ); "
            "random modules (e.g. dropout in training mode) have no Hessian: call model.eval()"
        )
    B = z.shape[0]
    if B > 1:
        for s in sorted({0, B - 1}):
            alone = layer.forward(np.ascontiguousarray(z[s : s + 1]), xl).z
            if np.abs(alone[0] - out[s]).max(initial=0.0) > tol:
                raise ValueError(
                    f"from_torch: {label} ({layer.label}) is not per-sample: sample {s} run "
                    "alone gives a different output than within the batch (the module "
                    "couples the samples of a batch, e.g. batch statistics)"
                )
    return out


def _check_sequential(model) -> None:
    """Refuse what is not an explicit, non-empty chain of per-sample blocks."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_torch: model must be an nn.Sequential, got {type(model).__name__}")
    if type(model) is not nn.Sequential:
        raise TypeError(
            f"from_torch: model is a {type(model).__name__}, not an nn.Sequential; blockops "
            "needs the chain of per-sample blocks explicitly. Write the model as an "
            "nn.Sequential, or wrap a per-sample module as nn.Sequential(module) (it then "
            "goes through TorchLayer as one block)"
        )
    if len(model) == 0:
        raise ValueError("from_torch: the nn.Sequential is empty")
    if next(model.parameters(recurse=False), None) is not None:
        raise ValueError(
            "from_torch: the nn.Sequential has parameters of its own; move them into a child"
        )


def _translate(blocks, i, n):
    """``(layer, its torch parameters, next index)`` for ``blocks[i]`` taking ``n`` features.

    A ``Linear`` with a bias takes the activation after it (identities skipped) into one
    ``Dense``; a lone activation becomes ``Elementwise``; anything else a ``TorchLayer``.
    """
    label, m = blocks[i]
    i += 1
    if type(m) is nn.Linear and m.bias is not None:
        if m.in_features != n:
            raise ValueError(
                f"from_torch: {label} (Linear {m.in_features}->{m.out_features}) gets {n} features"
            )
        while i < len(blocks) and _is_identity(blocks[i][1]):
            i += 1
        act = "identity"
        if i < len(blocks) and torch_activation(blocks[i][1]) is not None:
            act = torch_activation(blocks[i][1])
            i += 1
        return Dense(n, m.out_features, act), [m.weight, m.bias], i
    if torch_activation(m) is not None:
        return Elementwise(n, torch_activation(m)), [], i
    _static_check(m, f"{label} ({type(m).__name__})", "from_torch")
    try:
        layer = TorchLayer(m, n, name=type(m).__name__)
    except ValueError as e:
        raise ValueError(f"from_torch: {label}: {e}") from e
    return layer, list(m.parameters()), i


def torch_pipeline(model, loss, X, *, dtype=None):
    """The blockops :class:`~blockops.network.Pipeline` of a torch model and loss.

    Parameters
    ----------
    model : nn.Sequential
        Per-sample blocks (see the module docstring for the translation).
    loss : nn.MSELoss or nn.CrossEntropyLoss
    X : tensor or array ``(B, n_0)``
        A batch of inputs: it fixes the first size, runs the per-sample checks
        of the :class:`TorchLayer` blocks and, for ``reduction="sum"``, the
        batch size the loss's scale is for.
    dtype : float32 or float64, optional
        Of the pipeline's parameters and inputs (default float64).

    Returns
    -------
    (Pipeline, x0)
        ``x0`` is :func:`parameters_vector` ``(model)``: the model's current
        parameters in the pipeline's layout.
    """
    dt = _np_dtype(dtype)
    _check_sequential(model)
    Xn = _as_numpy(X, dt)
    if Xn.ndim != 2 or Xn.shape[0] < 1:
        raise ValueError(
            f"from_torch: inputs X have shape {Xn.shape}; expected (B, n_0) with B >= 1 "
            "(flatten the features; an nn.Unflatten can start the first block)"
        )
    B = Xn.shape[0]
    blocks = _leaves(model, "model")
    layers, owners = [], []
    z = Xn
    i = 0
    while i < len(blocks):
        label = blocks[i][0]
        if _is_identity(blocks[i][1]):
            i += 1
            continue
        layer, own, i = _translate(blocks, i, z.shape[1])
        xl = np.concatenate(
            [np.zeros(0, dt)] + [p.detach().cpu().reshape(-1).to(_FLOAT[dt]).numpy() for p in own]
        )
        if isinstance(layer, TorchLayer):
            z = _check_block(layer, z, xl, label)
        else:
            z = layer.forward(z, xl).z
        layers.append(layer)
        owners.extend(own)
    if [id(p) for p in owners] != [id(p) for p in model.parameters()]:
        raise ValueError(
            "from_torch: the children's parameters are not model.parameters() in order "
            "(parameters shared between children, i.e. tied weights, are not supported)"
        )
    layers.append(_loss_layer(loss, z.shape[1], B))
    return Pipeline(layers), parameters_vector(model, dt)


def from_torch(model, loss, X, y, *, dtype=None, method=None):
    """A torch model and loss linearised at its current parameters: a blockops ``Point``.

    Parameters
    ----------
    model : nn.Sequential
        Linear layers, activations and per-sample blocks (module docstring).
    loss : nn.MSELoss or nn.CrossEntropyLoss
        ``reduction`` ``"mean"`` or ``"sum"``; mapped exactly (losses agree to
        rounding).
    X : tensor or array ``(B, n_0)``
    y : tensor or array
        ``(B, n_L)`` real targets (MSE) or ``(B,)`` integer classes (cross-entropy).
    dtype : float32 or float64, optional
        Default float64.
    method : str, optional
        Gradient method of :meth:`Pipeline.linearize <blockops.network.Pipeline.linearize>`.

    Returns
    -------
    Point
        ``point.pipeline`` is the translated pipeline, ``point.params`` equals
        :func:`parameters_vector` ``(model)``, ``point.loss`` and
        ``point.gradient`` equal torch's loss and gradient to rounding.

    Examples
    --------
    >>> pt = from_torch(model, nn.MSELoss(), X, y)  # doctest: +SKIP
    >>> step = inverse_hessian(pt, damping=1e-2) @ pt.gradient  # doctest: +SKIP
    >>> load_parameters_vector(model, pt.params - step)  # doctest: +SKIP
    """
    dt = _np_dtype(dtype)
    net, x0 = torch_pipeline(model, loss, X, dtype=dt)
    Xn = _as_numpy(X, dt)
    yn = _targets(loss, y, Xn.shape[0], net.layers[-1].n_in, dt)
    return net.linearize(x0, Xn, yn, method=method)


# -- operators on tensors ---------------------------------------------------------------
class TorchOperator:
    """A blockops / pylops ``LinearOperator`` that takes and returns torch tensors.

    CPU tensors are viewed as NumPy arrays without copies (cast to the
    operator's dtype if they differ) and the result is returned as a tensor
    sharing the result array's memory. CUDA tensors go to CuPy through DLPack
    and back (the operator must be on the CuPy backend; untested here, no GPU).

    ``op @ v`` applies ``matvec`` to a ``(n,)`` tensor and ``matmat`` to
    ``(n, k)``; ``shape``, ``dtype`` (a ``torch.dtype``) and ``op`` (the
    wrapped operator) as expected.
    """

    def __init__(self, op):
        if not hasattr(op, "matvec") or not hasattr(op, "shape"):
            raise TypeError(f"TorchOperator: expected a LinearOperator, got {type(op).__name__}")
        self.op = op
        self.shape = tuple(op.shape)
        npdt = np.dtype(op.dtype)
        if npdt not in _FLOAT:
            raise TypeError(f"TorchOperator: operator dtype {npdt} not supported")
        self.dtype = _FLOAT[npdt]

    def __repr__(self) -> str:
        return f"TorchOperator({self.op!r})"

    def _apply(self, fn, v, ndim):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"TorchOperator: expected a torch.Tensor, got {type(v).__name__}")
        if v.ndim != ndim:
            raise ValueError(
                f"TorchOperator: expected a {ndim}-D tensor, got shape {tuple(v.shape)}"
            )
        v = v.detach()
        if v.dtype != self.dtype:
            v = v.to(self.dtype)
        if v.device.type == "cuda":  # pragma: no cover - no GPU here
            try:
                import cupy
            except ImportError as e:
                raise RuntimeError("TorchOperator: CUDA tensors need CuPy") from e
            return torch.from_dlpack(fn(cupy.from_dlpack(v.contiguous())))
        if v.device.type != "cpu":
            raise TypeError(f"TorchOperator: tensors on {v.device} are not supported")
        return _to_torch(np.asarray(fn(v.resolve_conj().resolve_neg().numpy())))

    def matvec(self, v):
        """``op v`` for a ``(n,)`` tensor."""
        return self._apply(self.op.matvec, v, 1)

    def rmatvec(self, v):
        """``opᴴ v`` for a ``(m,)`` tensor."""
        return self._apply(self.op.rmatvec, v, 1)

    def matmat(self, V):
        """``op V`` for a ``(n, k)`` tensor."""
        return self._apply(self.op.matmat, V, 2)

    def __matmul__(self, v):
        if isinstance(v, torch.Tensor) and v.ndim == 2:
            return self.matmat(v)
        return self.matvec(v)
