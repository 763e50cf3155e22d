r"""Compiled recurrences of the stacked dense HVP sweeps (host NumPy with numba).

Over a run of square dense layers (:mod:`.dense_sweep`) everything but two
recurrences is batched over the run. Those two are a product with one
``a × a`` matrix and an elementwise scale per layer,

.. math::
    \dot{pre}_i \mathrel{+}= u_{i-1} W_i^T, \quad u_i = σ'_i ⊙ \dot{pre}_i
    \qquad\text{and}\qquad
    q_{i-1} \mathrel{+}= σ'_{i-1} ⊙ (q_i W_i),

for all directions and samples at once, so at width 16 each NumPy call costs
far more to dispatch than to compute. Here each recurrence is one compiled
loop over the run (same products, same order of layers); the array loop in
:class:`~.dense_sweep.DenseRun` stays the reference and the CuPy path.

numba is optional, and the switch is the dense stage's
(:func:`blockops.network.dense_stage_jit.compiled`, ``BLOCKOPS_JIT=0``).
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["recurrences"]

_lock = threading.Lock()
_loaded = None  # (forward, backward), or False when numba is absent


# Rows (directions x samples) from which a layer's product goes to BLAS through np.dot:
# width 16, depth 256, one thread, HVP with 8 directions at batch 32 (256 rows): loops 25 ms,
# BLAS 21 ms; at 32 rows and fewer the loops win (1024 x 32 x 1: 12 against 18 ms).
GEMM_ROWS = 128


def _forward_recurrence(pre, U, WT, d1, start):
    """``pre[i] += U[i] @ WT[i]``, ``U[i + 1] = pre[i] ⊙ d1[i]`` for ``i = start .. R-1``.

    ``pre`` (R, k, B, a), ``U`` (R + 1, k, B, a), ``WT`` (R, a, a) = ``Wᵀ``,
    ``d1`` (R, B, a); each row is a contiguous axpy of length ``a``.
    """
    R, k, B, a = pre.shape
    gemm = k * B >= GEMM_ROWS
    tmp = np.empty((k * B, a), pre.dtype)
    for i in range(start, R):
        Wt, di = WT[i], d1[i]
        if gemm:
            np.dot(U[i].reshape(k * B, a), Wt, tmp)
        for c in range(k):
            for s in range(B):
                row, u, nxt, ds = pre[i, c, s], U[i, c, s], U[i + 1, c, s], di[s]
                if gemm:
                    t = tmp[c * B + s]
                    for q in range(a):
                        row[q] += t[q]
                else:
                    for j in range(a):
                        f = u[j]
                        for q in range(a):
                            row[q] += f * Wt[j, q]
                for q in range(a):
                    nxt[q] = row[q] * ds[q]


def _backward_recurrence(Q, W, d1):
    """``Q[i-1] += (Q[i] @ W[i]) ⊙ d1[i-1]`` for ``i = R-1 .. 1``; ``Q`` (R, k, B, a)."""
    R, k, B, a = Q.shape
    gemm = k * B >= GEMM_ROWS
    tmp = np.zeros((k * B, a), Q.dtype)
    for i in range(R - 1, 0, -1):
        Wi, dp = W[i], d1[i - 1]
        if gemm:
            np.dot(Q[i].reshape(k * B, a), Wi, tmp)
        for c in range(k):
            for s in range(B):
                src, dst, ds, t = Q[i, c, s], Q[i - 1, c, s], dp[s], tmp[c * B + s]
                if not gemm:
                    t[:] = 0.0
                    for j in range(a):
                        f = src[j]
                        for q in range(a):
                            t[q] += f * Wi[j, q]
                for q in range(a):
                    dst[q] += t[q] * ds[q]


def recurrences():
    """``(forward, backward)`` compiled, or ``None`` (numba absent or the sweeps switched off)."""
    global _loaded
    from .dense_stage_jit import enabled

    if not enabled():
        return None
    if _loaded is None:
        with _lock:
            if _loaded is None:
                try:
                    import numba
                except ImportError:
                    _loaded = False
                else:
                    opts = {
                        "cache": True,
                        "nogil": True,
                        "error_model": "numpy",
                        "fastmath": {"contract", "reassoc"},
                    }
                    _loaded = tuple(
                        numba.njit(**opts)(f) for f in (_forward_recurrence, _backward_recurrence)
                    )
    return _loaded or None
