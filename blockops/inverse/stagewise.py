r"""Stagewise (Riccati) factorisation of ``H + λI`` for a layered pipeline.

The lifted system (docs: derivation, "The general exact route") is the
stationarity condition of a linear-quadratic control problem: layer ``l``
has state ``s = dz_{l-1}`` (``B n_{l-1}`` entries, ``dz_0 = 0``), control
``u = dx_l`` (``p_l`` entries) and dynamics

.. math:: dz_l = A_l\, dz_{l-1} + B_l\, dx_l,

``A_l = ∇_z f_l`` (block-diagonal over samples) and ``B_l = ∇_x f_l``; the
stage cost is ``½ [s; u]ᵀ K_l [s; u] + ½ λ |u|² − g_lᵀ u`` with ``K_l`` the
four blocks of eq. 24 for layer ``l`` (``K_zz = DM Dzz``, ``K_zx = DM Dxz``,
``K_xz = DD Dzx``, ``K_xx = DD Dxx``). The backward sweep (``V_L = 0``)

.. math::

    Q_{ss} = K_{zz} + A^T V A,\quad Q_{us} = K_{xz} + B^T V A,\quad
    Q_{uu} = K_{xx} + λI + B^T V B,\\
    V_{l-1} = Q_{ss} - Q_{us}^T Q_{uu}^{-1} Q_{us}

is block Gaussian elimination of ``H + λI`` in the order ``x_L, …, x_1``;
the pivots are the ``Q_uu``, so by Haynsworth's inertia additivity
``inertia(H + λI) = Σ_l inertia(Q_uu,l)`` and
``log|det(H + λI)| = Σ_l log|det Q_uu,l|``. A right-hand side ``g`` is then
solved by one backward sweep for the linear terms
``v_{l-1} = A^T v - Q_{us}^T Q_{uu}^{-1}(B^T v - g_l)`` and one forward sweep
``u_l = -Q_{uu}^{-1}(Q_{us} s + B^T v_l - g_l)``, ``s_l = A s + B u``.

The sweep pivots only inside a stage, so a singular ``Q_uu`` (e.g. an
undamped dense layer with fewer samples than inputs) stops it with
:class:`~blockops.SingularBlockError`; the pivoted banded route of
:mod:`blockops.inverse.banded_kkt` handles those cases.

This module holds the driver (:class:`StagewiseFactor`) and the generic
stage (:class:`ExplicitStage`, explicit blocks, any layer type). Layers
register structured stages beside themselves (``Layer.stage_key`` /
``Layer.structured_stages``; the dense layer's is
:mod:`blockops.network.dense_stage`).

Backends: a stage pivot is factored by the backend's symmetric-indefinite
kernel (:func:`blockops.backend.factor_symmetric`: LAPACK Bunch-Kaufman on
the host, LU plus ``eigvalsh`` elsewhere) and judged singular by the one
criterion of :mod:`blockops.singular` on its reciprocal condition number.
That test is one device-to-host scalar per stage during the factorisation;
solves never leave the device.
"""

from __future__ import annotations

import numpy as np

from .._checks import layer_dampings
from ..backend import factor_symmetric, get_array_module
from ..singular import SingularBlockError, damping_hint, singular_pivots
from ..singular import upper_first as _upper_first

__all__ = ["ExplicitStage", "StagewiseFactor", "factor_stage_pivot", "stages_from_point"]


def _singular(name: str, index: int, detail: str, damping, dtype) -> SingularBlockError:
    return SingularBlockError(
        f"stagewise factorisation: the stage pivot Q_uu of {name} is {detail}; "
        "H + damping*I is singular or nearly so in the stagewise ordering. "
        f"{_upper_first(damping_hint(damping, dtype))}, or use method='kkt' (pivoted banded LU).",
        layer=index,
    )


def factor_stage_pivot(Q, name: str, index: int, damping: float = 0.0):
    """Factor a symmetric stage pivot ``Q_uu`` (backend kernel) or raise naming the layer."""
    fac = factor_symmetric(Q)
    rcond = fac.rcond
    if rcond == 0 or not np.isfinite(rcond):
        raise _singular(name, index, "exactly singular", damping, Q.dtype)
    if singular_pivots(rcond, 1.0, Q.dtype):
        detail = f"numerically singular (reciprocal condition {rcond:.1e})"
        raise _singular(name, index, detail, damping, Q.dtype)
    return fac


