r"""
Exact spectral histograms against stochastic Lanczos quadrature
===============================================================

How many eigenvalues of the Hessian :math:`H` lie below :math:`\sigma`?
Sylvester's law of inertia answers it exactly: congruent matrices have the
same numbers of negative, zero and positive eigenvalues, and the factorisation
:math:`H - \sigma I = L D L^\top` is a congruence, so

.. math::

   \#\{\, i : \lambda_i(H) < \sigma \,\} = n_-(H - \sigma I) = n_-(D).

blockops factors :math:`H - \sigma I` stage by stage in time linear in depth
(``inverse_hessian(point, damping=-sigma)``) and adds up the negative
eigenvalues of the small stage pivots (Haynsworth additivity), so
:func:`blockops.spectral.spectral_histogram` returns exact integer counts,
one factorisation per bin edge.

The usual matrix-free alternative is stochastic Lanczos quadrature (SLQ;
Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019): for a random
unit vector :math:`q`, :math:`m` Lanczos steps give a Gauss quadrature
:math:`q^\top f(H)\, q \approx \sum_k \tau_k^2 f(\theta_k)` (Ritz values
:math:`\theta_k`, squared first components :math:`\tau_k^2` of the
tridiagonal's eigenvectors), and with :math:`f` the indicator of a bin,
:math:`n` times its average over probes estimates the bin's count. We draw
both for a small net at a saddle (an indefinite :math:`H`) and check the
exact counts against ``numpy.linalg.eigvalsh`` of the dense Hessian.
"""

import os
import sys
import time

import matplotlib.pyplot as plt
import numpy as np

from blockops.hessian import hvp
from blockops.network import Dense, MSELoss, Pipeline
from blockops.spectral import count_eigenvalues, spectral_histogram

QUICK = os.environ.get("BLOCKOPS_EXAMPLE_QUICK", "0") == "1"
rng = np.random.default_rng(5)

# sphinx_gallery_start_ignore
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared _gallery helper
from _gallery import show_figures

# sphinx_gallery_end_ignore

# %%
# A small net away from a minimum
# -------------------------------
# Five tanh layers of width 16 on 16 samples of a 2-D regression problem, at
# scaled random parameters: far from a minimum, so :math:`H` has about as
# many negative eigenvalues as positive ones.

B, width = 16, 16
net = Pipeline(
    [Dense(2, width, "tanh")]
    + [Dense(width, width, "tanh") for _ in range(3)]
    + [Dense(width, 1, "identity"), MSELoss()]
)
X = rng.uniform(-2, 2, (B, 2))
y = np.sin(X[:, :1]) * np.cos(X[:, 1:])
pt = net.linearize(1.5 * net.init(seed=6), X, y)
n = pt.n_params
print(f"{n} parameters, loss {pt.loss:.3f}")

# %%
# Stochastic Lanczos quadrature
# -----------------------------
# All probes run together: one fused HVP ``hvp(pt, Q_k)`` per step for the
# ``(n, probes)`` block, and each column is reorthogonalised against its own
# earlier Lanczos vectors (twice), so no spurious Ritz copies enter the
# quadrature.


def slq_nodes(point, probes, steps, seed=0):
    """Ritz values and Gauss weights, each ``(probes, steps)``, of Rademacher probes."""
    Z = np.random.default_rng(seed).choice([-1.0, 1.0], (point.n_params, probes))
    Q = np.zeros((steps, *Z.shape))  # Lanczos vectors of every probe
    T = np.zeros((probes, steps, steps))  # one tridiagonal per probe
    q = Z / np.sqrt(point.n_params)
    for k in range(steps):
        Q[k] = q
        W = hvp(point, q)
        T[:, k, k] = np.einsum("np,np->p", q, W)
        for _ in range(2):  # W -= Q Qᵀ W per column, twice: "twice is enough"
            W -= np.einsum("jnp,jp->np", Q[: k + 1], np.einsum("jnp,np->jp", Q[: k + 1], W))
        if k + 1 < steps:
            beta = np.linalg.norm(W, axis=0)
            T[:, k, k + 1] = T[:, k + 1, k] = beta
            q = W / beta
    theta, S = np.linalg.eigh(T)
    return theta, S[:, 0, :] ** 2  # nodes, weights (the first components squared)


probes, steps = (10, 40) if QUICK else (30, 60)
t0 = time.perf_counter()
theta, tau2 = slq_nodes(pt, probes, steps)
t_slq = time.perf_counter() - t0

