r"""Selected inversion: the diagonal and diagonal blocks of ``(H + λI)⁻¹``.

From the stagewise factorisation (:mod:`blockops.inverse.stagewise`) one
forward sweep gives every diagonal block of the inverse (a Takahashi /
RTS-smoother recursion): with ``Π_0 = 0``

.. math::

    [(H + λI)^{-1}]_{ll} = Q_{uu,l}^{-1} + X_l Π_{l-1} X_l^T,\qquad
    Π_l = Ψ_l Π_{l-1} Ψ_l^T + B_l Q_{uu,l}^{-1} B_l^T,

where ``X = Q_uu⁻¹ Q_us`` is the stage gain, ``Ψ = A − B X`` the closed-loop
transition and ``−Π_l`` the map from the linear term ``v_l`` of the backward
solve to the state ``s_l`` of the forward solve. (Derivation: a right-hand
side on layer ``l`` alone leaves ``v = 0`` above ``l``; at ``l`` the backward
step gives ``κ = −Q_uu⁻¹ g`` and ``v_{l-1} = Xᵀ g``; the layers below return
``s_{l-1} = −Π_{l-1} v_{l-1}``; the forward step gives
``u_l = −X s_{l-1} − κ``.) ``Π`` lives on the states ``dz`` (``B n_l``
square), so the cost is that of about one factorisation, not ``n`` solves.

Each stage answers ``selected_inverse(Π, blocks)`` when it has a structured
formula (the dense segment: :mod:`blockops.network.dense_selected`); any
other stage is probed through its own ``backward`` / ``forward`` steps with
identity right-hand sides (``p`` columns for the block, ``n_out`` for ``Π``).
"""

from __future__ import annotations

from ..backend import blas_threads
from ..singular import SingularBlockError
from .stagewise import StagewiseFactor, stages_from_point

__all__ = ["inverse_diagonal", "inverse_diagonal_blocks", "probe_selected"]

_PROBE_MAX = 8192  # columns a probed stage may need (its p); beyond that refuse


def probe_selected(stage, Pi, blocks=False):
    """Diagonal (``blocks``: the ``(p, p)`` block) of the inverse on ``stage``, and ``Π`` out.

    Generic: uses only the stage's ``backward`` / ``forward`` steps, with
    ``g = I_p`` for the block and ``v = I_{n_out}``, ``g = 0`` for ``Π``.
    """
    xp, p, m = stage.xp, stage.p, stage.n_out
    if p > _PROBE_MAX:
        raise ValueError(
            f"selected inversion: a stage of {p} parameters has no structured formula and is "
            f"too large to probe (limit {_PROBE_MAX}); give its class a selected_inverse method"
        )
    dt = _dtype(stage)
    out = xp.zeros((p, p) if blocks else (p,), dt)
    if p:
        v_in, ctx = stage.backward(None, xp.eye(p, dtype=dt))
        D, _ = stage.forward(None if Pi is None else -(Pi @ v_in), ctx)
        out = 0.5 * (D + D.T) if blocks else xp.diagonal(D).copy()
    v_in, ctx = stage.backward(xp.eye(m, dtype=dt), xp.zeros((p, m), dt))
    _, s_out = stage.forward(None if Pi is None else -(Pi @ v_in), ctx)
    return ([out] if blocks else out), -0.5 * (s_out + s_out.T)


def _dtype(stage):
    for name in ("A", "W", "Bx"):
        if hasattr(stage, name):
            return getattr(stage, name).dtype
    return stage.dtype


def _sweep(fac, blocks):
    out, Pi = [], None
    for st in fac.stages:
        own = getattr(st, "selected_inverse", None)
        part, Pi = own(Pi, blocks) if own is not None else probe_selected(st, Pi, blocks)
        out.append(part)
    return out


def _stagewise(Hinv):
    """A stagewise factor of ``H + λI`` in the point's precision (the operator's, if it is one)."""
    dt = Hinv.point.dtype
    fac = Hinv._factor
    if isinstance(fac, StagewiseFactor) and Hinv.work_dtype == dt:
        return fac
    point = Hinv._working_point(dt)
    try:
        return StagewiseFactor(stages_from_point(point, Hinv.damping))
    except SingularBlockError:
        pass
    try:  # explicit stages pivot each Q_uu by Bunch-Kaufman
        return StagewiseFactor(stages_from_point(point, Hinv.damping, False))
    except SingularBlockError as err:
        raise SingularBlockError(
            "selected inversion needs the stagewise factorisation, and a stage pivot of "
            f"H + damping*I is singular ({err}); add damping.",
            layer=err.layer,
        ) from None


def inverse_diagonal(Hinv):
    r"""``diag((H + λI)⁻¹)`` exactly, by selected inversion (about one factorisation).

    Parameters
    ----------
    Hinv : InverseHessian
        The factored inverse (Hessian or GGN, any damping or shift).

    Returns
    -------
    d : array (n,)
        On the point's backend, in the point's dtype. E.g. the posterior
        variances of a Laplace approximation, ``tr((H + λI)⁻¹) = Σ d``.
    """
    with blas_threads(Hinv.threads):
        parts = _sweep(_stagewise(Hinv), blocks=False)
    return Hinv.xp.concatenate(parts)


def inverse_diagonal_blocks(Hinv):
    r"""The diagonal blocks ``[(H + λI)⁻¹]_{ll}``, one ``(p_l, p_l)`` array per layer.

    Parameter-free layers give ``(0, 0)`` arrays. A structured stage of a
    layer type without its own ``selected_inverse`` gives one block for the
    layers it covers.
    """
    with blas_threads(Hinv.threads):
        parts = _sweep(_stagewise(Hinv), blocks=True)
    return [b for part in parts for b in part]
