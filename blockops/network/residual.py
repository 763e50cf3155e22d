r"""Residual block ``z = z_prev + h σ(z_prev Wᵀ + c)`` (ResNet / explicit Euler step of an ODE).

Parameters as :class:`~blockops.network.Dense` (``x = concat(W.ravel(), c)``,
``W`` of shape ``(n, n)``). Since the identity part is linear:

* ``∇_z f = I + h ∇_z g`` and ``∇_x f = h ∇_x g`` with ``g`` the dense map;
* every second-order piece is ``h`` times the dense one, i.e. the dense
  b-weighted blocks at weighting ``h b`` (eqs. 12, 22).

``Cache.extra``: as Dense (``W``, ``c``, ``pre``, ``d1``, ``d2``) plus ``h``.
"""

from __future__ import annotations

import numpy as np

from ._util import array_module as get_array_module
from .dense import Dense
from .layer import Cache

__all__ = ["Residual"]


class Residual(Dense):
    """``z = z_prev + h σ(z_prev Wᵀ + c)`` with ``W`` square ``(n, n)``.

    Forward: ``dz = dz_prev + h d1 ⊙ (dz_prev Wᵀ + z_prev dWᵀ + dc)``.
    Adjoint: ``b ∇_z f = b + h (b ⊙ d1) W``, ``b ∇_x f = h ·`` (dense adjoint).
    """

    def __init__(self, n: int, activation="tanh", h: float = 1.0):
        self.h = float(h)
        super().__init__(n, n, activation)

    def describe(self) -> str:
        return f"Residual {self.n_in}->{self.n_out}, {self.act.name}, h={self.h:g}"

    def init_params(self, rng: np.random.Generator, dtype=np.float64) -> np.ndarray:
        return super().init_params(rng, dtype)

    def forward(self, z_prev, x, targets=None) -> Cache:
        cache = super().forward(z_prev, x)
        cache.extra["h"] = self.h
        cache.z = z_prev + self.h * cache.z
        return cache

    # jvp and hvp are Dense's: they check the inputs and call the two methods below

    def jvp_keep(self, cache, dz_prev, dx):
        dz, dpre = super().jvp_keep(cache, dz_prev, dx)
        dz *= self.h
        if dz_prev is not None:
            dz += dz_prev
        return dz, dpre

    def vjp(self, cache, b):
        bz, bx = super().vjp(cache, self.h * b)
        return bz + b, bx

    def hvp_vjp(self, cache, b, dz_prev, dx, bprime=None, dpre=None, out=None):
        hb = None if bprime is None else self.h * bprime
        hz, hx = super().hvp_vjp(cache, self.h * b, dz_prev, dx, hb, dpre, out)
        if bprime is not None:
            hz += bprime
        return hz, hx

    def jacobian_z(self, cache):
        xp = get_array_module(cache.z_prev)
        return self.h * super().jacobian_z(cache) + xp.eye(self.n_in, dtype=cache.z_prev.dtype)

    def jacobian_x(self, cache):
        return self.h * super().jacobian_x(cache)

    def hessian_blocks(self, cache, b):
        return super().hessian_blocks(cache, self.h * b)

    def djac_x(self, cache, dz_prev, dx):
        return self.h * super().djac_x(cache, dz_prev, dx)

    def djac_x_T(self, cache, T):
        return super().djac_x_T(cache, self.h * T)

    def djac_z(self, cache, dz_prev, dx):
        return self.h * super().djac_z(cache, dz_prev, dx)

    def djac_z_T(self, cache, T):
        return super().djac_z_T(cache, self.h * T)
