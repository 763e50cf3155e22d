r"""The Hessian as the paper writes it: eq. 24 literally, eq. 26 lifted, and the factory.

``literal_hessian``
    eq. 24 written as operator algebra of :func:`~blockops.hessian.parts.hessian_parts`,
    so that the code reads like the paper.
``lifted_hessian``
    eq. 26, ``Uᵀ K U`` with ``U = [M⁻¹ D_x; I]`` and ``K`` the 2×2 block of
    first- and second-derivative operators.
``literal_ggn``
    eq. 24 with only the loss layer's second-derivative blocks.

:func:`hessian` picks a form (the fused one of :mod:`blockops.hessian.fused`
by default), adds damping ``λ I``, and offers the generalized Gauss-Newton
matrix (``kind="ggn"``).
"""

from __future__ import annotations

import pylops
from pylops import LinearOperator

from .._checks import KINDS, check_choice, check_damping
from .fused import FusedHessian
from .parts import Layerwise, hessian_parts

__all__ = ["FORMS", "hessian", "lifted_hessian", "literal_ggn", "literal_hessian"]

FORMS = ("fused", "literal", "lifted")


def literal_hessian(point, parts=None) -> LinearOperator:
    r"""``H`` as the literal operator algebra of eq. 24.

    .. math::
        H = D_D D_{xx} + D_D D_{zx} P M^{-1} D_x + D_x^T M^{-T} P^T D_M D_{xz}
            + D_x^T M^{-T} P^T D_M D_{zz} P M^{-1} D_x

    Every product is a pylops operator chain; nothing is formed. It applies
    ``M⁻¹`` (and ``M^{-T}``) several times per product and moves vectors
    through the large ``vec ∇f`` spaces: use it to read and check eq. 24,
    and :class:`FusedHessian` to compute.
    """
    pr = hessian_parts(point) if parts is None else parts
    H = _eq24(pr, pr.Dxx, pr.Dxz, pr.Dzx, pr.Dzz)
    H.name = "H (eq. 24)"
    return H


def _eq24(pr, Dxx, Dxz, Dzx, Dzz) -> LinearOperator:
    """Eq. 24 with the given second-derivative blocks (all layers, or the loss only)."""
    Minv, P, Dx, DD, DM = pr.Minv, pr.P, pr.Dx, pr.DD, pr.DM  # M enters only inverted
    return (
        DD @ Dxx
        + DD @ Dzx @ P @ Minv @ Dx
        + Dx.H @ Minv.H @ P.H @ DM @ Dxz
        + Dx.H @ Minv.H @ P.H @ DM @ Dzz @ P @ Minv @ Dx
    )


def lifted_hessian(point, parts=None) -> LinearOperator:
    r"""``H = Uᵀ K U`` of eq. 26.

    .. math::
        U = \begin{bmatrix} M^{-1} D_x \\ I \end{bmatrix}, \qquad
        K = \begin{bmatrix} P^T D_M D_{zz} P & P^T D_M D_{xz} \\
                            D_D D_{zx} P & D_D D_{xx} \end{bmatrix}

    (the paper writes the left factor as ``U^T``; with ``U`` the tall
    ``(N_z + N_x) × N_x`` stack it is ``Uᵀ K U``).
    """
    pr = hessian_parts(point) if parts is None else parts
    Minv, P, Dx, DD, DM = pr.Minv, pr.P, pr.Dx, pr.DD, pr.DM
    Dxx, Dxz, Dzx, Dzz = pr.Dxx, pr.Dxz, pr.Dzx, pr.Dzz
    dtype = Dx.dtype
    U = pylops.VStack([Minv @ Dx, pylops.Identity(Dx.shape[1], dtype=dtype)], dtype=dtype)
    K = pylops.Block([[P.H @ DM @ Dzz @ P, P.H @ DM @ Dxz], [DD @ Dzx @ P, DD @ Dxx]], dtype=dtype)
    H = U.H @ K @ U
    H.name = "H (eq. 26)"
    return H


def literal_ggn(point, parts=None) -> LinearOperator:
    r"""Generalized Gauss-Newton matrix as operator algebra: eq. 24 with every
    second-derivative block kept only for the loss layer.

    .. math::
        G = D_D D_{xx}^{(L)} + D_D D_{zx}^{(L)} P M^{-1} D_x
            + D_x^T M^{-T} P^T D_M D_{xz}^{(L)}
            + D_x^T M^{-T} P^T D_M D_{zz}^{(L)} P M^{-1} D_x
          = \tilde J^T \nabla^2 \ell \, \tilde J ,

    with ``J̃ = ∂(z_{L-1}, x_L)/∂x`` and ``∇²ℓ`` the Hessian of the loss in its
    input and its own parameters (the built-in losses have none, so only
    ``D_zz^{(L)}`` remains and ``G = Jᵀ H_ℓ J``).
    """
    pr = hessian_parts(point) if parts is None else parts
    st = pr.structure
    L = len(st.layers)
    loss_only = [l == L - 1 for l in range(L)]
    Dxx, Dxz, Dzx, Dzz = (
        Layerwise(st, w, active=loss_only, name=f"D{w}(loss)") for w in ("xx", "xz", "zx", "zz")
    )
    G = _eq24(pr, Dxx, Dxz, Dzx, Dzz)
    G.name = "GGN (eq. 24, loss blocks)"
    return G


def hessian(point, damping: float = 0.0, form: str = "fused", kind: str = "hessian"):
    r"""The Hessian (or Gauss-Newton matrix) of the loss at ``point`` as a LinearOperator.

    Parameters
    ----------
    point : Point
        ``Pipeline.linearize(x, X, y)``.
    damping : float
        ``λ ≥ 0``: the operator is ``H + λ I``.
    form : {"fused", "literal", "lifted"}
        ``"fused"`` (default): :class:`FusedHessian`, Pearlmutter's sweeps.
        ``"literal"``: eq. 24 (:func:`literal_hessian`). ``"lifted"``: eq. 26
        (:func:`lifted_hessian`). All three are the same matrix.
    kind : {"hessian", "ggn"}
        Exact Hessian or generalized Gauss-Newton ``Jᵀ H_ℓ J`` (positive
        semi-definite for convex losses; ``form="lifted"`` is not offered).

    Returns
    -------
    pylops.LinearOperator
        Shape ``(n_params, n_params)``, dtype of the parameters.
    """
    check_choice("hessian", "form", form, FORMS)
    check_choice("hessian", "kind", kind, KINDS)
    if form == "fused":
        return FusedHessian(point, damping=damping, kind=kind)
    damping = check_damping("hessian", damping)
    if kind == "ggn":
        if form == "lifted":
            raise ValueError("hessian: kind='ggn' is offered with form='fused' or 'literal'")
        H = literal_ggn(point)
    else:
        H = literal_hessian(point) if form == "literal" else lifted_hessian(point)
    if damping:
        H = H + damping * pylops.Identity(H.shape[0], dtype=H.dtype)
    return H
