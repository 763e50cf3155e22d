"""The named pieces of eq. 24 against dense matrices built here from JAX and NumPy.

Every dense reference is assembled in this file: Jacobians and their
derivatives by ``jax.jacfwd`` of the plain re-implementation in
``tests/reference.py`` (never blockops numerics), ``P``, ``DD`` and ``DM`` by
``np.kron`` / loops from ``b_l`` (the Point's back-propagated rows, which
``test_b_rows_match_jax`` checks against JAX). The dense matrices, put into
eq. 24 here, reproduce ``jax.hessian``: that checks the vec layouts
independently of the operators.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
import scipy.linalg
from pylops.utils import dottest

from blockops.hessian import hessian_parts

jax.config.update("jax_enable_x64", True)

PART_NAMES = ("M", "Minv", "P", "Dx", "DD", "DM", "Dxx", "Dxz", "Dzx", "Dzz")
KINDS_ALL = ("Dense", "Bias", "Scale", "Residual", "Elementwise")


def make_case(seed, dtype=np.float64, **kw):
    kw.setdefault("widths", (1, 4))
    kw.setdefault("depths", (2, 4))
    kw.setdefault("batches", (1, 3))
    kw.setdefault("kinds", ("Dense", "Dense", *KINDS_ALL))
    return ref.random_pipeline(np.random.default_rng(seed), dtype=dtype, **kw)


# fixed cases covering every layer kind and loss (n_0 != n_{L-1} somewhere, so P is rectangular)
FIXED = {
    "dense-residual-scale-mse": (
        [("Dense", 3, 4, "tanh"), ("Residual", 4, 4, "sigmoid"), ("Scale", 4, 4, "softplus")],
        "MSELoss",
        3,
    ),
    "dense-bias-elementwise-softmax": (
        [("Dense", 2, 3, "gelu"), ("Bias", 3, 3, "custom"), ("Elementwise", 3, 3, "tanh")],
        "SoftmaxCrossEntropy",
        2,
    ),
    "dense-dense-huber": (
        [("Dense", 4, 2, "custom"), ("Dense", 2, 3, "identity")],
        "CustomLoss",
        1,
    ),
}


def fixed_case(name, dtype=np.float64, seed=0):
    from blockops.network import Pipeline

    layers, loss, B = FIXED[name]
    net = Pipeline(
        [ref.make_layer(k, a, b, act) for k, a, b, act in layers] + [ref.make_loss(loss)]
    )
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((B, layers[0][1])).astype(dtype)
    n = layers[-1][2]
    y = rng.integers(0, n, size=B) if loss == "SoftmaxCrossEntropy" else rng.standard_normal((B, n))
    return ref.Case(net, net.init(seed=seed, dtype=dtype), X, y)


def linearize(case):
    return case.pipeline.linearize(case.x, case.X, case.y)


def sample_diag(J):
    """Per-sample diagonal blocks ``(B, m, n)`` of a ``(B, m, B, n)`` Jacobian."""
    s = jnp.arange(J.shape[0])
    return J[s, :, s, :]


def layer_derivatives(s_l, z, x, y):
    """``(Jz, Jx, Txx, Tzx, Txz, Tzz)`` of one layer by JAX, in one compiled call.

    ``Jz`` per-sample ``(B, m, n)``, ``Jx`` ``(B, m, p)``; ``T..`` the derivatives
    of ``Jx`` / ``Jz`` in ``x`` / ``z`` (trailing axes the differentiation variable).
    """

    def f(z, x):
        return ref.layer_fn(s_l, z, x, y)

    def jac_x(z, x):
        return jax.jacfwd(f, argnums=1)(z, x)

    def jac_z(z, x):
        return sample_diag(jax.jacfwd(f, argnums=0)(z, x))

    def all_blocks(z, x):
        return (
            jac_z(z, x),
            jac_x(z, x),
            jax.jacfwd(jac_x, argnums=1)(z, x),
            jax.jacfwd(jac_x, argnums=0)(z, x),
            jax.jacfwd(jac_z, argnums=1)(z, x),
            jax.jacfwd(jac_z, argnums=0)(z, x),
        )

    return [np.asarray(a) for a in jax.jit(all_blocks)(jnp.asarray(z), jnp.asarray(x))]


def dense_parts(case, bs):
    """Dense ``M, Minv, P, Dx, DD, DM, Dxx, Dxz, Dzx, Dzz`` built from JAX and NumPy only."""
    spec = ref.spec_of(case.pipeline)
    xs = ref.split(spec, np.asarray(case.x, dtype=np.float64))
    fw = jax.jit(ref.forward_fn(spec, np.asarray(case.X, np.float64), case.y))
    zs = [np.asarray(z) for z in fw(jnp.asarray(case.x, jnp.float64))]
    B = zs[0].shape[0]
    n = [z.shape[1] for z in zs]
    L = len(spec)
    Jz, Jx, Dxx, Dzx, Dxz, Dzz = [], [], [], [], [], []
    for l, s_l in enumerate(spec):
        m, ni, p = n[l + 1], n[l], s_l["n_params"]
        jz, jx, Txx, Tzx, Txz, Tzz = layer_derivatives(s_l, zs[l], xs[l], case.y)
        Jz.append(jz)
        Jx.append(jx.reshape(B * m, p))
        # vec(∇_x f): column-major (B m, p) -> row index q B m + (s m + i)
        Dxx.append(Txx.transpose(2, 0, 1, 3).reshape(p * B * m, p))  # Txx (B, m, p, p')
        Dzx.append(Tzx.transpose(2, 0, 1, 3, 4).reshape(p * B * m, B * ni))  # (B, m, p, B, ni)
        # vec(∇_z f) per sample, column-major (m, ni) -> row index s m ni + j m + i
        Dxz.append(Txz.transpose(0, 2, 1, 3).reshape(B * ni * m, p))  # (B, m, ni, p)
        Dzz.append(Tzz.transpose(0, 2, 1, 3, 4).reshape(B * ni * m, B * ni))  # (B, m, ni, B, ni)
    zsz = [B * a for a in n]  # entries of z_0 .. z_L
    off = np.concatenate([[0], np.cumsum(zsz[1:])]).astype(int)
    M = np.eye(off[-1])
    for l in range(1, L):
        M[off[l] : off[l + 1], off[l - 1] : off[l]] = -scipy.linalg.block_diag(*Jz[l])
    P = np.zeros((sum(zsz[:-1]), sum(zsz[1:])))
    P[zsz[0] :, : sum(zsz[1:-1])] = np.eye(sum(zsz[1:-1]))
    b = [np.asarray(bl, dtype=np.float64) for bl in bs]
    DD = scipy.linalg.block_diag(
        *[np.kron(np.eye(s_l["n_params"]), b[l].reshape(1, -1)) for l, s_l in enumerate(spec)]
    )
    DM = scipy.linalg.block_diag(
        *[np.kron(np.eye(n[l]), b[l][s][None, :]) for l in range(L) for s in range(B)]
    )
    return {
        "M": M,
        "Minv": np.linalg.inv(M),
        "P": P,
        "Dx": scipy.linalg.block_diag(*Jx),
        "DD": DD,
        "DM": DM,
        "Dxx": scipy.linalg.block_diag(*Dxx),
        "Dzx": scipy.linalg.block_diag(*Dzx),
        "Dxz": scipy.linalg.block_diag(*Dxz),
        "Dzz": scipy.linalg.block_diag(*Dzz),
    }


def jax_b_rows(case):
    """``b_l = ∂z_L/∂z_l`` by JAX: gradient in additive perturbations of every ``z_l``."""
    spec = ref.spec_of(case.pipeline)
    X = jnp.asarray(case.X, jnp.float64)
    xs = ref.split(spec, jnp.asarray(case.x, jnp.float64))

    def loss(eps):
        z = X
        for s_l, x_l, e in zip(spec, xs, eps):
            z = ref.layer_fn(s_l, z, x_l, case.y) + e
        return jnp.sum(z)

    zs = jax.jit(ref.forward_fn(spec, X, case.y))(jnp.asarray(case.x, jnp.float64))
    eps = [jnp.zeros_like(z) for z in zs[1:]]
    return [np.asarray(g) for g in jax.jit(jax.grad(loss))(eps)]


def jax_hessian(case):
    """``jax.hessian`` of the reference loss (compiled once)."""
    f = ref.loss_fn(ref.spec_of(case.pipeline), np.asarray(case.X, np.float64), case.y)
    return np.asarray(jax.jit(jax.hessian(f))(jnp.asarray(case.x, jnp.float64)))


def eq24(d):
    MinvDx = d["Minv"] @ d["Dx"]
    return (
        d["DD"] @ d["Dxx"]
        + d["DD"] @ d["Dzx"] @ d["P"] @ MinvDx
        + MinvDx.T @ d["P"].T @ d["DM"] @ d["Dxz"]
        + MinvDx.T @ d["P"].T @ d["DM"] @ d["Dzz"] @ d["P"] @ MinvDx
    )


_DENSE: dict = {}


@pytest.fixture(scope="module", params=sorted(FIXED))
def case64(request):
    case = fixed_case(request.param)
    pt = linearize(case)
    _DENSE[request.param] = dense_parts(case, pt.bs)
    return case, pt, _DENSE[request.param]


def test_dense_references_reproduce_jax_hessian(case64):
    """The test's own dense parts, put into eq. 24, give jax.hessian (checks the layouts)."""
    case, _, d = case64
    H_ref = jax_hessian(case)
    assert np.allclose(eq24(d), H_ref, rtol=0, atol=1e-12 * max(1.0, np.abs(H_ref).max()))


