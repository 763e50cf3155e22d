r"""Dense layer ``z = σ(z_prev Wᵀ + c)``.

Parameter layout (public): ``x = concat(W.ravel(), c)`` with ``W`` of shape
``(n_out, n_in)`` in row-major order, so ``n_params = n_out (n_in + 1)``.

Per sample ``s`` with pre-activation ``t_s = W z_s + c``, ``σ' = d1``,
``σ'' = d2`` and the back-propagated row ``b_s``:

* ``∇_z f_s = diag(d1_s) W`` and ``∇_x f_s`` has rows
  ``d1_{s,i} (e_i ⊗ [z_s; 1])ᵀ`` (eq. 12, in the parameter layout above).
* The b-weighted second derivatives (``w = b ⊙ d2``, ``g = b ⊙ d1``):
  ``K_zz[s] = Wᵀ diag(w_s) W``;
  ``K_xx`` is block-diagonal over output rows ``i`` with blocks
  ``Σ_s w_{s,i} z̃_s z̃_sᵀ`` (``z̃ = [z; 1]``): a Kronecker product of a
  diagonal and an outer product summed over samples, never stored as an
  ``(a p) × p`` tensor;
  ``K_xz[(i,j), s] = w_{s,i} z_{s,j} W_i + g_{s,i} e_j`` and
  ``K_xz[c_i, s] = w_{s,i} W_i``.

``Cache.extra`` (read only here and by the dense layer's fast paths beside it,
:mod:`~blockops.network.dense_sweep` and :mod:`~blockops.network.dense_stage`):

``W``
    ``(n_out, n_in)`` view into ``x``.
``c``
    ``(n_out,)`` view into ``x``.
``pre``
    ``(B, n_out)`` pre-activation ``z_prev Wᵀ + c``.
``d1``, ``d2``
    ``(B, n_out)``: ``σ'(pre)`` and ``σ''(pre)``.
"""

from __future__ import annotations

import math

import numpy as np

from .._checks import check_int
from ._util import array_module as get_array_module
from ._util import check_forward, n_directions
from .activations import get_activation
from .layer import Cache, Layer

__all__ = ["Dense"]


