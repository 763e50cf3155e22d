"""``blockops.interop.jax``: per-sample JAX functions as layers, losses and pipelines.

Two pipelines mix :class:`FunctionLayer` stages (a per-sample layer
normalisation with pytree parameters, a gated layer, a parameter-free stage)
with native ``Dense`` layers and end in a native loss or a per-sample JAX loss
(:class:`JaxLoss`). Every form (gradient, fused HVP, literal and lifted eq. 24
through the JAX ``djac_*`` hooks, Gauss-Newton, exact inverse by the Riccati
sweep and the banded KKT LU) is compared with an independent dense reference:
``jax.hessian`` of the whole loss written directly in batched ``jax.numpy``
over the flat parameter vector, from the documented layout only (it never
calls the per-sample functions or the adapter). Float64, relative 1e-10.
"""

from __future__ import annotations

import functools
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from pylops.utils import dottest  # noqa: E402

from blockops.hessian import ggn_vp, hessian, hvp  # noqa: E402
from blockops.interop.jax import (  # noqa: E402
    FunctionLayer,
    JaxLoss,
    from_jax,
    initial_params,
    split_params,
    x64_enabled,
)
from blockops.inverse import inverse_hessian  # noqa: E402
from blockops.network import Dense, MSELoss, Pipeline  # noqa: E402

jax.config.update("jax_enable_x64", True)

RTOL = 1e-10
DAMPING = 1e-2
EPS = 1e-3  # layer-norm epsilon
# XLA's backend optimisations cost more than they save on the one-shot, tiny reference
FAST_COMPILE = {"xla_backend_optimization_level": 0}


# -- per-sample functions (what a user writes) ----------------------------------------
def layernorm(u, p):
    """``p = {"gamma": (n,), "beta": (n,)}`` (flat layout: beta, then gamma: keys sorted)."""
    c = u - jnp.mean(u)
    return p["gamma"] * c / jnp.sqrt(jnp.mean(c * c) + EPS) + p["beta"]


def gated(n, m):
    """``tanh(A u + a) ⊙ sigmoid(G u + g)``, flat ``x = (A, a, G, g)``, ``A, G`` ``(m, n)``."""

    def f(u, x):
        A = x[: m * n].reshape(m, n)
        a = x[m * n : m * n + m]
        G = x[m * n + m : 2 * m * n + m].reshape(m, n)
        g = x[2 * m * n + m :]
        return jnp.tanh(A @ u + a) * jax.nn.sigmoid(G @ u + g)

    return f


def softsign(u, x):
    return u / (1.0 + jnp.abs(u)) + 0.1 * jnp.sin(u)


def ce_loss(z, y):  # per sample, integer label y
    return jax.nn.logsumexp(z) - z[y]


# -- the two cases -----------------------------------------------------------------------
def _ln_params(rng, n):
    return {"gamma": 1.0 + 0.3 * rng.standard_normal(n), "beta": 0.2 * rng.standard_normal(n)}


def build(name):
    rng = np.random.default_rng(5 if name == "mixed-mse" else 6)
    if name == "mixed-mse":
        stages = [
            Dense(3, 5, "tanh"),
            FunctionLayer(layernorm, 5, 5, _ln_params(rng, 5), name="LN"),
            FunctionLayer(gated(5, 4), 5, 4, 0.6 * rng.standard_normal(2 * 4 * 5 + 8)),
            Dense(4, 2, "identity"),
        ]
        net = from_jax(stages, MSELoss())
        B, y = 3, rng.standard_normal((3, 2))
    else:  # "jax-loss": a tuple stage first, a parameter-free stage, a JAX loss
        stages = [
            (gated(3, 4), 3, 4, 0.6 * rng.standard_normal(2 * 4 * 3 + 8), "gated"),
            Dense(4, 4, "tanh"),
            FunctionLayer(softsign, 4, 4, None),
            Dense(4, 4, "identity"),
        ]
        net = from_jax(stages, ce_loss)
        B, y = 3, rng.integers(0, 4, size=3)
    x = initial_params(net, seed=1)
    X = rng.standard_normal((B, 3))
    return net, x, X, y


# -- the independent reference: the whole loss in batched jnp over the flat vector --------
def _dense(Z, x, n, m):
    return Z @ x[: m * n].reshape(m, n).T + x[m * n :]


def _ln_batch(Z, gamma, beta):
    c = Z - Z.mean(axis=1, keepdims=True)
    return gamma * c / jnp.sqrt((c * c).mean(axis=1, keepdims=True) + EPS) + beta


