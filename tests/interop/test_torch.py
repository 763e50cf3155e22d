"""``blockops.interop.torch``: torch models as pipelines, TorchLayer, TorchOperator.

References are independent of blockops: torch's autograd (``torch.func``) of
the torch model or of a plain torch re-implementation of the whole loss over
the flat parameter vector, and curvlinops' ``HessianLinearOperator``.

Note: in torch 2.13 ``torch.func.hessian`` through ``F.layer_norm`` is wrong
(the block of the scale against anything upstream; the matrix is not even
symmetric, finite differences of ``torch.func.grad`` disagree by O(1)), so
the LayerNorm reference below writes the normalisation out by hand.
"""

from __future__ import annotations

import functools
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="blockops.interop.torch needs PyTorch")
from torch import nn  # noqa: E402

from blockops.hessian import hessian, hvp  # noqa: E402
from blockops.interop.torch import (  # noqa: E402
    GELU_ERF,
    SILU,
    TorchLayer,
    TorchOperator,
    from_torch,
    load_parameters_vector,
    parameters_vector,
    softplus,
    torch_activation,
    torch_pipeline,
)
from blockops.inverse import inverse_hessian  # noqa: E402
from blockops.network import Dense, Layer, MSELoss, Pipeline, SoftmaxCrossEntropy  # noqa: E402

F64 = torch.float64


def rel(a, b):
    """Max-norm error relative to ``max|b|``."""
    a, b = np.asarray(a), np.asarray(b)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)


def mlp(act, depth, width=16, n_in=5, n_out=3, seed=0):
    """``depth`` linear layers (``depth - 1`` activations), float64."""
    torch.manual_seed(seed)
    mods = [nn.Linear(n_in, width), act()]
    for _ in range(depth - 2):
        mods += [nn.Linear(width, width), act()]
    mods.append(nn.Linear(width, n_out))
    return nn.Sequential(*mods).to(F64)


def data(B=8, n_in=5, n_out=3, seed=1, classes=False):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, n_in, generator=g, dtype=F64)
    if classes:
        return X, torch.randint(0, n_out, (B,), generator=g)
    return X, torch.randn(B, n_out, generator=g, dtype=F64)


def flat_loss(model, loss, X, y):
    """The torch loss as a function of the flat parameter vector (model.parameters() order)."""
    named = [(n, p.shape, p.numel()) for n, p in model.named_parameters()]

    def L(t):
        params, o = {}, 0
        for n, shape, k in named:
            params[n] = t[o : o + k].view(shape)
            o += k
        return loss(torch.func.functional_call(model, params, (X,)), y)

    return L


def torch_reference(model, loss, X, y, x):
    """``(loss, grad, H)`` of the torch model at the flat ``x``, float64 NumPy."""
    L = flat_loss(model, loss, X, y)
    t = torch.from_numpy(np.array(x))
    return (
        L(t).item(),
        torch.func.grad(L)(t).numpy(),
        torch.func.hessian(L)(t).numpy(),
    )


def inertia(A):
    w = np.linalg.eigvalsh(A)
    return int((w < 0).sum()), 0, int((w > 0).sum())


# -- deep MLPs: curvlinops, torch.func.hessian, exact inverse, Newton step ------------------
ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU}


@functools.cache
def deep_case(act, depth):
    model = mlp(ACTS[act], depth)
    X, y = data()
    return model, X, y, from_torch(model, nn.MSELoss(), X, y)


