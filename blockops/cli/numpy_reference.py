"""The independent reference of ``check``: the tanh MLP with MSE in plain NumPy.

Written from the documented parameter layout (``x_l = concat(W.ravel(), c)``,
``W`` of shape ``(out, in)``; tanh hidden layers, linear last layer,
``MSE = mean_s ½‖z_s - y_s‖²``) with a hand-written backprop, and nothing
from blockops. Dense Hessian and Gauss-Newton matrices come from central
finite differences (error ``O(h²)``, about 1e-9 relative at ``h = 1e-5``).
"""

from __future__ import annotations

import itertools

import numpy as np

__all__ = [
    "FD_STEP",
    "reference_ggn",
    "reference_hessian",
    "reference_loss_grad",
    "reference_outputs",
]

FD_STEP = 1e-5


def _reference_forward(x: np.ndarray, sizes: list[int], X: np.ndarray):
    """Weights, biases and activations ``[X, z_1, ..., z_out]`` of the tanh MLP."""
    Ws, cs, off = [], [], 0
    for a_in, a_out in itertools.pairwise(sizes):
        Ws.append(x[off : off + a_out * a_in].reshape(a_out, a_in))
        off += a_out * a_in
        cs.append(x[off : off + a_out])
        off += a_out
    last = len(Ws) - 1
    zs = [X]
    for l, (W, c) in enumerate(zip(Ws, cs)):
        t = zs[-1] @ W.T + c
        zs.append(np.tanh(t) if l < last else t)
    return Ws, zs


def reference_outputs(x: np.ndarray, sizes: list[int], X: np.ndarray) -> np.ndarray:
    """Network outputs ``(B, n_out)`` (the loss's input), plain NumPy."""
    return _reference_forward(x, sizes, X)[1][-1]


def reference_ggn(x: np.ndarray, sizes, X, h: float = FD_STEP) -> np.ndarray:
    """Gauss-Newton matrix ``Jᵀ J / B`` of the MSE loss, ``J`` by central differences."""
    n, B = x.size, X.shape[0]
    J = np.empty((reference_outputs(x, sizes, X).size, n))
    for j in range(n):
        e = np.zeros(n)
        e[j] = h
        J[:, j] = (reference_outputs(x + e, sizes, X) - reference_outputs(x - e, sizes, X)).ravel()
    J /= 2 * h
    return J.T @ J / B


def reference_loss_grad(x: np.ndarray, sizes: list[int], X: np.ndarray, y: np.ndarray):
    """Loss and gradient of the tanh MLP with MSE, in plain NumPy (hand-written backprop)."""
    Ws, zs = _reference_forward(x, sizes, X)
    last = len(Ws) - 1
    acts = zs[1:]
    B = X.shape[0]
    r = zs[-1] - y
    loss = 0.5 * float(np.sum(r * r)) / B
    delta = r / B
    grads = []
    for l in range(last, -1, -1):
        if l < last:
            delta = delta * (1.0 - acts[l] ** 2)
        grads.append(np.concatenate([(delta.T @ zs[l]).ravel(), delta.sum(axis=0)]))
        delta = delta @ Ws[l]
    return loss, np.concatenate(grads[::-1])


def reference_hessian(x: np.ndarray, sizes, X, y, h: float = FD_STEP) -> np.ndarray:
    """Dense Hessian by central differences of :func:`reference_loss_grad`, symmetrised."""
    n = x.size
    H = np.empty((n, n))
    for j in range(n):
        e = np.zeros(n)
        e[j] = h
        H[:, j] = (
            reference_loss_grad(x + e, sizes, X, y)[1] - reference_loss_grad(x - e, sizes, X, y)[1]
        ) / (2 * h)
    return 0.5 * (H + H.T)