def _gated_batch(Z, x, n, m):
    A, a = x[: m * n].reshape(m, n), x[m * n : m * n + m]
    G, g = x[m * n + m : 2 * m * n + m].reshape(m, n), x[2 * m * n + m :]
    return jnp.tanh(Z @ A.T + a) / (1.0 + jnp.exp(-(Z @ G.T + g)))


def hidden_ref(name, x, X):
    if name == "mixed-mse":  # 20 | 10 (beta, gamma) | 48 | 10
        z = jnp.tanh(_dense(X, x[:20], 3, 5))
        z = _ln_batch(z, x[25:30], x[20:25])
        z = _gated_batch(z, x[30:78], 5, 4)
        return _dense(z, x[78:88], 4, 2)
    # 32 | 20 | 0 | 20
    z = _gated_batch(X, x[:32], 3, 4)
    z = jnp.tanh(_dense(z, x[32:52], 4, 4))
    z = z / (1.0 + jnp.abs(z)) + 0.1 * jnp.sin(z)
    return _dense(z, x[52:72], 4, 4)


def loss_of_z(name, z, y):
    B = z.shape[0]
    if name == "mixed-mse":
        return 0.5 * jnp.sum((z - y) ** 2) / B
    lse = jnp.log(jnp.sum(jnp.exp(z), axis=1))
    return jnp.sum(lse - z[jnp.arange(B), y]) / B


def reference(name, x, X, y):
    """``(loss, grad, H, GGN)`` of the plain re-implementation, one jit compile."""

    def loss(x):
        return loss_of_z(name, hidden_ref(name, x, X), y)

    def all_of(x):
        z = hidden_ref(name, x, X)
        J = jax.jacfwd(lambda x: hidden_ref(name, x, X).ravel())(x)
        Hl = jax.hessian(lambda zf: loss_of_z(name, zf.reshape(z.shape), y))(z.ravel())
        return loss(x), jax.grad(loss)(x), jax.hessian(loss)(x), J.T @ Hl @ J

    res = jax.jit(all_of, compiler_options=FAST_COMPILE)(jnp.asarray(x))
    return [np.asarray(r, dtype=np.float64) for r in res]


@functools.cache
def case(name):
    net, x, X, y = build(name)
    L, g, H, G = reference(name, x, X, y)
    pt = net.linearize(x, X, y)
    return {
        "net": net,
        "x": x,
        "X": X,
        "y": y,
        "pt": pt,
        "loss": float(L),
        "grad": g,
        "H": H,
        "G": G,
    }


def rel(A, B):
    return np.abs(A - B).max() / max(np.abs(B).max(), 1e-300)


CASES = ("mixed-mse", "jax-loss")
ERRORS: dict = {}  # measured errors, printed by the last test (pytest -s)


def record(key, err):
    ERRORS[key] = max(ERRORS.get(key, 0.0), float(err))
    return err


def test_cases_sizes_and_layout():
    net, *_ = build("mixed-mse")
    assert net.n_params == 88
    assert [ly.n_params for ly in net.layers] == [20, 10, 48, 10, 0]
    net, *_ = build("jax-loss")
    assert [ly.n_params for ly in net.layers] == [32, 20, 0, 20, 0]
    assert isinstance(net.layers[0], FunctionLayer) and isinstance(net.layers[-1], JaxLoss)
    assert net.layers[0].describe() == "FunctionLayer[gated] 3->4"


@pytest.mark.parametrize("name", CASES)
def test_reference_is_sane(name):
    c = case(name)
    H, G = c["H"], c["G"]
    assert rel(H, H.T) <= 1e-13 and rel(G, G.T) <= 1e-13
    ev = np.linalg.eigvalsh(H)
    assert ev.min() < -1e-6 * ev.max() and ev.max() > 0, ev  # indefinite
    assert np.linalg.eigvalsh(G).min() >= -1e-12 * np.abs(G).max() * len(G)
    assert c["pt"].loss == pytest.approx(c["loss"], rel=1e-13)


