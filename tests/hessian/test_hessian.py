"""The Hessian operators (literal eq. 24, lifted eq. 26, fused HVP, GGN) against JAX.

References: ``jax.hessian`` / Gauss-Newton of the plain re-implementation in
``tests/reference.py`` (compiled once per case), never blockops numerics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st
from pylops.utils import dottest

from blockops.hessian import FusedHessian, ggn_vp, hessian, hvp
from blockops.hessian.fused import stacked_runs
from blockops.hessian.parts import point_structure
from blockops.network import Pipeline

jax.config.update("jax_enable_x64", True)

KINDS = ("Dense", "Dense", "Bias", "Scale", "Residual", "Elementwise")


def jax_hessian(case):
    f = ref.loss_fn(ref.spec_of(case.pipeline), np.asarray(case.X, np.float64), case.y)
    return np.asarray(jax.jit(jax.hessian(f))(jnp.asarray(case.x, jnp.float64)))


def rel(A, B):
    """Max-norm error relative to ``max|B|`` (floored at 1e-300 to avoid 0/0)."""
    return np.abs(A - B).max() / max(np.abs(B).max(), 1e-300)


def one_class_softmax(case):
    """Softmax over a single class: the loss is identically 0, so H = 0 exactly."""
    return type(case.pipeline.layers[-1]).__name__ == "SoftmaxCrossEntropy" and (
        case.pipeline.layers[-1].n_in == 1
    )


def dense_of(op):
    """Columns ``op @ e_j`` through ``matmat`` (the operator's batched path)."""
    return op.matmat(np.eye(op.shape[1], dtype=op.dtype))


def rng_case(seed, dtype=np.float64, **kw):
    kw.setdefault("kinds", KINDS)
    return ref.random_pipeline(np.random.default_rng(seed), dtype=dtype, **kw)


@settings(max_examples=10)
@given(ref.pipelines(widths=(1, 5), depths=(1, 4), batches=(1, 4), kinds=KINDS))
def test_all_forms_match_jax_hessian(case):
    """Fused, literal (eq. 24) and lifted (eq. 26) against jax.hessian; forms agree."""
    pt = case.pipeline.linearize(case.x, case.X, case.y)
    H_ref = jax_hessian(case)
    H_fused = dense_of(hessian(pt))
    H_lit = hessian(pt, form="literal").todense()
    H_lift = hessian(pt, form="lifted").todense()
    if one_class_softmax(case):
        # JAX returns rounding noise (up to ~1e-16) for this exact zero, so a
        # relative error is meaningless; every form must give zero to rounding.
        for H in (H_ref, H_fused, H_lit, H_lift):
            assert np.abs(H).max() <= 1e-14
        return
    assert rel(H_fused, H_ref) <= 1e-10
    assert rel(H_lit, H_ref) <= 1e-10
    assert rel(H_lit, H_fused) <= 1e-12
    assert rel(H_lift, H_lit) <= 1e-12


@pytest.fixture(scope="module")
def indefinite():
    """A fixed case whose Hessian has eigenvalues of both signs (checked)."""
    case = rng_case(3, widths=(3, 5), depths=(3, 3), batches=(3, 3), losses=("MSELoss",))
    H_ref = jax_hessian(case)
    return case, case.pipeline.linearize(case.x, case.X, case.y), H_ref


def test_indefinite_hessian(indefinite):
    _, pt, H_ref = indefinite
    ev = np.linalg.eigvalsh(H_ref)
    assert ev.min() < -1e-6 * ev.max() and ev.max() > 0  # the case is indefinite
    assert rel(dense_of(hessian(pt)), H_ref) <= 1e-10
    assert rel(hessian(pt, form="literal").todense(), H_ref) <= 1e-10


def test_symmetry(indefinite):
    _, pt, _ = indefinite
    rng = np.random.default_rng(1)
    n = pt.params.shape[0]
    u, v = rng.standard_normal(n), rng.standard_normal(n)
    for form in ("fused", "literal", "lifted"):
        H = hessian(pt, form=form)
        a, b = u @ (H @ v), v @ (H @ u)
        assert abs(a - b) <= 1e-12 * (abs(a) + abs(b) + 1e-300), form


@pytest.mark.parametrize("form", ["fused", "literal", "lifted"])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_dottest(indefinite, form, kind):
    _, pt, _ = indefinite
    if form == "lifted" and kind == "ggn":
        with pytest.raises(ValueError, match="ggn"):
            hessian(pt, form=form, kind=kind)
        return
    H = hessian(pt, form=form, kind=kind, damping=0.1)
    assert dottest(H, *H.shape, rtol=1e-10)


def test_damping(indefinite):
    _, pt, H_ref = indefinite
    lam = 0.37
    I = np.eye(H_ref.shape[0])
    assert rel(dense_of(hessian(pt, damping=lam)), H_ref + lam * I) <= 1e-10
    assert rel(hessian(pt, damping=lam, form="literal").todense(), H_ref + lam * I) <= 1e-10


@settings(max_examples=8)
@given(
    ref.pipelines(
        widths=(1, 4),
        depths=(1, 3),
        batches=(1, 3),
        kinds=KINDS,
        losses=("MSELoss", "SoftmaxCrossEntropy", "CustomLoss"),
    )
)
def test_ggn_matches_reference_and_is_psd(case):
    pt = case.pipeline.linearize(case.x, case.X, case.y)
    G_ref = ref.ggn(case.pipeline, case.x, case.X, case.y)
    G = dense_of(hessian(pt, kind="ggn"))
    G_lit = hessian(pt, kind="ggn", form="literal").todense()
    scale = max(np.abs(G_ref).max(), 1e-300)
    assert np.abs(G - G_ref).max() <= 1e-10 * scale
    assert np.abs(G_lit - G).max() <= 1e-12 * scale
    # convex losses: G is positive semi-definite
    assert np.linalg.eigvalsh(0.5 * (G + G.T)).min() >= -1e-12 * scale * G.shape[0]


def test_many_vectors_equal_column_by_column(indefinite):
    _, pt, _ = indefinite
    n = pt.params.shape[0]
    V = np.random.default_rng(2).standard_normal((n, 7))
    V0 = V.copy()
    for kind in ("hessian", "ggn"):
        H = hessian(pt, kind=kind)
        HV = H @ V
        cols = np.stack([H @ V[:, j] for j in range(7)], axis=1)
        assert np.allclose(HV, cols, rtol=0, atol=1e-14 * np.abs(cols).max())
        f = hvp if kind == "hessian" else ggn_vp
        assert np.allclose(f(pt, V), cols, rtol=0, atol=1e-14 * np.abs(cols).max())
    assert np.array_equal(V, V0)  # not mutated


def test_no_mutation(indefinite):
    _, pt, _ = indefinite
    params0 = pt.params.copy()
    bs0 = [b.copy() for b in pt.bs]
    v = np.random.default_rng(3).standard_normal(pt.params.shape[0])
    v0 = v.copy()
    for form in ("fused", "literal", "lifted"):
        hessian(pt, form=form, damping=0.5) @ v
    assert np.array_equal(v, v0)
    assert np.array_equal(pt.params, params0)
    assert all(np.array_equal(b, b0) for b, b0 in zip(pt.bs, bs0))


def test_float32(indefinite):
    case, _, H_ref = indefinite
    pt32 = case.pipeline.linearize(case.x.astype(np.float32), case.X.astype(np.float32), case.y)
    for form in ("fused", "literal"):
        H = hessian(pt32, form=form)
        assert H.dtype == np.float32
        H32 = dense_of(H) if form == "fused" else H.todense()
        assert H32.dtype == np.float32
        # float32 inputs and arithmetic: relative 1e-4 scaled by sqrt(n)
        assert rel(H32, H_ref) <= 1e-4 * np.sqrt(H_ref.shape[0])
    v = np.ones(pt32.params.shape[0])  # a float64 vector is cast to the point's dtype
    assert hvp(pt32, v).dtype == np.float32


def test_bad_vectors_raise(indefinite):
    _, pt, _ = indefinite
    n = pt.params.shape[0]
    H = FusedHessian(pt)
    with pytest.raises(ValueError, match="shape"):
        hvp(pt, np.ones(n + 1))
    with pytest.raises(ValueError, match="shape"):
        hvp(pt, np.ones((n, 2, 1)))
    for bad in (np.nan, np.inf, -np.inf):
        v = np.ones(n)
        v[n // 2] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            hvp(pt, v)
        with pytest.raises(ValueError, match="NaN or Inf"):
            H @ v
        with pytest.raises(ValueError, match="NaN or Inf"):
            ggn_vp(pt, v[:, None])
    with pytest.raises(TypeError):
        hvp(pt, [1.0] * n)
    with pytest.raises(TypeError, match="dtype"):
        hvp(pt, np.ones(n, dtype=complex))
    with pytest.raises(ValueError):
        H @ np.ones(n - 1)


def test_bad_options_raise(indefinite):
    _, pt, _ = indefinite
    with pytest.raises(ValueError, match="form"):
        hessian(pt, form="dense")
    with pytest.raises(ValueError, match="kind"):
        hessian(pt, kind="fisher")
    with pytest.raises(ValueError, match="damping"):
        hessian(pt, damping=-1.0)
    with pytest.raises(ValueError, match="damping"):
        hessian(pt, damping=np.nan, form="literal")


def test_deeper_network():
    """A deeper narrow net (depth 8) still matches jax.hessian."""
    case = rng_case(0, widths=(2, 3), depths=(8, 8), batches=(2, 2))
    pt = case.pipeline.linearize(case.x, case.X, case.y)
    H_ref = jax_hessian(case)
    assert rel(dense_of(hessian(pt)), H_ref) <= 1e-10
    assert rel(hessian(pt, form="literal").todense(), H_ref) <= 1e-10


def test_parameter_free_first_layer():
    """Layers without parameters before the first parameter (no direction reaches them)."""
    from blockops.network import Dense, Elementwise, MSELoss, Pipeline

    net = Pipeline([Elementwise(3, "tanh"), Dense(3, 2, "sigmoid"), MSELoss()])
    rng = np.random.default_rng(5)
    case = ref.Case(net, net.init(seed=5), rng.standard_normal((2, 3)), rng.standard_normal((2, 2)))
    pt = net.linearize(case.x, case.X, case.y)
    H_ref = jax_hessian(case)
    assert rel(dense_of(hessian(pt)), H_ref) <= 1e-10
    assert rel(hessian(pt, form="literal").todense(), H_ref) <= 1e-10
    G_ref = ref.ggn(net, case.x, case.X, case.y)
    assert rel(dense_of(hessian(pt, kind="ggn")), G_ref) <= 1e-10


def test_fused_hessian_attributes(indefinite):
    _, pt, _ = indefinite
    H = FusedHessian(pt, damping=0.25, kind="ggn")
    n = pt.params.shape[0]
    assert H.shape == (n, n) and H.dtype == np.float64
    assert H.damping == 0.25 and H.kind == "ggn"
    # adjoint equals forward (symmetric)
    v = np.random.default_rng(4).standard_normal(n)
    assert np.array_equal(H.rmatvec(v), H.matvec(v))


@settings(max_examples=8)
@given(
    width=st.integers(1, 4),
    depth=st.integers(3, 7),
    batch=st.integers(1, 3),
    k=st.integers(1, 3),
    acts=st.lists(st.sampled_from(ref.ACTIVATION_NAMES), min_size=7, max_size=7),
    loss=st.sampled_from(ref.LOSS_KINDS),
    seed=st.integers(0, 10_000),
)
def test_stacked_dense_runs_match_jax(width, depth, batch, k, acts, loss, seed):
    """Runs of square Dense layers (the stacked sweep of network/dense_sweep.py), with other
    layers around them, against jax.hessian and the JAX Gauss-Newton matrix."""
    w = width + 1  # two classes at least, so the softmax Hessian is not zero
    layers = [ref.make_layer("Dense", w + 1, w, acts[0])]  # not square: not in a run
    layers += [ref.make_layer("Dense", w, w, a) for a in acts[1:depth]]
    layers += [ref.make_layer("Bias", w, w, "tanh"), ref.make_layer("Dense", w, w, acts[-1])]
    layers += [ref.make_layer("Dense", w, w, "sigmoid"), ref.make_loss(loss)]
    net = Pipeline(layers)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, w + 1))
    y = (
        rng.integers(0, w, batch)
        if loss == "SoftmaxCrossEntropy"
        else rng.standard_normal((batch, w))
    )
    case = ref.Case(net, net.init(seed=seed), X, y)
    pt = net.linearize(case.x, X, y)
    V = rng.standard_normal((net.n_params, k))
    assert set(stacked_runs(pt, point_structure(pt))) == {1, depth + 1}  # two stacked runs
    assert rel(hvp(pt, V), jax_hessian(case) @ V) <= 1e-10
    G = ref.ggn(net.spec(), case.x, X, y)
    assert rel(ggn_vp(pt, V), G @ V) <= 1e-10
