r"""A loss with a decoupled auxiliary scalar: ``f_L = loss(z_{L-1}) + s²/2``.

The paper's inverse route (eqs. 25-43, see :mod:`blockops.woodbury`)
needs every ``∇_x f_l`` square and invertible, the loss layer included: the
scalar loss must then have exactly one parameter. A plain loss has none.
:class:`AuxiliaryScalarLoss` adds one, ``s``, that enters only through
``s²/2``:

* ``∇_x f_L = s`` (a ``1 × 1`` block in the scalar view, invertible iff
  ``s ≠ 0``);
* its Hessian block is ``b_L · 1 = 1`` and it is decoupled from every other
  parameter and from ``z_{L-1}``, so the augmented Hessian is
  ``H_aug = [[H, 0], [0, 1]]`` (and ``H_aug + λI = [[H + λI, 0], [0, 1 + λ]]``).

Hence the user's ``H⁻¹ g`` is the leading part of ``H_aug⁻¹ [g; 0]``, and
the loss value and gradient of the original network are unchanged up to the
constant ``s²/2`` and the extra gradient entry ``s``.

Conventions (see :mod:`blockops.network.layer`): the output has ``B`` rows,
row ``r`` being sample ``r``'s share of the scalar loss; the ``s²/2`` term is
put on row 0 only, so the column sum is ``loss + s²/2``. Parameter layout:
``x = concat(x_loss, [s])`` (``s`` last).
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ._util import check_forward, n_directions
from .layer import Cache, Layer
from .losses import Loss

__all__ = ["AuxiliaryScalarLoss"]


class AuxiliaryScalarLoss(Loss):
    r"""Wrap a loss layer into ``f_L = loss + s²/2`` with one extra parameter ``s``.

    Parameters
    ----------
    loss : Layer
        A loss layer (``is_loss`` true, ``n_out == 1``), e.g.
        :class:`~blockops.network.MSELoss`.
    s0 : float, optional
        Value of ``s`` returned by :meth:`init_params` (default ``1``; must be
        nonzero for the Woodbury route).

    Notes
    -----
    It subclasses :class:`~blockops.network.Loss` only so that a
    :class:`~blockops.network.Pipeline` binds its input size; every method is
    its own and delegates to the wrapped loss.

    Forward (eq. 53): ``dz_L = dloss(dz_{L-1}, dx_loss) + s ds`` (on row 0).
    Adjoint (eqs. 4-5): ``b ∇_x f = [b ∇_x loss, b_0 s]``. Second order: the
    only new entry of the b-weighted Hessian is ``K_ss = b_0`` (``= 1`` for
    the loss layer, ``b_L = 1``); ``K_sz = 0`` and ``K_s,x_loss = 0``.
    """

    is_loss = True
    n_out = 1

    def __init__(self, loss: Layer, s0: float = 1.0):
        if not getattr(loss, "is_loss", False) or getattr(loss, "n_out", None) != 1:
            raise TypeError(
                f"AuxiliaryScalarLoss: expected a loss layer (is_loss, n_out == 1), "
                f"got {type(loss).__name__}"
            )
        if not np.isfinite(s0) or s0 == 0.0:
            raise ValueError(f"AuxiliaryScalarLoss: s0 must be finite and nonzero, got {s0}")
        self.loss = loss
        self.s0 = float(s0)
        self.name = self.describe()

    # -- sizes follow the wrapped loss --------------------------------------------
    @property
    def n_in(self):
        return self.loss.n_in

    @n_in.setter
    def n_in(self, value):
        self.loss.n_in = value

    @property
    def n_params(self) -> int:
        return int(self.loss.n_params) + 1

    def bind(self, n_in: int) -> None:
        """Set the input size (called by the pipeline)."""
        if hasattr(self.loss, "bind"):
            self.loss.bind(n_in)
        else:
            self.loss.n_in = int(n_in)

    def describe(self) -> str:
        return f"AuxiliaryScalarLoss({self.loss.describe()} + s²/2)"

    def init_params(self, rng: np.random.Generator, dtype=np.float64) -> np.ndarray:
        inner = self.loss.init_params(rng, dtype=dtype)
        return np.concatenate([inner, np.array([self.s0], dtype=dtype)])

    # -- helpers --------------------------------------------------------------------
    def _split(self, dx):
        """``dx (k, p+1) -> (dx_loss or None, ds (k,))``."""
        if dx is None:
            return None, None
        inner = dx[:, :-1] if self.loss.n_params else None
        return inner, dx[:, -1]

    # -- zeroth and first order -------------------------------------------------------
    def forward(self, z_prev, x, targets=None) -> Cache:
        check_forward(self, z_prev, x)
        s = x[-1]
        inner = self.loss.forward(z_prev, x[:-1], targets)
        z = inner.z.copy()  # never mutate the wrapped loss's cache
        z[0, 0] = z[0, 0] + 0.5 * s * s
        return Cache(z_prev, x, z, {"inner": inner, "s": s})

    def jvp(self, cache, dz_prev, dx):
        k = n_directions(self, dz_prev, dx)
        xp = get_array_module(cache.z_prev)
        dxi, ds = self._split(dx)
        if dz_prev is None and dxi is None:
            out = xp.zeros((k, cache.z_prev.shape[0], 1), dtype=cache.z.dtype)
        else:
            out = self.loss.jvp(cache.extra["inner"], dz_prev, dxi).copy()
        if ds is not None:
            out[:, 0, 0] += cache.extra["s"] * ds
        return out

    def vjp(self, cache, b):
        xp = get_array_module(b)
        bz, bxi = self.loss.vjp(cache.extra["inner"], b)
        bs = (b[:, 0, 0] * cache.extra["s"])[:, None]
        return bz, xp.concatenate([bxi, bs.astype(bxi.dtype)], axis=1)

    # -- second order ---------------------------------------------------------------------
    def hvp(self, cache, b, dz_prev, dx):
        k = n_directions(self, dz_prev, dx)
        xp = get_array_module(b)
        z = cache.z_prev
        dxi, ds = self._split(dx)
        if dz_prev is None and dxi is None:
            hz = xp.zeros((k, *z.shape), dtype=z.dtype)
            hxi = xp.zeros((k, self.loss.n_params), dtype=z.dtype)
        else:
            hz, hxi = self.loss.hvp(cache.extra["inner"], b, dz_prev, dxi)
        hs = xp.zeros((k, 1), dtype=z.dtype) if ds is None else (b[0, 0] * ds)[:, None]
        return hz, xp.concatenate([hxi, hs.astype(z.dtype)], axis=1)

    def jacobian_z(self, cache):
        return self.loss.jacobian_z(cache.extra["inner"])

    def jacobian_x(self, cache):
        xp = get_array_module(cache.z_prev)
        Ji = self.loss.jacobian_x(cache.extra["inner"])
        col = xp.zeros((*Ji.shape[:2], 1), dtype=Ji.dtype)
        col[0, 0, 0] = cache.extra["s"]
        return xp.concatenate([Ji, col], axis=2)

    def hessian_blocks(self, cache, b):
        xp = get_array_module(cache.z_prev)
        Kzz, Kxz, Kxx = self.loss.hessian_blocks(cache.extra["inner"], b)
        p = self.n_params
        Kxz2 = xp.concatenate([Kxz, xp.zeros((1, *Kxz.shape[1:]), dtype=Kxz.dtype)], axis=0)
        Kxx2 = xp.zeros((p, p), dtype=Kxx.dtype)
        Kxx2[: p - 1, : p - 1] = Kxx
        Kxx2[p - 1, p - 1] = b[0, 0]
        return Kzz, Kxz2, Kxx2

    # -- un-contracted second derivatives (literal eq. 24) ---------------------------------
    def djac_x(self, cache, dz_prev, dx):
        k = n_directions(self, dz_prev, dx)
        xp = get_array_module(cache.z_prev)
        dxi, ds = self._split(dx)
        B = cache.z_prev.shape[0]
        out = xp.zeros((k, B, 1, self.n_params), dtype=cache.z_prev.dtype)
        if dz_prev is not None or dxi is not None:
            out[..., :-1] = self.loss.djac_x(cache.extra["inner"], dz_prev, dxi)
        if ds is not None:
            out[:, 0, 0, -1] = ds  # ∂(∇_s f)/∂s = 1 on row 0
        return out

    def djac_x_T(self, cache, T):
        xp = get_array_module(T)
        dz, dxi = self.loss.djac_x_T(cache.extra["inner"], T[..., :-1])
        return dz, xp.concatenate([dxi, T[:, 0, 0, -1][:, None]], axis=1)

    def djac_z(self, cache, dz_prev, dx):
        k = n_directions(self, dz_prev, dx)
        xp = get_array_module(cache.z_prev)
        dxi, _ = self._split(dx)
        if dz_prev is None and dxi is None:
            z = cache.z_prev
            return xp.zeros((k, z.shape[0], 1, z.shape[1]), dtype=z.dtype)
        return self.loss.djac_z(cache.extra["inner"], dz_prev, dxi)

    def djac_z_T(self, cache, T):
        xp = get_array_module(T)
        dz, dxi = self.loss.djac_z_T(cache.extra["inner"], T)
        return dz, xp.concatenate([dxi, xp.zeros((T.shape[0], 1), dtype=T.dtype)], axis=1)