# curvlinops' dependency linear_operator decorates with torch.jit.script (deprecated)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("act", list(ACTS))
def test_deep_mlp_matches_curvlinops(act):
    """Depth 64, width 16, batch 8: HVP against curvlinops, inverse residual, indefinite."""
    curvlinops = pytest.importorskip("curvlinops", reason="the reference HVP is curvlinops'")
    model, X, y, pt = deep_case(act, 64)
    assert pt.pipeline.n_params == sum(p.numel() for p in model.parameters()) == 17011
    assert np.array_equal(pt.params, parameters_vector(model))
    with torch.no_grad():
        assert pt.loss == pytest.approx(nn.MSELoss()(model(X), y).item(), rel=1e-13)
    Hc = curvlinops.HessianLinearOperator(
        model, nn.MSELoss(), list(model.parameters()), [(X, y)], check_deterministic=False
    )
    V = np.random.default_rng(0).standard_normal((pt.n_params, 3))
    HVc = (Hc @ torch.from_numpy(V)).numpy()
    assert rel(hvp(pt, V), HVc) <= 1e-12
    # the exact inverse of the (indefinite) damped Hessian; residual through curvlinops' H
    lam = 1e-3
    Hi = inverse_hessian(pt, damping=lam)
    assert Hi.inertia[0] > 0  # indefinite: negative pivots (checked against eigvalsh at depth 8)
    G = np.column_stack([pt.gradient, V[:, 0]])
    S = Hi @ G
    R = (Hc @ torch.from_numpy(S)).numpy() + lam * S - G
    assert np.linalg.norm(R) / np.linalg.norm(G) <= 1e-12


@pytest.mark.parametrize("act", list(ACTS))
def test_depth8_against_torch_hessian(act):
    """Depth 8: gradient, dense Hessian, inverse (both methods) and inertia against torch."""
    model, X, y, pt = deep_case(act, 8)
    L, g, H = torch_reference(model, nn.MSELoss(), X, y, pt.params)
    assert pt.loss == pytest.approx(L, rel=1e-13)
    assert rel(pt.gradient, g) <= 1e-13
    assert rel(hvp(pt, np.eye(pt.n_params)), H) <= 1e-12
    lam = 1e-3
    A = H + lam * np.eye(len(H))
    expected = inertia(A)
    assert expected[0] > 0, "the case must be indefinite"
    rhs = np.column_stack([g, np.random.default_rng(2).standard_normal(len(g))])
    for method in ("riccati", "kkt"):
        Hi = inverse_hessian(pt, damping=lam, method=method)
        S = Hi @ rhs
        assert np.linalg.norm(A @ S - rhs) / np.linalg.norm(rhs) <= 1e-12, method
        assert Hi.inertia == expected, method


@pytest.mark.parametrize("act", list(ACTS))
def test_newton_step_written_back(act):
    """A damped Newton step, written into the model, lowers the loss as the quadratic model says."""
    model, X, y, pt = deep_case(act, 64)
    model = pickle.loads(pickle.dumps(model))  # keep the cached case's model untouched
    loss = nn.MSELoss()
    g = pt.gradient
    for lam in (1.0, 3.0, 10.0, 30.0):  # the smallest tried damping with H + λI positive definite
        Hi = inverse_hessian(pt, damping=lam)
        if Hi.inertia[0] == 0:
            break
    assert Hi.inertia[0] == 0
    s = -(Hi @ g)
    Hs = hvp(pt, s)
    for alpha in (0.03, 0.01):  # small: a ReLU net's kinks stay put
        first = alpha * (g @ s)
        pred = first + 0.5 * alpha**2 * (s @ Hs)
        x_new = torch.from_numpy(pt.params + alpha * s)
        torch.nn.utils.vector_to_parameters(x_new, model.parameters())
        with torch.no_grad():
            actual = loss(model(X), y).item() - pt.loss
        assert actual < 0 and pred < 0
        assert abs(actual - pred) <= 1e-3 * abs(pred), (alpha, actual, pred)
        # the curvature term is seen: the model error is far below its size
        assert abs(actual - pred) <= 0.05 * abs(pred - first), (alpha, actual, pred, first)


