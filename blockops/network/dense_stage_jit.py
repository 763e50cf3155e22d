r"""Compiled (numba) sweeps of the dense layer's structured stage, host only.

The dense stage of :mod:`blockops.network.dense_stage` spends its time in the
sequential per-layer loops: the backward Riccati step of the factorisation
and the two sweeps of a solve. Over a run of ``Dense(16, 16)`` layers each
step is a handful of products of 16- to 64-square matrices, so array calls
cost more in Python and NumPy dispatch than in arithmetic. Here each of the
three loops is one compiled function over the whole segment: stacked arrays
in, stacked arrays out, no per-layer allocation (``B a ≤ JIT_M`` there).

The algorithm is the array path's (same notation), with the Kronecker
structure of ``W_blk`` and ``G = Yᵀ ⊗ I_a`` written as loops (and two GEMMs
through ``np.dot``) instead of the stacked ``(ns + k)``-square products:

* ``C = diag(w) + D₁ V D₁`` (``V = V2 / 2``), ``CW = C W_blk``;
* ``Q_ss − E = W_blkᵀ CW − E``, ``R = G CW + S_q``, ``T = λI + G C Gᵀ``;
* the pivot ``T`` factored by Cholesky, LU with partial pivoting when it is
  not definite, with the array path's pivot magnitudes (``diag(L)²`` /
  ``|diag U|``, judged by :func:`blockops.singular.singular_pivots`): loops
  for ``k < 32``, LAPACK's ``potrf`` / ``getrf`` from ``k = 32`` (on ``T``
  made exactly symmetric from its lower triangle);
* ``V2 = Q_ss − E − Rᵀ T⁻¹R``, symmetrised: where ``T = LLᵀ`` from the half
  gain ``H = L⁻¹R`` (BLAS ``trsm``) as ``Rᵀ T⁻¹R = HᵀH`` (BLAS ``syrk``, one
  triangle), half the flops of ``Rᵀ (T⁻¹R)``, then ``T⁻¹R = L⁻ᵀH`` (``trsm``);
  where ``T`` is LU-factored, from ``T⁻¹R`` and one GEMM.

The factor keeps ``T⁻¹R`` and the factor of ``T`` (``Lᵀ`` of its Cholesky
factor, or its LU and row swaps); the solves apply ``T⁻¹`` through it instead
of refactoring ``T``, and apply ``Ψ = D₁ (W_blk − Gᵀ T⁻¹R)`` unformed (see
the note above :func:`_backward_sweep`). Right-hand sides are handled in the
layout ``(kc, ·)`` so a single vector's products run over contiguous memory.

Measured (width 16, tanh, MSE, λ = 1e-3, float64, depth 1024, batch 1, one BLAS
thread, a shared 2-core VM, CPU time, best of 30): per layer the array path
spends about 35 µs in the factor loop (Python and NumPy dispatch around
16- to 48-square products) and 12 µs in a solve; the compiled sweeps 3.3 µs
(factor: loops 6.5, then 4.7 with GEMMs through ``np.dot``, 3.3 with Ψ left
unformed) and 0.8 + 0.5 µs (backward + forward). Whole segment, stages
built: factor 39 → 7.6 ms, solve 13 → 3.0 ms, against 7.8 ms for one HVP.
At batch 4 (``k = 64``) ``Rᵀ T⁻¹R`` through the half gain by BLAS took the
factor from 97 to 62 ms (per layer ``trsm`` + ``syrk`` 21 µs against 49 µs for
the loop solve and the GEMM), ``R``, ``G C`` as two GEMMs to 52 ms, and the
second ``trsm`` that keeps ``T⁻¹R`` for the solves adds back about 10 ms (in
alternating runs 80-98 ms against 103-115 ms before these changes).

numba is optional: :func:`kernels` imports it on first use and returns
``None`` when it is absent (the array path then runs), or when the sweeps are
switched off (:func:`compiled`, or ``BLOCKOPS_JIT=0`` in the environment).
Kernels are compiled once per machine and dtype (``cache=True``: about 27 s
for float64 and float32 together on a loaded 2-core VM, under a second to
load from the cache; float32 compiles on its first use).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading

import numpy as np

__all__ = ["available", "compiled", "kernels"]

_lock = threading.Lock()
_loaded = None  # namespace of compiled kernels, False when numba is absent
_enabled = os.environ.get("BLOCKOPS_JIT", "1").strip().lower() not in ("0", "false", "no", "off")


# -- small dense kernels (k ≤ a few dozen): loops over contiguous rows ------------------
def _chol_upper(T, U, ud):
    """``T = Uᵀ U`` from the lower triangle of ``T`` (what ``potrf(lower=1)`` reads).

    ``U`` (upper, rows contiguous) is ``Lᵀ``; ``ud = diag(L)²``. False as soon
    as a pivot is not positive (or NaN), like ``potrf``'s ``info > 0``.
    """
    k = T.shape[0]
    for i in range(k):  # U starts as the transposed lower triangle: U[i, j] = T[j, i], j >= i
        for j in range(i):
            U[i, j] = 0.0
        for j in range(i, k):
            U[i, j] = T[j, i]
    for i in range(k):  # right-looking: subtract row i's outer product from the trailing rows
        d = U[i, i]
        if not d > 0.0:
            return False
        d = math.sqrt(d)
        ud[i] = d * d
        U[i, i] = d
        inv = 1.0 / d
        for j in range(i + 1, k):
            U[i, j] *= inv
        for t in range(i + 1, k):
            f = U[i, t]
            for j in range(t, k):
                U[t, j] -= f * U[i, j]
    return True


def _lu(F, piv, ud):
    """In-place LU with partial pivoting (``getrf``); ``ud = |diag U|``.

    False when a pivot is exactly zero (``getrf``'s ``info > 0``).
    """
    k = F.shape[0]
    ok = True
    for i in range(k):
        p, big = i, abs(F[i, i])
        for t in range(i + 1, k):
            v = abs(F[t, i])
            if v > big:
                p, big = t, v
        piv[i] = p
        if p != i:
            for j in range(k):
                F[i, j], F[p, j] = F[p, j], F[i, j]
        d = F[i, i]
        ud[i] = abs(d)
        if d == 0.0:
            ok = False
            continue
        for t in range(i + 1, k):
            f = F[t, i] / d
            F[t, i] = f
            for j in range(i + 1, k):
                F[t, j] -= f * F[i, j]
    return ok


def _solve_rows(F, piv, lu, X):
    """``X ← T⁻¹ X`` in place for ``X`` (k, n), rows contiguous (many right-hand sides)."""
    k, n = X.shape
    if lu:
        for i in range(k):
            p = piv[i]
            if p != i:
                for c in range(n):
                    X[i, c], X[p, c] = X[p, c], X[i, c]
        for i in range(k):  # unit lower
            for t in range(i + 1, k):
                f = F[t, i]
                for c in range(n):
                    X[t, c] -= f * X[i, c]
    else:
        for i in range(k):  # Uᵀ y = x
            inv = 1.0 / F[i, i]
            for c in range(n):
                X[i, c] *= inv
            for t in range(i + 1, k):
                f = F[i, t]
                for c in range(n):
                    X[t, c] -= f * X[i, c]
    for i in range(k - 1, -1, -1):  # U x = y
        for t in range(i + 1, k):
            f = F[i, t]
            for c in range(n):
                X[i, c] -= f * X[t, c]
        inv = 1.0 / F[i, i]
        for c in range(n):
            X[i, c] *= inv


def _solve_vec(F, piv, lu, x):
    """``x ← T⁻¹ x`` in place for one vector ``x`` (k,)."""
    k = x.shape[0]
    if lu:
        for i in range(k):
            p = piv[i]
            if p != i:
                x[i], x[p] = x[p], x[i]
        for i in range(k):
            f = x[i]
            for t in range(i + 1, k):
                x[t] -= F[t, i] * f
    else:
        for i in range(k):
            x[i] /= F[i, i]
            f = x[i]
            for t in range(i + 1, k):
                x[t] -= F[i, t] * f
    # U x = y column by column (axpy on a strided column): 2.4 µs at k = 64 against 10.7 µs
    # for row dot products, whose serial sum numba does not vectorise (one thread)
    for i in range(k - 1, -1, -1):
        xi = x[i] / F[i, i]
        x[i] = xi
        for t in range(i):
            x[t] -= F[t, i] * xi


def _factor_pivot(T, F, ud, piv, lapack, potrf, getrf, ints, ch, ipiv):
    """Factor the symmetric pivot ``T``: Cholesky, LU with partial pivoting if not definite.

    Returns ``(lu, ok)``: whether LU ran, and False for an exactly zero LU pivot.
    Layouts (read by :func:`_solve_rows` / :func:`_solve_vec`): Cholesky leaves
    ``U = Lᵀ`` in the upper triangle of ``F``; LU leaves ``L`` (unit, below the
    diagonal) and ``U`` in ``F`` and the row swaps (0-based) in ``piv``. With
    ``lapack`` the factorisations are LAPACK's ``potrf`` / ``getrf`` (function
    pointers, faster from ``k = 32``): ``T`` is exactly symmetric, so its
    row-major memory is also the column-major ``T``.
    """
    k = T.shape[0]
    if not lapack:
        if _chol_upper(T, F, ud):
            return False, True
        F[:, :] = T
        return True, _lu(F, piv, ud)
    F[:, :] = T
    ints[0], ints[1] = k, k
    potrf(ch.ctypes, ints[0:].ctypes, F.ctypes, ints[1:].ctypes, ints[2:].ctypes)
    if ints[2] == 0:  # column-major lower factor = the row-major upper U
        for i in range(k):
            ud[i] = F[i, i] * F[i, i]
        return False, True
    F[:, :] = T
    getrf(ints[0:].ctypes, ints[0:].ctypes, F.ctypes, ints[1:].ctypes, ipiv.ctypes, ints[2:].ctypes)
    for i in range(k):  # column-major factors to the row layout
        for t in range(i):
            F[i, t], F[t, i] = F[t, i], F[i, t]
        piv[i] = ipiv[i] - 1
        ud[i] = abs(F[i, i])
    return True, ints[2] == 0


# -- the factorisation: the backward Riccati sweep over a segment ----------------------
def _cholesky_gain(F, H, S, trsm, syrk, ints, ch, one, zero):
    """``S = HᵀH`` (upper triangle) for the half gain ``H = L⁻¹R``, then ``H ← L⁻ᵀH = T⁻¹R``.

    By BLAS: ``trsm``, ``syrk``, ``trsm``. ``F`` holds ``U = Lᵀ`` row-major,
    which is the column-major lower ``L``; the row-major ``H`` (k, ns) is the
    column-major ``Hᵀ``, so ``L⁻¹H`` is the right-side solve ``Hᵀ L⁻ᵀ``,
    ``HᵀH`` the column-major lower ``Hᵀ (Hᵀ)ᵀ`` and ``L⁻ᵀH`` the solve ``Hᵀ L⁻¹``.
    ``Rᵀ T⁻¹R = HᵀH`` costs half of ``Rᵀ (T⁻¹R)``; the solves read ``T⁻¹R``
    alone (a stored half gain would have them read ``L`` too, and solve with it:
    repeated solves at depth 4096 took 22 ms against 14 ms).
    """
    # ch: "RLTN"; ints: (ns, k)
    side, lo, tr, no = ch[0:].ctypes, ch[1:].ctypes, ch[2:].ctypes, ch[3:].ctypes
    ns, k = ints[0:].ctypes, ints[1:].ctypes
    trsm(side, lo, tr, no, ns, k, one.ctypes, F.ctypes, k, H.ctypes, ns)
    syrk(lo, no, ns, k, one.ctypes, H.ctypes, ns, zero.ctypes, S.ctypes, ns)
    trsm(side, lo, no, no, ns, k, one.ctypes, F.ctypes, k, H.ctypes, ns)


def _scaled_core(Vin, dj, wj, half, C):
    """``C = D1 V D1 + diag(w)`` with ``V = half · Vin``."""
    m = C.shape[0]
    for p in range(m):
        f = half * dj[p]
        for q in range(m):
            C[p, q] = (f * dj[q]) * Vin[p, q]
        C[p, p] += wj[p]


def _stage_blocks(C, Wj, Yj, QTj, bj, lam, lapack, CW, Zs, R, GC, T):
    """One layer's ``Q_ss`` (into ``Zs``), ``R = G C W_blk + S_q`` and ``T = λI + G C Gᵀ``.

    ``W_blk = blockdiag_s W`` and ``G = Yᵀ ⊗ I_a`` act through reshapes: ``C W_blk``
    is one GEMM over the ``(s, i)`` columns of ``C`` as rows. With ``lapack``
    (``k ≥ LAPACK_K``) ``G CW`` and ``G C`` are GEMMs ``Yᵀ`` (ρ × B) by B × (a ·)
    (10 -> 2 µs a layer against loops, batch 4; at batch 1 the loops are cheaper
    than two BLAS calls) and ``T`` is made exactly symmetric from its lower
    triangle (what ``potrf`` reads). ``S_q[(r, i), (s, kk)] = Q[kk, r] β[s, i]``.
    """
    B, rho = Yj.shape
    a, a_in = Wj.shape
    m, ns, k = C.shape[0], Zs.shape[0], T.shape[0]
    np.dot(C.reshape(m * B, a), Wj, CW.reshape(m * B, a_in))
    CWb, Zsb = CW.reshape(B, a, ns), Zs.reshape(B, a_in, ns)
    for s in range(B):
        np.dot(Wj.T, CWb[s], Zsb[s])
    if lapack:
        np.dot(Yj.T, CW.reshape(B, a * ns), R.reshape(rho, a * ns))
        np.dot(Yj.T, C.reshape(B, a * m), GC.reshape(rho, a * m))
    else:  # R[(r, i), :] = sum_s Y[s, r] CW[(s, i), :], the same for GC from C
        R[:, :] = 0.0
        GC[:, :] = 0.0
        for r in range(rho):
            for s in range(B):
                y = Yj[s, r]
                for i in range(a):
                    for q in range(ns):
                        R[r * a + i, q] += y * CW[s * a + i, q]
                    for q in range(m):
                        GC[r * a + i, q] += y * C[s * a + i, q]
    for r in range(rho):
        for i in range(a):
            row = r * a + i
            for s in range(B):
                b = bj[s * a + i]
                for kk in range(a_in):
                    R[row, s * a_in + kk] += QTj[r, kk] * b
    # T[:, (r2, i2)] = sum_s GC[:, (s, i2)] Y[s, r2]
    T[:, :] = 0.0
    for row in range(k):
        for r2 in range(rho):
            for s in range(B):
                y = Yj[s, r2]
                for i2 in range(a):
                    T[row, r2 * a + i2] += GC[row, s * a + i2] * y
        T[row, row] += lam
    if lapack:
        for row in range(k):
            for q in range(row + 1, k):
                T[row, q] = T[q, row]


def _subtract_E(Zs, QTj, bj, lam, P, bb):
    """``Q_ss −= E = λ⁻¹ (ββᵀ) ⊗ (I − Q_z Q_zᵀ)`` (the basis is incomplete, ``B < r``)."""
    rho, a_in, B = QTj.shape[0], P.shape[0], bb.shape[0]
    a = bj.shape[0] // B
    for kk in range(a_in):
        for k2 in range(a_in):
            P[kk, k2] = 1.0 if kk == k2 else 0.0
    for r in range(rho):
        for kk in range(a_in):
            f = QTj[r, kk]
            for k2 in range(a_in):
                P[kk, k2] -= f * QTj[r, k2]
    for s in range(B):
        for s2 in range(B):
            acc = 0.0
            for i in range(a):
                acc += bj[s * a + i] * bj[s2 * a + i]
            bb[s, s2] = acc / lam
    for s in range(B):
        for kk in range(a_in):
            for s2 in range(B):
                f = bb[s, s2]
                for k2 in range(a_in):
                    Zs[s * a_in + kk, s2 * a_in + k2] -= f * P[kk, k2]


def _value_update(Zs, R, Fj, pivj, lu, lapack, Hj, S, Vout, gain_args):
    """``Vout = 2 (Q_ss − E − Rᵀ T⁻¹R)`` symmetrised, and the layer's gain ``T⁻¹R`` into ``Hj``.

    With ``lapack`` (``k ≥ LAPACK_K``) and ``T = LLᵀ``: ``Rᵀ T⁻¹R = HᵀH`` with the half
    gain ``H = L⁻¹R`` (:func:`_cholesky_gain`, whose BLAS arguments ``gain_args``
    carries). Otherwise ``T⁻¹R`` by loops and one GEMM: below ``k = 32`` three BLAS
    calls cost more than they save (batch 1, depth 1024: factor 5.5 against 8 ms).
    """
    ns = Zs.shape[0]
    Hj[:, :] = R
    if lu or not lapack:
        _solve_rows(Fj, pivj, lu, Hj)
        np.dot(R.T, Hj, S)
        for p in range(ns):
            for q in range(p + 1):
                v = (Zs[p, q] - S[p, q]) + (Zs[q, p] - S[q, p])
                Vout[p, q] = v
                Vout[q, p] = v
        return
    trsm, syrk, dims, chars, one, zero = gain_args
    _cholesky_gain(Fj, Hj, S, trsm, syrk, dims, chars, one, zero)
    for p in range(ns):
        for q in range(p, ns):
            v = (Zs[p, q] + Zs[q, p]) - 2.0 * S[p, q]
            Vout[p, q] = v
            Vout[q, p] = v


def _factor_sweep(
    W, d1, w, beta, QT, Y, V2, lam, half, full, TinvR, F, piv, islu, ud, lapack, blas
):
    """Backward sweep; fills ``TinvR``, ``F``/``piv``/``islu`` and ``ud``.

    ``W`` (L, a, a_in); ``d1``, ``w``, ``beta`` (L, B a); ``QT`` (L, ρ, r);
    ``Y`` (L, B, ρ); ``V2`` (B a, B a) is ``2V`` entering the last layer (zero
    when there is none). ``lapack``: factor the pivots by ``potrf`` / ``getrf``;
    ``blas``: ``(potrf, getrf, trsm, syrk)`` function pointers of the dtype.
    Returns ``(V2 at the input, index of an exactly singular pivot or -1)``.
    """
    potrf, getrf, trsm, syrk = blas
    L, a, a_in = W.shape
    B, rho = Y.shape[1], Y.shape[2]
    m, ns, k = B * a, B * a_in, rho * a
    dt = W.dtype
    C, CW, GC = np.empty((m, m), dt), np.empty((m, ns), dt), np.empty((k, m), dt)
    Zs, S, R, T = (
        np.empty((ns, ns), dt),
        np.empty((ns, ns), dt),
        np.empty((k, ns), dt),
        np.empty((k, k), dt),
    )
    P, bb = np.empty((a_in, a_in), dt), np.empty((B, B), dt)
    Vin, Vout = V2.copy(), np.empty((ns, ns), dt)
    # LAPACK / BLAS arguments by reference: potrf's (n, n, info) and 'L'; trsm's and
    # syrk's (ns, k) and "RLTN"
    ints, ipiv, ch = np.empty(3, np.int32), np.empty(k, np.int32), np.empty(1, np.uint8)
    ch[0] = 76
    dims, chars = np.empty(2, np.int32), np.empty(4, np.uint8)
    dims[0], dims[1] = ns, k
    chars[0], chars[1], chars[2], chars[3] = 82, 76, 84, 78
    gain_args = (trsm, syrk, dims, chars, np.ones(1, dt), np.zeros(1, dt))
    for j in range(L - 1, -1, -1):
        _scaled_core(Vin, d1[j], w[j], half, C)
        _stage_blocks(C, W[j], Y[j], QT[j], beta[j], lam, lapack, CW, Zs, R, GC, T)
        if not full:
            _subtract_E(Zs, QT[j], beta[j], lam, P, bb)
        # pivot: Cholesky, LU with partial pivoting when T is not definite
        lu, ok = _factor_pivot(T, F[j], ud[j], piv[j], lapack, potrf, getrf, ints, ch, ipiv)
        if not ok:
            return Vout, j
        islu[j] = lu
        _value_update(Zs, R, F[j], piv[j], lu, lapack, TinvR[j], S, Vout, gain_args)
        Vin, Vout = Vout, Vin
    return Vin, -1


def _lu_rebuild(F, piv, out):
    """``out[i] = P_iᵀ L_i U_i``: the pivots ``T`` of LU-factored layers, from their factors."""
    n, k = F.shape[0], F.shape[1]
    for j in range(n):
        Fj, T = F[j], out[j]
        for i in range(k):
            for c in range(k):
                T[i, c] = 0.0
            for t in range(i):  # row i of L U: sum_t L[i, t] U[t, :] + U[i, :]
                f = Fj[i, t]
                for c in range(t, k):
                    T[i, c] += f * Fj[t, c]
            for c in range(i, k):
                T[i, c] += Fj[i, c]
        for i in range(k - 1, -1, -1):  # undo the row swaps, last first
            p = piv[j, i]
            if p != i:
                for c in range(k):
                    T[i, c], T[p, c] = T[p, c], T[i, c]


# -- the solves: backward (linear terms) and forward (states, controls) sweeps ------------
# The closed-loop transition Psi = D1 (W_blk - G^T T^-1 R) is applied unformed:
#   Psi^T v + (T^-1 R)^T gam = W_blk^T (D1 v) - (T^-1 R)^T x,  x = G D1 v - gam = T tau,
#   Psi s + om = D1 (W_blk s + G^T eta),                      eta = -(T^-1 R) s - tau,
# both of which the sweeps need anyway: as many flops as with Psi, and nothing to store.
# The projections on the complement of the basis (B < r) use gam = U_q^T g, too:
#   S_perp^T g:  sig[(s, :)] = sum_i beta[s, i] (X[i, :] - sum_r gam[(r, i)] Q[:, r]),
#   u_perp row i: (I - Q Q^T) D_i with D_i Q = sum_s beta[s, i] (s_s Q_z) - gam[(., i)].
# Both sweeps stay one loop nest each: with their per-layer steps split into inlined
# functions (as the factor's are) the forward sweep took 0.69-0.80 ms instead of 0.50 ms
# at depth 1024, batch 1 (best of 200).
def _backward_sweep(g, v, W, TinvR, F, piv, islu, QT, Y, d1, beta, lam, full, tau, gam):
    """``v`` (kc, B a) entering the last layer → ``v`` at the input.

    ``g`` (kc, L, p_l): the segment's right-hand sides, per layer ``[W.ravel(), c]``.
    Fills ``tau`` (L, kc, k) and ``gam = U_qᵀ g`` (L, kc, k) for the forward sweep.
    """
    L, a, a_in = W.shape
    kc = g.shape[0]
    rho, B, k, ns = QT.shape[1], Y.shape[1], TinvR.shape[1], TinvR.shape[2]
    m = B * a
    dt = TinvR.dtype
    x = np.empty(k, dt)
    sig = np.empty(a_in, dt)
    dv = np.empty(m, dt)
    cur = np.empty((kc, m), dt)
    cur[:, :] = v
    out = np.empty((kc, ns), dt)
    for j in range(L - 1, -1, -1):
        Wj, QTj, Yj, dj, bj, TRj = W[j], QT[j], Y[j], d1[j], beta[j], TinvR[j]
        for c in range(kc):
            gj, vc, oc, tj, gm = g[c, j], cur[c], out[c], tau[j, c], gam[j, c]
            # gam = U_q^T g: gam[(r, i)] = sum_kk X[i, kk] Q[kk, r], X = [W, c]
            for r in range(rho):
                qr = QTj[r]
                for i in range(a):
                    acc = 0.0
                    for kk in range(a_in):
                        acc += gj[i * a_in + kk] * qr[kk]
                    gm[r * a + i] = acc + gj[a * a_in + i] * qr[a_in]
            # x = G D1 v - gam; tau = T^-1 x
            for p in range(m):
                dv[p] = dj[p] * vc[p]
            x[:] = 0.0
            for r in range(rho):
                for s in range(B):
                    y = Yj[s, r]
                    for i in range(a):
                        x[r * a + i] += y * dv[s * a + i]
            for t in range(k):
                x[t] -= gm[t]
                tj[t] = x[t]
            _solve_vec(F[j], piv[j], islu[j], tj)
            # v <- W_blk^T D1 v - (T^-1 R)^T x (+ lam^-1 S_perp^T g)
            for q in range(ns):
                oc[q] = 0.0
            for s in range(B):
                for i in range(a):
                    f = dv[s * a + i]
                    for kk in range(a_in):
                        oc[s * a_in + kk] += f * Wj[i, kk]
            for t in range(k):
                f = x[t]
                for q in range(ns):
                    oc[q] -= f * TRj[t, q]
            if not full:
                for s in range(B):
                    sig[:] = 0.0
                    for i in range(a):
                        f = bj[s * a + i]
                        for kk in range(a_in):
                            sig[kk] += f * gj[i * a_in + kk]
                    for r in range(rho):
                        f = 0.0
                        for i in range(a):
                            f += bj[s * a + i] * gm[r * a + i]
                        for kk in range(a_in):
                            sig[kk] -= f * QTj[r, kk]
                    for kk in range(a_in):
                        oc[s * a_in + kk] += sig[kk] / lam
        if j > 0:
            cur[:, :] = out
    return out


def _forward_sweep(g, s, W, TinvR, QT, Y, d1, beta, lam, full, tau, gam, u):
    """``s`` (kc, B a_in) into the first layer → ``s`` out of the last; fills ``u`` (kc, L, p_l)."""
    L, a, a_in = W.shape
    kc = g.shape[0]
    rho, r_dim, B, k, ns = QT.shape[1], QT.shape[2], Y.shape[1], TinvR.shape[1], TinvR.shape[2]
    m = B * a
    dt = TinvR.dtype
    eta = np.empty(k, dt)
    U = np.empty(r_dim, dt)
    coef = np.empty(rho, dt)
    sQ = np.empty((B, rho), dt)
    cur = np.empty((kc, ns), dt)
    cur[:, :] = s
    nxt = np.empty((kc, m), dt)
    for j in range(L):
        Wj, QTj, Yj, dj, bj, TRj = W[j], QT[j], Y[j], d1[j], beta[j], TinvR[j]
        for c in range(kc):
            sc, tj, gj, uj, nc, gm = cur[c], tau[j, c], g[c, j], u[c, j], nxt[c], gam[j, c]
            # eta = -(T^-1 R) s - tau
            for t in range(k):
                acc = 0.0
                for q in range(ns):
                    acc += TRj[t, q] * sc[q]
                eta[t] = -acc - tj[t]
            # s <- D1 (W_blk s + G^T eta)
            for s_ in range(B):
                for i in range(a):
                    acc = 0.0
                    for kk in range(a_in):
                        acc += Wj[i, kk] * sc[s_ * a_in + kk]
                    for r in range(rho):
                        acc += Yj[s_, r] * eta[r * a + i]
                    nc[s_ * a + i] = dj[s_ * a + i] * acc
            # u = U_q eta (- lam^-1 (I - U_q U_q^T)(Sel s - g)), row by row of X = [W, c]
            if not full:
                for s_ in range(B):
                    for r in range(rho):
                        acc = 0.0
                        for kk in range(a_in):
                            acc += sc[s_ * a_in + kk] * QTj[r, kk]
                        sQ[s_, r] = acc
            for i in range(a):
                if full:
                    for r in range(rho):
                        coef[r] = eta[r * a + i]
                    for kk in range(r_dim):
                        U[kk] = 0.0
                else:  # D_i = Sel s - X (row i), D_i Q = sum_s beta (s Q_z) - gam
                    for r in range(rho):
                        acc = 0.0
                        for s_ in range(B):
                            acc += bj[s_ * a + i] * sQ[s_, r]
                        coef[r] = eta[r * a + i] + (acc - gm[r * a + i]) / lam
                    for kk in range(a_in):
                        U[kk] = gj[i * a_in + kk]
                    U[a_in] = gj[a * a_in + i]
                    for s_ in range(B):
                        f = bj[s_ * a + i]
                        for kk in range(a_in):
                            U[kk] -= f * sc[s_ * a_in + kk]
                    for kk in range(r_dim):
                        U[kk] /= lam
                for r in range(rho):
                    f = coef[r]
                    for kk in range(r_dim):
                        U[kk] += f * QTj[r, kk]
                for kk in range(a_in):
                    uj[i * a_in + kk] = U[kk]
                uj[a * a_in + i] = U[a_in]
        if j < L - 1:
            cur[:, :] = nxt
    return nxt


def _pi_sweep(Psi, PsiT, M, Pis):
    """``Pis[j+1] = Ψ_j Pis[j] Ψ_jᵀ + M_j`` (selected inversion, :mod:`.dense_selected`)."""
    for j in range(Psi.shape[0] - 1):
        Pis[j + 1] = np.dot(np.dot(Psi[j], Pis[j]), PsiT[j]) + M[j]


# -- loading ----------------------------------------------------------------------------
_HELPERS = (
    "_chol_upper",
    "_lu",
    "_factor_pivot",
    "_solve_rows",
    "_solve_vec",
    "_cholesky_gain",
    # the per-layer steps of the sweeps, split out to be read; inlined into them
    "_scaled_core",
    "_stage_blocks",
    "_subtract_E",
    "_value_update",
)
# Inlined by numba (a call passing a dozen arrays costs their reference counting: the
# batch-1 factor took 7.5 ms at depth 1024 with these as calls, 4.8 ms written inline).
_INLINED = (
    "_scaled_core",
    "_stage_blocks",
    "_subtract_E",
    "_value_update",
)
LAPACK_K = 32  # pivots of this order and up are factored by LAPACK (measured, see _Kernels)
_SWEEPS = ("_factor_sweep", "_backward_sweep", "_forward_sweep", "_lu_rebuild", "_pi_sweep")


class _Kernels:
    """The compiled sweeps (``factor``, ``backward``, ``forward``; ``lu_rebuild``, ``pi_sweep``).

    ``lapack[dtype]``: ``(potrf, getrf, trsm, syrk)`` of SciPy's LAPACK and BLAS
    as ctypes function pointers, passed to the factor as arguments (a pointer
    baked into the code would stop numba caching it). Per pivot, Cholesky / LU,
    loops against LAPACK (µs, one thread): k = 16: 0.61 / 1.03 against 0.50 / 1.26; k = 32:
    3.5 / 5.9 against 1.8 / 4.4; k = 64: 22 / 40 against 7.4 / 18.
    """

    def __init__(self, numba):
        import ctypes

        from numba.extending import get_cython_function_address

        opts = {
            "cache": True,
            "nogil": True,
            "error_model": "numpy",
            "fastmath": {"contract", "reassoc"},  # FMA and vectorised sums; keeps NaN checks
        }
        g = globals()
        for name in _HELPERS + _SWEEPS:  # callees first: callers resolve them when compiled
            inline = "always" if name in _INLINED else "never"
            g[name] = numba.njit(inline=inline, **opts)(g[name])
        self.factor, self.backward, self.forward, self.lu_rebuild, self.pi_sweep = (
            g[n] for n in _SWEEPS
        )
        self.LAPACK_K = LAPACK_K

        def fn(lib, name, nargs):
            address = get_cython_function_address(f"scipy.linalg.cython_{lib}", name)
            return ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * nargs))(address)

        self.lapack = {
            np.dtype(dt): (
                fn("lapack", c + "potrf", 5),
                fn("lapack", c + "getrf", 6),
                fn("blas", c + "trsm", 11),
                fn("blas", c + "syrk", 10),
            )
            for dt, c in ((np.float64, "d"), (np.float32, "s"))
        }


def kernels():
    """The compiled sweeps, or ``None`` (numba absent, or switched off)."""
    global _loaded
    if not _enabled:
        return None
    if _loaded is None:
        with _lock:
            if _loaded is None:
                try:
                    import numba

                    _loaded = _Kernels(numba)
                except (ImportError, ValueError):  # numba absent, or no SciPy cython_lapack
                    _loaded = False
    return _loaded or None


def available() -> bool:
    """Whether the compiled sweeps can run (numba importable)."""
    if _loaded is None:
        try:
            import numba  # noqa: F401
        except ImportError:
            return False
        return True
    return bool(_loaded)


def enabled() -> bool:
    """Whether dense stages built now will use the compiled sweeps (on the host)."""
    return _enabled and available()


@contextlib.contextmanager
def compiled(enabled: bool = True):
    """Context manager: use (or, with ``False``, bypass) the compiled sweeps.

    For comparisons and tests; the setting is process-wide, read when a
    dense stage is built.
    """
    global _enabled
    old, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = old