def test_b_rows_match_jax(case64):
    """``b_l = ∂z_L/∂z_l`` of the Point (used for DD, DM) against JAX."""
    case, pt, _ = case64
    for b, b_ref in zip(pt.bs, jax_b_rows(case)):
        assert np.allclose(b, b_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", PART_NAMES)
def test_part_equals_dense(case64, name):
    _, pt, d = case64
    op = getattr(hessian_parts(pt), name)
    A = op.todense()
    assert A.shape == d[name].shape, name
    scale = max(1.0, np.abs(d[name]).max())
    assert np.allclose(A, d[name], rtol=0, atol=1e-12 * scale), name
    # adjoint against the transpose
    AT = op.H.todense()
    assert np.allclose(AT, d[name].T, rtol=0, atol=1e-12 * scale), name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", [0, 3, 7, 8])
def test_dottest_every_part(seed, dtype):
    case = make_case(seed, dtype=dtype)
    pt = linearize(case)
    parts = hessian_parts(pt)
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    for name in PART_NAMES:
        op = getattr(parts, name)
        assert op.dtype == np.dtype(dtype), name
        assert dottest(op, *op.shape, rtol=rtol, atol=1e-30), name


def test_float32_parts_match_float64_dense():
    name = "dense-residual-scale-mse"
    case = fixed_case(name, dtype=np.float32)
    pt = linearize(case)
    assert pt.dtype == np.float32
    if name not in _DENSE:  # the float64 case of the same seed (same parameters, rounded)
        c64 = fixed_case(name)
        _DENSE[name] = dense_parts(c64, linearize(c64).bs)
    d = _DENSE[name]
    parts = hessian_parts(pt)
    for name in PART_NAMES:
        A = getattr(parts, name).todense()
        assert A.dtype == np.float32, name
        scale = max(1.0, np.abs(d[name]).max())
        # float32 inputs/caches vs a float64 dense: relative 1e-4 scaled by the size
        assert np.allclose(A, d[name], rtol=0, atol=1e-4 * scale * np.sqrt(A.shape[1])), name


def test_shapes_and_spaces():
    """Sizes of the spaces of the module docstring; P rectangular when n_0 != n_L."""
    from blockops.network import Dense, MSELoss, Pipeline

    net = Pipeline([Dense(3, 4), Dense(4, 2), MSELoss()])
    B = 5
    rng = np.random.default_rng(0)
    pt = net.linearize(net.init(seed=0), rng.standard_normal((B, 3)), rng.standard_normal((B, 2)))
    parts = hessian_parts(pt)
    Nx = net.n_params
    Nz = B * (4 + 2 + 1)
    Nzs = B * (3 + 4 + 2)
    Ngx = B * (4 * 16 + 2 * 10 + 0)
    Ngz = B * (4 * 3 + 2 * 4 + 1 * 2)
    assert parts.M.shape == parts.Minv.shape == (Nz, Nz)
    assert parts.P.shape == (Nzs, Nz)
    assert parts.Dx.shape == (Nz, Nx)
    assert parts.DD.shape == (Nx, Ngx)
    assert parts.DM.shape == (Nzs, Ngz)
    assert parts.Dxx.shape == (Ngx, Nx) and parts.Dzx.shape == (Ngx, Nzs)
    assert parts.Dxz.shape == (Ngz, Nx) and parts.Dzz.shape == (Ngz, Nzs)
