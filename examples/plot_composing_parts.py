r"""
Composing the named parts of the Hessian in user code
=====================================================

:func:`~blockops.hessian_parts` returns the operators of eq. 24 —
``M``, ``Minv``, ``P``, ``Dx``, ``DD``, ``DM``, ``Dxx``, ``Dxz``, ``Dzx``,
``Dzz`` — as :class:`pylops.LinearOperator` objects. They compose with ``@``,
``+``, ``.H`` like matrices, and nothing is formed. This example builds, in a
few lines each:

1. the gradient as backpropagation, :math:`\nabla_x z_L = D_x^\top M^{-\top} e_L^\top` (eq. 8);
2. the tangents of every activation, :math:`dz = M^{-1} D_x\, dx` (eq. 14);
3. the Hessian of eq. 24, from its parts, against the fused HVP;
4. the Jacobian of the network outputs and the empirical neural tangent
   kernel :math:`J J^\top`, and the Gauss-Newton matrix :math:`J^\top H_\ell J`;
5. the change of every activation under an exact Newton step,
   ``Minv @ Dx @ Hinv``.

Every result is checked against finite differences or an independent route.
"""

import os
import sys

import matplotlib.pyplot as plt
import numpy as np
import pylops

from blockops.hessian import hessian, hessian_parts, hvp
from blockops.inverse import inverse_hessian
from blockops.network import Dense, MSELoss, Pipeline

QUICK = os.environ.get("BLOCKOPS_EXAMPLE_QUICK", "0") == "1"
rng = np.random.default_rng(5)


# sphinx_gallery_start_ignore
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared _gallery helper
from _gallery import show_figures

# sphinx_gallery_end_ignore

width, depth, B, n_out = 6, (3 if QUICK else 5), 8, 2
layers = [Dense(3, width, "tanh")] + [Dense(width, width, "tanh") for _ in range(depth - 2)]
net = Pipeline([*layers, Dense(width, n_out, "identity"), MSELoss()])
w = net.init(seed=6)
X = rng.standard_normal((B, 3))
Y = rng.standard_normal((B, n_out))
pt = net.linearize(w, X, Y)
parts = hessian_parts(pt)
M, Minv, P, Dx = parts.M, parts.Minv, parts.P, parts.Dx
DD, DM, Dxx, Dxz, Dzx, Dzz = parts.DD, parts.DM, parts.Dxx, parts.Dxz, parts.Dzx, parts.Dzz
n = net.n_params
sizes = [B * m for m in parts.structure.n[1:]]  # blocks of the z space: z_1, ..., z_L
z_off = np.concatenate([[0], np.cumsum(sizes)])
print(f"{len(net)} stages, {n} parameters; M is {M.shape}, Dx is {Dx.shape}, P is {P.shape}")

# %%
# 1. Backprop is a triangular solve: the gradient is Dx.H @ Minv.H @ e_L
# ----------------------------------------------------------------------
# :math:`b M = e_L` (eq. 7) with :math:`e_L` one in the loss block (one row
# per sample): :math:`b^\top = M^{-\top} e_L^\top` is back substitution.

e_L = np.zeros(M.shape[0])
e_L[z_off[-2] :] = 1.0
b = Minv.H @ e_L
grad = Dx.H @ b
err_grad = np.abs(grad - pt.gradient).max() / np.abs(pt.gradient).max()
err_b = max(np.abs(b[z_off[l] : z_off[l + 1]] - pt.bs[l].ravel()).max() for l in range(len(net)))
print(f"gradient from parts vs backprop: {err_grad:.1e}; b_l from parts vs backprop: {err_b:.1e}")
assert err_grad < 1e-13 and err_b < 1e-13

# %%
# 2. Tangents of every activation: dz = Minv @ Dx @ dx
# ----------------------------------------------------
# Forward substitution through :math:`M` is the forward-mode pass (eq. 53).
# Finite differences of the activations ``Point.zs`` give an independent
# check.

v = rng.standard_normal(n)
tangent = Minv @ (Dx @ v)
h = 1e-6
zp = net.linearize(w + h * v, X, Y).zs[1:]
zm = net.linearize(w - h * v, X, Y).zs[1:]
fd = np.concatenate([((a - c) / (2 * h)).ravel() for a, c in zip(zp, zm)])
err_tan = np.abs(tangent - fd).max() / np.abs(fd).max()
print(f"tangents Minv @ Dx @ v vs finite differences: {err_tan:.1e}")
assert err_tan < 1e-8

