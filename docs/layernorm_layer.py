r"""A per-sample layer normalisation with a learnable scale and shift.

For each sample ``s`` (a row ``u`` of ``z_prev``, ``n`` features)

.. math::

    \mu = \operatorname{mean}(u),\quad c = u - \mu,\quad
    \sigma = (\operatorname{mean}(c^2) + \varepsilon)^{-1/2},\quad
    y = \sigma c,\qquad z = \gamma \odot y + \beta .

Parameter layout: ``x = concat(γ, β)``, so ``n_params = 2 n``.

The Jacobian of ``y`` in ``u`` is symmetric,
``J_y = σ (I - 11ᵀ/n - y yᵀ/n)``, so ``J_y r = σ (r - mean(r) - y mean(y ⊙ r))``
for any ``r``. With ``g = b ⊙ γ`` the contracted Hessian ``K`` of
``Σ_{s,i} b_{s,i} z_{s,i}`` in ``(u, γ, β)`` has the blocks

* ``K_uu du = -σ² a (g - mean(g)) + σ² a m y - σ m J_y du - σ y mean(g ⊙ J_y du)``
  with ``a = mean(y ⊙ du)`` and ``m = mean(y ⊙ g)``;
* ``K_γu du = Σ_s b ⊙ J_y du`` and ``K_uγ dγ = J_y (b ⊙ dγ)``;
* every block with ``β``, and ``K_γγ``, is zero (``z`` is linear in ``γ``
  and in ``β``).

This file is the code of the docs page "Adding a layer";
``docs/layernorm_check.py`` checks it against JAX.
"""

from __future__ import annotations

import numpy as np

from blockops.backend import get_array_module
from blockops.network import Cache, Layer

__all__ = ["LayerNorm", "LayerNormFused"]


class LayerNorm(Layer):
    """``z = γ ⊙ (u - mean(u)) / sqrt(var(u) + eps) + β`` per sample (``n -> n``).

    Parameters
    ----------
    n : int
        Features per sample.
    eps : float
        The ``ε`` under the square root.
    """

    def __init__(self, n: int, eps: float = 1e-5):
        n = int(n)
        if n < 2:
            raise ValueError(f"LayerNorm: size must be >= 2, got {n}")
        self.n_in = self.n_out = n
        self.n_params = 2 * n  # concat(gamma, beta)
        self.eps = float(eps)
        self.name = self.describe()

    def init_params(self, rng: np.random.Generator, dtype=np.float64) -> np.ndarray:
        """``γ = 1``, ``β = 0`` (the identity normalisation)."""
        n = self.n_in
        return np.concatenate([np.ones(n), np.zeros(n)]).astype(dtype)

    # -- helpers ---------------------------------------------------------------
    def _split(self, x):
        """``(γ, β)`` views of a flat ``(..., 2n)`` array."""
        n = self.n_in
        return x[..., :n], x[..., n:]

    @staticmethod
    def _Jy(cache, r):
        """``J_y r`` for ``r`` of shape ``(k, B, n)`` (``J_y`` is symmetric)."""
        y, sig = cache.extra["y"], cache.extra["sigma"]
        return sig * (r - r.mean(axis=-1, keepdims=True) - y * (y * r).mean(axis=-1, keepdims=True))

    # -- the Layer contract ----------------------------------------------------
    def forward(self, z_prev, x, targets=None) -> Cache:
        if z_prev.ndim != 2 or z_prev.shape[1] != self.n_in:
            raise ValueError(
                f"{self.name}: z_prev has shape {z_prev.shape}; expected (B, {self.n_in})"
            )
        if x.shape != (self.n_params,):
            raise ValueError(f"{self.name}: x has shape {x.shape}; expected ({self.n_params},)")
        gamma, beta = self._split(x)
        c = z_prev - z_prev.mean(axis=1, keepdims=True)
        xp = get_array_module(z_prev)
        sigma = 1.0 / xp.sqrt((c * c).mean(axis=1, keepdims=True) + self.eps)
        y = sigma * c
        return Cache(z_prev, x, gamma * y + beta, {"y": y, "sigma": sigma})

    def jvp(self, cache, dz_prev, dx):
        """``dz = γ ⊙ J_y du + dγ ⊙ y + dβ``; either direction may be ``None``."""
        dz = None
        if dz_prev is not None:
            gamma, _ = self._split(cache.x)
            dz = gamma * self._Jy(cache, dz_prev)
        if dx is not None:
            dgamma, dbeta = self._split(dx)
            t = dgamma[:, None, :] * cache.extra["y"] + dbeta[:, None, :]
            dz = t if dz is None else dz + t
        return dz

    def vjp(self, cache, b):
        """``(J_y (γ ⊙ b), concat(Σ_s b ⊙ y, Σ_s b))`` for ``b`` of shape ``(k, B, n)``."""
        xp = get_array_module(b)
        gamma, _ = self._split(cache.x)
        bz = self._Jy(cache, gamma * b)
        bx = xp.concatenate([(b * cache.extra["y"]).sum(axis=1), b.sum(axis=1)], axis=-1)
        return bz, bx

    def hvp(self, cache, b, dz_prev, dx):
        """``(K_zz du + K_zx dx, K_xz du + K_xx dx)`` for the weighting ``b`` ``(B, n)``."""
        xp = get_array_module(b)
        k = dz_prev.shape[0] if dz_prev is not None else dx.shape[0]
        B, n = cache.z_prev.shape
        hz = xp.zeros((k, B, n), dtype=cache.z_prev.dtype)
        hx = xp.zeros((k, self.n_params), dtype=cache.z_prev.dtype)
        if dz_prev is not None:
            dy = self._Jy(cache, dz_prev)
            hz += self._Kuu(cache, b, dz_prev, dy)
            hx[:, :n] = (b * dy).sum(axis=1)  # K_γu du
        if dx is not None:
            dgamma, _ = self._split(dx)
            hz += self._Jy(cache, b * dgamma[:, None, :])  # K_uγ dγ
        return hz, hx

    def _Kuu(self, cache, b, du, dy):
        """``K_uu du`` given ``dy = J_y du`` (see the module docstring)."""
        gamma, _ = self._split(cache.x)
        y, sig = cache.extra["y"], cache.extra["sigma"]
        g = b * gamma
        a = (y * du).mean(axis=-1, keepdims=True)
        m = (y * g).mean(axis=-1, keepdims=True)
        dm = (dy * g).mean(axis=-1, keepdims=True)
        return sig**2 * a * (m * y - (g - g.mean(axis=-1, keepdims=True))) - sig * (m * dy + y * dm)