FORMS = ("gradient", "fused", "literal", "lifted", "ggn-fused", "ggn-literal")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", CASES)
def test_forms(name, form):
    c = case(name)
    pt, H, G = c["pt"], c["H"], c["G"]
    V = np.random.default_rng(3).standard_normal((len(H), 3))
    if form == "gradient":
        assert record(form, rel(np.asarray(pt.gradient), c["grad"])) <= RTOL
        g2 = c["net"].gradient(c["x"], c["X"], c["y"], method="bidiagonal")
        assert rel(g2, c["grad"]) <= RTOL
    elif form == "fused":
        assert record(form, rel(hvp(pt, V), H @ V)) <= RTOL
        assert rel(hvp(pt, V[:, 0]), H @ V[:, 0]) <= RTOL
        assert record(form, rel(hessian(pt) @ V, H @ V)) <= RTOL
        assert record(form, rel(hessian(pt).todense(), H)) <= RTOL
        Hd = hessian(pt, damping=DAMPING) @ V
        assert rel(Hd, H @ V + DAMPING * V) <= RTOL
    elif form in ("literal", "lifted"):  # through the JAX djac_* hooks and their adjoints
        Hop = hessian(pt, form=form)  # (random directions: todense would compile more sizes)
        assert record(form, rel(Hop @ V, H @ V)) <= RTOL
        assert record(form, rel(Hop.H @ V, H @ V)) <= RTOL
    elif form == "ggn-fused":
        assert record(form, rel(ggn_vp(pt, V), G @ V)) <= RTOL
        assert record(form, rel(hessian(pt, kind="ggn").todense(), G)) <= RTOL
    elif form == "ggn-literal":
        Gop = hessian(pt, kind="ggn", form="literal")
        assert record(form, rel(Gop @ V, G @ V)) <= RTOL
        assert record(form, rel(Gop.H @ V, G @ V)) <= RTOL
    else:  # pragma: no cover
        raise AssertionError(form)


@pytest.mark.parametrize("method", ["riccati", "kkt"])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("name", CASES)
def test_exact_inverse(name, kind, method):
    c = case(name)
    A = (c["H"] if kind == "hessian" else c["G"]) + DAMPING * np.eye(len(c["H"]))
    w = np.linalg.eigvalsh(A)
    if kind == "hessian":
        assert w.min() < 0 < w.max()  # the damped Hessian is still indefinite
    cond = np.abs(w).max() / np.abs(w).min()
    assert cond < 1e8
    g = np.column_stack([c["grad"], np.random.default_rng(7).standard_normal(len(A))])
    x_ref = np.linalg.solve(A, g)
    for refine in (1, 0):
        Hi = inverse_hessian(c["pt"], damping=DAMPING, method=method, kind=kind, refine=refine)
        assert Hi.method == method
        xs = Hi @ g
        res = np.linalg.norm(A @ xs - g) / np.linalg.norm(g)
        ferr = np.linalg.norm(xs - x_ref) / np.linalg.norm(x_ref)
        record(f"inverse-{kind}-{method} residual", res)
        record(f"inverse-{kind}-{method} forward", ferr)
        assert res <= RTOL
        assert ferr <= max(RTOL, 100 * cond * np.finfo(float).eps), (refine, cond, ferr)
    assert Hi.inertia == (int((w < 0).sum()), 0, int((w > 0).sum()))
    assert Hi.logdet == pytest.approx(np.sum(np.log(np.abs(w))), rel=1e-9, abs=1e-9)


def test_mixed_precision_inverse():
    """``precision="mixed"`` re-runs the JAX functions on the float32 copy of the caches."""
    c = case("mixed-mse")
    A = c["H"] + DAMPING * np.eye(len(c["H"]))
    Hi = inverse_hessian(c["pt"], damping=DAMPING, precision="mixed", refine=4)
    xs = Hi @ c["grad"]
    res = np.linalg.norm(A @ xs - c["grad"]) / np.linalg.norm(c["grad"])
    assert record("inverse mixed residual", res) <= 1e-9


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("name", CASES)
def test_dottest_fused(name, kind):
    H = hessian(case(name)["pt"], kind=kind, damping=0.1)
    assert dottest(H, *H.shape, rtol=1e-10)


