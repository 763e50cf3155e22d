r"""Hessian sweeps over a run of equal-shape dense layers, stacked.

Deep, narrow networks are mostly runs of ``Dense(a, a)`` layers. Over such a
run every term of the sweeps that does not feed the recursion is computed for
all layers at once with batched ``matmul``; what remains in the Python loop
is three small array calls per layer (forward and backward), against about a
dozen through the generic per-layer steps. Width 16, depth 1024, one BLAS
thread (``benchmarks/bench_hvp.py``, shared 2-core machine): HVP 14 ms
against 35 ms per layer (batch 1) and 48 ms against 61 ms (batch 32); with
the recurrences compiled (below) 2.1 ms against 7.6 ms for the array loops at
batch 1 and 12 ms against 18 ms at batch 32, in one run.

For layer ``i`` of the run (``pre_i = W_i z_{i-1} + c_i``, ``z_i = σ(pre_i)``,
``σ'``, ``σ''`` and ``b_i`` at the point), a direction ``(dW_i, dc_i)`` and the
tangent ``u_{i-1}`` entering it, the forward sweep (eq. 53) is

.. math::
    \dot{pre}_i = u_{i-1} W_i^T + s_i, \quad s_i = z_{i-1} dW_i^T + dc_i, \qquad
    u_i = σ'_i ⊙ \dot{pre}_i ,

and the backward sweep (eqs. 46-52) with ``b'`` the second-order adjoint

.. math::
    q_i = b'_i ⊙ σ'_i + b_i ⊙ σ''_i ⊙ \dot{pre}_i, \quad
    b'_{i-1} = q_i W_i + (b_i ⊙ σ'_i) dW_i ,

    (Hv)_{W_i} = q_i^T z_{i-1} + (b_i ⊙ σ'_i)^T u_{i-1}, \quad
    (Hv)_{c_i} = \textstyle\sum_s q_{i,s} ,

summed over samples ``s``; the Gauss-Newton sweep drops every ``b_i`` term.
The ``s_i``, the ``b σ'' \dot{pre}`` terms, the ``(b σ') dW`` terms and all
parameter outputs are batched over the run. On host NumPy with numba the two
recurrences left (the ``u`` and ``q`` updates) run as compiled loops
(:mod:`.dense_sweep_jit`); the array loops below are the reference and the
CuPy path.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module

__all__ = ["DenseRun"]


class DenseRun:
    """Consecutive plain square :class:`~blockops.network.Dense` layers, stacked.

    Parameters
    ----------
    caches, bs : lists
        The layers' caches and weightings ``b_l``.
    cols : slice
        The run's columns in the flat parameter vector.
    """

    def __init__(self, caches, bs, cols):
        xp = get_array_module(caches[0].z_prev)
        ex = [c.extra for c in caches]
        self.xp = xp
        self.W = xp.stack([e["W"] for e in ex])  # (R, a, a)
        self.WT = xp.ascontiguousarray(self.W.transpose(0, 2, 1))
        self.Z = xp.stack([c.z_prev for c in caches])  # (R, B, a): inputs z_{i-1}
        self.d1 = xp.stack([e["d1"] for e in ex])  # (R, B, a)
        b = xp.stack(bs)
        self.bd2 = b * xp.stack([e["d2"] for e in ex])  # b ⊙ σ''
        self.G = b * self.d1  # b ⊙ σ'
        self.GT = xp.ascontiguousarray(self.G.transpose(0, 2, 1))  # (R, a, B)
        self.cols = cols
        self._jit = None  # (forward, backward) compiled recurrences, host only
        if xp is np and self.W.dtype in (np.float32, np.float64):
            from .dense_sweep_jit import recurrences

            self._jit = recurrences()

    def _params(self, V):
        """``(dW, dc)`` of the run's columns of ``V`` (k, n): (R, k, a, a) and (R, k, a)."""
        R, a = self.W.shape[0], self.W.shape[1]
        P = V[:, self.cols].reshape(V.shape[0], R, a * a + a).transpose(1, 0, 2)
        return P[..., : a * a].reshape(R, -1, a, a), P[..., a * a :]  # concat(W.ravel(), c)

    def forward(self, g_in, V):
        """Tangent at the run's output for input tangent ``g_in`` (or None) and ``V``.

        Returns ``(g_out, state)``; ``state`` is what :meth:`backward` reuses.
        """
        xp = self.xp
        R = self.W.shape[0]
        dW, dc = self._params(V)
        pre = self.Z[:, None] @ dW.transpose(0, 1, 3, 2)  # s_i, (R, k, B, a)
        pre += dc[:, :, None, :]
        U = xp.empty((R + 1, *pre.shape[1:]), dtype=pre.dtype)  # U[i] = u_{i-1}
        start = 0
        if g_in is None:  # u_{-1} = 0: the first pre-activation is s_0
            xp.multiply(pre[0], self.d1[0], out=U[1])
            U[0] = 0
            start = 1
        else:
            U[0] = g_in
        if self._jit is not None:  # C order: the kernel reshapes each layer's block
            pre = xp.ascontiguousarray(pre)
            self._jit[0](pre, U, self.WT, self.d1, start)
            return U[R], (pre, U, dW)
        tmp = xp.empty(pre.shape[1:], dtype=pre.dtype)
        for i in range(start, R):
            xp.matmul(U[i], self.WT[i], out=tmp)
            pre[i] += tmp
            xp.multiply(pre[i], self.d1[i], out=U[i + 1])
        return U[R], (pre, U, dW)

    def backward(self, state, bprime, out, second_order=True):
        """Adjoint sweep from ``bprime`` at the run's output (or None); fills ``out``'s
        columns of the run and returns ``b'`` at its input."""
        xp = self.xp
        pre, U, dW = state
        R, a = self.W.shape[0], self.W.shape[1]
        k = pre.shape[1]
        if second_order:
            Q = self.bd2[:, None] * pre  # b σ'' pre-dot, (R, k, B, a)
            Rr = self.G[:, None] @ dW  # (b σ') dW, (R, k, B, a)
            Q[:-1] += Rr[1:] * self.d1[:-1, None]
        else:
            Q = xp.zeros_like(pre)
        if bprime is not None:
            Q[R - 1] += bprime * self.d1[R - 1]
        if self._jit is not None:
            Q = xp.ascontiguousarray(Q)
            self._jit[1](Q, self.W, self.d1)
        else:
            tmp = xp.empty(Q.shape[1:], dtype=Q.dtype)
            for i in range(R - 1, 0, -1):
                xp.matmul(Q[i], self.W[i], out=tmp)
                tmp *= self.d1[i - 1]
                Q[i - 1] += tmp
        b_in = Q[0] @ self.W[0]
        if second_order:
            b_in += Rr[0]
        # a view: `out` is the sweep's own C-contiguous (k, n) array, and splitting the
        # last axis of a column slice never copies
        rows = out[:, self.cols].reshape(k, R, a * a + a)
        hW = Q.transpose(0, 1, 3, 2) @ self.Z[:, None]  # q_iᵀ z_{i-1}, (R, k, a, a)
        if second_order:
            hW += self.GT[:, None] @ U[:R]
        rows[..., : a * a] = hW.reshape(R, k, a * a).transpose(1, 0, 2)
        rows[..., a * a :] = Q.sum(axis=2).transpose(1, 0, 2)
        return b_in
