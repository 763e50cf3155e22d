r"""Diagonal layers: ``Bias`` (``σ(z + x)``), ``Scale`` (``σ(x ⊙ z)``), ``Elementwise`` (``σ(z)``).

Each acts feature by feature, so with pre-activation ``t = t(z, x)``,
``pz = ∂t/∂z`` and ``px = ∂t/∂x`` (both diagonal), ``d1 = σ'(t)``,
``d2 = σ''(t)``, ``w = b ⊙ d2`` and ``g = b ⊙ d1``:

* ``∇_z f_s = diag(d1_s pz_s)``, ``∇_x f_s = diag(d1_s px_s)`` (eq. 12);
* ``K_zz[s] = diag(w_s pz_s²)``, ``K_xx = diag(Σ_s w_s px_s²)``,
  ``K_xz[j, s, j'] = δ_{jj'} (w pz px + g ∂²t/∂z∂x)_{s,j}``.

Bias: ``pz = px = 1``; Scale: ``pz = x``, ``px = z``, ``∂²t/∂z∂x = 1``;
Elementwise: ``pz = 1`` and no parameters. Parameter layout: ``x`` has length
``n`` (one bias or scale per feature) for Bias and Scale.

``Cache.extra``: ``pre``, ``d1``, ``d2``.
"""

from __future__ import annotations

import numpy as np

from ._util import array_module as get_array_module
from ._util import check_forward, n_directions
from .activations import get_activation
from .layer import Cache, Layer

__all__ = ["Bias", "Elementwise", "Scale"]


def _diag(xp, d):
    """``(..., n) -> (..., n, n)`` diagonal matrices."""
    n = d.shape[-1]
    return d[..., :, None] * xp.eye(n, dtype=d.dtype)


def _diag_of(xp, T):
    """Diagonal ``(..., n)`` of ``(..., n, n)``."""
    return xp.diagonal(T, axis1=-2, axis2=-1)