def test_layer_hooks_adjoint_and_symmetric():
    """``vjp`` adjoint to ``jvp``, ``hvp`` symmetric, ``djac_*_T`` adjoint to ``djac_*``."""
    c = case("mixed-mse")
    pt = c["pt"]
    rng = np.random.default_rng(9)
    for l in (1, 2):
        ly, cache, b = pt.layers[l], pt.caches[l], pt.bs[l]
        B, n, m, p = cache.z_prev.shape[0], ly.n_in, ly.n_out, ly.n_params
        u, v = rng.standard_normal((2, B, n)), rng.standard_normal((2, p))
        w = rng.standard_normal((2, B, m))
        bz, bx = ly.vjp(cache, w)
        lhs, rhs = np.sum(w * ly.jvp(cache, u, v)), np.sum(bz * u) + np.sum(bx * v)
        assert abs(lhs - rhs) <= 1e-12 * (abs(lhs) + abs(rhs))
        u2, v2 = rng.standard_normal((2, B, n)), rng.standard_normal((2, p))
        hz, hx = ly.hvp(cache, b, u, v)
        hz2, hx2 = ly.hvp(cache, b, u2, v2)
        a1, a2 = np.sum(hz * u2) + np.sum(hx * v2), np.sum(hz2 * u) + np.sum(hx2 * v)
        assert abs(a1 - a2) <= 1e-12 * (abs(a1) + abs(a2))
        # None directions agree with explicit zeros
        hz0, hx0 = ly.hvp(cache, b, u, np.zeros((2, p)))
        hzn, hxn = ly.hvp(cache, b, u, None)
        assert rel(hzn, hz0) <= 1e-14 and rel(hxn, hx0) <= 1e-14
        for fwd, adj, cols in ((ly.djac_z, ly.djac_z_T, n), (ly.djac_x, ly.djac_x_T, p)):
            T = rng.standard_normal((2, B, m, cols))
            tz, tx = adj(cache, T)
            lhs, rhs = np.sum(T * fwd(cache, u, v)), np.sum(tz * u) + np.sum(tx * v)
            assert abs(lhs - rhs) <= 1e-12 * (abs(lhs) + abs(rhs))
        # outputs are fresh writable NumPy arrays
        out = ly.jvp(cache, u, v)
        assert isinstance(out, np.ndarray) and out.flags.writeable and out.dtype == np.float64


def test_pytree_round_trip():
    rng = np.random.default_rng(2)
    tree = {
        "w": rng.standard_normal((2, 3)).astype(np.float32),
        "b": (rng.standard_normal(2), np.float64(0.5)),
    }

    def fn(u, p):
        return jnp.tanh(p["w"] @ u + p["b"][0]) * p["b"][1]

    ly = FunctionLayer(fn, 3, 2, tree)
    flat, _ = ravel_pytree(tree)
    assert ly.n_params == 9 and ly.params.dtype == np.float64
    assert np.array_equal(ly.params, np.asarray(flat, dtype=np.float64))  # ravel_pytree layout
    back = ly.unravel(ly.params)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)):
        assert a.shape == np.shape(b) and np.array_equal(a, np.asarray(b, dtype=np.float64))
    assert np.array_equal(ly.ravel(back), ly.params)
    back32 = ly.unravel(ly.params.astype(np.float32))  # the flat vector's dtype is kept
    assert all(a.dtype == np.float32 for a in jax.tree_util.tree_leaves(back32))
    with pytest.raises(ValueError, match="structure"):
        ly.ravel({"w": tree["w"]})

    # the gradient mapped back is jax.grad with respect to the pytree itself
    net = from_jax([ly, Dense(2, 2, "identity")], MSELoss())
    x = initial_params(net, seed=3)
    assert np.array_equal(x[:9], ly.params) and np.array_equal(x, net.init(seed=3))
    X, y = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    parts = split_params(net, net.gradient(x, X, y))
    W, c = x[9:13].reshape(2, 2), x[13:]

    def loss_tree(p):
        z = jnp.tanh(X @ p["w"].T + p["b"][0]) * p["b"][1]
        return 0.5 * jnp.sum((z @ W.T + c - y) ** 2) / 4

    tree64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)
    ref = jax.jit(jax.grad(loss_tree))(tree64)
    for a, b in zip(jax.tree_util.tree_leaves(parts[0]), jax.tree_util.tree_leaves(ref)):
        assert rel(a, np.asarray(b)) <= RTOL
    assert parts[1].shape == (6,) and parts[2].shape == (0,)


