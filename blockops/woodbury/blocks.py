r"""Per-layer blocks of the paper's inverse route (eqs. 25-43), scalar view, with checks.

This module computes, from a :class:`~blockops.network.Point`, the small dense
blocks out of which :mod:`blockops.woodbury` builds its operators, and
checks the route's validity conditions block by block (docs: derivation, "The
mathematics", items 1-4).

The scalar view
---------------
The paper's route needs ``z_L`` to be the *scalar* loss (the last block of
``M`` is ``1``). The pipeline's loss layer has ``B`` rows (per-sample shares
summed to ``z_L``), so here they are aggregated: ``∇_z f_L`` is the single row
``1 × (B n_{L-1})`` (the concatenation of the per-sample rows) and
``∇_x f_L`` is the column sum ``1 × p_L``. Every other layer keeps its batch
stacked into its activations: ``z_l`` has ``n_l = B a_l`` entries and
``∇_z f_l`` is the ``(B a_l) × (B a_{l-1})`` block-diagonal matrix of the
per-sample Jacobians (densified: the route inverts the square ``∇_x f_l`` of
the same size anyway).

Blocks (0-based layer ``k``; ``z_k`` is the output of layer ``k``; ``K`` are
the b-weighted Hessian blocks of :meth:`Layer.hessian_blocks`, ``λ`` the
damping):

* ``Jz[k] = ∇_z f_k`` (``n_k × n_{k-1}``), ``Jx[k] = ∇_x f_k`` (``n_k × p_k``);
* ``Q11[k] = K_zz[k+1] − I`` (``k < L−1``), ``Q11[L−1] = −1`` (eq. 30: nothing
  consumes ``z_L``); ``Q12`` has blocks ``(k, k+1) = K_zx[k+1]`` (eq. 31),
  ``Q21 = Q12ᵀ`` (eq. 32), ``Q22[k] = K_xx[k] + λI`` (eq. 33; the damping is
  folded in here exactly, because ``H + λI = A + Uᵀ Q_λ U`` with ``Q_λ`` the
  ``Q`` of eq. 27 whose ``Q22`` is shifted by ``λI``: the second block row of
  ``U`` is the identity);
* ``S_q[k] = Q11[k] − K_zx[k+1] Q22[k+1]⁻¹ K_xz[k+1]`` (eq. 34, block-diagonal);
* the blocks of ``S_H = Q⁻¹ + U A⁻¹ Uᵀ`` (eq. 35; eq. 36's sign corrected):
  ``S_H(z_k, z_k) = S_q[k]⁻¹ + I``, ``S_H(z_k, x_k) = ∇_x f_k⁻ᵀ``,
  ``S_H(z_k, x_{k+1}) = −S_q[k]⁻¹ K_zx[k+1] Q22[k+1]⁻¹ − ∇_z f_{k+1}ᵀ ∇_x f_{k+1}⁻ᵀ``,
  ``S_H(x_k, x_k) = Q̃22[k] + ∇_x f_k⁻¹ (I + ∇_z f_k ∇_z f_kᵀ) ∇_x f_k⁻ᵀ``,
  ``S_H(x_k, x_{k−1}) = −∇_x f_k⁻¹ ∇_z f_k ∇_x f_{k−1}⁻ᵀ``; all others zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._checks import SingularBlockError
from ..backend import get_array_module

__all__ = ["KKT_HINT", "RouteBlocks", "ScalarView", "route_blocks", "scalar_view"]

KKT_HINT = 'use inverse_hessian(..., method="kkt"), which handles this network'


@dataclass
class ScalarView:
    """Per-layer dense blocks of a linearised pipeline in the scalar view.

    Lists are indexed by the 0-based layer ``k``; entries that the route never
    uses (``Jz[0]``, ``Kzz[0]``, ``Kxz[0]``: the input ``z_0`` is fixed) are
    ``None``. ``names[k]`` is the pipeline's layer name (1-based, as in the paper).
    ``augmented`` says whether an auxiliary scalar ``s`` was appended to the
    loss layer (then ``n_user`` is the number of the user's parameters and
    ``s`` is the last parameter).
    """

    Jz: list
    Jx: list
    Kzz: list
    Kxz: list
    Kxx: list
    names: list
    augmented: bool
    n_user: int
    xp: Any
    dtype: Any

    @property
    def n_layers(self) -> int:
        return len(self.Jx)

    @property
    def z_sizes(self) -> list:
        return [int(J.shape[0]) for J in self.Jx]

    @property
    def x_sizes(self) -> list:
        return [int(J.shape[1]) for J in self.Jx]


def _blockdiag(xp, J3):
    """``(B, r, c)`` per-sample blocks -> dense ``(B r, B c)`` block-diagonal matrix."""
    B, r, c = J3.shape
    out = xp.zeros((B, r, B, c), dtype=J3.dtype)
    idx = xp.arange(B)
    out[idx, :, idx, :] = J3
    return out.reshape(B * r, B * c)


def scalar_view(point, augment: str | bool = "auto", s: float = 1.0) -> ScalarView:
    """Blocks of ``point`` in the scalar view (see the module docstring).

    Parameters
    ----------
    point : Point
        A linearised pipeline whose last layer is a loss.
    augment : "auto", True or False
        ``"auto"``/``True``: when the loss layer has no parameter, append the
        decoupled auxiliary scalar of
        :class:`~blockops.network.AuxiliaryScalarLoss` (``f_L = loss + s²/2``):
        ``∇_x f_L = [s]``, ``K_ss = 1``, ``K_sz = 0``. ``False``: never.
    s : float
        Value of the auxiliary scalar (nonzero).
    """
    layers, caches, bs = point.layers, point.caches, point.bs
    xp = get_array_module(caches[0].z)
    dt = caches[-1].z.dtype
    L = len(layers)
    if not getattr(layers[-1], "is_loss", False):
        raise ValueError("woodbury: the pipeline's last layer must be a loss (scalar z_L)")
    Jz, Jx, Kzz, Kxz, Kxx, names = [], [], [], [], [], []
    for k, (ly, c) in enumerate(zip(layers, caches)):
        B = c.z_prev.shape[0]
        names.append(getattr(ly, "name", f"layer {k + 1}"))
        jx = ly.jacobian_x(c)
        jz = ly.jacobian_z(c) if k else None
        if ly.is_loss:  # aggregate the B loss rows into the scalar z_L
            Jx.append(jx.sum(axis=0))
            Jz.append(None if jz is None else jz.reshape(1, -1))
        else:
            Jx.append(jx.reshape(-1, jx.shape[2]))
            Jz.append(None if jz is None else _blockdiag(xp, jz))
        kzz, kxz, kxx = ly.hessian_blocks(c, bs[k])
        Kxx.append(kxx)
        Kzz.append(_blockdiag(xp, kzz) if k else None)
        Kxz.append(kxz.reshape(kxz.shape[0], B * ly.n_in) if k else None)
    n_user = int(sum(J.shape[1] for J in Jx))
    augmented = False
    if augment and Jx[-1].shape[1] == 0:
        if not np.isfinite(s) or s == 0.0:
            raise ValueError(f"woodbury: the auxiliary scalar s must be nonzero, got {s}")
        Jx[-1] = xp.full((1, 1), s, dtype=dt)
        Kxx[-1] = xp.ones((1, 1), dtype=dt)
        if L > 1:
            Kxz[-1] = xp.zeros((1, Kzz[-1].shape[0]), dtype=dt)
        augmented = True
    return ScalarView(Jz, Jx, Kzz, Kxz, Kxx, names, augmented, n_user, xp, dt)


def _where_z(k: int, names: list) -> str:
    """Human description of the block of ``z_{k+1}`` (1-based, as in the paper)."""
    if k + 1 < len(names):
        return f"the block of z_{k + 1} (output of {names[k]}, input of {names[k + 1]})"
    return f"the block of z_{k + 1} = z_L (the scalar loss)"


def _inv_checked(xp, X, what: str, k: int, where: str, cond_max: float):
    """Explicit inverse of a small block and its 1-norm condition number; raise if singular."""
    n = X.shape[0]
    try:
        Xi = xp.linalg.solve(X, xp.eye(n, dtype=X.dtype)) if n else X.copy()
        finite = bool(xp.all(xp.isfinite(Xi)))
    except np.linalg.LinAlgError:
        Xi, finite = None, False
    if not finite:
        raise SingularBlockError(
            f"woodbury: {what} at {where} ({n}x{n}) is singular; {KKT_HINT}", layer=k + 1
        )
    c = float(xp.abs(X).sum(axis=0).max() * xp.abs(Xi).sum(axis=0).max()) if n else 1.0
    if not c < cond_max:
        raise SingularBlockError(
            f"woodbury: {what} at {where} ({n}x{n}) is numerically singular "
            f"(1-norm condition {c:.2e}); {KKT_HINT}",
            layer=k + 1,
        )
    return Xi, c


@dataclass
class RouteBlocks:
    """The dense blocks of the route and their 1-norm condition numbers (see module doc)."""

    view: ScalarView
    damping: float
    Jx_inv: list
    Q11: list
    Q22: list
    Q22_inv: list
    S_q: list
    S_q_inv: list
    SH11: list  # S_H(z_k, z_k) for every k (the printed S_H11, eq. 38, sign corrected)
    SH_zx: list  # S_H(z_k, x_k)
    SH_zx_next: list  # S_H(z_k, x_{k+1}), k < L-1
    SH_xx: list  # S_H(x_k, x_k)
    SH_xx_sub: list  # S_H(x_k, x_{k-1}), k >= 1 (entry 0 is None)
    cond: dict = field(default_factory=dict)


def route_blocks(view: ScalarView, damping: float = 0.0, cond_max: float | None = None):
    """Blocks of ``Q`` (eqs. 30-34) and ``S_H`` (eqs. 35-39, corrected), with checks.

    Raises :class:`~blockops.SingularBlockError` naming the condition and the
    layer when a ``∇_x f_l`` is not square or not invertible, or ``Q22`` or
    ``S_q`` has a singular block.
    """
    if cond_max is None:
        cond_max = 0.1 / np.finfo(view.dtype).eps
    Jx_inv, c_jx = _invert_jx(view, cond_max)
    Q22, Q22_inv = _q22(view, damping, cond_max)
    Q11, S_q, S_q_inv = _s_q(view, Q22_inv, cond_max)
    SH = _s_h(view, Jx_inv, Q22_inv, S_q_inv)
    xp = view.xp
    cond = {
        "Jx": c_jx,
        "Q22": _blockdiag_cond(xp, Q22, Q22_inv),
        "S_q": _blockdiag_cond(xp, S_q, S_q_inv),
    }
    return RouteBlocks(
        view, float(damping), Jx_inv, Q11, Q22, Q22_inv, S_q, S_q_inv, *SH, cond
    )  # fmt: skip


def _invert_jx(view, cond_max):
    """``∇_x f_l⁻¹`` for every layer (square and invertible, or a named error)."""
    xp, names, L = view.xp, view.names, view.n_layers
    Jx_inv, conds = [], []
    for k, J in enumerate(view.Jx):
        if J.shape[0] != J.shape[1]:
            hint = (
                " (the loss layer needs exactly one parameter: wrap it in "
                "AuxiliaryScalarLoss or let woodbury_inverse augment it)"
                if k == L - 1
                else " (parameters per layer must equal outputs per layer times the batch:"
                " bias-only or diagonal-scale layers with batch 1, or constant-width dense"
                " layers with a batch of width + 1 samples)"
            )
            raise SingularBlockError(
                f"woodbury: ∇_x f at {names[k]} is {J.shape[0]}x{J.shape[1]}, "
                f"not square, so A = Dxᵀ M⁻ᵀ M⁻¹ Dx is singular{hint}; {KKT_HINT}",
                layer=k + 1,
            )
        Ji, c = _inv_checked(xp, J, "∇_x f (a block of Dx)", k, names[k], cond_max)
        Jx_inv.append(Ji)
        conds.append(c)
    return Jx_inv, max(conds)


def _q22(view, damping, cond_max):
    """``Q22 = DD Dxx + λI`` per layer (eq. 33) and its inverse."""
    xp, dt = view.xp, view.dtype
    Q22, Q22_inv = [], []
    for k, K in enumerate(view.Kxx):
        Qk = K + damping * xp.eye(K.shape[0], dtype=dt) if damping else K
        Qi, _ = _inv_checked(xp, Qk, "Q22 = DD Dxx + λI (eq. 33)", k, view.names[k], cond_max)
        Q22.append(Qk)
        Q22_inv.append(Qi)
    return Q22, Q22_inv


def _s_q(view, Q22_inv, cond_max):
    """``Q11`` and ``S_q`` (eq. 34) per ``z_k`` and the inverse of ``S_q``."""
    xp, dt, L, Kzz, Kxz = view.xp, view.dtype, view.n_layers, view.Kzz, view.Kxz
    Q11, S_q, S_q_inv = [], [], []
    for k in range(L):
        eye = xp.eye(view.Jx[k].shape[0], dtype=dt)
        if k < L - 1:
            q11 = Kzz[k + 1] - eye
            sq = q11 - Kxz[k + 1].T @ (Q22_inv[k + 1] @ Kxz[k + 1])
        else:  # nothing consumes z_L: Q11 block is -1
            q11 = -eye
            sq = -eye
        what = "S_q (eq. 34)"
        if k == L - 2:
            what += " (the loss Hessian ∇²ℓ/B must not have the eigenvalue 1; MSELoss needs B ≥ 2)"
        Si, _ = _inv_checked(xp, sq, what, k, _where_z(k, view.names), cond_max)
        Q11.append(q11)
        S_q.append(sq)
        S_q_inv.append(Si)
    return Q11, S_q, S_q_inv


def _s_h(view, Jx_inv, Q22_inv, S_q_inv):
    """The blocks of ``S_H`` (eqs. 35-39, sign of eq. 36 corrected)."""
    xp, dt, L, Jz, Kxz = view.xp, view.dtype, view.n_layers, view.Jz, view.Kxz
    SH11, SH_zx, SH_zx_next, SH_xx, SH_xx_sub = [], [], [], [], [None]
    for k in range(L):
        eye = xp.eye(view.Jx[k].shape[0], dtype=dt)
        SH11.append(S_q_inv[k] + eye)
        SH_zx.append(Jx_inv[k].T)
        if k < L - 1:
            t = -S_q_inv[k] @ (Kxz[k + 1].T @ Q22_inv[k + 1])
            SH_zx_next.append(t - Jz[k + 1].T @ Jx_inv[k + 1].T)
        q22t = Q22_inv[k]
        mm = eye
        if k >= 1:
            w = Q22_inv[k] @ Kxz[k]
            q22t = q22t + w @ S_q_inv[k - 1] @ w.T
            mm = eye + Jz[k] @ Jz[k].T
            SH_xx_sub.append(-Jx_inv[k] @ Jz[k] @ Jx_inv[k - 1].T)
        SH_xx.append(q22t + Jx_inv[k] @ mm @ Jx_inv[k].T)
    return SH11, SH_zx, SH_zx_next, SH_xx, SH_xx_sub


def _blockdiag_cond(xp, blocks, inverses) -> float:
    """Exact 1-norm condition number of a block-diagonal matrix from its blocks' inverses."""
    n1 = max(float(xp.abs(b).sum(axis=0).max()) for b in blocks if b.size)
    n2 = max(float(xp.abs(b).sum(axis=0).max()) for b in inverses if b.size)
    return n1 * n2
