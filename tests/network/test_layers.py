"""Every layer method against JAX derivatives of the plain re-implementation in ``reference.py``.

For each layer: ``jvp``, ``vjp``, ``hvp`` (all combinations of ``None``
directions), ``jacobian_z``, ``jacobian_x``, ``hessian_blocks`` against
``jax.jacfwd`` / ``jax.hessian`` of the per-layer function; ``djac_z`` and
``djac_x`` against ``jax.jvp`` of the JAX Jacobian, and their adjoints by the
dot test; the generic fallbacks of the base class against the overrides.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as R
from hypothesis import given, settings
from hypothesis import strategies as st

from blockops.network import (
    ACTIVATIONS,
    Bias,
    CustomLoss,
    Dense,
    Elementwise,
    Layer,
    MSELoss,
    Pipeline,
    Residual,
    Scale,
    SoftmaxCrossEntropy,
    activation,
)

TOL64 = 1e-12


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    nb = np.linalg.norm(b)
    return np.linalg.norm(a - b) / nb if nb > 0 else np.linalg.norm(a)


def build(kind, act, n_in=3, n_out=4):
    """A layer put in a one-layer-plus-loss pipeline (so it has a name and sizes)."""
    if kind in ("MSELoss", "SoftmaxCrossEntropy", "CustomLoss"):
        loss = R.make_loss(kind)
        Pipeline([Dense(n_in, n_in, "identity"), loss])
        return loss
    layer = R.make_layer(kind, n_in, n_out if kind == "Dense" else n_in, act)
    Pipeline([layer, MSELoss()])
    return layer


def data(layer, rng, B, dtype=np.float64):
    n, m, p = layer.n_in, layer.n_out, layer.n_params
    z = rng.standard_normal((B, n)).astype(dtype)
    x = layer.init_params(rng, dtype) if p else np.zeros(0, dtype)
    if p:
        x = (x + 0.3 * rng.standard_normal(p)).astype(dtype)
    y = None
    if isinstance(layer, SoftmaxCrossEntropy):
        y = rng.integers(0, n, size=B)
    elif layer.is_loss:
        y = rng.standard_normal((B, n)).astype(dtype)
    b = rng.standard_normal((B, m)).astype(dtype)
    return z, x, y, b


CASES = (
    [("Dense", a) for a in R.ACTIVATION_NAMES]
    + [(k, a) for k in ("Residual", "Bias", "Scale", "Elementwise") for a in ("tanh", "custom")]
    + [
        ("Scale", "gelu"),
        ("Bias", "softplus"),
        ("Elementwise", "sigmoid"),
        ("Residual", "identity"),
    ]
    + [(k, None) for k in ("MSELoss", "SoftmaxCrossEntropy", "CustomLoss")]
)


@pytest.mark.parametrize("kind,act", CASES, ids=[f"{k}-{a}" for k, a in CASES])
def test_layer_against_jax(kind, act):
    rng = np.random.default_rng(abs(hash((kind, act))) % 2**32)
    layer = build(kind, act)
    B, k = 3, 2
    z, x, y, b = data(layer, rng, B)
    n, m, p = layer.n_in, layer.n_out, layer.n_params
    spec_l = Pipeline([layer] if layer.is_loss else [layer, MSELoss()]).spec()[0]
    ref = R.layer_blocks(spec_l, z, x, b, y)
    z0, x0 = z.copy(), x.copy()
    c = layer.forward(z, x, y)
    out_ref = np.asarray(R.layer_fn(spec_l, jnp.asarray(z), jnp.asarray(x), y))
    assert rel_err(c.z, out_ref) <= TOL64

    Jz, Jx = ref["jacobian_z"], ref["jacobian_x"]
    # off-sample blocks of the JAX Jacobian are zero: storing (B, m, n) loses nothing
    full = ref["jacobian_z_full"].copy()
    full[np.arange(B), :, np.arange(B), :] = 0.0
    assert np.abs(full).max() == 0.0

    assert rel_err(layer.jacobian_z(c), Jz) <= TOL64
    assert rel_err(layer.jacobian_x(c), Jx) <= TOL64
    Kzz, Kxz, Kxx = layer.hessian_blocks(c, b)
    assert rel_err(Kzz, ref["Kzz"]) <= TOL64
    assert rel_err(Kxz, ref["Kxz"]) <= TOL64
    assert rel_err(Kxx, ref["Kxx"]) <= TOL64
    # the base-class fallbacks (built from jvp / hvp) agree with the overrides
    assert rel_err(Layer.jacobian_z(layer, c), Jz) <= TOL64
    assert rel_err(Layer.jacobian_x(layer, c), Jx) <= TOL64
    for got, want in zip(Layer.hessian_blocks(layer, c, b), (ref["Kzz"], ref["Kxz"], ref["Kxx"])):
        assert rel_err(got, want) <= TOL64

    dz = rng.standard_normal((k, B, n))
    dx = rng.standard_normal((k, p))
    # first order
    jv_ref = np.einsum("sij,ksj->ksi", Jz, dz) + np.einsum("sip,kp->ksi", Jx, dx)
    assert rel_err(layer.jvp(c, dz, dx), jv_ref) <= TOL64
    assert rel_err(layer.jvp(c, dz, None), np.einsum("sij,ksj->ksi", Jz, dz)) <= TOL64
    if p:
        assert rel_err(layer.jvp(c, None, dx), np.einsum("sip,kp->ksi", Jx, dx)) <= TOL64
    bb = rng.standard_normal((k, B, m))
    bz, bx = layer.vjp(c, bb)
    assert rel_err(bz, np.einsum("ksi,sij->ksj", bb, Jz)) <= TOL64
    assert bx.shape == (k, p)
    if p:
        assert rel_err(bx, np.einsum("ksi,sip->kp", bb, Jx)) <= TOL64
    # second order, b-contracted (eqs. 12/22 contracted with b)
    Kzz_d, Kxz_d = ref["Kzz"], ref["Kxz"]
    hz_ref = np.einsum("sij,ksj->ksi", Kzz_d, dz) + np.einsum("psi,kp->ksi", Kxz_d, dx)
    hx_ref = np.einsum("psi,ksi->kp", Kxz_d, dz) + dx @ ref["Kxx"].T
    hz, hx = layer.hvp(c, b, dz, dx)
    assert rel_err(hz, hz_ref) <= TOL64
    if p:
        assert rel_err(hx, hx_ref) <= TOL64
    hz, hx = layer.hvp(c, b, dz, None)
    assert rel_err(hz, np.einsum("sij,ksj->ksi", Kzz_d, dz)) <= TOL64
    assert hx.shape == (k, p)
    if p:
        assert rel_err(hx, np.einsum("psi,ksi->kp", Kxz_d, dz)) <= TOL64
        hz, hx = layer.hvp(c, b, None, dx)
        assert rel_err(hz, np.einsum("psi,kp->ksi", Kxz_d, dx)) <= TOL64
        assert rel_err(hx, dx @ ref["Kxx"].T) <= TOL64

    # un-contracted second derivatives (literal eq. 24) against jvp of the JAX Jacobian
    Dz = layer.djac_z(c, dz, dx)
    Dx = layer.djac_x(c, dz, dx)
    assert Dz.shape == (k, B, m, n) and Dx.shape == (k, B, m, p)
    for j in range(k):
        assert rel_err(Dz[j], R.djac_apply(spec_l, z, x, dz[j], dx[j], "z", y)) <= TOL64
        if p:
            assert rel_err(Dx[j], R.djac_apply(spec_l, z, x, dz[j], dx[j], "x", y)) <= TOL64
    # contracting djac_x with b gives the hvp's parameter part (eq. 24: K_xz dz + K_xx dx)
    if p:
        assert rel_err(np.einsum("si,ksip->kp", b, Dx), layer.hvp(c, b, dz, dx)[1]) <= TOL64
    # b Dzz dz + b Dxz dx is the z-part of the hvp: b contracted with d(∇_z f)
    assert rel_err(np.einsum("si,ksij->ksj", b, Dz), layer.hvp(c, b, dz, dx)[0]) <= TOL64
    # adjoints: dot test <T, djac(d)> = <djac_T(T), d>
    for fwd, adj, shape in (
        (layer.djac_z, layer.djac_z_T, (k, B, m, n)),
        (layer.djac_x, layer.djac_x_T, (k, B, m, p)),
    ):
        T = rng.standard_normal(shape)
        lhs = np.sum(T * fwd(c, dz, dx))
        az, ax = adj(c, T)
        assert az.shape == (k, B, n) and ax.shape == (k, p)
        rhs = np.sum(az * dz) + np.sum(ax * dx)
        assert abs(lhs - rhs) <= TOL64 * max(
            1.0, np.sqrt(np.sum(T * T)) * np.sqrt(np.sum(dz * dz) + np.sum(dx * dx))
        )
    # one-sided directions of djac
    assert rel_err(layer.djac_z(c, dz, None), layer.djac_z(c, dz, 0 * dx)) <= TOL64
    assert rel_err(layer.djac_x(c, None, dx), layer.djac_x(c, 0 * dz, dx)) <= TOL64
    # nothing mutated
    np.testing.assert_array_equal(z, z0)
    np.testing.assert_array_equal(x, x0)


@settings(max_examples=8)
@given(
    kind=st.sampled_from(["Dense", "Residual", "Scale", "Bias"]),
    act=st.sampled_from(R.ACTIVATION_NAMES),
    n_in=st.integers(1, 8),
    n_out=st.integers(1, 8),
    B=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_blocks_hypothesis(kind, act, n_in, n_out, B, seed):
    """Explicit blocks over random sizes (one JAX compilation per example)."""
    rng = np.random.default_rng(seed)
    layer = build(kind, act, n_in, n_out)
    z, x, _, b = data(layer, rng, B)
    spec_l = Pipeline([layer, MSELoss()]).spec()[0]
    ref = R.layer_blocks(spec_l, z, x, b)
    c = layer.forward(z, x)
    assert rel_err(layer.jacobian_z(c), ref["jacobian_z"]) <= TOL64
    assert rel_err(layer.jacobian_x(c), ref["jacobian_x"]) <= TOL64
    for got, want in zip(layer.hessian_blocks(c, b), (ref["Kzz"], ref["Kxz"], ref["Kxx"])):
        assert rel_err(got, want) <= TOL64


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_derivatives(name):
    f = R._act({"activation": name, "functions": None})
    t = np.linspace(-6.0, 6.0, 97)
    v, d1, d2 = ACTIVATIONS[name].derivs(t)
    g1 = jax.vmap(jax.grad(f))(jnp.asarray(t))
    g2 = jax.vmap(jax.grad(jax.grad(f)))(jnp.asarray(t))
    assert rel_err(v, f(jnp.asarray(t))) <= TOL64
    assert rel_err(d1, g1) <= TOL64
    assert rel_err(d2, g2) <= 1e-11  # d2 of sigmoid/softplus is ~1e-3 near |t| = 6
    v32, d1_32, d2_32 = ACTIVATIONS[name].derivs(t.astype(np.float32))
    assert v32.dtype == d1_32.dtype == d2_32.dtype == np.float32
    assert rel_err(d1_32, g1) <= 1e-6


def test_activation_large_arguments_finite():
    t = np.array([-800.0, -40.0, 40.0, 800.0])
    for act in ACTIVATIONS.values():
        assert all(np.all(np.isfinite(a)) for a in act.derivs(t)), act.name


def test_custom_activation_and_loss_names():
    a = activation(*R.CUSTOM_ACTIVATION, name="isru")
    net = Pipeline([Dense(2, 3, a), CustomLoss(*R.PSEUDO_HUBER, name="Huber")])
    assert net.layers[0].name == "layer 1 (Dense 2->3, isru)"
    assert net.layers[1].name == "layer 2 (Huber 3->1)"
    assert net.spec()[0]["functions"] == R.CUSTOM_ACTIVATION
    with pytest.raises(TypeError, match="callable"):
        activation(np.tanh, None, None)
    with pytest.raises(TypeError, match="callable"):
        CustomLoss(None, None, None)


@pytest.mark.parametrize("kind", ["Dense", "Scale", "Residual", "SoftmaxCrossEntropy"])
def test_float32_layer(kind):
    rng = np.random.default_rng(5)
    layer = build(kind, "tanh")
    z, x, y, b = data(layer, rng, 3, np.float32)
    c = layer.forward(z, x, y)
    assert c.z.dtype == np.float32
    spec_l = Pipeline([layer] if layer.is_loss else [layer, MSELoss()]).spec()[0]
    ref = R.layer_blocks(
        spec_l, z.astype(np.float64), x.astype(np.float64), b.astype(np.float64), y
    )
    dz = rng.standard_normal((2, *z.shape)).astype(np.float32)
    dx = rng.standard_normal((2, layer.n_params)).astype(np.float32)
    assert layer.jvp(c, dz, dx).dtype == np.float32
    blocks = layer.hessian_blocks(c, b)
    assert all(a.dtype == np.float32 for a in blocks)
    for got, want in zip(blocks, (ref["Kzz"], ref["Kxz"], ref["Kxx"])):
        assert rel_err(got, want) <= 1e-5
    assert rel_err(layer.jacobian_z(c), ref["jacobian_z"]) <= 1e-5
    hz, hx = layer.hvp(c, b, dz, dx)
    assert hz.dtype == hx.dtype == np.float32


def test_layer_input_errors():
    layer = Dense(3, 4)
    Pipeline([layer, MSELoss()])
    z = np.zeros((2, 3))
    x = np.zeros(layer.n_params)
    with pytest.raises(
        ValueError, match=r"layer 1 \(Dense 3->4, tanh\): input z_prev has shape \(2, 2\)"
    ):
        layer.forward(z[:, :2], x)
    with pytest.raises(
        ValueError, match=r"layer 1 .*parameters x have shape \(15,\); expected \(16,\)"
    ):
        layer.forward(z, x[:-1])
    with pytest.raises(TypeError, match="dtype"):
        layer.forward(z.astype(np.int32), x)
    c = layer.forward(z, x)
    with pytest.raises(ValueError, match="dz_prev has shape"):
        layer.jvp(c, np.zeros((1, 2, 2)), None)
    with pytest.raises(ValueError, match="dx has shape"):
        layer.jvp(c, None, np.zeros((1, 3)))
    with pytest.raises(ValueError, match="both are None"):
        layer.hvp(c, np.ones((2, 4)), None, None)
    with pytest.raises(ValueError, match=r"n_in=0; expected an integer >= 1"):
        Dense(0, 3)
    with pytest.raises(ValueError, match=r"n_in=3.5; expected an integer"):
        Dense(3.5, 4)  # used to be truncated to 3 silently
    with pytest.raises(ValueError, match="size must be"):
        Bias(0)
    for L in (Scale, Elementwise):
        with pytest.raises(ValueError):
            L(-1)
    with pytest.raises(ValueError, match="Residual"):
        Residual(0)