# -- losses ---------------------------------------------------------------------------------
LOSSES = {
    "mse-mean": (lambda: nn.MSELoss(), False),
    "mse-sum": (lambda: nn.MSELoss(reduction="sum"), False),
    "ce-mean": (lambda: nn.CrossEntropyLoss(), True),
    "ce-sum": (lambda: nn.CrossEntropyLoss(reduction="sum"), True),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_match_torch(name):
    make, classes = LOSSES[name]
    model = mlp(nn.Tanh, 3, width=6, n_in=4, n_out=5, seed=3)
    X, y = data(B=7, n_in=4, n_out=5, seed=4, classes=classes)
    loss = make()
    pt = from_torch(model, loss, X, y)
    expected_kind = SoftmaxCrossEntropy if classes else MSELoss
    assert type(pt.pipeline.layers[-1]) is expected_kind
    L, g, H = torch_reference(model, loss, X, y, pt.params)
    assert abs(pt.loss - L) <= 1e-13 * abs(L)
    assert rel(pt.gradient, g) <= 1e-13
    assert rel(hvp(pt, np.eye(pt.n_params)), H) <= 1e-12
    # the loss layer's scale reaches every derivative: the explicit blocks give the same inverse
    A = H + 1e-2 * np.eye(len(H))
    Hi = inverse_hessian(pt, damping=1e-2, method="kkt", refine=0)
    assert rel(Hi @ g, np.linalg.solve(A, g)) <= 1e-10


def test_loss_scale_option():
    net = Pipeline([Dense(3, 4), Dense(4, 2, "identity"), MSELoss(scale=0.25)])
    ref = Pipeline([Dense(3, 4), Dense(4, 2, "identity"), MSELoss()])
    rng = np.random.default_rng(0)
    x, X, y = net.init(seed=1), rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    a, b = net.linearize(x, X, y), ref.linearize(x, X, y)
    assert a.loss == pytest.approx(0.25 * b.loss, rel=1e-15)
    V = rng.standard_normal((net.n_params, 2))
    assert rel(hvp(a, V), 0.25 * hvp(b, V)) <= 1e-14
    assert rel(hessian(a, form="literal") @ V, 0.25 * hvp(b, V)) <= 1e-13
    assert "scale 0.25" in net.layers[-1].name
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        MSELoss(scale=0.0)
    with pytest.raises(TypeError, match="scale must be a real number"):
        SoftmaxCrossEntropy(scale="big")


def test_loss_errors():
    model = mlp(nn.Tanh, 2, width=4, n_in=3, n_out=2)
    X, y = data(B=3, n_in=3, n_out=2)
    with pytest.raises(ValueError, match="reduction='none'"):
        from_torch(model, nn.MSELoss(reduction="none"), X, y)
    Xc, yc = data(B=3, n_in=3, n_out=2, classes=True)
    with pytest.raises(ValueError, match="label_smoothing"):
        from_torch(model, nn.CrossEntropyLoss(label_smoothing=0.1), Xc, yc)
    with pytest.raises(ValueError, match="integer class indices"):
        from_torch(model, nn.CrossEntropyLoss(), Xc, torch.softmax(y, 1))
    with pytest.raises(ValueError, match="ignore_index"):
        from_torch(model, nn.CrossEntropyLoss(ignore_index=1), Xc, torch.tensor([0, 1, 0]))
    with pytest.raises(TypeError, match="L1Loss is not supported"):
        from_torch(model, nn.L1Loss(), X, y)


# -- activations ------------------------------------------------------------------------------
ACT_MODULES = {
    "Sigmoid": nn.Sigmoid(),
    "LeakyReLU": nn.LeakyReLU(0.2),
    "GELU-erf": nn.GELU(),
    "GELU-tanh": nn.GELU(approximate="tanh"),
    "SiLU": nn.SiLU(),
    "Softplus": nn.Softplus(),
    "Softplus-beta": nn.Softplus(beta=2.5),
}


@pytest.mark.parametrize("name", list(ACT_MODULES))
def test_activation_translation(name):
    """Each activation after a Linear (Dense) and on its own (Elementwise) against torch."""
    act = ACT_MODULES[name]
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Linear(3, 5), act, nn.Linear(5, 4), nn.Identity(), act, nn.Linear(4, 2)
    )
    model = model.to(F64)
    X, y = data(B=4, n_in=3, n_out=2, seed=6)
    pt = from_torch(model, nn.MSELoss(), X, y)
    kinds = [type(ly).__name__ for ly in pt.pipeline.layers]
    assert kinds == ["Dense", "Dense", "Dense", "MSELoss"]
    assert pt.pipeline.layers[0].act.name == torch_activation(act).name
    L, g, H = torch_reference(model, nn.MSELoss(), X, y, pt.params)
    assert pt.loss == pytest.approx(L, rel=1e-13)
    assert rel(pt.gradient, g) <= 1e-13
    assert rel(hvp(pt, np.eye(pt.n_params)), H) <= 1e-12
    # on its own (not after a Linear): an Elementwise layer
    net, _ = torch_pipeline(nn.Sequential(act, nn.Linear(3, 2)).to(F64), nn.MSELoss(), X)
    assert type(net.layers[0]).__name__ == "Elementwise"


