r"""Independent JAX reference for pipelines (CPU, float64).

A plain re-implementation of every layer and loss of :mod:`blockops.network`
written from the documented parameter layouts only. It reads nothing but
``pipeline.spec()`` (a list of plain dicts) and never calls blockops numerics,
so JAX's ``grad`` / ``jacfwd`` / ``hessian`` of these functions are
independent references for the gradient, the Hessian and every per-layer
derivative block.

Layouts (docs: architecture, "Conventions"): the flat parameter vector is ``concat(x_1, ..., x_L)``;
``Dense``/``Residual``: ``x = concat(W.ravel(), c)``, ``W`` ``(n_out, n_in)``
row-major, ``z = σ(z_prev Wᵀ + c)`` (Residual: ``z_prev + h σ(...)``);
``Bias``: ``σ(z + x)``; ``Scale``: ``σ(x z)``; ``Elementwise``: ``σ(z)``;
losses output ``(B, 1)``, row ``s`` = ``ℓ(z_s, y_s) / B``; the scalar loss is
the sum of that column.

Public helpers
--------------
``spec_of(obj)``
    ``obj.spec()`` for a pipeline, else ``obj`` (a spec list).
``n_params(spec_l)``
    Parameter count of one layer from its sizes.
``split(spec, x)``
    Per-layer slices of a flat vector.
``layer_fn(spec_l, z_prev, x_l, y=None)``
    One layer's output ``(B, n_out)`` in ``jax.numpy``.
``forward_fn(spec, X, y)``
    ``x -> [z_0, ..., z_L]``.
``loss_fn(spec, X, y)``
    ``x -> scalar loss`` (take ``jax.grad`` / ``jax.hessian`` of it).
``loss_value(spec, x, X, y)``, ``gradient(spec, x, X, y)``, ``dense_hessian(spec, x, X, y)``
    The loss, ``jax.grad`` and ``jax.hessian`` of it as float / NumPy float64
    arrays (jit-compiled once per structure and shapes, then cached).
``ggn(spec, x, X, y)``
    Gauss-Newton matrix ``Jᵀ (∇² loss) J`` with ``J`` the Jacobian of
    ``z_{L-1}`` (flattened sample-major) in ``x``.
``layer_blocks(spec_l, z_prev, x_l, b, y=None)``
    Dict of the per-layer blocks by JAX: ``jacobian_z (B, n_out, n_in)``
    (per-sample blocks; ``jacobian_z_full (B, n_out, B, n_in)`` shows the
    off-sample zeros), ``jacobian_x (B, n_out, p)``, and for the weighting
    ``b (B, n_out)`` the Hessian of ``Σ b ⊙ f``: ``Kzz (B, n_in, n_in)``
    (``Kzz_full (B, n_in, B, n_in)``), ``Kxz (p, B, n_in)``, ``Kxx (p, p)``.
``djac_apply(spec_l, z_prev, x_l, dz, dx, which, y=None)``
    ``jax.jvp`` of ``jacobian_z`` / ``jacobian_x`` along ``(dz, dx)``.
``random_pipeline(source, ...)``
    A small random case ``(pipeline, x, X, y)``; ``source`` is a
    ``numpy.random.Generator`` or a hypothesis ``draw``. ``pipelines(...)``
    is the matching hypothesis strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

__all__ = [
    "ACTIVATION_NAMES",
    "Case",
    "dense_hessian",
    "djac_apply",
    "forward_fn",
    "ggn",
    "gradient",
    "layer_blocks",
    "layer_fn",
    "loss_fn",
    "loss_value",
    "n_params",
    "pipelines",
    "random_pipeline",
    "spec_of",
    "split",
]

ACTIVATION_NAMES = ("tanh", "sigmoid", "softplus", "gelu", "identity", "custom")
LOSS_KINDS = ("MSELoss", "SoftmaxCrossEntropy", "CustomLoss")


# -- the plain re-implementation ------------------------------------------------
def spec_of(obj) -> list:
    return obj.spec() if hasattr(obj, "spec") else list(obj)


# JAX differentiates tanh as 1 - tanh² and sigmoid as s (1 - s): both cancel
# when the unit saturates (relative error eps / (1 - tanh²), 3e-10 seen at a
# tanh input of 7.3 against 40-digit mpmath). The reference must be more
# accurate than the code it checks, so these define the derivatives in forms
# without cancellation; autodiff of those gives accurate second derivatives.
def _sech2(t):
    e = jnp.exp(-2.0 * jnp.abs(t))
    return 4.0 * e / (1.0 + e) ** 2


@jax.custom_jvp
def _tanh(t):
    return jnp.tanh(t)


_tanh.defjvp(lambda p, d: (_tanh(p[0]), _sech2(p[0]) * d[0]))


@jax.custom_jvp
def _sigmoid(t):
    return jax.nn.sigmoid(t)


_sigmoid.defjvp(lambda p, d: (_sigmoid(p[0]), _sigmoid(p[0]) * _sigmoid(-p[0]) * d[0]))


def _gelu_tanh(t):
    # 0.5 t (1 + tanh(u)) = t sigmoid(2u), u = sqrt(2/pi) (t + 0.044715 t³)
    return t * _sigmoid(2.0 * jnp.sqrt(2.0 / jnp.pi) * (t + 0.044715 * t**3))


def _act(spec_l):
    name = spec_l["activation"]
    if spec_l.get("functions") is not None:
        return spec_l["functions"][0]
    if name == "leaky_relu":
        a = (spec_l.get("activation_params") or {}).get("negative_slope", 0.01)
        return lambda t: jnp.where(t > 0, t, a * t)
    return {
        "relu": lambda t: jnp.where(t > 0, t, 0.0),
        "tanh": _tanh,
        "sigmoid": _sigmoid,
        "softplus": jax.nn.softplus,
        "gelu": _gelu_tanh,
        "identity": lambda t: t,
    }[name]


def n_params(spec_l) -> int:
    k, n, m = spec_l["kind"], spec_l["n_in"], spec_l["n_out"]
    if k in ("Dense", "Residual"):
        return m * (n + 1)
    if k in ("Bias", "Scale"):
        return n
    return 0


def split(spec, x) -> list:
    spec = spec_of(spec)
    out, o = [], 0
    for s in spec:
        p = n_params(s)
        assert p == s["n_params"], (s, p)
        out.append(x[o : o + p])
        o += p
    assert o == x.shape[0], (o, x.shape)
    return out


def layer_fn(spec_l, z_prev, x_l, y=None):
    """Output ``(B, n_out)`` of one layer, in ``jax.numpy``."""
    k = spec_l["kind"]
    n, m = spec_l["n_in"], spec_l["n_out"]
    B = z_prev.shape[0]
    if k in ("Dense", "Residual"):
        W = x_l[: m * n].reshape(m, n)
        c = x_l[m * n :]
        out = _act(spec_l)(z_prev @ W.T + c)
        return z_prev + spec_l["h"] * out if k == "Residual" else out
    if k == "Bias":
        return _act(spec_l)(z_prev + x_l)
    if k == "Scale":
        return _act(spec_l)(x_l * z_prev)
    if k == "Elementwise":
        return _act(spec_l)(z_prev)
    scale = spec_l.get("scale") or 1.0  # a loss's factor on every sample's share
    if k == "MSELoss":
        yy = jnp.asarray(y).reshape(z_prev.shape)
        return (scale * 0.5 * jnp.sum((z_prev - yy) ** 2, axis=1) / B)[:, None]
    if k == "SoftmaxCrossEntropy":
        yy = jnp.asarray(y)
        lse = jax.scipy.special.logsumexp(z_prev, axis=1)
        return (scale * (lse - z_prev[jnp.arange(B), yy]) / B)[:, None]
    if k == "CustomLoss":
        return (spec_l["functions"][0](z_prev, y) / B)[:, None]
    raise ValueError(f"reference: unknown layer kind {k!r}")


def forward_fn(spec, X, y):
    spec = spec_of(spec)
    X = jnp.asarray(X)

    def f(x):
        zs = [X]
        for s, xl in zip(spec, split(spec, x)):
            zs.append(layer_fn(s, zs[-1], xl, y))
        return zs

    return f


def loss_fn(spec, X, y):
    """``x -> z_L`` (scalar loss) for fixed data."""
    fw = forward_fn(spec, X, y)
    return lambda x: jnp.sum(fw(x)[-1])


def _layer_key(s) -> tuple:
    funcs = s.get("functions")
    return (
        s["kind"],
        s["n_in"],
        s["n_out"],
        s["n_params"],
        s["activation"],
        tuple(sorted((s.get("activation_params") or {}).items())),
        s["h"],
        s.get("scale"),
        None if funcs is None else tuple(funcs),
    )  # the callables themselves: no id reuse


_JIT_CACHE: dict = {}


def _jitted(what: str, spec, shapes: tuple, build):
    """One compiled function per (what, structure, shapes): hypothesis repeats structures."""
    key = (what, tuple(_layer_key(s) for s in spec), shapes)
    fn = _JIT_CACHE.get(key)
    if fn is None:
        fn = _JIT_CACHE[key] = jax.jit(build())
    return fn


def _args(x, X, y):
    x = jnp.asarray(np.asarray(x, dtype=np.float64))
    X = jnp.asarray(np.asarray(X, dtype=np.float64))
    yy = np.asarray(y)
    y = jnp.asarray(yy.astype(np.float64) if yy.dtype.kind == "f" else yy)
    return x, X, y, (tuple(X.shape), tuple(y.shape), str(y.dtype))


def _loss_xXy(spec):
    return lambda x, X, y: loss_fn(spec, X, y)(x)


def loss_value(spec, x, X, y) -> float:
    spec = spec_of(spec)
    x, X, y, shapes = _args(x, X, y)
    return float(_jitted("loss", spec, shapes, lambda: _loss_xXy(spec))(x, X, y))


def gradient(spec, x, X, y) -> np.ndarray:
    """``jax.grad`` of the loss at ``x`` (float64 NumPy array)."""
    spec = spec_of(spec)
    x, X, y, shapes = _args(x, X, y)
    return np.asarray(_jitted("grad", spec, shapes, lambda: jax.grad(_loss_xXy(spec)))(x, X, y))


def dense_hessian(spec, x, X, y) -> np.ndarray:
    """``jax.hessian`` of the loss at ``x``: dense ``(n_params, n_params)`` float64."""
    spec = spec_of(spec)
    x, X, y, shapes = _args(x, X, y)
    return np.asarray(_jitted("hess", spec, shapes, lambda: jax.hessian(_loss_xXy(spec)))(x, X, y))


def ggn(spec, x, X, y) -> np.ndarray:
    """Gauss-Newton ``Jᵀ (∇²_z loss) J`` with ``J = ∂ vec(z_{L-1}) / ∂x`` (dense float64)."""
    spec = spec_of(spec)
    x, X, y, shapes = _args(x, X, y)

    def build():
        def g(x, X, y):
            def net(x):
                z = X
                for s, xl in zip(spec[:-1], split(spec, x)[:-1]):
                    z = layer_fn(s, z, xl)
                return z.ravel()

            shape = (X.shape[0], spec[-1]["n_in"])
            J = jax.jacfwd(net)(x)
            empty = jnp.zeros((0,), dtype=jnp.float64)
            Hl = jax.hessian(lambda zf: jnp.sum(layer_fn(spec[-1], zf.reshape(shape), empty, y)))(
                net(x)
            )
            return J.T @ Hl @ J

        return g

    return np.asarray(_jitted("ggn", spec, shapes, build)(x, X, y))


def layer_blocks(spec_l, z_prev, x_l, b, y=None) -> dict:
    """Per-layer derivative blocks by JAX (see the module docstring)."""
    z_prev = jnp.asarray(np.asarray(z_prev, dtype=np.float64))
    x_l = jnp.asarray(np.asarray(x_l, dtype=np.float64))
    b = jnp.asarray(np.asarray(b, dtype=np.float64))
    yy = None if y is None else np.asarray(y)
    if yy is not None and yy.dtype.kind == "f":
        yy = yy.astype(np.float64)
    shapes = (tuple(z_prev.shape), None if yy is None else (yy.shape, str(yy.dtype)))

    def build():
        def blocks(z_prev, x_l, b, y):
            B = z_prev.shape[0]

            def f(z, x):
                return layer_fn(spec_l, z, x, y)

            Jz_full = jax.jacfwd(f, argnums=0)(z_prev, x_l)  # (B, m, B, n)
            Jx = jax.jacfwd(f, argnums=1)(z_prev, x_l)  # (B, m, p)
            s = jnp.arange(B)

            def phi(z, x):
                return jnp.sum(b * f(z, x))

            Hzz = jax.hessian(phi, argnums=0)(z_prev, x_l)  # (B, n, B, n)
            Hxz = jax.jacfwd(jax.grad(phi, argnums=0), argnums=1)(z_prev, x_l)  # (B, n, p)
            Hxx = jax.hessian(phi, argnums=1)(z_prev, x_l)
            return {
                "jacobian_z": Jz_full[s, :, s, :],
                "jacobian_z_full": Jz_full,
                "jacobian_x": Jx,
                "Kzz": Hzz[s, :, s, :],
                "Kzz_full": Hzz,
                "Kxz": jnp.transpose(Hxz, (2, 0, 1)),
                "Kxx": Hxx,
            }

        return blocks

    fn = _jitted("blocks", [spec_l], shapes, build)
    return {
        k: np.asarray(v)
        for k, v in fn(z_prev, x_l, b, None if yy is None else jnp.asarray(yy)).items()
    }


def djac_apply(spec_l, z_prev, x_l, dz, dx, which: str, y=None) -> np.ndarray:
    """``d/dα J(z_prev + α dz, x + α dx)`` for ``J`` = per-sample ``∇_z f`` or ``∇_x f``.

    ``dz`` ``(B, n_in)``, ``dx`` ``(p,)``; returns ``(B, n_out, n_in)`` or ``(B, n_out, p)``.
    """
    z_prev = jnp.asarray(np.asarray(z_prev, dtype=np.float64))
    x_l = jnp.asarray(np.asarray(x_l, dtype=np.float64))
    yy = None if y is None else np.asarray(y)
    if yy is not None and yy.dtype.kind == "f":
        yy = yy.astype(np.float64)
    shapes = (tuple(z_prev.shape), which, None if yy is None else (yy.shape, str(yy.dtype)))

    def build():
        def d(z_prev, x_l, dz, dx, y):
            s = jnp.arange(z_prev.shape[0])

            def J(z, x):
                if which == "z":
                    return jax.jacfwd(lambda zz: layer_fn(spec_l, zz, x, y))(z)[s, :, s, :]
                return jax.jacfwd(lambda xx: layer_fn(spec_l, z, xx, y))(x)

            return jax.jvp(J, (z_prev, x_l), (dz, dx))[1]

        return d

    fn = _jitted("djac", [spec_l], shapes, build)
    dz = jnp.asarray(np.asarray(dz, dtype=np.float64))
    dx = jnp.asarray(np.asarray(dx, dtype=np.float64))
    return np.asarray(fn(z_prev, x_l, dz, dx, None if yy is None else jnp.asarray(yy)))


# -- random cases ------------------------------------------------------------------
# Module-level (stable identity) user functions, pure arithmetic so that they
# run on NumPy, CuPy and JAX arrays alike.
CUSTOM_ACTIVATION = (  # t / sqrt(1 + t²) and its two derivatives
    lambda t: t * (1.0 + t * t) ** -0.5,
    lambda t: (1.0 + t * t) ** -1.5,
    lambda t: -3.0 * t * (1.0 + t * t) ** -2.5,
)
PSEUDO_HUBER = (  # per-sample Σ_j sqrt(1 + r_j²) − 1, r = z − y: loss, grad, hvp
    lambda z, y: (((1.0 + (z - y) ** 2) ** 0.5) - 1.0).sum(axis=1),
    lambda z, y: (z - y) * (1.0 + (z - y) ** 2) ** -0.5,
    lambda z, y, v: v * (1.0 + (z - y) ** 2) ** -1.5,
)


@dataclass
class Case:
    """A random test case: pipeline, parameters and data."""

    pipeline: Any
    x: np.ndarray
    X: np.ndarray
    y: Any


class _Source:
    """Uniform choices from a NumPy generator or a hypothesis ``draw``."""

    def __init__(self, source):
        self.rng = source if isinstance(source, np.random.Generator) else None
        self.draw = None if self.rng is not None else source

    def integer(self, lo: int, hi: int) -> int:
        if self.rng is not None:
            return int(self.rng.integers(lo, hi + 1))
        from hypothesis import strategies as st

        return self.draw(st.integers(lo, hi))

    def choice(self, items):
        items = list(items)
        return items[self.integer(0, len(items) - 1)]


def make_layer(kind: str, n_in: int, n_out: int, act: str, h: float = 0.5):
    """A blockops layer of the given kind (construction only, no numerics)."""
    from blockops.network import Bias, Dense, Elementwise, Residual, Scale, activation

    a = activation(*CUSTOM_ACTIVATION, name="custom") if act == "custom" else act
    if kind == "Dense":
        return Dense(n_in, n_out, a)
    if kind == "Residual":
        return Residual(n_in, a, h=h)
    return {"Bias": Bias, "Scale": Scale, "Elementwise": Elementwise}[kind](n_in, a)


def make_loss(kind: str):
    from blockops.network import CustomLoss, MSELoss, SoftmaxCrossEntropy

    if kind == "MSELoss":
        return MSELoss()
    if kind == "SoftmaxCrossEntropy":
        return SoftmaxCrossEntropy()
    return CustomLoss(*PSEUDO_HUBER, name="PseudoHuber")


def random_pipeline(
    source,
    widths=(1, 8),
    depths=(1, 6),
    batches=(1, 5),
    activations=ACTIVATION_NAMES,
    losses=LOSS_KINDS,
    kinds=("Dense", "Dense", "Bias", "Scale", "Residual", "Elementwise"),
    dtype=np.float64,
) -> Case:
    """A small random pipeline with parameters and data.

    ``source``: ``numpy.random.Generator`` or a hypothesis ``draw``. Widths,
    depths (number of layers before the loss) and batch sizes are drawn from
    the inclusive ranges given; ``kinds`` is the pool of hidden-layer kinds
    (the first layer is always ``Dense`` so the input width varies freely).
    Parameters come from ``pipeline.init`` with a drawn seed, inputs and
    targets from a NumPy generator with a drawn seed.
    """
    from blockops.network import Pipeline

    src = _Source(source)
    depth = src.integer(*depths)
    n0 = src.integer(*widths)
    layers, n = [], n0
    for i in range(depth):
        kind = "Dense" if i == 0 else src.choice(kinds)
        act = src.choice(activations)
        m = src.integer(*widths) if kind == "Dense" else n
        layers.append(make_layer(kind, n, m, act))
        n = m
    loss_kind = src.choice(losses)
    layers.append(make_loss(loss_kind))
    net = Pipeline(layers)
    B = src.integer(*batches)
    seed = src.integer(0, 2**31 - 1)
    rng = np.random.default_rng(seed)
    x = net.init(seed=seed, dtype=dtype)
    X = rng.standard_normal((B, n0)).astype(dtype)
    if loss_kind == "SoftmaxCrossEntropy":
        y = rng.integers(0, n, size=B)
    else:
        y = rng.standard_normal((B, n)).astype(dtype)
    return Case(net, x, X, y)


def pipelines(**kwargs):
    """Hypothesis strategy of :class:`Case` (keyword arguments as :func:`random_pipeline`)."""
    from hypothesis import strategies as st

    return st.composite(lambda draw: random_pipeline(draw, **kwargs))()
