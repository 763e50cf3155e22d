"""Checks of the LayerNorm layer of the docs page "Adding a layer".

Run ``python docs/layernorm_check.py`` (needs JAX): every check compares
blockops, driven only through the layer's ``forward`` / ``jvp`` / ``vjp`` /
``hvp`` and the generic defaults, with JAX derivatives of a plain
re-implementation that never calls blockops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from layernorm_layer import LayerNorm, LayerNormFused  # docs/ is the script's folder
from pylops.utils import dottest

from blockops.hessian import hessian, hvp
from blockops.inverse import inverse_hessian, stages_from_point
from blockops.network import Dense, MSELoss, Pipeline

jax.config.update("jax_enable_x64", True)
EPS = 1e-5


def build(cls=LayerNorm, seed=0, batch=5):
    """``Dense(3, 6, tanh) -> LayerNorm(6) -> Dense(6, 2) -> MSE`` at a random point."""
    rng = np.random.default_rng(seed)
    X, y = rng.standard_normal((batch, 3)), rng.standard_normal((batch, 2))
    net = Pipeline([Dense(3, 6, "tanh"), cls(6, EPS), Dense(6, 2, "identity"), MSELoss()])
    x = net.init(seed=seed) + 0.3 * rng.standard_normal(net.n_params)  # γ ≠ 1, β ≠ 0
    return net, x, X, y


def layernorm_ref(u, gamma, beta):
    """The layer, written again in ``jax.numpy`` from its formula."""
    c = u - u.mean(axis=1, keepdims=True)
    return gamma * c / jnp.sqrt((c * c).mean(axis=1, keepdims=True) + EPS) + beta


def reference_loss(X, y):
    """``x -> loss`` of the same pipeline, from the documented parameter layouts only."""

    def loss(x):
        W1, c1 = x[:18].reshape(6, 3), x[18:24]  # Dense: concat(W.ravel(), c)
        gamma, beta = x[24:30], x[30:36]  # LayerNorm: concat(γ, β)
        W2, c2 = x[36:48].reshape(2, 6), x[48:50]
        z = layernorm_ref(jnp.tanh(X @ W1.T + c1), gamma, beta)
        return 0.5 * jnp.sum((z @ W2.T + c2 - y) ** 2) / X.shape[0]  # MSE: mean of ½|r|²

    return loss


def check_adjoint(cls=LayerNorm):
    """``vjp`` is the adjoint of ``jvp`` and ``hvp`` is symmetric (the layer's dot tests)."""
    net, x, X, y = build(cls)
    pt = net.linearize(x, X, y)
    ln, cache, b = net.layers[1], pt.caches[1], pt.bs[1]
    rng = np.random.default_rng(2)
    B, n, p = X.shape[0], ln.n_in, ln.n_params
    du, dx, w = (
        rng.standard_normal((1, B, n)),
        rng.standard_normal((1, p)),
        rng.standard_normal((1, B, n)),
    )
    bz, bx = ln.vjp(cache, w)
    lhs, rhs = np.vdot(w, ln.jvp(cache, du, dx)), np.vdot(bz, du) + np.vdot(bx, dx)
    assert abs(lhs - rhs) <= 1e-12 * (abs(lhs) + abs(rhs))
    du2, dx2 = rng.standard_normal((1, B, n)), rng.standard_normal((1, p))
    hz, hx = ln.hvp(cache, b, du, dx)
    hz2, hx2 = ln.hvp(cache, b, du2, dx2)
    lhs, rhs = np.vdot(du2, hz) + np.vdot(dx2, hx), np.vdot(du, hz2) + np.vdot(dx, hx2)
    assert abs(lhs - rhs) <= 1e-12 * (abs(lhs) + abs(rhs))


def check_hvp(cls=LayerNorm):
    """Gradient and ``H V`` against JAX; ``H`` passes the dot test."""
    net, x, X, y = build(cls)
    pt = net.linearize(x, X, y)
    loss = reference_loss(X, y)
    H_ref = np.asarray(jax.hessian(loss)(jnp.asarray(x)))
    g_ref = np.asarray(jax.grad(loss)(jnp.asarray(x)))
    V = np.random.default_rng(1).standard_normal((net.n_params, 4))
    assert abs(pt.loss - float(loss(jnp.asarray(x)))) <= 1e-12 * abs(pt.loss)
    assert np.abs(pt.gradient - g_ref).max() <= 1e-10 * np.abs(g_ref).max()
    HV = hvp(pt, V)  # the fused R{backprop} sweeps, all four directions at once
    assert np.abs(HV - H_ref @ V).max() <= 1e-8 * np.abs(H_ref @ V).max()
    H = hessian(pt, form="fused")  # a pylops.LinearOperator
    dottest(H, rtol=1e-10)  # <v, H u> == <H^T v, u>
    return np.abs(HV - H_ref @ V).max() / np.abs(H_ref @ V).max()


def check_blocks():
    """The generic explicit blocks of the layer against JAX (layer 2 of the pipeline)."""
    net, x, X, y = build()
    pt = net.linearize(x, X, y)
    ln, cache, b = net.layers[1], pt.caches[1], pt.bs[1]
    n = ln.n_in
    z_prev, x_l = jnp.asarray(cache.z_prev), jnp.asarray(cache.x)

    def f(z, xl):
        return layernorm_ref(z, xl[:n], xl[n:])

    def phi(z, xl):  # Σ b ⊙ f: its Hessian in (z_prev, x_l) is the layer's K
        return jnp.sum(b * f(z, xl))

    s = np.arange(z_prev.shape[0])
    Jz = np.asarray(jax.jacfwd(f, argnums=0)(z_prev, x_l))[s, :, s, :]  # per-sample blocks
    Jx = np.asarray(jax.jacfwd(f, argnums=1)(z_prev, x_l))
    Kzz = np.asarray(jax.hessian(phi, argnums=0)(z_prev, x_l))[s, :, s, :]
    Kxz = np.transpose(np.asarray(jax.jacfwd(jax.grad(phi), argnums=1)(z_prev, x_l)), (2, 0, 1))
    Kxx = np.asarray(jax.hessian(phi, argnums=1)(z_prev, x_l))
    got = (ln.jacobian_z(cache), ln.jacobian_x(cache), *ln.hessian_blocks(cache, b))
    for mine, ref in zip(got, (Jz, Jx, Kzz, Kxz, Kxx)):
        assert mine.shape == ref.shape
        assert np.abs(mine - ref).max() <= 1e-10 * max(np.abs(ref).max(), 1.0)


def check_inverse(cls=LayerNorm, damping=1e-3):
    """The exact inverse (generic stage for the LayerNorm), both factorisations."""
    net, x, X, y = build(cls)
    pt = net.linearize(x, X, y)
    H_ref = np.asarray(jax.hessian(reference_loss(X, y))(jnp.asarray(x)))
    g = pt.gradient
    A_ref = H_ref + damping * np.eye(len(g))
    x_ref = np.linalg.solve(A_ref, g)
    kinds = [type(st).__name__ for st in stages_from_point(pt, damping)]
    assert kinds == ["DenseSegment", "ExplicitStage", "DenseSegment", "ExplicitStage"]
    residuals = []
    for method in ("auto", "kkt"):
        Hinv = inverse_hessian(pt, damping=damping, method=method)
        step = Hinv @ g
        residuals.append(Hinv.residual(g, step))  # ‖(H + λI) step − g‖ / ‖g‖
        assert residuals[-1] <= 1e-12
        assert np.abs(step - x_ref).max() <= 1e-8 * np.abs(x_ref).max()
    assert Hinv.inertia[0] == np.sum(np.linalg.eigvalsh(A_ref) < 0)  # H is indefinite here
    G = inverse_hessian(pt, damping=damping, kind="ggn")  # Gauss-Newton: also generic
    residuals.append(G.residual(g))
    assert residuals[-1] <= 1e-12
    return residuals


if __name__ == "__main__":
    for cls in (LayerNorm, LayerNormFused):
        print(f"{cls.__name__}: hvp relative error {check_hvp(cls):.1e}")
        res = check_inverse(cls)
        print(f"{cls.__name__}: inverse residuals (auto, kkt, ggn)", [f"{r:.1e}" for r in res])
    check_adjoint()
    check_blocks()
    print("jvp/vjp adjoint, hvp symmetric, explicit blocks match JAX")