# %%
# Bins and the exact histogram
# ----------------------------
# The eigenvalues spread over many decades towards 0, so the bins are
# half-decades of :math:`|\lambda|` on both sides, with one bin
# :math:`[-10^{-5}, 10^{-5})` around 0. The Ritz values lie inside the
# spectrum; the outer edges pad their range, and the exact counts below the
# first edge and from the last one on (both 0) certify that the bins hold
# every eigenvalue. An edge that is an eigenvalue (to rounding) would make
# :math:`H - \sigma I` singular (``SingularBlockError``): move it slightly.

top = np.ceil(2 * np.log10(1.05 * np.abs(theta).max())) / 2
decades = 10.0 ** np.arange(-5, top + 0.25, 0.5)
edges = np.concatenate([-decades[::-1], decades])
t0 = time.perf_counter()
counts = spectral_histogram(pt, edges)
t_exact = time.perf_counter() - t0
outside = count_eigenvalues(pt, -np.inf, edges[0]) + count_eigenvalues(pt, edges[-1], np.inf)
assert outside == 0 and counts.sum() == n  # every eigenvalue is in a bin
n_neg = count_eigenvalues(pt, -np.inf, -1e-5)
print(
    f"exact histogram: {len(edges)} edges (one factorisation each) in {t_exact * 1e3:.0f} ms; "
    f"{n_neg} eigenvalues below -1e-5"
)

# SLQ's estimate of the same bins: n · mean over probes of the weights in each bin
slq = n * np.array([np.histogram(t, edges, weights=w)[0] for t, w in zip(theta, tau2)]).mean(0)
misplaced = 0.5 * np.abs(slq - counts).sum() / n
print(
    f"SLQ, {probes} probes x {steps} steps ({probes * steps} HVPs) in {t_slq * 1e3:.0f} ms: "
    f"weights sum to {slq.sum():.1f}; fraction of the spectrum in the wrong bins {misplaced:.3f}"
)
small = np.abs(edges[1:]) <= 1e-2  # bins of eigenvalues within 1e-2 of 0 (from -1e-2 to 1e-2)
small &= np.abs(edges[:-1]) <= 1e-2
print(
    f"|lambda| < 1e-2: exact {counts[small].sum()}, SLQ {slq[small].sum():.0f} "
    f"(in {small.sum()} bins: exact {counts[small].tolist()})"
)

# %%
# The dense check
# ---------------
# For a net this small the Hessian can be formed column by column and its
# eigenvalues computed densely: the counts agree bin by bin.

H = hvp(pt, np.eye(n))
w = np.linalg.eigvalsh(0.5 * (H + H.T))
dense_counts = np.histogram(w, edges)[0]
print(
    f"dense eigvalsh: lambda in [{w[0]:.3f}, {w[-1]:.3f}], {int((w < 0).sum())} below 0; "
    f"counts equal in every bin: {np.array_equal(dense_counts, counts)}"
)
assert np.array_equal(dense_counts, counts)

# %%
# SLQ places the wide outer bins well, but a probe's ``steps`` Ritz values
# cannot resolve the hundreds of eigenvalues within :math:`10^{-2}` of 0: their
# weight lands on one or two nodes, in the wrong bins. The exact counts need
# one factorisation per edge and no probes, and are integers.

fig, ax = plt.subplots(figsize=(7.5, 4))
exact_label = "exact (inertia of $H - \\sigma I$)"
ax.stairs(counts, edges, fill=True, color="C0", alpha=0.5, label=exact_label)
ax.stairs(slq, edges, color="C3", lw=1.5, label=f"SLQ ({probes} probes, {steps} Lanczos steps)")
ax.set_xscale("symlog", linthresh=1e-5)
ax.set_xticks([s * 10.0**k for s in (-1, 1) for k in (-4, -2, 0)] + [0])
ax.set_xlabel("eigenvalue of $H$ (bins: half-decades of $|\\lambda|$)")
ax.set_ylabel("eigenvalues per bin")
ax.set_title(f"Hessian spectrum of a saddle, n = {n}")
ax.legend(fontsize=8, loc="upper left")
fig.tight_layout()
# sphinx_gallery_start_ignore
show_figures("plot_spectral_histogram")  # plt.show(), or PNGs when headless (see the top)
# sphinx_gallery_end_ignore