def _bd_left_T(A, X):
    """``blockdiag(A)ᵀ X`` for ``A`` (B, n, n_prev) and ``X`` (B*n, c)."""
    B, n, n_prev = A.shape
    return (A.transpose(0, 2, 1) @ X.reshape(B, n, -1)).reshape(B * n_prev, -1)


def _bd_right(X, A):
    """``X blockdiag(A)`` for ``X`` (r, B*n) and ``A`` (B, n, n_prev)."""
    B, n, n_prev = A.shape
    r = X.shape[0]
    Xt = X.reshape(r, B, n).transpose(1, 0, 2)  # (B, r, n)
    return (Xt @ A).transpose(1, 0, 2).reshape(r, B * n_prev)


class ExplicitStage:
    """One layer of the sweep with explicit blocks (any layer type).

    Parameters
    ----------
    A : ndarray (B, n, n_prev)
        ``∇_z f_l`` per sample.
    Bx : ndarray (B*n, p)
        ``∇_x f_l``, sample-major rows.
    Kzz : ndarray (B, n_prev, n_prev)
        ``DM Dzz`` block of layer ``l`` (block-diagonal over samples).
    Kxz : ndarray (p, B*n_prev)
        ``DD Dzx`` block (``K_zx = K_xzᵀ``).
    Kxx : ndarray (p, p)
        ``DD Dxx`` block, without damping.
    damping : float
        ``λ`` added to ``K_xx``.
    index : int
        1-based layer index (messages).
    name : str
        Layer name (messages).
    """

    def __init__(self, A, Bx, Kzz, Kxz, Kxx, damping, index, name):
        self.A, self.Bx, self.Kzz, self.Kxz, self.Kxx = A, Bx, Kzz, Kxz, Kxx
        self.damping, self.index, self.name = float(damping), index, name
        B, n, n_prev = A.shape
        self.n_in, self.n_out, self.p = B * n_prev, B * n, Bx.shape[1]
        self.nlayers = 1
        self.xp = get_array_module(A, Bx, Kzz, Kxz, Kxx)

    def __getstate__(self):
        """Pickle without the array module (a module does not pickle)."""
        return {k: v for k, v in self.__dict__.items() if k != "xp"}

    def __setstate__(self, state):
        """Restore a pickled stage; its array module is that of its arrays, as in ``__init__``."""
        self.__dict__.update(state)
        self.xp = get_array_module(self.A, self.Bx, self.Kzz, self.Kxz, self.Kxx)

    @property
    def inertia(self):
        """Inertia of the stage pivot ``Q_uu`` (Sylvester's law)."""
        return self.pivot.inertia

    @property
    def logdet(self):
        """``log|det Q_uu|``."""
        return self.pivot.logdet

    def factor(self, V):
        """One backward Riccati step: store the pivot, return ``V_{l-1}``."""
        xp, A, Bx = self.xp, self.A, self.Bx
        B, n_prev = A.shape[0], A.shape[2]
        Qss = xp.zeros((self.n_in, self.n_in), A.dtype)
        for s in range(B):  # block-diagonal K_zz
            sl = slice(s * n_prev, (s + 1) * n_prev)
            Qss[sl, sl] = self.Kzz[s]
        Quu = self.Kxx + self.damping * xp.eye(self.p, dtype=A.dtype)
        Qus = self.Kxz.copy()
        if V is not None:
            VA = _bd_right(V, A)  # (B n, B n_prev)
            Qss += _bd_left_T(A, VA)
            Qus += Bx.T @ VA
            Quu += Bx.T @ (V @ Bx)
        Quu = 0.5 * (Quu + Quu.T)
        self.pivot = factor_stage_pivot(Quu, self.name, self.index, self.damping)
        if self.p:
            self.X = self.pivot.solve(Qus)  # gain Q_uu^-1 Q_us
            Vp = Qss - Qus.T @ self.X
        else:
            self.X = xp.zeros((0, self.n_in), A.dtype)
            Vp = Qss
        return 0.5 * (Vp + Vp.T)  # symmetrise: 40x better residual (docs: numerics)

    def backward(self, v, g):
        """Linear-term step: ``v_{l-1}`` and ``κ = Q_uu^{-1} q_u`` for ``g`` (p, k)."""
        qu = -g if v is None else self.Bx.T @ v - g
        if self.p:
            kappa = self.pivot.solve(qu)
        else:
            kappa = qu
        vp = -(self.X.T @ qu)
        if v is not None:
            vp += _bd_left_T(self.A, v)
        return vp, kappa

    def forward(self, s, kappa):
        """``u_l = -X s - κ`` and ``s_l = A s + B u``; ``s`` may be None (zero)."""
        u = -kappa if s is None else -(self.X @ s) - kappa
        snext = self.Bx @ u
        if s is not None:
            B, n, n_prev = self.A.shape
            snext += (self.A @ s.reshape(B, n_prev, -1)).reshape(B * n, -1)
        return u, snext