# %%
# 3. Eq. 24 from its parts
# ------------------------
# The four terms, written as in the paper (with the `P` that eqs. 52 and 54
# drop); the result is a LinearOperator like any other.

H24 = (
    DD @ Dxx
    + DD @ Dzx @ P @ Minv @ Dx
    + Dx.H @ Minv.H @ P.H @ DM @ Dxz
    + Dx.H @ Minv.H @ P.H @ DM @ Dzz @ P @ Minv @ Dx
)
err_24 = np.linalg.norm(H24 @ v - hvp(pt, v)) / np.linalg.norm(hvp(pt, v))
print(f"eq. 24 assembled in user code vs fused HVP: {err_24:.1e}")
assert err_24 < 1e-12
assert pylops.utils.dottest(H24, n, n, rtol=1e-10, raiseerror=False)  # adjoint consistency

# %%
# 4. Output Jacobian, neural tangent kernel and Gauss-Newton matrix
# -----------------------------------------------------------------
# The outputs are the block :math:`z_{L-1}` of the tangents, so with a
# restriction :math:`S` onto it, :math:`J = S M^{-1} D_x`. The empirical NTK
# :math:`J J^\top` is a :math:`(B n_{out})^2` matrix, formed here by applying
# the operator to the identity. For the mean squared error,
# :math:`H_\ell = I/B` and the Gauss-Newton matrix is :math:`J^\top J / B`.

S = pylops.Restriction(M.shape[0], np.arange(z_off[-3], z_off[-2]), dtype=np.float64)
J = S @ Minv @ Dx
ntk = J @ (J.H @ np.eye(J.shape[0]))
# independent check: the output Jacobian by central differences, one parameter at a time
J_fd = np.empty((J.shape[0], n))
for k in range(n):
    e = np.zeros(n)
    e[k] = 1e-6
    J_fd[:, k] = (
        net.linearize(w + e, X, Y).zs[-2] - net.linearize(w - e, X, Y).zs[-2]
    ).ravel() / 2e-6
err_ntk = np.abs(ntk - J_fd @ J_fd.T).max() / np.abs(ntk).max()
print(f"NTK J J^T ({ntk.shape[0]}x{ntk.shape[0]}) vs finite-difference Jacobian: {err_ntk:.1e}")
assert err_ntk < 1e-8

G_user = (1.0 / B) * (J.H @ J)  # note: "/" on a pylops operator means "solve"
err_ggn = np.linalg.norm(G_user @ v - hessian(pt, kind="ggn") @ v) / np.linalg.norm(G_user @ v)
print(f"Gauss-Newton J^T J / B vs hessian(kind='ggn'): {err_ggn:.1e}")
assert err_ggn < 1e-12

# %%
# 5. How a Newton step moves every layer: Minv @ Dx @ Hinv
# --------------------------------------------------------
# The exact inverse composes with the parts too. The first-order change of
# all activations under the damped Newton step :math:`s = -(H + \lambda
# I)^{-1} g` is :math:`M^{-1} D_x s`; we compare it with the actual change
# under a small fraction of the step.

Hinv = inverse_hessian(pt, damping=1e-2)
move = -(Minv @ Dx @ Hinv) @ pt.gradient
t = 1e-6
s = -(Hinv @ pt.gradient)
z_new = net.linearize(w + t * s, X, Y).zs[1:]
actual = np.concatenate([((a - c) / t).ravel() for a, c in zip(z_new, pt.zs[1:])])
err_move = np.abs(move - actual).max() / np.abs(move).max()
print(f"activation change under the Newton step, predicted vs actual: {err_move:.1e}")
assert err_move < 1e-4

per_layer = [
    np.linalg.norm(move[z_off[l] : z_off[l + 1]]) / np.sqrt(sizes[l]) for l in range(len(net) - 1)
]
fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
ax[0].imshow(ntk, cmap="viridis")
ax[0].set_title("empirical NTK  J Jᵀ")
ax[0].set_xticks([])
ax[0].set_yticks([])
ax[1].bar(np.arange(1, len(per_layer) + 1), per_layer)
ax[1].set_xticks(np.arange(1, len(per_layer) + 1))
ax[1].set_xlabel("layer")
ax[1].set_ylabel("RMS change of activations")
ax[1].set_title("Newton step, seen layer by layer")
fig.tight_layout()
# sphinx_gallery_start_ignore
show_figures("plot_composing_parts")  # plt.show(), or PNGs when headless (see the top)
# sphinx_gallery_end_ignore
