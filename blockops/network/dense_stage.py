r"""The structured stage of dense layers for the stagewise sweep.

For a dense layer (docs: numerics, "Where the speed comes from") with ``B``
samples, ``a_in`` inputs, ``a`` outputs, ``r = a_in + 1`` and
``p = a r`` parameters, write the parameters as the matrix
``X̃ = [W, c]`` (``a × r``) and ``z̃_s = [z_s; 1]``. Then, with
``β = b ⊙ σ'`` and ``w = b ⊙ σ''`` (``B × a``, sample-major ``m = B a``):

* ``∇_z f = D₁ W_blk`` (``D₁ = diag(σ')``, ``W_blk = blockdiag_s W``) and
  ``∇_x f = D₁ Uᵀ`` with ``U = [e_i ⊗ z̃_s]`` (``p × m``);
* ``K_xx = U diag(w) Uᵀ``, ``K_zz = W_blkᵀ diag(w) W_blk``,
  ``K_xz = U diag(w) W_blk + Sel`` with the selector
  ``Sel[(i,k),(s,k')] = β_{s,i} δ_{kk'}`` (``k < a_in``).

So for the value matrix ``V`` of ``dz_l`` and ``C = diag(w) + D₁ V D₁``:
``Q_uu = λI + U C Uᵀ``, ``Q_us = U C W_blk + Sel``, ``Q_ss = W_blkᵀ C W_blk``.
A thin QR ``Z̃ᵀ = Q Yᵀ`` (never the Gram ``Z̃ Z̃ᵀ``, which is singular in
deep nets) gives ``U = U_q G`` with ``U_q = I_a ⊗ Q`` orthonormal and
``G = Yᵀ ⊗ I_a`` (reduced coordinates ordered ``(r, i)``), hence

.. math::

    Q_{uu}^{-1} = λ^{-1}(I - U_q U_q^T) + U_q T^{-1} U_q^T,\qquad
    T = λI + G C G^T,

    V_{l-1} = Q_{ss} - E - R^T T^{-1} R,\qquad R = G C W_{blk} + U_q^T Sel,

    E = λ^{-1} Sel^T (I - U_q U_q^T) Sel = λ^{-1} (β β^T) ⊗ (I - Q_z Q_z^T).

No ``p × p`` or ``p × m`` matrix is formed. When ``B ≥ r`` the basis is
complete, ``E = 0`` and ``λ = 0`` is allowed; otherwise ``λ > 0`` is needed
(``Q_uu`` has rank ``≤ B a < p``). Everything that does not depend on ``V``
is computed for all layers of a segment at once; the sequential loop is a
handful of small products per layer. The inertia of ``Q_uu`` is that of ``T``
plus ``p - ρa`` eigenvalues ``λ``.

Backends: everything is written with the array module of the layer data
(batched ``xp.linalg.qr``, matmul, ``xp.linalg.solve``). On NumPy the pivots
``T`` are factored by LAPACK: the small form by ``posv`` (``gesv`` when ``T``
is not definite); the large form by ``potrf``, or Bunch-Kaufman ``sytrf``
when ``T`` is not definite, its half gain by one ``trsm`` and
``V ← Q_ss − Rᵀ T⁻¹ R`` by ``syrk`` on the lower triangle, then mirrored
(:mod:`blockops.backend.kernels`: half the flops of the full product, and of
LU's ``getrs`` and ``Rᵀ (T⁻¹ R)`` for indefinite ``T``). Otherwise (CuPy, or NumPy
inside :func:`blockops.backend.generic_linalg`) they are solved by
``xp.linalg.solve`` with a batched ``xp.linalg.eigvalsh`` of the ``T`` stack
(pivot ratio, ``log|det|`` and inertia). The pivot check is one
device-to-host transfer per segment during the factorisation; solves stay on
the device.

Compiled sweeps: on host NumPy with numba installed, segments with
``B a ≤ JIT_M`` run the three sequential loops (the backward sweep of the
factorisation, the two sweeps of a solve) as compiled functions over the whole
segment (:mod:`.dense_stage_jit`): per layer the step is a few products of
16- to 64-square matrices, which NumPy calls cost more to dispatch than to
compute. Same algorithm and pivots as the small form (Cholesky, LU with
partial pivoting when ``T`` is not definite, the same pivot magnitudes and
singular check; the large form's Bunch-Kaufman pivots are judged alike); they
keep ``W``, ``T⁻¹R`` and the factor of ``T`` instead of ``T``, ``Ψ`` and
``Ψᵀ``, and rebuild the ``T`` of LU-factored layers from their factors when the
inertia is asked for. Without numba (or with ``BLOCKOPS_JIT=0``) the array code
runs; :func:`.dense_stage_jit.compiled` switches between the two.
"""

