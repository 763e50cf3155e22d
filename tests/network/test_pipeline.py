"""Pipeline: forward, loss, backprop (eq. 7), packing, checks — against the JAX reference."""

from __future__ import annotations

import numpy as np
import pytest
import reference as R
from hypothesis import given, settings

from blockops.network import (
    Bias,
    CustomLoss,
    Dense,
    Elementwise,
    MSELoss,
    Pipeline,
    Residual,
    Scale,
    SoftmaxCrossEntropy,
)


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.linalg.norm(b), 1e-300)
    return np.linalg.norm(a - b) / scale


def close(a, b, rtol, atol=1e-15):
    """``||a - b|| <= rtol ||b|| + atol`` (atol only for references that vanish)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) <= rtol * np.linalg.norm(b) + atol


def _has_bidiagonal() -> bool:
    try:
        from blockops.operators import BlockBidiagonal  # noqa: F401
    except ImportError:
        return False
    return True


METHODS = [
    "vjp",
    pytest.param(
        "bidiagonal",
        marks=pytest.mark.skipif(
            not _has_bidiagonal(), reason="blockops.operators.BlockBidiagonal not available yet"
        ),
    ),
]


def small_net(loss=None):
    return Pipeline(
        [Dense(3, 5, "tanh"), Dense(5, 4, "gelu"), Dense(4, 2, "identity"), loss or MSELoss()]
    )


def small_data(rng, B=4, n0=3, n=2):
    return rng.standard_normal((B, n0)), rng.standard_normal((B, n))


# -- correctness against JAX ---------------------------------------------------------
@settings(max_examples=12)
@given(R.pipelines())
def test_loss_and_gradient_match_jax(case):
    net, x, X, y = case.pipeline, case.x, case.X, case.y
    loss = net.forward(x, X, y)
    assert abs(loss - R.loss_value(net, x, X, y)) <= 1e-12 * max(abs(loss), 1.0)
    g_ref = R.gradient(net, x, X, y)
    assert close(net.gradient(x, X, y), g_ref, 1e-12)
    pt = net.linearize(x, X, y)
    assert close(pt.gradient, g_ref, 1e-12)
    assert pt.loss == pytest.approx(loss, rel=1e-14, abs=1e-300)


@pytest.fixture(scope="module")
def rows_case():
    """A mixed pipeline and its ``b_l`` by JAX: gradients of the loss with respect to
    additive perturbations ``e_l`` of every ``z_l`` (one compilation for all layers)."""
    import jax
    import jax.numpy as jnp

    net = Pipeline(
        [
            Dense(3, 5, "tanh"),
            Scale(5, "sigmoid"),
            Residual(5, "gelu", h=0.3),
            Bias(5, "softplus"),
            Dense(5, 3, "tanh"),
            SoftmaxCrossEntropy(),
        ]
    )
    x = net.init(seed=3)
    X = np.random.default_rng(0).standard_normal((4, 3))
    y = np.array([0, 2, 1, 2])
    spec = net.spec()
    xs = [jnp.asarray(v) for v in R.split(spec, x)]

    def loss(eps):
        z = jnp.asarray(X)
        for s, xl, e in zip(spec, xs, eps):
            z = R.layer_fn(s, z, xl, y) + e
        return jnp.sum(z)

    eps = [jnp.zeros((4, s["n_out"])) for s in spec]
    b_ref = [np.asarray(b) for b in jax.jit(jax.grad(loss))(eps)]
    return net, x, X, y, b_ref


@pytest.mark.parametrize("method", METHODS)
def test_backprop_rows_b_match_jax(rows_case, method):
    """``b_l = ∂z_L/∂z_l`` for every layer, both backprop methods."""
    net, x, X, y, b_ref = rows_case
    pt = net.linearize(x, X, y, method=method)
    for l in range(len(net)):
        assert pt.bs[l].shape == (4, net.layers[l].n_out)
        assert close(pt.bs[l], b_ref[l], 1e-12)
    np.testing.assert_array_equal(pt.bs[-1], np.ones((4, 1)))
    assert close(pt.gradient, R.gradient(net, x, X, y), 1e-12)


@pytest.mark.skipif(not _has_bidiagonal(), reason="BlockBidiagonal not available yet")
@settings(max_examples=10)
@given(R.pipelines())
def test_gradient_methods_agree(case):
    net, x, X, y = case.pipeline, case.x, case.X, case.y
    g1 = net.gradient(x, X, y, method="vjp")
    g2 = net.gradient(x, X, y, method="bidiagonal")
    assert close(g2, g1, 1e-13)


def test_point_fields(rng):
    net = small_net()
    x = net.init(seed=1)
    X, y = small_data(rng)
    pt = net.linearize(x, X, y)
    assert pt.batch_size == 4 and pt.dtype == np.float64 and pt.xp is np
    assert [z.shape for z in pt.zs] == [(4, 3), (4, 5), (4, 4), (4, 2), (4, 1)]
    assert len(pt.caches) == len(pt.bs) == len(pt.xs) == 4
    np.testing.assert_array_equal(pt.params, x)
    assert pt.params is not x  # a private copy
    jz = pt.jacobians_z()
    assert jz is pt.jacobians_z()  # cached
    assert [j.shape for j in jz] == [(4, 5, 3), (4, 4, 5), (4, 2, 4), (4, 1, 2)]
    assert [j.shape for j in pt.jacobians_x()] == [(4, 5, 20), (4, 4, 24), (4, 2, 10), (4, 1, 0)]
    # Dense caches expose what the stagewise solver reads by name
    e = pt.caches[1].extra
    for key in ("W", "pre", "d1", "d2"):
        assert key in e
    np.testing.assert_array_equal(e["W"], x[20:40].reshape(4, 5))


@pytest.mark.parametrize("loss", ["mse", "ce", "custom"])
def test_float32(rng, loss):
    layers = [Dense(3, 6, "tanh"), Residual(6, "sigmoid", h=0.5), Dense(6, 3, "gelu")]
    if loss == "ce":
        layers.append(SoftmaxCrossEntropy())
        y = rng.integers(0, 3, size=5)
    else:
        layers.append(MSELoss() if loss == "mse" else CustomLoss(*R.PSEUDO_HUBER))
        y = rng.standard_normal((5, 3)).astype(np.float32)
    net = Pipeline(layers)
    x = net.init(seed=2, dtype=np.float32)
    X = rng.standard_normal((5, 3)).astype(np.float32)
    assert x.dtype == np.float32
    pt = net.linearize(x, X, y)
    assert pt.gradient.dtype == np.float32 and pt.dtype == np.float32
    assert all(c.z.dtype == np.float32 for c in pt.caches)
    g_ref = R.gradient(net, x.astype(np.float64), X.astype(np.float64), y)
    assert close(pt.gradient, g_ref, 2e-5, atol=1e-6)
    assert pt.loss == pytest.approx(R.loss_value(net, x, X, y), rel=1e-5)


def test_mixed_dtypes_promote(rng):
    net = small_net()
    x = net.init(seed=0, dtype=np.float32)
    X, y = small_data(rng)
    assert net.gradient(x, X, y).dtype == np.float64


# -- packing, init, spec, names ---------------------------------------------------
def test_split_concat_init_spec():
    net = Pipeline(
        [
            Dense(2, 3),
            Bias(3, "sigmoid"),
            Scale(3),
            Elementwise(3, "softplus"),
            Residual(3, "identity", h=0.25),
            MSELoss(),
        ]
    )
    assert net.n_params == 9 + 3 + 3 + 0 + 12
    assert net.offsets == [0, 9, 12, 15, 15, 27, 27]
    x = net.init(seed=7)
    parts = net.split(x)
    assert [p.shape[0] for p in parts] == [9, 3, 3, 0, 12, 0]
    assert all(np.shares_memory(p, x) for p in parts if p.size)
    np.testing.assert_array_equal(net.concat(parts), x)
    np.testing.assert_array_equal(net.init(seed=7), x)
    assert not np.array_equal(net.init(seed=8), x)
    assert net.init(seed=7, dtype=np.float32).dtype == np.float32
    spec = net.spec()
    assert [s["kind"] for s in spec] == [
        "Dense",
        "Bias",
        "Scale",
        "Elementwise",
        "Residual",
        "MSELoss",
    ]
    assert spec[4]["h"] == 0.25 and spec[1]["activation"] == "sigmoid"
    assert spec[-1]["n_in"] == 3 and spec[-1]["n_out"] == 1
    assert net.layers[0].name == "layer 1 (Dense 2->3, tanh)"
    assert net.layers[4].name == "layer 5 (Residual 3->3, identity, h=0.25)"
    with pytest.raises(TypeError):
        net.init(dtype=np.int64)


def test_reference_ggn_equals_hessian_for_linear_mse(rng):
    """Self-check of the reference: for a linear net with MSE, H = GGN."""
    net = Pipeline([Dense(2, 3, "identity"), Dense(3, 2, "identity"), MSELoss()])
    x = net.init(seed=0)
    X, y = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    H = R.dense_hessian(net, x, X, y)
    G = R.ggn(net, x, X, y)
    # a linear net is bilinear in (W1, W2): H - GGN is the residual-weighted cross term
    assert np.allclose(H, H.T) and np.allclose(G, G.T)
    assert np.linalg.eigvalsh(G).min() > -1e-12
    net1 = Pipeline([Dense(2, 2, "identity"), MSELoss()])
    x1 = net1.init(seed=0)
    np.testing.assert_allclose(R.ggn(net1, x1, X, y), R.dense_hessian(net1, x1, X, y), atol=1e-14)


# -- bad input ------------------------------------------------------------------------------
def test_construction_errors():
    with pytest.raises(
        ValueError, match=r"layer 1 \(Dense 3->4, tanh\).*layer 2 \(Dense 5->2, tanh\)"
    ):
        Pipeline([Dense(3, 4), Dense(5, 2), MSELoss()])
    with pytest.raises(ValueError, match="not a loss"):
        Pipeline([Dense(3, 4), Dense(4, 2)])
    with pytest.raises(ValueError, match="loss but not the last"):
        Pipeline([Dense(3, 4), MSELoss(), Dense(1, 2), MSELoss()])
    with pytest.raises(ValueError, match="no layers"):
        Pipeline([])
    with pytest.raises(TypeError):
        Pipeline([Dense(3, 4), "tanh", MSELoss()])
    with pytest.raises(ValueError, match="activation"):
        Dense(3, 4, "relu6")


def test_bad_inputs(rng):
    net = small_net()
    x = net.init(seed=0)
    X, y = small_data(rng)
    with pytest.raises(
        ValueError, match=r"parameter vector has shape \(52,\).*layer 1 \(Dense 3->5"
    ):
        net.gradient(x[:-2], X, y)
    with pytest.raises(
        ValueError, match=r"layer 1 \(Dense 3->5, tanh\): inputs X have shape \(4, 2\)"
    ):
        net.forward(x, X[:, :2], y)
    with pytest.raises(ValueError, match="inputs X"):
        net.forward(x, X[0], y)
    with pytest.raises(ValueError, match=r"layer 4 \(MSELoss 2->1\): targets have shape"):
        net.forward(x, X, y[:, :1])
    Xn = X.copy()
    Xn[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"layer 1 .*inputs X contains 1 NaN or Inf"):
        net.forward(x, Xn, y)
    xn = x.copy()
    xn[30] = np.inf  # inside layer 2's parameters (offsets 20..44)
    with pytest.raises(
        ValueError, match=r"layer 2 \(Dense 5->4, gelu\): parameters contains 1 NaN"
    ):
        net.gradient(xn, X, y)
    yn = y.copy()
    yn[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"layer 4 .*targets"):
        net.linearize(x, X, yn)
    with pytest.raises(TypeError, match="dtype"):
        net.forward(x, X.astype(np.int64), y)
    with pytest.raises(TypeError, match="dtype"):
        net.forward(x.astype(np.float16), X, y)
    with pytest.raises(ValueError, match="unknown gradient method"):
        net.gradient(x, X, y, method="magic")


def test_labels_checked(rng):
    net = small_net(SoftmaxCrossEntropy())
    x = net.init(seed=0)
    X, _ = small_data(rng)
    with pytest.raises(
        ValueError, match=r"layer 4 \(SoftmaxCrossEntropy 2->1\): labels out of range"
    ):
        net.forward(x, X, np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="labels out of range"):
        net.forward(x, X, np.array([0, -1, 1, 0]))
    with pytest.raises(TypeError, match="integers"):
        net.forward(x, X, np.array([0.0, 1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="labels have shape"):
        net.forward(x, X, np.array([0, 1]))


def test_no_mutation(rng):
    net = Pipeline(
        [Dense(3, 4), Scale(4, "sigmoid"), Elementwise(4, "identity"), Dense(4, 2), MSELoss()]
    )
    x = net.init(seed=0)
    X, y = small_data(rng)
    copies = [a.copy() for a in (x, X, y)]
    pt = net.linearize(x, X, y)
    net.gradient(x, X, y)
    net.forward(x, X, y)
    for a, c in zip((x, X, y), copies):
        np.testing.assert_array_equal(a, c)
    x[:] = 0.0  # the point keeps its own copy
    np.testing.assert_array_equal(pt.params, copies[0])
    assert pt.loss == net.forward(copies[0], X, y)