class Dense(Layer):
    """Fully connected layer ``z = σ(z_prev Wᵀ + c)``.

    Parameters
    ----------
    n_in, n_out : int
        Input and output features per sample.
    activation : str, Activation or None
        ``"tanh"`` (default), ``"sigmoid"``, ``"softplus"``, ``"gelu"``,
        ``"identity"`` (or ``None``) or :func:`~blockops.network.activation`.

    Notes
    -----
    Forward (eq. 53): ``dz = d1 ⊙ (dz_prev Wᵀ + z_prev dWᵀ + dc)``.
    Adjoint (eqs. 4-5): with ``g = b ⊙ d1``, ``b ∇_z f = g W`` and
    ``b ∇_x f = concat((gᵀ z_prev).ravel(), Σ_s g_s)``.
    """

    def __init__(self, n_in: int, n_out: int, activation="tanh"):
        n_in = check_int(type(self).__name__, "n_in", n_in, 1)
        n_out = check_int(type(self).__name__, "n_out", n_out, 1)
        self.n_in, self.n_out = n_in, n_out
        self.act = get_activation(activation)
        self.n_params = n_out * n_in + n_out
        self._nW = n_out * n_in
        self._shapeW = (n_out, n_in)
        self.name = self.describe()

    def describe(self) -> str:
        return f"{type(self).__name__} {self.n_in}->{self.n_out}, {self.act.name}"

    def init_params(self, rng: np.random.Generator, dtype=np.float64) -> np.ndarray:
        """``W ~ N(0, 1/n_in)``, ``c ~ N(0, 0.01)`` (fan-in scaling keeps tanh unsaturated)."""
        W = rng.standard_normal((self.n_out, self.n_in)) / math.sqrt(self.n_in)
        c = 0.1 * rng.standard_normal(self.n_out)
        return np.concatenate([W.ravel(), c]).astype(dtype)

    # -- helpers ---------------------------------------------------------------
    def unpack(self, x):
        """Views ``(W, c)`` of a parameter vector (or ``(k, p)`` stack of them)."""
        if x.ndim == 1:
            return x[: self._nW].reshape(self.n_out, self.n_in), x[self._nW :]
        k = x.shape[0]
        return x[:, : self._nW].reshape(k, self.n_out, self.n_in), x[:, self._nW :]

    def _dpre(self, cache, dz_prev, dx):
        """Directional derivative of the pre-activation, ``(k, B, n_out)`` (a fresh array)."""
        out = None
        if dz_prev is not None:
            out = dz_prev @ cache.extra["W"].T
        if dx is not None:
            dW, dc = self.unpack(dx)
            t = cache.z_prev @ dW.transpose(0, 2, 1)  # (k, B, n_out)
            t += dc[:, None, :]
            if out is None:
                out = t
            else:
                out += t
        return out

    def _back_pre(self, xp, cache, r, out=None):
        """Adjoint of :meth:`_dpre` at ``r (k, B, n_out)``: ``(dz_prev, dx)``.

        ``dx`` is written into ``out`` (``(k, p)``, e.g. a slice of a larger
        array) when given, so the sweeps need no concatenate per layer.
        """
        k, B = r.shape[0], r.shape[1]
        if out is None:
            out = xp.empty((k, self.n_params), dtype=r.dtype)
        # splitting one axis of a slice is always a view: matmul writes into `out`
        xp.matmul(
            r.transpose(0, 2, 1), cache.z_prev, out=out[:, : self._nW].reshape(k, *self._shapeW)
        )
        if B == 1:  # copying the row beats a 1-row reduction (0.4 us vs 1.6 us, width 16)
            out[:, self._nW :] = r[:, 0]
        else:
            r.sum(axis=1, out=out[:, self._nW :])  # the method: np.sum's wrapper costs 2 us
        return r @ cache.extra["W"], out

    # -- zeroth and first order ------------------------------------------------
    def forward(self, z_prev, x, targets=None) -> Cache:
        check_forward(self, z_prev, x)
        W, c = self.unpack(x)
        pre = z_prev @ W.T
        pre += c
        z, d1, d2 = self.act.derivs(pre)
        return Cache(z_prev, x, z, {"W": W, "c": c, "pre": pre, "d1": d1, "d2": d2})

    def jvp(self, cache, dz_prev, dx):
        n_directions(self, dz_prev, dx)
        return self.jvp_keep(cache, dz_prev, dx)[0]

    def jvp_keep(self, cache, dz_prev, dx):
        """:meth:`jvp` without input checks, also returning what :meth:`hvp_vjp` reuses.

        Returns ``(dz, dpre)`` with ``dpre`` the directional derivative of the
        pre-activation (``dz = d1 ⊙ dpre``); the Hessian sweeps keep it so the
        backward step need not recompute it (two matmuls per layer).
        """
        dpre = self._dpre(cache, dz_prev, dx)
        return cache.extra["d1"] * dpre, dpre

    def vjp(self, cache, b):
        xp = get_array_module(b)
        return self._back_pre(xp, cache, b * cache.extra["d1"])

    # -- second order ------------------------------------------------------------
    def hvp(self, cache, b, dz_prev, dx):
        n_directions(self, dz_prev, dx)
        return self.hvp_vjp(cache, b, dz_prev, dx)

    def hvp_vjp(self, cache, b, dz_prev, dx, bprime=None, dpre=None, out=None):
        """``hvp(b, dz_prev, dx) + vjp(bprime)`` in one adjoint pass, without input checks.

        Both terms end in the adjoint of the pre-activation map, so it is
        applied once to ``(b ⊙ d2) ⊙ dpre + bprime ⊙ d1``. ``bprime``
        (``(k, B, n_out)``) may be ``None`` (then this is :meth:`hvp`);
        ``dpre`` is what :meth:`jvp_keep` returned for ``(dz_prev, dx)``
        (recomputed when ``None``); ``hx`` is written into ``out`` when given.
        Returns ``(hz + bz, hx + bx)``.
        """
        xp = get_array_module(b)
        e = cache.extra
        if dpre is None:
            dpre = self._dpre(cache, dz_prev, dx)
        s = (b * e["d2"]) * dpre  # (k, B, n_out)
        if bprime is not None:
            s += bprime * e["d1"]
        hz, hx = self._back_pre(xp, cache, s, out)
        g = b * e["d1"]  # (B, n_out): the bilinear term of pre = W z + c
        if dx is not None:
            dW, _ = self.unpack(dx)
            hz += g @ dW
        if dz_prev is not None:
            k = dz_prev.shape[0]
            hx[:, : self._nW] += (g.T @ dz_prev).reshape(k, self._nW)
        return hz, hx

    # -- registered fast paths -------------------------------------------------------
    def stack_key(self):
        """Runs of plain square dense layers of one width are swept stacked by the HVP.

        Only the exact type (a subclass may change the maths).
        """
        return ("dense", self.n_in) if type(self) is Dense and self.n_in == self.n_out else None

    @classmethod
    def stacked_sweep(cls, caches, bs, cols):
        from .dense_sweep import DenseRun

        return DenseRun(caches, bs, cols)

    def stage_key(self):
        """Consecutive plain dense layers share the structured (low-rank) inverse stage."""
        return "dense" if type(self) is Dense else None

    @classmethod
    def structured_stages(cls, layers, caches, bs, damping, first_index):
        from .dense_stage import dense_segments

        return dense_segments(layers, caches, bs, damping, first_index)

    # -- explicit blocks ---------------------------------------------------------
    def jacobian_z(self, cache):
        return cache.extra["d1"][:, :, None] * cache.extra["W"]

    def jacobian_x(self, cache):
        xp = get_array_module(cache.z_prev)
        d1, z = cache.extra["d1"], cache.z_prev
        B, n, m = z.shape[0], self.n_in, self.n_out
        eye = xp.eye(m, dtype=d1.dtype)
        JW = (d1[:, :, None, None] * eye[None, :, :, None]) * z[:, None, None, :]
        Jc = d1[:, :, None] * eye
        return xp.concatenate([JW.reshape(B, m, m * n), Jc], axis=2)

    def hessian_blocks(self, cache, b):
        xp = get_array_module(cache.z_prev)
        e = cache.extra
        W, z = e["W"], cache.z_prev
        B, n, m, p = z.shape[0], self.n_in, self.n_out, self.n_params
        w, g = b * e["d2"], b * e["d1"]
        Kzz = (W.T[None, :, :] * w[:, None, :]) @ W
        eye_n = xp.eye(n, dtype=z.dtype)
        eye_m = xp.eye(m, dtype=z.dtype)
        # K_xz: (i, j, s, :) = w_si z_sj W_i + g_si e_j ; c rows: w_si W_i
        wW = w.T[:, :, None] * W[:, None, :]  # (m, B, n): w_si W_i
        KxzW = (
            wW[:, None, :, :] * z.T[None, :, :, None]
            + g.T[:, None, :, None] * eye_n[None, :, None, :]
        )
        Kxz = xp.concatenate([KxzW.reshape(m * n, B, n), wW], axis=0)
        # K_xx: block-diagonal over output rows i, block G_i = Σ_s w_si z̃_s z̃_sᵀ
        zt = xp.concatenate([z, xp.ones((B, 1), dtype=z.dtype)], axis=1)
        G = xp.einsum("si,sa,sb->iab", w, zt, zt)  # (m, n+1, n+1)
        Kxx = xp.zeros((p, p), dtype=z.dtype)
        nW = self._nW
        Kxx[:nW, :nW] = xp.einsum("iab,ik->iakb", G[:, :n, :n], eye_m).reshape(nW, nW)
        KWc = (G[:, :n, n][:, :, None] * eye_m[:, None, :]).reshape(nW, m)
        Kxx[:nW, nW:] = KWc
        Kxx[nW:, :nW] = KWc.T
        Kxx[nW:, nW:] = xp.diag(G[:, n, n])
        return Kzz, Kxz, Kxx

    # -- un-contracted second derivatives (literal eq. 24) ---------------------
    def djac_x(self, cache, dz_prev, dx):
        r"""``d(∇_x f)[dz_prev, dx]``, ``(k, B, n_out, p)`` (eq. 12 before ``vec``)."""
        k = n_directions(self, dz_prev, dx)
        xp = get_array_module(cache.z_prev)
        e = cache.extra
        z = cache.z_prev
        B, n, m = z.shape[0], self.n_in, self.n_out
        ed = e["d2"] * self._dpre(cache, dz_prev, dx)  # (k, B, m): d(d1)
        V = ed[:, :, :, None] * z[None, :, None, :]  # (k, B, m, n)
        if dz_prev is not None:
            V = V + e["d1"][None, :, :, None] * dz_prev[:, :, None, :]
        eye = xp.eye(m, dtype=z.dtype)
        TW = V[:, :, :, None, :] * eye[None, None, :, :, None]  # (k, B, m, m, n)
        Tc = ed[:, :, :, None] * eye
        return xp.concatenate([TW.reshape(k, B, m, m * n), Tc], axis=3)

    def djac_x_T(self, cache, T):
        """Adjoint of :meth:`djac_x`: ``T (k, B, n_out, p) -> (dz_prev, dx)``."""
        xp = get_array_module(T)
        e = cache.extra
        k, B, m, _ = T.shape
        n = self.n_in
        TWd = xp.einsum("ksiij->ksij", T[..., : self._nW].reshape(k, B, m, m, n))
        Tcd = xp.einsum("ksii->ksi", T[..., self._nW :])
        r = e["d2"] * (xp.einsum("ksij,sj->ksi", TWd, cache.z_prev) + Tcd)
        dz, dx = self._back_pre(xp, cache, r)
        dz = dz + xp.einsum("ksij,si->ksj", TWd, e["d1"])
        return dz, dx

    def djac_z(self, cache, dz_prev, dx):
        r"""``d(∇_z f)[dz_prev, dx]``, ``(k, B, n_out, n_in)`` (eq. 22 before ``vec``)."""
        n_directions(self, dz_prev, dx)
        e = cache.extra
        ed = e["d2"] * self._dpre(cache, dz_prev, dx)
        out = ed[:, :, :, None] * e["W"]
        if dx is not None:
            dW, _ = self.unpack(dx)
            out = out + e["d1"][None, :, :, None] * dW[:, None, :, :]
        return out

    def djac_z_T(self, cache, T):
        """Adjoint of :meth:`djac_z`: ``T (k, B, n_out, n_in) -> (dz_prev, dx)``."""
        xp = get_array_module(T)
        e = cache.extra
        r = e["d2"] * xp.einsum("ksij,ij->ksi", T, e["W"])
        dz, dx = self._back_pre(xp, cache, r)
        k = T.shape[0]
        dx[:, : self._nW] += xp.einsum("ksij,si->kij", T, e["d1"]).reshape(k, self._nW)
        return dz, dx
