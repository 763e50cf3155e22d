"""``LaplaceGGN``: evidence, its gradient, samples and predictive variance vs dense references.

References, all independent of blockops' numerics: the Gauss-Newton matrix
``reference.ggn`` (JAX ``jacfwd`` of a plain re-implementation and the loss
Hessian by ``jax.hessian``), the loss by ``reference.loss_value``, the network
outputs' Jacobian at test inputs by ``jax.jacfwd``, the likelihood and prior
densities by ``scipy.stats.norm.logpdf``, ``numpy.linalg.slogdet`` and
``numpy.linalg.inv`` of the explicitly formed ``G + D``, and central finite
differences of the dense evidence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from scipy.stats import norm

from blockops import LaplaceGGN
from blockops.network import CustomLoss, Dense, Elementwise, MSELoss, Pipeline, SoftmaxCrossEntropy
from blockops.network.auxiliary import AuxiliaryScalarLoss

SIGMA = 0.3  # the Gaussian noise level of the regression cases


def regression_case():
    """Dense-tanh, a parameter-free layer, Dense-identity; MSE as a Gaussian NLL of noise SIGMA."""
    rng = np.random.default_rng(3)
    B = 6
    net = Pipeline(
        [
            Dense(2, 3, "tanh"),
            Elementwise(3, "softplus"),  # no parameters: its prior entry is ignored
            Dense(3, 2, "identity"),
            MSELoss(scale=B / SIGMA**2),
        ]
    )
    X, y = rng.standard_normal((B, 2)), rng.standard_normal((B, 2))
    return net, net.init(seed=4), X, y


def classification_case():
    """Softmax cross-entropy with scale B: the categorical likelihood."""
    rng = np.random.default_rng(5)
    B = 7
    net = Pipeline([Dense(2, 4, "tanh"), Dense(4, 3, "identity"), SoftmaxCrossEntropy(scale=B)])
    X, y = rng.standard_normal((B, 2)), rng.integers(0, 3, size=B)
    return net, net.init(seed=6), X, y


CASES = {"mse": regression_case, "softmax": classification_case}
# one shared precision, and one per layer (the loss's entry, and the parameter-free
# layer's in the regression case, are ignored)
PRIORS = {"mse": [0.7, [0.3, 9.0, 2.0, 0.0]], "softmax": [1.3, [0.5, 4.0, 0.0]]}
PARAMS = [(c, p) for c in CASES for p in PRIORS[c]]
IDS = [f"{c}-{'layers' if np.ndim(p) else 'shared'}" for c, p in PARAMS]


def delta_vector(net, prior):
    """``diag(D)``: δ_l repeated p_l times."""
    d = np.broadcast_to(np.asarray(prior, dtype=float), (len(net.layers),))
    return np.repeat(d, [ly.n_params for ly in net.layers])


def outputs(net, x, X):
    """Network outputs ``(B, m)`` and their Jacobian ``(B m, n)`` by JAX."""
    spec = net.spec()

    def f(x):
        z = jnp.asarray(X)
        for s, xl in zip(spec[:-1], reference.split(spec, x)[:-1]):
            z = reference.layer_fn(s, z, xl)
        return z

    return np.asarray(f(x)), np.asarray(jax.jacfwd(lambda x: f(x).ravel())(x))


def log_likelihood(net, x, X, y):
    """``log p(y | f(X))`` from the density itself (Gaussian or categorical)."""
    f, _ = outputs(net, x, X)
    if isinstance(net.layers[-1], MSELoss):
        return float(norm.logpdf(y, loc=f, scale=SIGMA).sum())
    logp = f - np.log(np.exp(f).sum(axis=1, keepdims=True))
    return float(logp[np.arange(len(y)), y].sum())


def dense_evidence(net, x, X, y, d, G):
    """Laplace evidence from densities: log p(D|θ*) + log p(θ*) + (P/2) log 2π - ½ log det(G+D)."""
    used = d > 0
    log_prior = norm.logpdf(x[used], scale=1 / np.sqrt(d[used])).sum()
    P = int(used.sum())
    logdet = np.linalg.slogdet(G + np.diag(d))
    assert logdet[0] > 0
    return log_likelihood(net, x, X, y) + log_prior + 0.5 * P * np.log(2 * np.pi) - 0.5 * logdet[1]


def setup(case, prior, method="auto"):
    net, x, X, y = CASES[case]()
    G = reference.ggn(net.spec(), x, X, y)
    la = LaplaceGGN(net.linearize(x, X, y), prior, method=method)
    return net, x, X, y, G, la


# "kkt": the pivoted banded factorisation supplies log det (selected inversion then
# runs its own stagewise sweep); "auto" here is the stagewise sweep
METHODS = ["auto", "kkt"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("case", "prior"), PARAMS, ids=IDS)
def test_evidence_against_dense(case, prior, method):
    net, x, X, y, G, la = setup(case, prior, method)
    assert la.covariance.method == ("kkt" if method == "kkt" else "riccati")
    d = delta_vector(net, prior)
    want = dense_evidence(net, x, X, y, d, G)
    assert la.log_marginal_likelihood() == pytest.approx(want, rel=1e-10)
    # the loss is the NLL up to the stated constant
    nll = reference.loss_value(net.spec(), x, X, y) + la.nll_constant
    assert nll == pytest.approx(-log_likelihood(net, x, X, y), rel=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("case", "prior"), PARAMS, ids=IDS)
def test_evidence_gradient_against_finite_differences(case, prior, method):
    net, x, X, y, G, la = setup(case, prior, method)
    d = delta_vector(net, prior)
    used = [l for l, ly in enumerate(net.layers) if ly.n_params]
    o = net.offsets
    # central differences in log δ_l (relative step h): truncation ~h²|f'''|/6 ≈ 1e-11 and
    # rounding ~ε|f|/h ≈ 1e-10 for |f| ~ 1e2, so 1e-7 (relative to max(|g|, 1)) is ample
    h = 1e-5

    def fd(rows):
        e = np.zeros_like(d)
        e[rows] = d[rows] * h
        f = lambda s: dense_evidence(net, x, X, y, d + s * e, G)  # noqa: E731
        return (f(1) - f(-1)) / (2 * h)  # = δ ∂f/∂δ

    if np.ndim(prior) == 0:
        want = fd(d > 0) / d[d > 0][0]
        got = la.log_marginal_likelihood_gradient()
        assert isinstance(got, float)
        assert abs(got - want) <= 1e-7 * max(abs(want), 1)
        return
    got = la.log_marginal_likelihood_gradient()
    assert got.shape == (len(net.layers),)
    for l in range(len(net.layers)):
        if l not in used:
            assert got[l] == 0.0
            continue
        want = fd(slice(o[l], o[l + 1])) / prior[l]
        assert abs(got[l] - want) <= 1e-7 * max(abs(want), 1), l


@pytest.mark.parametrize(("case", "prior"), PARAMS, ids=IDS)
@pytest.mark.parametrize("method", ["lbfgs", "mackay"])
def test_optimize_prior_precision(case, prior, method):
    net, x, X, y, G, la = setup(case, prior)
    best = la.optimize_prior_precision(method)
    assert np.ndim(best) == np.ndim(prior)
    d = delta_vector(net, best)
    f0 = dense_evidence(net, x, X, y, d, G)
    assert la.log_marginal_likelihood() == pytest.approx(f0, rel=1e-10)
    # a maximum of the dense evidence: every layer's (or the shared) δ moved by ±1 %
    # lowers it, and the exact gradient vanishes there
    o = net.offsets  # per layer: each layer's rows, even where two layers share a value
    per_layer = [slice(o[l], o[l + 1]) for l in range(len(net.layers)) if o[l + 1] > o[l]]
    blocks = [d > 0] if np.ndim(prior) == 0 else per_layer
    for rows in blocks:
        for s in (0.99, 1.01):
            dd = d.copy()
            dd[rows] *= s
            assert dense_evidence(net, x, X, y, dd, G) < f0
    g = np.atleast_1d(la.log_marginal_likelihood_gradient())
    assert np.abs(g * np.atleast_1d(best)).max() <= 1e-6  # ∂/∂log δ at the optimum (tol 1e-8)


@pytest.mark.parametrize(("case", "prior"), PARAMS, ids=IDS)
def test_sampler_factor_is_exact(case, prior):
    """Samples are Σ (F ξ) with F = [Jᵀ R, D^{1/2}]: then F Fᵀ must be G + D exactly."""
    net, _, X, _, G, la = setup(case, prior)
    d = delta_vector(net, prior)
    B, m = X.shape[0], net.layers[-1].n_in
    n = net.n_params
    eye = np.eye(B * m).reshape(B * m, B, m)
    F1 = la._sample_rhs(eye, np.zeros((n, B * m)))
    F2 = la._sample_rhs(np.zeros((n, B, m)), np.eye(n))
    F = np.hstack([F1, F2])
    A = G + np.diag(d)
    assert np.abs(F @ F.T - A).max() <= 1e-12 * np.abs(A).max()


@pytest.mark.parametrize(("case", "prior"), PARAMS, ids=IDS)
def test_sample_covariance(case, prior):
    """20 000 seeded samples: mean and covariance against θ* and the dense (G + D)⁻¹.

    With the known mean, ``Ĉ = (1/N) Σ (θ - θ*)(θ - θ*)ᵀ`` is unbiased and for
    Gaussian samples ``Var Ĉ_ij = (Σ_ij² + Σ_ii Σ_jj) / N`` exactly, and
    ``Var θ̄_i = Σ_ii / N``. Every standardised error must be below 5 (a
    5-sigma bound: about 1e-4 chance that any of the ~150 entries exceeds it for
    a correct sampler; the seed makes the test deterministic).
    """
    net, x, _, _, G, la = setup(case, prior)
    S = np.linalg.inv(G + np.diag(delta_vector(net, prior)))
    N = 20_000
    x0 = x.copy()
    theta = la.sample(N, rng=np.random.default_rng(123))
    assert theta.shape == (N, net.n_params)
    np.testing.assert_array_equal(x, x0)
    dev = theta - x
    s = np.sqrt(np.diag(S))
    assert np.abs(dev.mean(axis=0) / (s / np.sqrt(N))).max() < 5
    C = dev.T @ dev / N
    z = (C - S) / np.sqrt((S**2 + np.outer(s**2, s**2)) / N)
    assert np.abs(z).max() < 5
    assert la.covariance.info["residual"].max() <= 1e-12  # the batched solve's certificate
    # seeded: the same seed gives the same samples
    np.testing.assert_array_equal(la.sample(3, rng=7), la.sample(3, rng=7))


@pytest.mark.parametrize(("case", "prior"), PARAMS, ids=IDS)
def test_predictive_variance_against_dense(case, prior):
    net, x, _, _, G, la = setup(case, prior)
    S = np.linalg.inv(G + np.diag(delta_vector(net, prior)))
    Xt = np.random.default_rng(9).standard_normal((11, 2))
    Xt0 = Xt.copy()
    f, J = outputs(net, x, Xt)
    want = np.einsum("ij,jk,ik->i", J, S, J).reshape(f.shape)
    mean, var = la.predict(Xt, chunk=4)  # 3 chunks, one solve
    np.testing.assert_array_equal(Xt, Xt0)
    np.testing.assert_allclose(mean, f, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(var, want, rtol=1e-10, atol=0)
    np.testing.assert_allclose(la.predictive_variance(Xt), want, rtol=1e-10, atol=0)


def test_float32_point():
    """A float32 point: float32 samples and predictions; the evidence to float32 accuracy.

    log det of the 17 x 17 G + D in float32 carries a relative error of about
    n·ε32·cond ≈ 17 · 6e-8 · 1e2 ≈ 1e-4 of its terms; 1e-4 of the evidence's
    largest term bounds it.
    """
    net, x, X, y = regression_case()
    G = reference.ggn(net.spec(), x, X, y)
    prior = [0.3, 9.0, 2.0, 0.0]
    pt = net.linearize(x.astype(np.float32), X.astype(np.float32), y.astype(np.float32))
    la = LaplaceGGN(pt, prior)
    want = dense_evidence(net, x, X, y, delta_vector(net, prior), G)
    scale = max(abs(want), reference.loss_value(net.spec(), x, X, y))
    assert abs(la.log_marginal_likelihood() - want) <= 1e-4 * scale
    assert la.sample(4, rng=0).dtype == np.float32
    mean, var = la.predict(X[:3].astype(np.float32))
    assert mean.dtype == var.dtype == np.float32


def test_prior_queries_do_not_change_the_prior():
    net, x, X, y, G, la = setup("mse", 0.7)
    d = delta_vector(net, 2.5)
    assert la.log_marginal_likelihood(2.5) == pytest.approx(
        dense_evidence(net, x, X, y, d, G), rel=1e-10
    )
    assert la.prior_precision == 0.7
    per_layer = la.log_marginal_likelihood_gradient([1.0, 5.0, 2.0, 3.0])
    assert per_layer.shape == (4,) and per_layer[1] == 0.0  # the parameter-free layer
    assert la.prior_precision == 0.7


def test_bad_input():
    net, x, X, y = regression_case()
    pt = net.linearize(x, X, y)
    with pytest.raises(ValueError, match=r"prior_precision=0\.0"):
        LaplaceGGN(pt, 0.0)
    with pytest.raises(ValueError, match=r"prior_precision\[2\].*layer 3"):
        LaplaceGGN(pt, [1.0, 1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match=r"one value per layer \(4,\)"):
        LaplaceGGN(pt, [1.0, 2.0])
    with pytest.raises(TypeError, match="expected a Point"):
        LaplaceGGN(net, 1.0)
    la = LaplaceGGN(pt, [1.0, 5.0, 2.0, 0.0])  # unused entries may be anything >= 0
    with pytest.raises(ValueError, match="prior_precision=nan"):
        la.prior_precision = float("nan")
    assert la.prior_precision[2] == 2.0  # a rejected prior leaves the old one
    with pytest.raises(ValueError, match=r"inputs X have shape \(3, 5\); expected \(B, 2\)"):
        la.predict(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="method='newton'"):
        la.optimize_prior_precision("newton")
    with pytest.raises(ValueError, match="k=0"):
        la.sample(0)
    aux = Pipeline([Dense(2, 2, "identity"), AuxiliaryScalarLoss(MSELoss())])
    with pytest.raises(ValueError, match="parameter"):
        LaplaceGGN(aux.linearize(aux.init(0), X, y), 1.0)


def test_non_convex_loss_is_refused():
    """A loss concave in the outputs: G is negative semi-definite, G + D indefinite or no JᵀR."""
    neg = CustomLoss(
        lambda z, y: -0.5 * ((z - y) ** 2).sum(axis=1),
        lambda z, y: -(z - y),
        lambda z, y, v: -v,
        name="Concave",
    )
    net = Pipeline([Dense(2, 3, "tanh"), Dense(3, 2, "identity"), neg])
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((6, 2)), rng.standard_normal((6, 2))
    pt = net.linearize(net.init(2), X, y)
    with pytest.raises(ValueError, match="not positive definite"):
        LaplaceGGN(pt, 1e-3)
    la = LaplaceGGN(pt, 1e6)  # D dominates: G + D is positive definite, but G has no root
    with pytest.raises(ValueError, match="eigenvalue"):
        la.sample(2, rng=0)