class _Diagonal(Layer):
    """Shared machinery of the feature-wise layers (see the module docstring)."""

    bilinear = False  # ∂²t/∂z∂x = 1 (Scale) or 0

    def __init__(self, n: int, activation="tanh", params: bool = True):
        n = int(n)
        if n < 1:
            raise ValueError(f"{type(self).__name__}: size must be >= 1, got {n}")
        self.n_in = self.n_out = n
        self.n_params = n if params else 0
        self.act = get_activation(activation)
        self.name = self.describe()

    def describe(self) -> str:
        return f"{type(self).__name__} {self.n_in}->{self.n_out}, {self.act.name}"

    # hooks: pre-activation and its partial derivatives
    def _pre(self, z, x):
        raise NotImplementedError

    def _pz(self, cache):
        return 1.0

    def _px(self, cache):
        return 1.0

    def _dpre(self, cache, dz, dx):
        out = None
        if dz is not None:
            out = dz * self._pz(cache)
        if dx is not None and self.n_params:
            t = dx[:, None, :] * self._px(cache)
            out = t if out is None else out + t
        if out is None:  # only a (k, 0) parameter direction of a parameter-free layer
            xp = get_array_module(cache.z_prev)
            out = xp.zeros((dx.shape[0], *cache.z_prev.shape), dtype=cache.z_prev.dtype)
        return out

    def _back_pre(self, xp, cache, r):
        dz = r * self._pz(cache)
        if self.n_params:
            dx = (r * self._px(cache)).sum(axis=1)
        else:
            dx = xp.zeros((r.shape[0], 0), dtype=r.dtype)
        return dz, dx

    # -- the Layer interface -----------------------------------------------------
    def forward(self, z_prev, x, targets=None) -> Cache:
        check_forward(self, z_prev, x)
        pre = self._pre(z_prev, x)
        z, d1, d2 = self.act.derivs(pre)
        return Cache(z_prev, x, z, {"pre": pre, "d1": d1, "d2": d2})

    def jvp(self, cache, dz_prev, dx):
        n_directions(self, dz_prev, dx)
        return cache.extra["d1"] * self._dpre(cache, dz_prev, dx)

    def vjp(self, cache, b):
        return self._back_pre(get_array_module(b), cache, b * cache.extra["d1"])

    def hvp(self, cache, b, dz_prev, dx):
        n_directions(self, dz_prev, dx)
        xp = get_array_module(b)
        e = cache.extra
        hz, hx = self._back_pre(xp, cache, (b * e["d2"]) * self._dpre(cache, dz_prev, dx))
        if self.bilinear:
            g = b * e["d1"]
            if dx is not None:
                hz = hz + g * dx[:, None, :]
            if dz_prev is not None:
                hx = hx + (g * dz_prev).sum(axis=1)
        return hz, hx

    def jacobian_z(self, cache):
        xp = get_array_module(cache.z_prev)
        return _diag(xp, cache.extra["d1"] * self._pz(cache))

    def jacobian_x(self, cache):
        xp = get_array_module(cache.z_prev)
        d1 = cache.extra["d1"]
        if not self.n_params:
            return xp.zeros((*d1.shape, 0), dtype=d1.dtype)
        return _diag(xp, d1 * self._px(cache))

    def hessian_blocks(self, cache, b):
        xp = get_array_module(cache.z_prev)
        e = cache.extra
        z = cache.z_prev
        B, n = z.shape
        w = b * e["d2"]
        pz = self._pz(cache)
        Kzz = _diag(xp, w * pz * pz)
        if not self.n_params:
            return Kzz, xp.zeros((0, B, n), dtype=z.dtype), xp.zeros((0, 0), dtype=z.dtype)
        px = self._px(cache)
        Kxx = xp.diag((w * px * px).sum(axis=0))
        kxz = w * pz * px
        if self.bilinear:
            kxz = kxz + b * e["d1"]
        Kxz = kxz.T[:, :, None] * xp.eye(n, dtype=z.dtype)[:, None, :]  # (n, B, n)
        return Kzz, Kxz, Kxx

    def djac_z(self, cache, dz_prev, dx):
        """``d(∇_z f)[dz_prev, dx]``, ``(k, B, n, n)`` diagonal per sample (eq. 22)."""
        n_directions(self, dz_prev, dx)
        xp = get_array_module(cache.z_prev)
        e = cache.extra
        d = e["d2"] * self._dpre(cache, dz_prev, dx) * self._pz(cache)
        if self.bilinear and dx is not None:
            d = d + e["d1"] * dx[:, None, :]  # only Scale, which has parameters
        return _diag(xp, d)

    def djac_z_T(self, cache, T):
        """Adjoint of :meth:`djac_z`: ``T (k, B, n, n) -> (dz_prev, dx)``."""
        xp = get_array_module(T)
        e = cache.extra
        t = _diag_of(xp, T)
        dz, dx = self._back_pre(xp, cache, e["d2"] * t * self._pz(cache))
        if self.bilinear:
            dx = dx + (t * e["d1"]).sum(axis=1)
        return dz, dx

    def djac_x(self, cache, dz_prev, dx):
        """``d(∇_x f)[dz_prev, dx]``, ``(k, B, n, p)`` (eq. 12)."""
        k = n_directions(self, dz_prev, dx)
        xp = get_array_module(cache.z_prev)
        e = cache.extra
        if not self.n_params:
            return xp.zeros((k, *e["d1"].shape, 0), dtype=e["d1"].dtype)
        d = e["d2"] * self._dpre(cache, dz_prev, dx) * self._px(cache)
        if self.bilinear and dz_prev is not None:
            d = d + e["d1"] * dz_prev
        return _diag(xp, d)

    def djac_x_T(self, cache, T):
        """Adjoint of :meth:`djac_x`: ``T (k, B, n, p) -> (dz_prev, dx)``."""
        xp = get_array_module(T)
        e = cache.extra
        k = T.shape[0]
        if not self.n_params:
            return xp.zeros((k, *cache.z_prev.shape), dtype=T.dtype), xp.zeros(
                (k, 0), dtype=T.dtype
            )
        t = _diag_of(xp, T)
        dz, dx = self._back_pre(xp, cache, e["d2"] * t * self._px(cache))
        if self.bilinear:
            dz = dz + t * e["d1"]
        return dz, dx


class Bias(_Diagonal):
    """``z = σ(z_prev + x)``, one bias per feature (``n_params = n``).

    Forward: ``dz = d1 ⊙ (dz_prev + dx)``; adjoint: ``(b ⊙ d1, Σ_s b_s ⊙ d1_s)``.
    """

    def __init__(self, n: int, activation="tanh"):
        super().__init__(n, activation, params=True)

    def init_params(self, rng: np.random.Generator, dtype=np.float64) -> np.ndarray:
        return (0.5 * rng.standard_normal(self.n_params)).astype(dtype)

    def _pre(self, z, x):
        return z + x


class Scale(_Diagonal):
    """``z = σ(x ⊙ z_prev)``, one scale per feature (``n_params = n``).

    Forward: ``dz = d1 ⊙ (x ⊙ dz_prev + dx ⊙ z_prev)``; adjoint:
    ``(x ⊙ b ⊙ d1, Σ_s z_s ⊙ b_s ⊙ d1_s)``.
    """

    bilinear = True

    def __init__(self, n: int, activation="tanh"):
        super().__init__(n, activation, params=True)

    def init_params(self, rng: np.random.Generator, dtype=np.float64) -> np.ndarray:
        return (1.0 + 0.3 * rng.standard_normal(self.n_params)).astype(dtype)

    def _pre(self, z, x):
        return z * x

    def _pz(self, cache):
        return cache.x

    def _px(self, cache):
        return cache.z_prev


class Elementwise(_Diagonal):
    """``z = σ(z_prev)``, parameter-free (``n_params = 0``).

    Forward: ``dz = d1 ⊙ dz_prev``; adjoint: ``b ⊙ d1``.
    """

    def __init__(self, n: int, activation="tanh"):
        super().__init__(n, activation, params=False)

    def _pre(self, z, x):
        return z * 1  # a fresh array: the cache never aliases the caller's input