class StagewiseFactor:
    """Factor ``H + λI`` once by the backward sweep; solve many right-hand sides.

    Parameters
    ----------
    stages : list
        Stage objects in layer order (:class:`ExplicitStage` or the
        structured stages layers register), each covering ``nlayers``
        consecutive layers and following
        :class:`~blockops.network.layer.InverseStage`.
    """

    def __init__(self, stages):
        self.stages = list(stages)
        self.sizes = [st.p for st in self.stages]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int)
        self.n = int(self.offsets[-1])
        V = None
        for st in reversed(self.stages):
            V = st.factor(V)

    @property
    def inertia(self):
        neg = zero = pos = 0
        for st in self.stages:
            a, b, c = st.inertia
            neg, zero, pos = neg + a, zero + b, pos + c
        return (neg, zero, pos)

    @property
    def logdet(self):
        return float(sum(st.logdet for st in self.stages))

    def solve(self, G):
        """``(H + λI)^{-1} G`` for ``G`` of shape (n, k)."""
        off = self.offsets
        kappas = [None] * len(self.stages)
        v = None
        for j in range(len(self.stages) - 1, -1, -1):
            v, kappas[j] = self.stages[j].backward(v, G[off[j] : off[j + 1]])
        X = get_array_module(G).empty_like(G)
        s = None
        for j, st in enumerate(self.stages):
            X[off[j] : off[j + 1]], s = st.forward(s, kappas[j])
        return X


def explicit_stage(layer, cache, b, damping, index):
    """An :class:`ExplicitStage` from a layer's explicit blocks (eq. 24 pieces)."""
    A = layer.jacobian_z(cache)
    Bn, n_out, p = A.shape[0], A.shape[1], layer.n_params
    Bx = layer.jacobian_x(cache).reshape(Bn * n_out, p)
    Kzz, Kxz, Kxx = layer.hessian_blocks(cache, b)
    Kxz = Kxz.reshape(p, Bn * layer.n_in)
    return ExplicitStage(A, Bx, Kzz, Kxz, Kxx.reshape(p, p), damping, index, layer.name)


def stages_from_point(point, damping, structured=True):
    """Stage list for :class:`StagewiseFactor`.

    ``damping`` is a float or one ``λ_l`` per layer (any sign: a negative one
    is a shift ``H − σI``).

    Consecutive layers with one non-``None`` ``stage_key`` get the structured
    stages their class registers (``Layer.structured_stages``); every other
    layer an :class:`ExplicitStage`. ``structured=False`` makes every stage
    explicit (pivoted inside each stage: used for the inertia of hard cases).
    """
    layers, caches, bs = point.layers, point.caches, point.bs
    stages, j, L = [], 0, len(layers)
    lams = layer_dampings(damping, L)
    while j < L:
        key = layers[j].stage_key() if structured else None
        if key is None:
            stages.append(explicit_stage(layers[j], caches[j], bs[j], lams[j], j + 1))
            j += 1
            continue
        e = j + 1  # a structured run shares one damping (a per-layer prior splits it)
        while e < L and layers[e].stage_key() == key and lams[e] == lams[j]:
            e += 1
        build = type(layers[j]).structured_stages
        stages += build(layers[j:e], caches[j:e], bs[j:e], lams[j], j + 1)
        j = e
    return stages