@pytest.mark.parametrize(
    ("act", "points"),
    [
        (GELU_ERF, (-30.0, -8.0, -3.0, 0.5, 3.0, 8.0)),
        (SILU, (-30.0, -8.0, -3.0, 0.5, 3.0, 8.0, 30.0)),
        (softplus(2.5), (-12.0, -3.0, 0.5, 3.0, 12.0)),
    ],
    ids=["gelu_erf", "silu", "softplus2.5"],
)
def test_custom_activations_accurate_in_the_tails(act, points):
    """``σ, σ', σ''`` against 50-digit mpmath, far into the tails.

    Each to 8 ulps times ``1 + κ``, ``κ = |t σ^(k+1) / σ^(k)|`` the condition
    number of that derivative at ``t`` (the erf GELU's value at ``t = -30`` has
    ``κ ≈ 900``: ``erfc`` of the rounded ``t/√2``); no catastrophic cancellation.
    """
    mpmath = pytest.importorskip("mpmath")
    f_mp = {
        "gelu_erf": lambda t: t * mpmath.ncdf(t),
        "silu": lambda t: t / (1 + mpmath.exp(-t)),
        "softplus(beta=2.5)": lambda t: mpmath.log1p(mpmath.exp(2.5 * t)) / 2.5,
    }[act.name]
    got = act.derivs(np.array(points))
    with mpmath.workdps(50):
        ref = np.array(
            [[float(mpmath.diff(f_mp, mpmath.mpf(s), k)) for s in points] for k in range(4)]
        )
    eps = np.finfo(np.float64).eps
    for k in range(3):
        kappa = np.abs(np.array(points) * ref[k + 1] / ref[k])
        err = np.abs(got[k] - ref[k]) / np.abs(ref[k])
        assert np.all(err <= 8 * eps * (1 + kappa)), (k, err / eps, kappa)


# -- TorchLayer: LayerNorm against a plain re-implementation --------------------------------
def ln_reference_loss(X, y, n_hidden, eps, loss):
    """Dense(3, n, tanh) -> LayerNorm(n) -> Dense(n, 2): written out over the flat vector."""
    n = n_hidden
    sizes = [n * 3, n, n, n, 2 * n, 2]

    def L(t):
        W1, c1, gamma, beta, W2, c2 = torch.split(t, sizes)
        h = torch.tanh(X @ W1.view(n, 3).T + c1)
        c = h - h.mean(dim=1, keepdim=True)
        h = gamma * c / torch.sqrt((c * c).mean(dim=1, keepdim=True) + eps) + beta
        return loss(h @ W2.view(2, n).T + c2, y)

    return L


@functools.cache
def ln_case():
    torch.manual_seed(7)
    ln = nn.LayerNorm(6).to(F64)
    with torch.no_grad():  # a non-trivial scale and shift
        ln.weight.add_(0.3 * torch.randn(6, dtype=F64))
        ln.bias.add_(0.2 * torch.randn(6, dtype=F64))
    net = Pipeline([Dense(3, 6, "tanh"), TorchLayer(ln, 6), Dense(6, 2, "identity"), MSELoss()])
    rng = np.random.default_rng(8)
    x = net.init(seed=3)
    X, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))

    def mse(z, y):  # blockops' MSELoss: (1/B) Σ_s ½‖z_s − y_s‖²
        return 0.5 * ((z - y) ** 2).sum() / z.shape[0]

    L = ln_reference_loss(torch.from_numpy(X), torch.from_numpy(y), 6, ln.eps, mse)
    t = torch.from_numpy(x.copy())
    ref = L(t).item(), torch.func.grad(L)(t).numpy(), torch.func.hessian(L)(t).numpy()
    return net, x, X, y, net.linearize(x, X, y), ref