from __future__ import annotations

import numpy as np

from ..backend import (
    count_negative,
    get_array_module,
    host_lapack,
    pivot_factorizer,
    pivot_magnitudes,
    pivot_solver,
)
from ..singular import SingularBlockError, damping_hint, singular_pivots
from ..singular import upper_first as _upper_first

__all__ = ["DenseSegment", "dense_segments"]

SMALL_M = 32  # B*a up to which the stacked (ns + k)-square form is used
# B*a up to which the compiled sweeps run (host NumPy with numba). Width 16, one BLAS
# thread, CPU ms of factor (stages built) / one solve, compiled against array path, depth
# 1024: B = 1: 7.6 / 3.0 against 39 / 13; B = 2: 19 / 6.0 against 117 / 18; B = 4: 104 / 17
# against 132 / 64. With the BLAS value update (k >= 32), factor / refined solve / repeated
# solve: depth 256, B = 8: 129-139 / 23 / 10-13 against 139-192 / 52-77 / 33-38; depth 128,
# B = 16: 562 / 53-60 / 27 against 420-472 / 85-102 / 44-54 (so not compiled).
JIT_M = 128


def _compiled_kernels(xp, dtype):
    """The compiled sweeps (:mod:`.dense_stage_jit`) for host float arrays, else ``None``."""
    if not host_lapack(xp) or dtype not in (np.float32, np.float64):
        return None
    from .dense_stage_jit import kernels

    return kernels()


def _stack(xp, arrays):
    """``xp.stack`` of equal-shape arrays as one concatenation (half the time at depth 1024)."""
    return xp.concatenate(arrays, axis=0).reshape((len(arrays), *arrays[0].shape))


def _stack_mm(X, Q):
    """``X @ Q`` for X (L, kc, a, r) and Q (L, r, q), shared over kc and a.

    One GEMM-like contraction instead of ``L * kc`` tiny BLAS calls: the
    ``(kc, a)`` axes are merged so each layer is a single product.
    """
    L, kc, a, r = X.shape
    Xm = X.reshape(L, kc * a, r)
    return (Xm @ Q).reshape(L, kc, a, Q.shape[2])


def _mirror_lower(xp, V, block=64):
    """Copy the lower triangle of the square ``V`` onto its upper one, in place.

    By ``block``-square tiles: a transposed read of whole rows walks memory
    with a stride of one row per element (an ``512``-square ``V + Vᵀ`` costs
    twice as long as the tiled copy).
    """
    n = V.shape[0]
    for i in range(0, n, block):
        rows = V[i : i + block]
        d = rows[:, i : i + block]
        d[...] = xp.tril(d) + xp.tril(d, -1).T
        for j in range(i + block, n, block):
            rows[:, j : j + block] = V[j : j + block, i : i + block].T


def _kron_eye(Y, a):
    """``kron(Y, I_a)`` for a stack ``Y`` (L, B, ρ) -> (L, B a, ρ a)."""
    L, B, rho = Y.shape
    eye = get_array_module(Y).eye(a, dtype=Y.dtype)
    return (Y[:, :, None, :, None] * eye[None, None, :, None, :]).reshape(L, B * a, rho * a)