class LayerNormFused(LayerNorm):
    """:class:`LayerNorm` with the fused HVP's optional per-layer steps.

    ``jvp_keep`` keeps ``dy = J_y du`` from the forward sweep and ``hvp_vjp``
    reuses it for ``K_uu du`` and ``K_γu du`` and folds in the ``vjp`` of
    ``b'``: the backward sweep then recomputes no ``J_y du``.
    """

    def jvp_keep(self, cache, dz_prev, dx):
        dy = None if dz_prev is None else self._Jy(cache, dz_prev)
        dz = None
        if dy is not None:
            gamma, _ = self._split(cache.x)
            dz = gamma * dy
        if dx is not None:
            dgamma, dbeta = self._split(dx)
            t = dgamma[:, None, :] * cache.extra["y"] + dbeta[:, None, :]
            dz = t if dz is None else dz + t
        return dz, dy

    def hvp_vjp(self, cache, b, dz_prev, dx, bprime=None, keep=None, out=None):
        xp, n = get_array_module(b), self.n_in
        gamma, _ = self._split(cache.x)
        k = (dz_prev if dz_prev is not None else dx).shape[0]
        hx = xp.zeros((k, self.n_params), dtype=b.dtype) if out is None else out
        hx[...] = 0.0
        # u side: J_y (γ ⊙ b' + b ⊙ dγ) is one J_y application, plus K_uu du
        r = xp.zeros((k, *cache.z_prev.shape), dtype=b.dtype)
        if bprime is not None:  # vjp of b'
            r += gamma * bprime
            hx[:, :n] += (bprime * cache.extra["y"]).sum(axis=1)
            hx[:, n:] += bprime.sum(axis=1)
        if dx is not None:  # K_uγ dγ
            r += b * dx[:, None, :n]
        hz = self._Jy(cache, r)
        if dz_prev is not None:
            dy = keep if keep is not None else self._Jy(cache, dz_prev)
            hz += self._Kuu(cache, b, dz_prev, dy)
            hx[:, :n] += (b * dy).sum(axis=1)  # K_γu du
        return hz, hx