def test_torchlayer_layernorm_contract():
    """Gradient, fused HVP (matrix and dot test), exact inverses (riccati, kkt) and inertia."""
    net, _, _, _, pt, (L, g, H) = ln_case()
    assert net.layers[1].n_params == 12 and net.layers[1].n_out == 6
    assert pt.loss == pytest.approx(L, rel=1e-13)
    assert rel(pt.gradient, g) <= 1e-12
    assert rel(H, H.T) <= 1e-13  # the written-out reference is sane
    V = np.random.default_rng(3).standard_normal((net.n_params, 3))
    assert rel(hvp(pt, V), H @ V) <= 1e-12
    assert rel(hvp(pt, np.eye(net.n_params)), H) <= 1e-12
    Hop = hessian(pt, damping=0.1)
    u, v = V[:, 0], V[:, 1]
    assert abs(u @ (Hop @ v) - v @ (Hop @ u)) <= 1e-12 * abs(u @ (Hop @ v))
    lam = 1e-2
    A = H + lam * np.eye(len(H))
    assert inertia(A)[0] > 0, "the case must be indefinite"
    rhs = np.column_stack([g, V])
    for method in ("riccati", "kkt"):
        for refine in (1, 0):
            Hi = inverse_hessian(pt, damping=lam, method=method, refine=refine)
            S = Hi @ rhs
            tol = 1e-12 if refine else 1e-11  # the bare factorisation: cond(A) ≈ 700 here
            assert np.linalg.norm(A @ S - rhs) / np.linalg.norm(rhs) <= tol, (method, refine)
        assert Hi.inertia == inertia(A)
        assert Hi.logdet == pytest.approx(np.linalg.slogdet(A)[1], rel=1e-10)
    # float32 factor (a float32 copy of the module), refined in float64
    Hm = inverse_hessian(pt, damping=lam, precision="mixed", refine=4)
    assert np.linalg.norm(A @ (Hm @ g) - g) / np.linalg.norm(g) <= 1e-10
    # a pickled point (the module copies travel) gives the same products
    assert rel(hvp(pickle.loads(pickle.dumps(pt)), V), hvp(pt, V)) <= 1e-15


def test_torchlayer_layer_level():
    """Generic explicit blocks, dot tests and the fused step hvp_vjp = hvp + vjp."""
    net, _, _, _, pt, _ = ln_case()
    ly, cache, b = net.layers[1], pt.caches[1], pt.bs[1]
    for hook in ("jacobian_z", "jacobian_x", "hessian_blocks"):
        assert getattr(type(ly), hook) is getattr(Layer, hook)
    rng = np.random.default_rng(4)
    dz = rng.standard_normal((2, *cache.z_prev.shape))
    dx = rng.standard_normal((2, ly.n_params))
    bp = rng.standard_normal((2, *cache.z.shape))
    # vjp is the adjoint of jvp; hvp is symmetric
    j = ly.jvp(cache, dz, dx)
    bz, bx = ly.vjp(cache, bp)
    assert np.sum(j * bp) == pytest.approx(np.sum(bz * dz) + np.sum(bx * dx), rel=1e-13)
    hz, hx = ly.hvp(cache, b, dz, dx)
    lhs = np.sum(hz[0] * dz[1]) + hx[0] @ dx[1]
    assert lhs == pytest.approx(np.sum(hz[1] * dz[0]) + hx[1] @ dx[0], rel=1e-12)
    fz, fx = ly.hvp_vjp(cache, b, dz, dx, bp)
    assert rel(fz, hz + bz) <= 1e-14 and rel(fx, hx + bx) <= 1e-14
    # generic explicit blocks against the directional products
    Jz, Jx = ly.jacobian_z(cache), ly.jacobian_x(cache)
    assert rel(np.einsum("soi,ksi->kso", Jz, dz) + np.einsum("sop,kp->kso", Jx, dx), j) <= 1e-13
    Kzz, Kxz, Kxx = ly.hessian_blocks(cache, b)
    assert rel(np.einsum("sij,ksj->ksi", Kzz, dz) + np.einsum("psi,kp->ksi", Kxz, dx), hz) <= 1e-13
    assert rel(np.einsum("psi,ksi->kp", Kxz, dz) + dx @ Kxx.T, hx) <= 1e-13
    # layer contract: inputs are never modified, outputs never alias them
    assert not np.shares_memory(ly.forward(cache.z_prev, cache.x).z, cache.z_prev)