class DenseSegment:
    """Consecutive dense layers of one shape, as one structured stage.

    Parameters
    ----------
    layers, caches, bs : lists
        The layers, their caches and their ``b_l`` (in layer order).
    damping : float
        ``λ``.
    first_index : int
        1-based index of the first layer (messages).
    """

    def __init__(self, layers, caches, bs, damping, first_index):
        self.layers, self.first_index = layers, first_index
        self.damping = lam = float(damping)
        ex = [c.extra for c in caches]
        self.xp = xp = get_array_module(ex[0]["W"], caches[0].z_prev)
        self._eigT = None  # eigenvalues of the T stack (generic path)
        self._Ts_lu = []  # pivots factored by LU (all of them on the generic path)
        self._negatives = 0  # negative eigenvalues of the host L D L^T-factored pivots
        W = _stack(xp, [e["W"] for e in ex])  # (L, a, a_in)
        z = _stack(xp, [c.z_prev for c in caches])  # (L, B, a_in)
        d1 = _stack(xp, [e["d1"] for e in ex])  # (L, B, a)
        b = _stack(xp, bs)
        L, a, a_in = W.shape
        B = z.shape[1]
        r = a_in + 1
        self.nlayers, self.a, self.a_in, self.B, self.r = L, a, a_in, B, r
        self.p = L * a * r
        self.pl = a * r
        self.n_in, self.n_out = B * a_in, B * a
        self.dtype = dt = W.dtype
        beta = b * d1
        w = b * _stack(xp, [e["d2"] for e in ex])
        zt = xp.concatenate([z, xp.ones((L, B, 1), dt)], axis=2)
        Q, R = xp.linalg.qr(zt.transpose(0, 2, 1))  # Q (L, r, ρ), R (L, ρ, B)
        rho = Q.shape[2]
        self.rho, self.k = rho, rho * a
        self.full = rho == r
        if not self.full and lam == 0:
            raise SingularBlockError(
                f"stagewise (low-rank) sweep: {layers[0].name} has {a * r} parameters but only "
                f"B*a = {B * a} curvature directions, so its stage pivot Q_uu is singular "
                "without damping; pass damping > 0 or use method='kkt'.",
                layer=first_index,
            )
        Y = R.transpose(0, 2, 1)  # (L, B, ρ)
        self.Q, self.Y, self.W, self.d1, self.beta, self.w = Q, Y, W, d1, beta, w
        self.QT = xp.ascontiguousarray(Q.transpose(0, 2, 1))
        self.YT = xp.ascontiguousarray(Y.transpose(0, 2, 1))
        # Small batches: one (ns + k)-square product per layer on stacked, precomputed
        # N = D1 [W_blk, G^T]; large batches: Kronecker-structured products per layer
        # (keeps memory at the stored gains T^-1 R).
        self.small = B * a <= SMALL_M
        # Host NumPy, B a <= JIT_M: the sequential loops run compiled (numba, when installed;
        # module dense_stage_jit); the array code is the reference and the CuPy / generic path.
        self._jit = _compiled_kernels(xp, dt) if B * a <= JIT_M else None
        if self.small and self._jit is None:
            self._precompute_small()

    def __getstate__(self):
        """Pickle the factor without its array module and compiled kernels (neither pickles).

        ``_jit`` becomes a flag: :meth:`__setstate__` fetches the kernels again (numba
        loads them from its cache) and takes the array module from the stored arrays.
        """
        state = {k: v for k, v in self.__dict__.items() if k not in ("xp", "_jit")}
        state["_jit"] = self._jit is not None
        return state

    def __setstate__(self, state):
        """Restore a pickled segment as it was factored (no sweep runs again)."""
        self.__dict__.update(state)
        self.xp = get_array_module(self.W)
        self._jit = _compiled_kernels(self.xp, self.dtype) if state["_jit"] else None
        if state["_jit"] and self._jit is None:  # its arrays are in the compiled sweeps' layout
            raise RuntimeError(
                f"DenseSegment ({self.layers[0].name}, ...): this factor was computed by the "
                "compiled sweeps; unpickle it where numba is installed and the sweeps are on "
                "(not inside compiled(False), nor with BLOCKOPS_JIT=0), or factor again there"
            )

    def _precompute_small(self):
        L, a, B, k, lam = self.nlayers, self.a, self.B, self.k, self.damping
        xp, ns, m, dt = self.xp, self.n_in, self.n_out, self.dtype
        eyeB = xp.eye(B, dtype=dt)
        Wblk = (eyeB[None, :, None, :, None] * self.W[:, None, :, None, :]).reshape(L, m, ns)
        M = xp.concatenate([Wblk, _kron_eye(self.Y, a)], axis=2)
        self.N = self.d1.reshape(L, m, 1) * M
        self.Nh = self.N * dt.type(np.sqrt(0.5))
        K0 = M.transpose(0, 2, 1) @ (self.w.reshape(L, m, 1) * M)
        Sq = self._Sq(slice(None))
        K0[:, ns:, :ns] += Sq
        K0[:, :ns, ns:] += Sq.transpose(0, 2, 1)
        K0[:, ns:, ns:] += lam * xp.eye(k, dtype=dt)
        if not self.full:
            K0[:, :ns, :ns] -= self._E(slice(None))
        self.K0 = K0

    def _Sq(self, sl, out=None):
        """``S_q = U_qᵀ Sel``: ``[(r,i),(s,k)] = Q[k,r] β[s,i]`` for layers ``sl``.

        ``out`` (``(n_layers, ρ, a, B, a_in)``) receives it without an allocation.
        """
        Qz, beta = self.Q[sl, : self.a_in, :], self.beta[sl]
        out = self.xp.multiply(
            Qz.transpose(0, 2, 1)[:, :, None, None, :],
            beta.transpose(0, 2, 1)[:, None, :, :, None],
            out=out,
        )
        return out.reshape(-1, self.k, self.n_in)

    def _E(self, sl):
        """``E = λ⁻¹ (ββᵀ) ⊗ (I − Q_z Q_zᵀ)`` for layers ``sl``."""
        Qz, beta = self.Q[sl, : self.a_in, :], self.beta[sl]
        P = self.xp.eye(self.a_in, dtype=Qz.dtype) - Qz @ Qz.transpose(0, 2, 1)
        bb = beta @ beta.transpose(0, 2, 1)
        E = bb[:, :, None, :, None] * P[:, None, :, None, :]
        return E.reshape(-1, self.n_in, self.n_in) / self.damping

    # -- factorisation -------------------------------------------------------
    def factor(self, V):
        """Backward sweep over the segment; return the value matrix at its input."""
        V2 = None if V is None else V + V.T  # 2V, symmetrised
        if self._jit is not None:
            run = self._factor_compiled
        else:
            run = self._factor_small if self.small else self._factor_large
        V2, LUd = run(V2)
        self._check_pivots(self.xp.abs(LUd))
        if self.small and self._jit is None:
            # Closed-loop transition Psi = D1 (W_blk - G^T T^-1 R), used by both solve sweeps.
            ns = self.n_in
            self._Psi = self.N[:, :, :ns] - self.N[:, :, ns:] @ self.TinvR
            self.PsiT = self.xp.ascontiguousarray(self._Psi.transpose(0, 2, 1))
            del self.N, self.Nh, self.K0  # the solves need T, T^-1 R and Psi only
        return 0.5 * V2

    _Psi = None

    @property
    def Psi(self):
        """Closed-loop transitions ``Ψ = D₁ (W_blk − Gᵀ T⁻¹R)`` (L, B a, B a_in) of the small form.

        Stored by the array path; the compiled sweeps apply it unformed (from
        ``W`` and ``T⁻¹R``), so there it is formed here, on request, by the
        array path's formula.
        """
        if self._Psi is None and self._jit is not None:
            L, a, B, ns, m, xp = self.nlayers, self.a, self.B, self.n_in, self.n_out, self.xp
            eyeB = xp.eye(B, dtype=self.dtype)
            Wblk = (eyeB[None, :, None, :, None] * self.W[:, None, :, None, :]).reshape(L, m, ns)
            d1 = self.d1.reshape(L, m, 1)
            return d1 * Wblk - (d1 * _kron_eye(self.Y, a)) @ self.gains()
        return self._Psi

    def gains(self, sl=slice(None)):
        """The gains ``T⁻¹R`` (n, k, n_in) of layers ``sl``, whichever path factored them.

        Stored by the small form and the compiled sweeps; the large form keeps
        half gains and the factors of ``T``.
        """
        if self._jit is not None or self.small:
            return self.TinvR[sl]
        return self.xp.stack([fac.right(Yh) for fac, Yh in self.fac[sl]])

    def _factor_compiled(self, V2):
        """The backward sweep as one compiled loop (host NumPy; :mod:`.dense_stage_jit`).

        Keeps ``W``, ``T⁻¹R``, the factor of ``T`` (``Lᵀ`` of its Cholesky factor, or
        its LU and row swaps), ``Qᵀ``, ``Y``, ``d1`` and ``β``: what the solves read.
        """
        L, m, ns, k, dt = self.nlayers, self.n_out, self.n_in, self.k, self.dtype
        if L > 1 and m != ns:
            raise ValueError("DenseSegment: a segment of several layers must be square")
        self.W = np.ascontiguousarray(self.W)
        self._d1f = np.ascontiguousarray(self.d1.reshape(L, m))
        self._betaf = np.ascontiguousarray(self.beta.reshape(L, m))
        self.Y = np.ascontiguousarray(self.Y)
        self.TinvR = np.empty((L, k, ns), dt)
        self._F = np.empty((L, k, k), dt)  # L^T of the Cholesky factor of T, or its LU
        self._piv = np.zeros((L, k), np.int32)  # LU row swaps
        self._islu = np.zeros(L, np.bool_)
        ud = np.empty((L, k), dt)
        Vin = np.zeros((m, m), dt) if V2 is None else np.ascontiguousarray(V2, dtype=dt)
        V2, bad = self._jit.factor(
            self.W,
            self._d1f,
            np.ascontiguousarray(self.w.reshape(L, m)),
            self._betaf,
            self.QT,
            self.Y,
            Vin,
            dt.type(self.damping),
            dt.type(0.5),
            self.full,
            self.TinvR,
            self._F,
            self._piv,
            self._islu,
            ud,
            k >= self._jit.LAPACK_K,
            self._jit.lapack[dt],
        )
        if bad >= 0:
            raise self._singular(int(bad), "exactly singular")
        return V2, ud

    def _factor_large(self, V2):
        """Per-layer Kronecker-structured step (``C = diag(w) + D1 V D1``).

        Per layer, with ``GC = G C`` formed once: ``Q_ss = W_blkᵀ (C W_blk)``,
        ``T = λI + GC Gᵀ`` (``k`` batched ``ρ × B`` by ``B × a`` products, no
        transposed copy of ``GC``), ``R = GC W_blk + S_q``; the factor of ``T``
        gives the half gain ``Y = L_f⁻¹ R`` (in ``R``'s memory on the host) and
        subtracts ``Rᵀ T⁻¹ R`` from the lower triangle of ``Q_ss`` (``syrk``),
        which is then mirrored: ``V`` is exactly symmetric after every update.
        Width 16, batch 32, depth 1024, one BLAS thread, shared 2-core VM: factor
        7.9 -> 5.2 s against LU, ``gemm`` for ``YᵀY`` and the transposed ``GC``; what
        is left is mostly ``trsm`` + ``syrk`` (2.3 s, near one core's peak), page
        faults of the stored factors (about 0.7 s) and the Kronecker products.
        """
        xp, L, ns, k, a, B, m = self.xp, self.nlayers, self.n_in, self.k, self.a, self.B, self.n_out
        dt, rho, a_in = self.dtype, self.rho, self.a_in
        # Per layer (factor of T, half gain Y = L_f^-1 R): Cholesky when T is positive
        # definite, else Bunch-Kaufman on the host, LU on the generic path (backend kernels).
        factor_T = pivot_factorizer(xp, dt)
        self.fac = [None] * L
        pivots = [None] * L
        diag, diag_k = xp.arange(m), xp.arange(k)
        # Work in preallocated buffers: a fresh (m x m) array of 2 MB costs about 1.5 ms
        # of page faults on a shared VM (batch 32, depth 128: factor 2.30 -> 2.02 s).
        C, CW, GC = xp.empty((m, m), dt), xp.empty((m, ns), dt), xp.empty((k, m), dt)
        T = xp.empty((k, k), dt)  # the factors copy it (the generic LU keeps a copy)
        V = xp.zeros((m, m), dt) if V2 is None else 0.5 * V2  # the value matrix, not 2V
        Sq = xp.empty((1, rho, a, B, a_in), dt)
        for j in range(L - 1, -1, -1):
            W, YT = self.W[j], self.YT[j]
            d1 = self.d1[j].reshape(m)
            xp.multiply(V, d1[:, None], out=C)  # C = D1 V D1 + diag(w)
            C *= d1[None, :]
            C[diag, diag] += self.w[j].reshape(m)
            # C W_blk as one GEMM (a batch of m*B tiny products is slow), Q_ss = W_blk^T C W_blk.
            xp.matmul(C.reshape(m * B, a), W, out=CW.reshape(m * B, a_in))
            # Q_ss overwrites V once C is formed (a new buffer only if a_in != a: one layer)
            V = V if V.shape[0] == ns else xp.empty((ns, ns), dt)
            xp.matmul(W.T, CW.reshape(B, a, ns), out=V.reshape(B, a_in, ns))
            xp.matmul(YT, C.reshape(B, a * m), out=GC.reshape(rho, a * m))  # G C
            # T[(r,i),(r',i')] = sum_s GC[(r,i),(s,i')] Y[s,r']: per row of GC, Y^T (B x a)
            xp.matmul(YT, GC.reshape(k, B, a), out=T.reshape(k, rho, a))
            T[diag_k, diag_k] += self.damping
            R = (GC.reshape(k * B, a) @ W).reshape(k, ns)  # G C W_blk, fresh: becomes Y
            R += self._Sq(slice(j, j + 1), out=Sq)[0]
            fac = factor_T(T)
            if fac is None:
                raise self._singular(j, "exactly singular")
            if fac.negatives is None:  # generic LU: T kept for the batched eigvalsh
                self._Ts_lu.append(fac.T)
            else:
                self._negatives += fac.negatives
            self.fac[j] = (fac, fac.half_gain_update(R, V))  # V -= R^T T^-1 R (lower)
            pivots[j] = fac.pivots()
            if not self.full:
                V -= self._E(slice(j, j + 1))[0]
            _mirror_lower(xp, V)
        LUd, self._eigT = pivot_magnitudes(xp, self._Ts_lu[::-1], pivots)
        return V + V, LUd

    def _TR(self, j, s):
        """``T_j⁻¹ R_j s``."""
        fac, Y = self.fac[j]
        return fac.right(Y @ s)

    def _TRt(self, j, x):
        """``(T_j⁻¹ R_j)ᵀ x``."""
        fac, Y = self.fac[j]
        return Y.T @ fac.right_T(x)

    def _Tinv(self, j, x):
        return self.fac[j][0].solve(x)

    def _factor_small(self, V2):
        xp, L, ns = self.xp, self.nlayers, self.n_in
        N, K0 = self.Nh, self.K0
        solve_T = pivot_solver(xp, K0.dtype)
        Zs = xp.empty_like(K0)
        TinvR, pivots = [None] * L, [None] * L
        # V2 = V + V^T = 2V (symmetrised); Nh = N / sqrt(2) absorbs the factor 1/2.
        for j in range(L - 1, -1, -1):
            Z = Zs[j]
            if V2 is None:
                Z[...] = K0[j]
            else:
                Nj = N[j]
                xp.matmul(Nj.T, V2 @ Nj, out=Z)
                Z += K0[j]
            R = Z[ns:, :ns]
            TR, pivots[j] = solve_T(Z[ns:, ns:], R)
            if TR is None:
                raise self._singular(j, "exactly singular")
            TinvR[j] = TR
            V2 = Z[:ns, :ns] - R.T @ TR
            V2 += V2.T  # symmetrise (docs: numerics, "Numerics that matter")
        self.T = xp.ascontiguousarray(Zs[:, ns:, ns:])  # not a view: Zs is dropped
        self.TinvR = xp.stack(TinvR)
        LUd, self._eigT = pivot_magnitudes(xp, self.T, pivots)
        return V2, LUd

    def _singular(self, j, detail):
        ly = self.layers[j]
        return SingularBlockError(
            f"stagewise sweep: the stage pivot Q_uu of {ly.name} is {detail}; "
            "H + damping*I is singular or nearly so in the stagewise ordering. "
            f"{_upper_first(damping_hint(self.damping, self.dtype))}, or use method='kkt' "
            "(pivoted banded LU).",
            layer=self.first_index + j,
        )

    def _check_pivots(self, ud):
        """Flag stage pivots whose LU diagonal (or eigenvalue) spread says 'singular'.

        ``ud`` (L, k): ``|diag U|`` of the LU of each ``T`` (LAPACK path) or
        ``|eigenvalues|`` of ``T`` (generic path); both multiply to ``|det T|``.
        """
        # Q_uu has the eigenvalues of T and p - k more equal to lam (any sign: a shift)
        xp, lam, extra = self.xp, abs(self.damping), self.pl - self.k
        big, small = ud.max(axis=1), ud.min(axis=1)
        if extra:
            big, small = xp.maximum(big, lam), xp.minimum(small, lam)
        bad = singular_pivots(small, big, ud.dtype)  # the one criterion (blockops.singular)
        if bool(bad.any()):  # one scalar to the host per segment
            j = int(xp.flatnonzero(bad)[-1])  # the sweep runs backward: report where it broke
            lo, hi = float(small[j]), float(big[j])
            if lo == 0 or not np.isfinite(hi):
                raise self._singular(j, "exactly singular")
            raise self._singular(j, f"numerically singular (pivot ratio {lo / hi:.1e})")
        self.logdet = float(xp.sum(xp.log(ud))) + extra * self.nlayers * float(np.log(lam or 1.0))

    @property
    def inertia(self):
        """Inertia of the stage pivots (batched eigenvalues of the ``T`` stack, on request)."""
        # generic path: eigenvalues computed with the factor; large stages on the host:
        # Cholesky-factored pivots are positive definite, so only the LU ones count
        if self._jit is not None:  # the LU ones rebuilt from their factors (nothing stored)
            lu = self._islu
            Ts = np.empty((int(lu.sum()), self.k, self.k), self.dtype)
            self._jit.lu_rebuild(self._F[lu], self._piv[lu], Ts)
        else:
            Ts = self.T if self.small else self._Ts_lu
        neg = count_negative(self.xp, Ts, self._eigT) + self._negatives
        if self.damping < 0:  # the p - k eigenvalues lam of each Q_uu outside T's range
            neg += (self.pl - self.k) * self.nlayers
        return (neg, 0, self.pl * self.nlayers - neg)

    def selected_inverse(self, Pi, blocks=False):
        """Diagonal (``blocks``: per-layer blocks) of the inverse here (:mod:`.dense_selected`)."""
        from .dense_selected import dense_selected_inverse

        return dense_selected_inverse(self, Pi, blocks)

    # -- solves --------------------------------------------------------------
    # Right-hand sides carry kc columns; per layer the parameters are the matrix
    # X̃ = [W, c] (a x r) and reduced coordinates are ordered (r, i).
    def _matrix_form(self, g):
        """Flat (L p_l, kc) -> X̃ stack (L, kc, a, r)."""
        L, a, a_in = self.nlayers, self.a, self.a_in
        g = g.reshape(L, self.pl, -1).transpose(0, 2, 1)
        kc = g.shape[1]
        return self.xp.concatenate(
            [g[:, :, : a * a_in].reshape(L, kc, a, a_in), g[:, :, a * a_in :, None]], axis=3
        )

    def _to_reduced(self, X):
        """``U_qᵀ``: (L, kc, a, r) -> (L, k, kc)."""
        L, kc = X.shape[:2]
        return _stack_mm(X, self.Q).transpose(0, 3, 2, 1).reshape(L, self.k, kc)

    def _from_reduced(self, eta):
        """``U_q``: (L, k, kc) -> (L, kc, a, r)."""
        L, kc = eta.shape[0], eta.shape[2]
        return _stack_mm(eta.reshape(L, self.rho, self.a, kc).transpose(0, 3, 2, 1), self.QT)

    def _perp(self, X):
        """``(I − U_q U_qᵀ)`` on (L, kc, a, r)."""
        return X - _stack_mm(_stack_mm(X, self.Q), self.QT)

    def _bwd_step(self, j, v, gam):
        """``Ψ_jᵀ v + (T⁻¹R)ᵀ γ = W_blkᵀ w − (T⁻¹R)ᵀ (G w − γ)``, ``w = D1 v`` (large form).

        ``γ`` joins ``G w`` so each layer's half gain is read once per sweep.
        """
        B, a, kc = self.B, self.a, v.shape[1]
        w = self.d1[j].reshape(-1, 1) * v
        Ww = (self.W[j].T @ w.reshape(B, a, kc)).reshape(self.n_in, kc)
        Gw = (self.YT[j] @ w.reshape(B, a * kc)).reshape(self.k, kc)
        return Ww - self._TRt(j, Gw - gam)

    def _fwd_step(self, j, s):
        """``(Ψ_j s, T⁻¹R s)`` (large form): the gain product is the control's too."""
        B, a, kc = self.B, self.a, s.shape[1]
        Ws = (self.W[j] @ s.reshape(B, self.a_in, kc)).reshape(self.n_out, kc)
        t = self._TR(j, s)
        Gt = (self.Y[j] @ t.reshape(self.rho, a * kc)).reshape(self.n_out, kc)
        return self.d1[j].reshape(-1, 1) * (Ws - Gt), t

    def backward(self, v, g):
        """Linear-term sweep: ``v_{l-1} = Ψᵀ v_l + T⁻¹R`ᵀ γ_l + λ⁻¹ S_⊥ᵀ g_l``."""
        if self._jit is not None:
            return self._backward_compiled(v, g)
        xp, L, a, B, k, ns = self.xp, self.nlayers, self.a, self.B, self.k, self.n_in
        Xg = self._matrix_form(g)
        kc = Xg.shape[1]
        gam = self._to_reduced(Xg)  # U_q^T g_l
        # psi_l = T^-1R`^T gamma_l + lam^-1 S_perp^T g_l (large form: the first term in the loop)
        psi = self.TinvR.transpose(0, 2, 1) @ gam if self.small else None
        if not self.full:
            Xp = self._perp(Xg)[:, :, :, : self.a_in]
            sig = (self.beta[:, None] @ Xp).transpose(0, 2, 3, 1).reshape(L, ns, kc)
            psi = sig / self.damping if psi is None else psi + sig / self.damping
        vs = xp.zeros((L, self.n_out, kc), g.dtype)
        top = L - 1
        if self.small:  # the sequential part: one product and one add per layer
            if v is None:
                v, top = psi[top], top - 1
            PsiT = self.PsiT
            for j in range(top, -1, -1):
                vs[j] = v
                v = PsiT[j] @ v + psi[j]
        else:  # from v = 0 when there is no later stage (its step gives psi_top)
            v = xp.zeros((self.n_out, kc), g.dtype) if v is None else v
            for j in range(top, -1, -1):
                vs[j] = v
                v = self._bwd_step(j, v, gam[j])
                if psi is not None:
                    v += psi[j]
        # tau_l = T^-1 (G D1 v_l - gamma_l)
        dv = (self.d1.reshape(L, -1, 1) * vs).reshape(L, B, a * kc)
        Gdv = (self.YT @ dv).reshape(L, k, kc)
        if self.small:
            tau = xp.linalg.solve(self.T, Gdv - gam)  # not an explicit inverse: accuracy
        else:
            tau = xp.stack([self._Tinv(j, Gdv[j] - gam[j]) for j in range(L)])
        return v, (Xg, tau)

    def forward(self, s, ctx):
        """State sweep ``s_l = Ψ s_{l-1} − D1 Gᵀ τ_l``; controls ``u_l``."""
        if self._jit is not None:
            return self._forward_compiled(s, ctx)
        Xg, tau = ctx
        L, a, a_in, B, rho, kc = self.nlayers, self.a, self.a_in, self.B, self.rho, Xg.shape[1]
        om = (self.Y @ tau.reshape(L, rho, a * kc)).reshape(L, self.n_out, kc)
        om *= -self.d1.reshape(L, -1, 1)
        xp = self.xp
        ss = xp.zeros((L, self.n_in, kc), Xg.dtype)
        j0 = 0
        if s is None:
            s, j0 = om[0], 1
        if self.small:
            Psi = self._Psi
            for j in range(j0, L):
                ss[j] = s
                s = Psi[j] @ s + om[j]
            eta = -(self.TinvR @ ss) - tau  # U_q^T u_l
        else:
            eta = -tau  # U_q^T u_l = -T^-1R s_{l-1} - tau_l, the gain product from each step
            for j in range(j0, L):
                ss[j] = s
                s, t = self._fwd_step(j, s)
                s += om[j]
                eta[j] -= t
        U = self._from_reduced(eta)
        if not self.full:
            # u_perp = -lam^-1 (I - P)(Sel s - g)
            sel = xp.zeros_like(Xg)
            sst = ss.reshape(L, B, a_in, kc).transpose(0, 3, 1, 2)  # (L, kc, B, a_in)
            sel[:, :, :, :a_in] = self.beta.transpose(0, 2, 1)[:, None] @ sst
            U -= self._perp(sel - Xg) / self.damping
        u = xp.concatenate([U[:, :, :, :a_in].reshape(L, kc, a * a_in), U[:, :, :, a_in]], axis=2)
        return u.transpose(0, 2, 1).reshape(self.p, kc), s

    def _backward_compiled(self, v, g):
        L, pl, m, dt = self.nlayers, self.pl, self.n_out, self.dtype
        kc = g.shape[1]
        gT = np.ascontiguousarray(g.T, dtype=dt).reshape(kc, L, pl)
        vT = np.zeros((kc, m), dt) if v is None else np.ascontiguousarray(v.T, dtype=dt)
        tau, gam = np.empty((2, L, kc, self.k), dt)
        v = self._jit.backward(
            gT,
            vT,
            self.W,
            self.TinvR,
            self._F,
            self._piv,
            self._islu,
            self.QT,
            self.Y,
            self._d1f,
            self._betaf,
            dt.type(self.damping),
            self.full,
            tau,
            gam,
        )
        return v.T, (gT, tau, gam)

    def _forward_compiled(self, s, ctx):
        gT, tau, gam = ctx
        kc, dt = gT.shape[0], gT.dtype
        sT = np.zeros((kc, self.n_in), dt) if s is None else np.ascontiguousarray(s.T, dtype=dt)
        u = np.empty((kc, self.nlayers, self.pl), dt)
        s = self._jit.forward(
            gT,
            sT,
            self.W,
            self.TinvR,
            self.QT,
            self.Y,
            self._d1f,
            self._betaf,
            dt.type(self.damping),
            self.full,
            tau,
            gam,
            u,
        )
        return u.reshape(kc, self.p).T, s.T


def dense_segments(layers, caches, bs, damping, first_index=1):
    """Split a run of dense layers into segments of equal shape."""
    out, start = [], 0
    for j in range(1, len(layers) + 1):
        if j == len(layers) or (layers[j].n_in, layers[j].n_out) != (
            layers[start].n_in,
            layers[start].n_out,
        ):
            out.append(
                DenseSegment(
                    layers[start:j], caches[start:j], bs[start:j], damping, first_index + start
                )
            )
            start = j
    return out
