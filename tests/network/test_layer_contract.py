"""The :class:`~blockops.network.Layer` contract: every layer type × every form.

Each case is a small pipeline built around one layer type: the native ones
(``Dense``, ``Residual``, ``Bias``, ``Scale``, ``Elementwise`` and the three
losses) and two layer types defined *only here*, written against the contract
with nothing but ``forward`` / ``jvp`` / ``vjp`` / ``hvp`` (plus the
``djac_*`` hooks the literal eq. 24 form needs):

``LayerNorm``
    per-sample layer normalisation with learnable scale and shift,
    ``z = γ ⊙ (u − mean u) / sqrt(var u + eps) + β``, ``x = concat(γ, β)``;
``CircularConv``
    a one-channel circular 1-D convolution (kernel 3) plus bias, then tanh:
    ``z_i = tanh(Σ_j w_j u_{(i+j-1) mod n} + c)``, ``x = (w_0, w_1, w_2, c)``.

Everything else those two layers get (the explicit blocks ``jacobian_z``,
``jacobian_x``, ``hessian_blocks``; the fused HVP steps; the generic inverse
stage) comes from the :class:`Layer` defaults.

Every form is compared with an independent dense reference: ``jax.grad``,
``jax.hessian`` and the Gauss-Newton ``Jᵀ ∇²ℓ J`` of a plain JAX
re-implementation (``tests/reference.py``'s ``layer_fn`` for the native layers,
the functions below for the test-only ones), compiled once per case; the
exact inverses against ``numpy.linalg.solve`` of the JAX matrix. Float64
throughout, relative tolerance 1e-10.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from pylops.utils import dottest

from blockops.hessian import ggn_vp, hessian, hvp
from blockops.inverse import inverse_hessian
from blockops.network import (
    Bias,
    Cache,
    CustomLoss,
    Dense,
    Elementwise,
    Layer,
    MSELoss,
    Pipeline,
    Residual,
    Scale,
    SoftmaxCrossEntropy,
)

jax.config.update("jax_enable_x64", True)

RTOL = 1e-10  # float64, problems of at most ~60 parameters
DAMPING = 1e-2
MAX_COND = 1e8
# XLA's backend optimisations cost more than they save on these one-shot, tiny references
FAST_COMPILE = {"xla_backend_optimization_level": 0}


# -- the two test-only layers ------------------------------------------------------
def _center(a):
    return a - a.mean(axis=-1, keepdims=True)


def _k(dz_prev, dx):
    return dz_prev.shape[0] if dz_prev is not None else dx.shape[0]


class LayerNorm(Layer):
    r"""``z = γ ⊙ y + β``, ``y = (u − mean u) r``, ``r = (var u + eps)^{-1/2}`` per sample.

    With ``c = P u`` (``P = I − 11ᵀ/n``) and ``m(d) = yᵀ P d / n``:

    * ``J_y d = r (P d − y m(d))``, symmetric (``J_y = r (P − y yᵀ/n)``);
    * ``d²y[d, e] = r² (−m(e) Pd − m(d) Pe + 3 m(d) m(e) y − y (Pd)ᵀ(Pe)/n)``.

    ``∇_x f = [diag(y), I]`` per sample; ``∇_z f = diag(γ) J_y``.
    """

    def __init__(self, n: int, eps: float = 1e-3):
        self.n_in = self.n_out = int(n)
        self.n_params = 2 * self.n_in
        self.eps = float(eps)
        self.name = self.describe()

    def init_params(self, rng, dtype=np.float64):
        n = self.n_in
        return np.concatenate(
            [1.0 + 0.3 * rng.standard_normal(n), 0.2 * rng.standard_normal(n)]
        ).astype(dtype)

    def forward(self, z_prev, x, targets=None):
        c = _center(z_prev)
        r = 1.0 / np.sqrt((c * c).mean(axis=1, keepdims=True) + self.eps)  # (B, 1)
        y = c * r
        z = x[: self.n_in] * y + x[self.n_in :]
        return Cache(z_prev, x, z, {"y": y, "r": r})

    @staticmethod
    def _jy(cache, d):
        """``J_y d`` for ``d (k, B, n)`` (``J_y`` is symmetric: also ``J_yᵀ d``)."""
        y, r = cache.extra["y"], cache.extra["r"]
        dc = _center(d)
        return r * (dc - y * (y * dc).mean(axis=-1, keepdims=True))

    def jvp(self, cache, dz_prev, dx):
        n, y = self.n_in, cache.extra["y"]
        out = np.zeros((_k(dz_prev, dx), *y.shape))
        if dz_prev is not None:
            out += cache.x[:n] * self._jy(cache, dz_prev)
        if dx is not None:
            out += dx[:, None, :n] * y + dx[:, None, n:]
        return out

    def vjp(self, cache, b):
        n, y = self.n_in, cache.extra["y"]
        bz = self._jy(cache, cache.x[:n] * b)
        return bz, np.concatenate([(b * y).sum(axis=1), b.sum(axis=1)], axis=1)

    def hvp(self, cache, b, dz_prev, dx):
        n, y, r = self.n_in, cache.extra["y"], cache.extra["r"]
        k = _k(dz_prev, dx)
        hz = np.zeros((k, *y.shape))
        hx = np.zeros((k, self.n_params))
        if dz_prev is not None:
            g = b * cache.x[:n]  # the weighting of y
            dc = _center(dz_prev)
            m = (y * dc).mean(axis=-1, keepdims=True)
            gy = (g * y).sum(axis=-1, keepdims=True)
            gdc = (g * dc).sum(axis=-1, keepdims=True)
            hz += (r * r / n) * (-gdc * y - n * m * _center(g) + 3 * m * gy * y - gy * dc)
            hx[:, :n] += (b * self._jy(cache, dz_prev)).sum(axis=1)
        if dx is not None:
            hz += self._jy(cache, b * dx[:, None, :n])
        return hz, hx

    # -- literal eq. 24 ----------------------------------------------------------
    def _Jy(self, cache):
        y, r = cache.extra["y"], cache.extra["r"]
        n = self.n_in
        P = np.eye(n) - 1.0 / n
        return r[:, :, None] * (P - y[:, :, None] * y[:, None, :] / n)  # (B, n, n)

    def djac_x(self, cache, dz_prev, dx):
        n, y = self.n_in, cache.extra["y"]
        out = np.zeros((_k(dz_prev, dx), *y.shape, self.n_params))
        if dz_prev is not None:  # ∇_x f does not depend on x
            out[..., :n] = self._jy(cache, dz_prev)[..., None] * np.eye(n)
        return out

    def djac_x_T(self, cache, T):
        t = np.diagonal(T[..., : self.n_in], axis1=-2, axis2=-1)
        return self._jy(cache, t), np.zeros((T.shape[0], self.n_params))

    def djac_z(self, cache, dz_prev, dx):
        n, y, r = self.n_in, cache.extra["y"], cache.extra["r"]
        out = np.zeros((_k(dz_prev, dx), *y.shape, n))
        if dx is not None:
            out += dx[:, None, :n, None] * self._Jy(cache)
        if dz_prev is not None:
            dc = _center(dz_prev)
            m = (y * dc).mean(axis=-1, keepdims=True)[..., None]
            P = np.eye(n) - 1.0 / n
            yy = y[:, :, None] * y[:, None, :]
            dJ = (r * r)[:, :, None] * (
                -dc[..., :, None] * y[:, None, :] / n
                - m * P
                + 3 * m * yy / n
                - y[:, :, None] * dc[..., None, :] / n
            )
            out += cache.x[:n, None] * dJ
        return out

    def djac_z_T(self, cache, T):
        n, y, r = self.n_in, cache.extra["y"], cache.extra["r"]
        k = T.shape[0]
        dx = np.zeros((k, self.n_params))
        dx[:, :n] = np.einsum("ksij,sij->ki", T, self._Jy(cache))
        G = T * cache.x[:n, None]
        P = np.eye(n) - 1.0 / n
        Gy = np.einsum("ksij,sj->ksi", G, y)
        GTy = np.einsum("ksij,si->ksj", G, y)
        trGP = np.einsum("ksij,ij->ks", G, P)[..., None]
        yGy = np.einsum("si,ksi->ks", y, Gy)[..., None]
        grad = (r * r) * (-Gy / n - trGP * y / n + 3 * yGy * y / n**2 - GTy / n)
        return _center(grad), dx


class CircularConv(Layer):
    r"""``z = tanh(Σ_j w_j S_j u + c)``, ``(S_j u)_i = u_{(i+j-1) mod n}``, ``j = 0, 1, 2``.

    ``x = (w_0, w_1, w_2, c)``, ``n_params = 4``, ``n_out = n_in``.
    """

    n_params = 4

    def __init__(self, n: int):
        self.n_in = self.n_out = int(n)
        self.S = np.stack([np.roll(np.eye(n), j - 1, axis=1) for j in range(3)])  # (3, n, n)
        self.name = self.describe()

    def init_params(self, rng, dtype=np.float64):
        return (0.6 * rng.standard_normal(4)).astype(dtype)

    @staticmethod
    def _shift(a, j):
        return np.roll(a, -(j - 1), axis=-1)  # (S_j a)_i = a_{i+j-1}

    @staticmethod
    def _shiftT(a, j):
        return np.roll(a, j - 1, axis=-1)

    def forward(self, z_prev, x, targets=None):
        Su = np.stack([self._shift(z_prev, j) for j in range(3)])  # (3, B, n)
        pre = np.einsum("j,jsi->si", x[:3], Su) + x[3]
        t = np.tanh(pre)
        d1 = 1.0 - t * t
        return Cache(z_prev, x, t, {"Su": Su, "d1": d1, "d2": -2.0 * t * d1})

    def _dpre(self, cache, dz_prev, dx):
        out = np.zeros((_k(dz_prev, dx), *cache.z_prev.shape))
        if dz_prev is not None:
            out += sum(cache.x[j] * self._shift(dz_prev, j) for j in range(3))
        if dx is not None:
            out += np.einsum("kj,jsi->ksi", dx[:, :3], cache.extra["Su"]) + dx[:, 3, None, None]
        return out

    def _back_pre(self, cache, r):
        dz = sum(cache.x[j] * self._shiftT(r, j) for j in range(3))
        dx = np.concatenate(
            [np.einsum("ksi,jsi->kj", r, cache.extra["Su"]), r.sum(axis=(1, 2))[:, None]], axis=1
        )
        return dz, dx

    def jvp(self, cache, dz_prev, dx):
        return cache.extra["d1"] * self._dpre(cache, dz_prev, dx)

    def vjp(self, cache, b):
        return self._back_pre(cache, b * cache.extra["d1"])

    def hvp(self, cache, b, dz_prev, dx):
        e = cache.extra
        hz, hx = self._back_pre(cache, (b * e["d2"]) * self._dpre(cache, dz_prev, dx))
        g = b * e["d1"]  # the bilinear term w_j S_j u
        if dx is not None:
            hz = hz + sum(dx[:, j, None, None] * self._shiftT(g, j) for j in range(3))
        if dz_prev is not None:
            for j in range(3):
                hx[:, j] += (g * self._shift(dz_prev, j)).sum(axis=(1, 2))
        return hz, hx

    # -- literal eq. 24 ----------------------------------------------------------
    def djac_x(self, cache, dz_prev, dx):
        e = cache.extra
        ed = e["d2"] * self._dpre(cache, dz_prev, dx)  # d(d1)
        cols = [ed * e["Su"][j] for j in range(3)] + [ed]
        if dz_prev is not None:
            for j in range(3):
                cols[j] = cols[j] + e["d1"] * self._shift(dz_prev, j)
        return np.stack(cols, axis=-1)

    def djac_x_T(self, cache, T):
        e = cache.extra
        r = e["d2"] * (np.einsum("ksij,jsi->ksi", T[..., :3], e["Su"]) + T[..., 3])
        dz, dx = self._back_pre(cache, r)
        dz = dz + sum(self._shiftT(T[..., j] * e["d1"], j) for j in range(3))
        return dz, dx

    def djac_z(self, cache, dz_prev, dx):
        e = cache.extra
        C = np.einsum("j,jab->ab", cache.x[:3], self.S)
        out = (e["d2"] * self._dpre(cache, dz_prev, dx))[..., None] * C
        if dx is not None:
            dC = np.einsum("kj,jab->kab", dx[:, :3], self.S)
            out = out + e["d1"][None, :, :, None] * dC[:, None]
        return out

    def djac_z_T(self, cache, T):
        e = cache.extra
        C = np.einsum("j,jab->ab", cache.x[:3], self.S)
        dz, dx = self._back_pre(cache, e["d2"] * np.einsum("ksij,ij->ksi", T, C))
        dx[:, :3] += np.einsum("ksia,si,jia->kj", T, e["d1"], self.S)
        return dz, dx


TEST_ONLY = (LayerNorm, CircularConv)


# -- the independent JAX reference ---------------------------------------------------
def layernorm_jax(n, eps):
    def f(u, x):
        gamma, beta = x[:n], x[n:]
        c = u - jnp.mean(u, axis=1, keepdims=True)
        var = jnp.mean(c**2, axis=1, keepdims=True)
        return gamma * c / jnp.sqrt(var + eps) + beta

    return f


def circular_conv_jax(n):
    # the circulant matrices written out by index: (S_j)_{i, (i+j-1) mod n} = 1
    S = np.zeros((3, n, n))
    for j in range(3):
        for i in range(n):
            S[j, i, (i + j - 1) % n] = 1.0

    def f(u, x):
        return jnp.tanh(u @ jnp.tensordot(x[:3], S, axes=1).T + x[3])

    return f


def layer_functions(net):
    """Per layer ``(f(z_prev, x_l, y), n_params)``, computed from sizes alone."""
    out = []
    for ly, s in zip(net.layers, net.spec()):
        if isinstance(ly, LayerNorm):
            f, p = layernorm_jax(s["n_in"], ly.eps), 2 * s["n_in"]
            out.append((lambda z, x, y, f=f: f(z, x), p))
        elif isinstance(ly, CircularConv):
            f, p = circular_conv_jax(s["n_in"]), 4
            out.append((lambda z, x, y, f=f: f(z, x), p))
        else:
            out.append((lambda z, x, y, s=s: ref.layer_fn(s, z, x, y), ref.n_params(s)))
        assert out[-1][1] == s["n_params"], (s, out[-1][1])
    return out


def jax_reference(net, x, X, y):
    """``(loss, grad, H, GGN)`` as float64 NumPy arrays, one jit compile per case."""
    fns = layer_functions(net)
    offs = np.concatenate([[0], np.cumsum([p for _, p in fns])]).astype(int)
    B, n_last = X.shape[0], net.layers[-1].n_in

    def hidden(x, X):
        z = X
        for (f, _), a, b in zip(fns[:-1], offs[:-2], offs[1:-1]):
            z = f(z, x[a:b], None)
        return z

    def loss_of_z(z, x, y):
        return jnp.sum(fns[-1][0](z, x[offs[-2] :], y))

    def loss(x, X, y):
        return loss_of_z(hidden(x, X), x, y)

    def all_of(x, X, y):
        J = jax.jacfwd(lambda x: hidden(x, X).ravel())(x)
        z = hidden(x, X).ravel()
        Hl = jax.hessian(lambda zf: loss_of_z(zf.reshape(B, n_last), x, y))(z)
        return loss(x, X, y), jax.grad(loss)(x, X, y), jax.hessian(loss)(x, X, y), J.T @ Hl @ J

    yj = jnp.asarray(y) if np.asarray(y).dtype.kind != "f" else jnp.asarray(y, jnp.float64)
    res = jax.jit(all_of, compiler_options=FAST_COMPILE)(jnp.asarray(x), jnp.asarray(X), yj)
    return tuple(np.asarray(r, dtype=np.float64) for r in res)


# -- the cases: one per layer type ----------------------------------------------------
def _layers(name):
    """``(layers, loss, batch, indefinite)``: ``indefinite`` is checked with eigvalsh."""
    huber = CustomLoss(*ref.PSEUDO_HUBER, name="PseudoHuber")
    return {
        # two square Dense layers in a row: the stacked sweep and the low-rank stage
        "Dense": ([Dense(3, 4), Dense(4, 4), Dense(4, 4), Dense(4, 2)], MSELoss(), 3, True),
        "Residual": (
            [Dense(3, 4), Residual(4, "tanh", h=0.5), Residual(4, "sigmoid", h=0.7)],
            MSELoss(),
            2,
            True,
        ),
        "Bias": ([Dense(3, 4), Bias(4, "tanh"), Dense(4, 2)], MSELoss(), 3, True),
        "Scale": ([Dense(3, 4), Scale(4, "tanh"), Dense(4, 2)], MSELoss(), 3, True),
        "Elementwise": (
            [Elementwise(3), Dense(3, 4, "identity"), Elementwise(4, "sigmoid"), Dense(4, 2)],
            MSELoss(),
            3,
            True,
        ),
        "SoftmaxCrossEntropy": ([Dense(3, 4), Dense(4, 3)], SoftmaxCrossEntropy(), 3, True),
        "CustomLoss": ([Dense(3, 4), Bias(4, "tanh"), Dense(4, 3)], huber, 2, True),
        "LayerNorm": ([Dense(3, 4), LayerNorm(4), Dense(4, 2)], MSELoss(), 3, True),
        "LayerNorm-first": ([LayerNorm(4), Dense(4, 3), LayerNorm(3)], huber, 2, True),
        "CircularConv": (
            [Dense(3, 5), CircularConv(5), CircularConv(5), Dense(5, 2)],
            MSELoss(),
            3,
            True,
        ),
        "CircularConv-first": (
            [CircularConv(4), LayerNorm(4), Dense(4, 3)],
            SoftmaxCrossEntropy(),
            3,
            True,
        ),
        "test-only-mixed": (
            [Dense(3, 5), CircularConv(5), LayerNorm(5), Residual(5, h=0.5), Dense(5, 2)],
            MSELoss(),
            2,
            True,
        ),
    }[name]


CASES = (
    "Dense",
    "Residual",
    "Bias",
    "Scale",
    "Elementwise",
    "SoftmaxCrossEntropy",
    "CustomLoss",
    "LayerNorm",
    "LayerNorm-first",
    "CircularConv",
    "CircularConv-first",
    "test-only-mixed",
)
TEST_ONLY_CASES = [c for c in CASES if "LayerNorm" in c or "Conv" in c or "test-only" in c]
FORMS = (
    "gradient",
    "fused",
    "literal",
    "lifted",
    "inverse-riccati",
    "inverse-kkt",
    "ggn-fused",
    "ggn-literal",
    "ggn-inverse-riccati",
    "ggn-inverse-kkt",
)


@functools.cache
def case(name):
    layers, loss, B, indefinite = _layers(name)
    net = Pipeline([*layers, loss])
    seed = CASES.index(name)
    rng = np.random.default_rng(100 + seed)
    x = net.init(seed=seed)
    X = rng.standard_normal((B, net.n_in))
    n_last = net.layers[-1].n_in
    if type(loss).__name__ == "SoftmaxCrossEntropy":
        y = rng.integers(0, n_last, size=B)
    else:
        y = rng.standard_normal((B, n_last))
    L, g, H, G = jax_reference(net, x, X, y)
    pt = net.linearize(x, X, y)
    return {
        "net": net,
        "x": x,
        "X": X,
        "y": y,
        "pt": pt,
        "loss": L,
        "grad": g,
        "H": H,
        "G": G,
        "indefinite": indefinite,
    }


def rel(A, B):
    """Max-norm error relative to ``max|B|``."""
    return np.abs(A - B).max() / max(np.abs(B).max(), 1e-300)


def dense_of(op):
    return op.matmat(np.eye(op.shape[1]))


@pytest.mark.parametrize("name", CASES)
def test_reference_is_sane(name):
    """The JAX matrices are symmetric, the claimed cases indefinite, the GGN PSD (convex losses)."""
    c = case(name)
    H, G = c["H"], c["G"]
    assert rel(H, H.T) <= 1e-13 and rel(G, G.T) <= 1e-13
    ev = np.linalg.eigvalsh(H)
    if c["indefinite"]:
        assert ev.min() < -1e-6 * ev.max() and ev.max() > 0, ev
    assert np.linalg.eigvalsh(0.5 * (G + G.T)).min() >= -1e-12 * np.abs(G).max() * len(G)
    assert c["pt"].loss == pytest.approx(c["loss"], rel=1e-13)


def _solve_check(name, kind, method):
    c = case(name)
    A = (c["H"] if kind == "hessian" else c["G"]) + DAMPING * np.eye(len(c["H"]))
    cond = np.linalg.cond(A)
    assert cond < MAX_COND, cond
    rng = np.random.default_rng(7)
    g = np.column_stack([c["grad"], rng.standard_normal(len(A))])
    x_ref = np.linalg.solve(A, g)
    for refine in (1, 0):  # with the default refinement (fused HVP), and the bare factorisation
        Hi = inverse_hessian(c["pt"], damping=DAMPING, method=method, kind=kind, refine=refine)
        assert Hi.method == method
        xs = Hi @ g
        assert np.linalg.norm(A @ xs - g) / np.linalg.norm(g) <= RTOL, (refine, cond)
        # forward error: the rounding bound of the reference solve itself, at least RTOL
        ferr = np.linalg.norm(xs - x_ref) / np.linalg.norm(x_ref)
        assert ferr <= max(RTOL, 100 * cond * np.finfo(float).eps), (refine, cond, ferr)
    w = np.linalg.eigvalsh(A)
    assert Hi.inertia == (int((w < 0).sum()), 0, int((w > 0).sum()))
    assert Hi.logdet == pytest.approx(np.linalg.slogdet(A)[1], rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", CASES)
def test_contract(name, form):
    """One layer type (the case) × one form, against the dense JAX reference."""
    c = case(name)
    pt, H, G = c["pt"], c["H"], c["G"]
    n = len(H)
    V = np.random.default_rng(3).standard_normal((n, 3))
    if form == "gradient":
        assert rel(np.asarray(pt.gradient), c["grad"]) <= RTOL
    elif form == "fused":
        assert rel(hvp(pt, V), H @ V) <= RTOL
        assert rel(hvp(pt, V[:, 0]), H @ V[:, 0]) <= RTOL
        assert rel(dense_of(hessian(pt, form="fused")), H) <= RTOL
        Hd = hessian(pt, damping=DAMPING, form="fused") @ V
        assert rel(Hd, H @ V + DAMPING * V) <= RTOL
    elif form in ("literal", "lifted"):
        Hop = hessian(pt, form=form)
        assert rel(Hop.todense(), H) <= RTOL
        assert rel(Hop.H @ V, H @ V) <= RTOL  # the adjoint chain (the djac_*_T hooks)
        assert rel(hessian(pt, form=form, damping=DAMPING) @ V, H @ V + DAMPING * V) <= RTOL
    elif form.startswith("inverse-"):
        _solve_check(name, "hessian", form.split("-")[1])
    elif form == "ggn-fused":
        assert rel(ggn_vp(pt, V), G @ V) <= RTOL
        assert rel(dense_of(hessian(pt, kind="ggn")), G) <= RTOL
    elif form == "ggn-literal":
        Gop = hessian(pt, kind="ggn", form="literal")
        assert rel(Gop.todense(), G) <= RTOL
        assert rel(Gop.H @ V, G @ V) <= RTOL
    elif form.startswith("ggn-inverse-"):
        _solve_check(name, "ggn", form.split("-")[2])
    else:  # pragma: no cover
        raise AssertionError(form)


@pytest.mark.parametrize("name", TEST_ONLY_CASES)
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_dottest_fused_test_only_layers(name, kind):
    pt = case(name)["pt"]
    H = hessian(pt, form="fused", kind=kind, damping=0.1)
    assert dottest(H, *H.shape, rtol=1e-10)


# -- the test-only layers' generic explicit blocks and djac hooks against JAX ---------
LAYER_CASES = {
    "LayerNorm": (lambda: LayerNorm(4), lambda ly: layernorm_jax(4, ly.eps)),
    "CircularConv": (lambda: CircularConv(5), lambda ly: circular_conv_jax(5)),
}


@functools.cache
def layer_case(which):
    make, jaxf = LAYER_CASES[which]
    ly = make()
    f = jaxf(ly)
    rng = np.random.default_rng(11)
    B = 3
    z = rng.standard_normal((B, ly.n_in))
    x = ly.init_params(rng)
    b = rng.standard_normal((B, ly.n_out))
    dz = rng.standard_normal((B, ly.n_in))
    dx = rng.standard_normal(ly.n_params)
    s = np.arange(B)

    def blocks(z, x, b, dz, dx):
        Jz = jax.jacfwd(f, argnums=0)(z, x)[s, :, s, :]  # (B, m, n) per-sample blocks
        Jx = jax.jacfwd(f, argnums=1)(z, x)  # (B, m, p)

        def phi(z, x):
            return jnp.sum(b * f(z, x))

        Kzz = jax.hessian(phi, argnums=0)(z, x)[s, :, s, :]
        Kxz = jnp.transpose(jax.jacfwd(jax.grad(phi, argnums=0), argnums=1)(z, x), (2, 0, 1))
        Kxx = jax.hessian(phi, argnums=1)(z, x)

        def jz(z, x):
            return jax.jacfwd(f, argnums=0)(z, x)[s, :, s, :]

        def jx(z, x):
            return jax.jacfwd(f, argnums=1)(z, x)

        dJz = jax.jvp(jz, (z, x), (dz, dx))[1]
        dJx = jax.jvp(jx, (z, x), (dz, dx))[1]
        return Jz, Jx, Kzz, Kxz, Kxx, dJz, dJx

    res = [np.asarray(r) for r in jax.jit(blocks, compiler_options=FAST_COMPILE)(z, x, b, dz, dx)]
    return ly, z, x, b, dz, dx, res


@pytest.mark.parametrize("which", list(LAYER_CASES))
def test_test_only_layer_generic_blocks_match_jax(which):
    ly, z, x, b, dz, dx, (Jz, Jx, Kzz, Kxz, Kxx, dJz, dJx) = layer_case(which)
    # the blocks are the Layer defaults (the test-only layers override none of them)
    for hook in ("jacobian_z", "jacobian_x", "hessian_blocks", "jvp_keep", "hvp_vjp"):
        assert getattr(type(ly), hook) is getattr(Layer, hook)
    cache = ly.forward(z, x)
    assert rel(ly.jacobian_z(cache), Jz) <= RTOL
    assert rel(ly.jacobian_x(cache), Jx) <= RTOL
    kzz, kxz, kxx = ly.hessian_blocks(cache, b)
    assert rel(kzz, Kzz) <= RTOL
    assert rel(kxz, Kxz) <= RTOL
    assert rel(kxx, Kxx) <= RTOL if np.abs(Kxx).max() > 0 else np.abs(kxx).max() == 0
    # the hvp's other half (K_xz dz; the default blocks read K_zx dx only)
    hz, hx = ly.hvp(cache, b, dz[None], dx[None])
    assert rel(hx[0], np.einsum("psi,si->p", Kxz, dz) + Kxx @ dx) <= RTOL
    assert rel(hz[0], np.einsum("sij,sj->si", Kzz, dz) + np.einsum("psi,p->si", Kxz, dx)) <= RTOL
    # the djac hooks (literal eq. 24) along (dz, dx) and their adjoints
    assert rel(ly.djac_z(cache, dz[None], dx[None])[0], dJz) <= RTOL
    assert rel(ly.djac_x(cache, dz[None], dx[None])[0], dJx) <= RTOL
    rng = np.random.default_rng(5)
    for fwd, adj, shape in (
        (ly.djac_z, ly.djac_z_T, dJz.shape),
        (ly.djac_x, ly.djac_x_T, dJx.shape),
    ):
        T = rng.standard_normal((2, *shape))
        u, v = rng.standard_normal((2, *dz.shape)), rng.standard_normal((2, ly.n_params))
        tz, tx = adj(cache, T)
        lhs = np.sum(T * fwd(cache, u, v))
        rhs = np.sum(tz * u) + np.sum(tx * v)
        assert abs(lhs - rhs) <= 1e-12 * (abs(lhs) + abs(rhs))