def test_layernorm_first_through_from_torch():
    """A TorchLayer as the first layer (no incoming tangent) with a cross-entropy loss."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    with torch.no_grad():
        model[0].weight.add_(0.3 * torch.randn(4, dtype=F64))
    X, y = data(B=4, n_in=4, n_out=3, seed=10, classes=True)
    pt = from_torch(model, nn.CrossEntropyLoss(), X, y)
    assert [type(ly).__name__ for ly in pt.pipeline.layers] == [
        "TorchLayer",
        "Dense",
        "Dense",
        "SoftmaxCrossEntropy",
    ]
    eps = model[0].eps
    sizes = [4, 4, 20, 5, 15, 3]

    def L(t):
        gamma, beta, W1, c1, W2, c2 = torch.split(t, sizes)
        c = X - X.mean(dim=1, keepdim=True)
        h = gamma * c / torch.sqrt((c * c).mean(dim=1, keepdim=True) + eps) + beta
        h = torch.tanh(h @ W1.view(5, 4).T + c1)
        return nn.functional.cross_entropy(h @ W2.view(3, 5).T + c2, y)

    t = torch.from_numpy(pt.params.copy())
    H = torch.func.hessian(L)(t).numpy()
    assert pt.loss == pytest.approx(L(t).item(), rel=1e-13)
    assert rel(pt.gradient, torch.func.grad(L)(t).numpy()) <= 1e-12
    assert rel(hvp(pt, np.eye(pt.n_params)), H) <= 1e-12
    A = H + 1e-2 * np.eye(len(H))
    for method in ("riccati", "kkt"):
        Hi = inverse_hessian(pt, damping=1e-2, method=method)
        assert np.linalg.norm(A @ (Hi @ pt.gradient) - pt.gradient) <= 1e-12 * np.linalg.norm(
            pt.gradient
        )
        assert Hi.inertia == inertia(A)


def test_bias_free_linear_and_eval_modules_through_torchlayer():
    """Linear(bias=False), BatchNorm1d(eval) go through TorchLayer; Dropout(eval) is dropped."""
    torch.manual_seed(11)
    bn = nn.BatchNorm1d(4)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    model = nn.Sequential(
        nn.Linear(3, 4, bias=False), nn.Tanh(), bn, nn.Dropout(0.3), nn.Linear(4, 2)
    ).to(F64)
    model.eval()
    X, y = data(B=5, n_in=3, n_out=2, seed=12)
    pt = from_torch(model, nn.MSELoss(reduction="sum"), X, y)
    names = [ly.describe() for ly in pt.pipeline.layers]
    assert names[:3] == [
        "TorchLayer 3->4 (Linear)",
        "Elementwise 4->4, tanh",
        "TorchLayer 4->4 (BatchNorm1d)",
    ]
    L, g, H = torch_reference(model, nn.MSELoss(reduction="sum"), X, y, pt.params)
    assert pt.loss == pytest.approx(L, rel=1e-13)
    assert rel(pt.gradient, g) <= 1e-13
    assert rel(hvp(pt, np.eye(pt.n_params)), H) <= 1e-12


# -- errors ---------------------------------------------------------------------------------
def test_errors_name_the_module():
    X, y = data(B=4, n_in=3, n_out=2)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(F64)
    with pytest.raises(ValueError, match=r"model\[1\] \(BatchNorm1d\).*training mode.*model\.eval"):
        from_torch(bn, nn.MSELoss(), X, y)
    drop = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 2)).to(F64)
    with pytest.raises(ValueError, match=r"model\[2\] \(Dropout\).*random.*model\.eval"):
        from_torch(drop, nn.MSELoss(), X, y)
    with pytest.raises(TypeError, match=r"model is a Linear, not an nn\.Sequential"):
        from_torch(nn.Linear(3, 2).to(F64), nn.MSELoss(), X, y)
    with pytest.raises(ValueError, match=r"TorchLayer: BatchNorm1d is not a per-sample"):
        TorchLayer(nn.BatchNorm1d(4), 4)

    class BatchCentre(nn.Module):  # couples samples without being a known module
        def forward(self, z):
            return z - z.mean(dim=0, keepdim=True)

    with pytest.raises(ValueError, match=r"model\[1\] \(BatchCentre\) is not per-sample"):
        from_torch(nn.Sequential(nn.Linear(3, 2), BatchCentre()).to(F64), nn.MSELoss(), X, y)
    shared = nn.Linear(3, 3)
    tied = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(3, 2)).to(F64)
    with pytest.raises(ValueError, match="tied weights"):
        from_torch(tied, nn.MSELoss(), X, y)
    with pytest.raises(ValueError, match="maps a"):
        from_torch(nn.Sequential(nn.Unflatten(1, (1, 3))), nn.MSELoss(), X, y)


# -- tensors in and out ---------------------------------------------------------------------
def test_torch_operator_round_trip():
    net, _, _, _, pt, (_, _, H) = ln_case()
    lam = 1e-2
    Hop = TorchOperator(hessian(pt, damping=lam))
    Hinv = TorchOperator(inverse_hessian(pt, damping=lam))
    n = net.n_params
    assert Hop.shape == Hinv.shape == (n, n) and Hop.dtype == Hinv.dtype == F64
    v = torch.randn(n, dtype=F64)
    w = Hop @ v
    assert isinstance(w, torch.Tensor) and w.dtype == F64 and w.shape == (n,)
    assert rel(w.numpy(), (H + lam * np.eye(n)) @ v.numpy()) <= 1e-12
    assert rel((Hinv @ w).numpy(), v.numpy()) <= 1e-12
    V = torch.randn(n, 3, dtype=F64)
    assert rel(Hinv.matmat(Hop.matmat(V)).numpy(), V.numpy()) <= 1e-12
    assert rel(Hop.rmatvec(v).numpy(), w.numpy()) <= 1e-14
    assert rel((Hop @ v.float()).numpy(), w.numpy()) <= 1e-6  # cast to the operator's dtype
    with pytest.raises(TypeError, match=r"expected a torch\.Tensor"):
        Hop @ v.numpy()


def test_parameter_vectors_round_trip():
    model = mlp(nn.Tanh, 3, width=4, n_in=2, n_out=2).float()
    x = parameters_vector(model)
    assert x.dtype == np.float64 and x.shape == (sum(p.numel() for p in model.parameters()),)
    load_parameters_vector(model, 2 * x)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert np.allclose(parameters_vector(model), 2 * x, rtol=1e-7)


def test_import_blockops_without_torch():
    """No blockops module imports torch when blockops (and blockops.interop) is imported.

    (pylops 2.8 itself imports torch whenever it is installed, so ``"torch" in
    sys.modules`` says nothing about blockops; the importers are recorded instead.)
    """
    code = (
        "import builtins, sys\n"
        "seen = []\n"
        "orig = builtins.__import__\n"
        "def hook(name, globals=None, *args, **kwargs):\n"
        "    if name == 'torch' or name.startswith('torch.'):\n"
        "        seen.append((globals or {}).get('__name__', '?'))\n"
        "    return orig(name, globals, *args, **kwargs)\n"
        "builtins.__import__ = hook\n"
        "import blockops, blockops.interop\n"
        "mods = sorted(m for m in sys.modules if m.startswith('blockops'))\n"
        "assert 'blockops.interop.torch' not in mods, mods\n"
        "bad = [m for m in seen if m.startswith('blockops')]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    env = {**os.environ, "JAX_PYLOPS": "0"}  # pylops need not import jax here
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