def test_compile_once():
    """``fn`` is traced once per shapes: repeated products of one shape never retrace."""
    traces = [0]

    def fn(u, x):
        traces[0] += 1  # Python side effect: runs only while JAX traces
        return jnp.tanh(x[:3] * u + x[3:])

    ly = FunctionLayer(fn, 3, 3, np.linspace(0.5, 1.5, 6))
    net = Pipeline([ly, Dense(3, 2, "tanh"), MSELoss()])
    rng = np.random.default_rng(4)
    x, X, y = net.init(seed=0), rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    pt = net.linearize(x, X, y)
    V = rng.standard_normal((net.n_params, 4))
    hvp(pt, V)
    ly.hvp(pt.caches[0], pt.bs[0], None, V[:6].T)
    n1 = traces[0]
    for _ in range(5):
        hvp(pt, V)
        ly.hvp(pt.caches[0], pt.bs[0], None, V[:6].T)
    pt2 = net.linearize(x + 0.1, X, y)  # new values, same shapes
    hvp(pt2, V)
    hvp(pt2, V[:, :3])  # k = 3 and 4 share one compiled batch size (powers of four)
    assert traces[0] == n1
    V5 = rng.standard_normal((net.n_params, 5))
    hvp(pt, V5)  # a new batch size (16) compiles once more, then is reused
    n2 = traces[0]
    assert n2 > n1
    hvp(pt2, V5)
    big = hvp(pt2, V5[:, :4].repeat(10, axis=1))  # k = 40: three batches of that size
    assert traces[0] == n2
    assert rel(big, hvp(pt2, V5[:, :4]).repeat(10, axis=1)) <= 1e-14


def test_x64_off_raises_and_float32_runs():
    net, x, X, y = build("mixed-mse")
    g64 = case("mixed-mse")["grad"]
    jax.config.update("jax_enable_x64", False)
    try:
        assert not x64_enabled()
        with pytest.raises(RuntimeError, match="jax_enable_x64"):
            net.linearize(x, X, y)
        pt = net.linearize(x.astype(np.float32), X.astype(np.float32), y.astype(np.float32))
        assert pt.gradient.dtype == np.float32
        assert rel(pt.gradient, g64) <= 1e-4
    finally:
        jax.config.update("jax_enable_x64", True)
    assert x64_enabled()


def test_errors():
    with pytest.raises(ValueError, match=r"fn returned shape \(3,\).*expected \(2,\)"):
        FunctionLayer(lambda u, x: u * x, 3, 2, np.ones(3))
    with pytest.raises(TypeError, match=r"eqx\.partition"):
        FunctionLayer(lambda u, p: u, 3, 3, {"act": jnp.tanh})
    with pytest.raises(TypeError, match="stage 1"):
        from_jax([object()], MSELoss())
    with pytest.raises(ValueError, match="loss"):
        from_jax([MSELoss()], MSELoss())
    with pytest.raises(TypeError, match="Loss or a"):
        from_jax([Dense(2, 2)], 3)
    ly = FunctionLayer(lambda u, x: u * x, 3, 3, np.ones(3))
    with pytest.raises(ValueError, match="expected \\(B, 3\\)"):
        ly.forward(np.ones((2, 4)), np.ones(3))


def test_jax_loss_functions_are_array_generic():
    """The CustomLoss callables take NumPy (return NumPy) and trace under JAX (spec references)."""
    loss = JaxLoss(ce_loss)
    net = from_jax([Dense(3, 4)], loss)
    f_loss, f_grad, f_hvp = net.spec()[-1]["functions"]
    z, y = np.random.default_rng(1).standard_normal((3, 4)), np.array([0, 3, 1])
    v = np.ones((3, 4))
    assert isinstance(f_loss(z, y), np.ndarray) and f_loss(z, y).shape == (3,)
    assert rel(f_grad(z, y), np.asarray(jax.grad(lambda z: jnp.sum(f_loss(z, y)))(z))) <= 1e-13
    hv = np.asarray(jax.jit(lambda z: jax.jvp(lambda z_: f_grad(z_, y), (z,), (v,))[1])(z))
    assert rel(f_hvp(z, y, v), hv) <= 1e-13


def softsign_loss(z, y):
    return jnp.sum((z - y) ** 2 / (1.0 + jnp.abs(z - y)))


def test_pickle_round_trip():
    """Layers and losses pickle without their compiled functions (module-level fn)."""
    net = from_jax([(softsign, 2, 2, None), Dense(2, 2)], softsign_loss)
    rng = np.random.default_rng(8)
    x, X, y = net.init(seed=2), rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    g = net.gradient(x, X, y)
    net2 = pickle.loads(pickle.dumps(net))
    assert net2.layers[0]._jit is None
    assert np.array_equal(net2.gradient(x, X, y), g)


def test_import_blockops_does_not_import_jax():
    # pylops itself imports jax when it is installed unless JAX_PYLOPS=0: switch that
    # off to see what blockops (and blockops.interop) import
    code = "import blockops, blockops.interop, sys; print('jax' in sys.modules)"
    env = {**os.environ, "JAX_PYLOPS": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "False"


def test_zz_report_errors():
    """Print the measured errors (``pytest -s``); runs last in file order."""
    for k, v in sorted(ERRORS.items()):
        print(f"{k:40s} {v:.1e}")
