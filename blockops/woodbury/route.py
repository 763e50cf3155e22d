r"""``H⁻¹`` by the paper's own route (eqs. 25-43), corrected, as composable operators.

Rahimi (2025) lifts the Hessian (eq. 24) to ``H = A + Uᵀ Q U`` (eq. 27) with

.. math::
    A = D_x^T M^{-T} M^{-1} D_x, \qquad
    U = \begin{bmatrix} M^{-1} D_x \\ I \end{bmatrix}, \qquad
    Q = \begin{bmatrix} P^T D_M D_{zz} P - I & P^T D_M D_{xz} \\
                        D_D D_{zx} P & D_D D_{xx} \end{bmatrix},

and inverts it by Woodbury (eq. 28),
``H⁻¹ = A⁻¹ − A⁻¹ Uᵀ S_H⁻¹ U A⁻¹`` with ``S_H = Q⁻¹ + U A⁻¹ Uᵀ`` (eq. 35),
``Q⁻¹`` by the partitioned inverse of eq. 29 and ``S_H⁻¹`` by that of
eqs. 40-43. :class:`WoodburyRoute` builds every piece as a
:class:`pylops.LinearOperator` that can be applied, composed and inspected
(``.todense()`` on small sizes).

What is corrected (docs: derivation, "The mathematics", items 1-6)
------------------------------------------------------------------
1. ``A⁻¹ = Dx⁻¹ M Mᵀ Dx⁻ᵀ`` needs every ``∇_x f_l`` square and invertible,
   the loss layer included; a loss without parameters gets the decoupled
   auxiliary scalar of :class:`~blockops.network.auxiliary.AuxiliaryScalarLoss`
   (``f_L = loss + s²/2``) and the user's ``H⁻¹ g`` is the leading part of
   ``H_aug⁻¹ [g; 0]`` (``H_aug = [[H, 0], [0, 1]]``).
2. Eq. 36's sign: ``S_H = +Q⁻¹ + U A⁻¹ Uᵀ`` (eq. 35 is right), so eq. 38
   reads ``S_H = [[Q̃11 + I, Q̃12 + Mᵀ Dx⁻ᵀ], [Q̃21 + Dx⁻¹ M, Q̃22 + A⁻¹]]``.
3. The block of ``z_L`` in ``S_H11 = S_q⁻¹ + I`` is exactly zero for every
   network (``Q11_LL = −1``), so the printed pivot of eqs. 40-43 is singular.
   Here ``S_H`` is repartitioned: ``S_H11`` keeps ``z_1 … z_{L-1}`` and
   ``z_L`` joins the second block beside ``x_L``. With ``partition="auto"``
   (default) any other ``z_l`` whose ``S_H11`` block is numerically singular
   joins the second block too, beside ``x_l`` (block pivoting; it happens for
   a bias layer ``σ(z + c)`` after the first, where
   ``K_zz − K_zx K_xx⁻¹ K_xz = 0``, and for the input of a softmax
   cross-entropy, whose Hessian is singular). The second block, ordered by
   stages ``(x_l[, z_l])``, and its Schur complement (eq. 40) are
   block-tridiagonal.
4. The Schur complement of eq. 40 is indefinite in general: it is factored by
   a pivoted banded LU (:class:`~blockops.operators.BlockTridiagonal`), not
   ``G Gᵀ``. Step 6 is applied as the partitioned inverse of
   :class:`~blockops.operators.Partitioned2x2` (pivot ``"11"``), which does
   (a)-(f) with the slips of the printed text fixed, and the final step
   ``H⁻¹ g = A⁻¹ g − A⁻¹ Uᵀ g''`` is added.
5. Cheaper forms: ``U A⁻¹ g = [Mᵀ Dx⁻ᵀ g; A⁻¹ g]`` and
   ``A⁻¹ Uᵀ y = Dx⁻¹ M y_1 + A⁻¹ y_2``.
6. Damping: ``H + λI = A + Uᵀ Q_λ U`` with ``Q_λ`` equal to ``Q`` except
   ``Q22 = D_D D_xx + λI`` (the second block row of ``U`` is ``I``), so
   ``λ ≥ 0`` is folded in exactly.

Validity and conditioning
-------------------------
Every condition is checked at construction, block by block; a failure raises
:class:`~blockops.SingularBlockError` naming the condition and the layer and
pointing to ``method="kkt"``, which handles every network. The route
multiplies condition numbers (``A``, ``Q22``, ``S_H``); their cheap estimates
are in :attr:`WoodburyRoute.cond` and a :class:`WoodburyConditionWarning` is
issued when the predicted relative error exceeds ``rtol``.

Valid families (all conditions hold generically):

* diagonal-scale layers ``σ(d ⊙ z)`` and bias-only layers ``σ(z + c)``
  (batch 1; ``σ`` nonlinear, so that ``Q22 = D_D D_xx`` is invertible);
* constant-width dense layers ``σ(W z + c)`` with a batch of width + 1
  samples (``∇_x f`` is then ``a(a+1) × a(a+1)``);
* the scalar loss with the auxiliary scalar ``s`` (added automatically by
  :func:`woodbury_inverse`). The loss Hessian ``∇²ℓ / B`` must not have the
  eigenvalue 1 (``S_q`` would be singular): ``MSELoss`` needs ``B ≥ 2``.

Everything else (wider-than-batch dense layers, width changes, losses with
the eigenvalue 1, ...) gets the error. The route is the paper's algebra made
literal, for study and small networks; it is never the default.

Where it stops being usable in float64
--------------------------------------
Measured by ``benchmarks/bench_woodbury.py`` (relative difference to
``method="kkt"``, whose residual stays ≤ 1e-13 at every depth to 256):
with ``λ = 1e-3``, dense width 2 (batch 3) loses digits from depth 4
(4e-12), reaches 6e-9 at depth 8 and 8e-8 at 16; dense width 4 (batch 5)
starts at 1e-8; diagonal-scale width 8 stays at 1e-15 to depth 4, 8e-14 at
8 and 1e-10 at 16. From depth 16-32 on, ``∇_x f_l``, ``Q22``, ``S_H11`` or
the Schur complement become numerically singular (samples and activations
collapse with depth) and the route refuses. Undamped, dense width 2 is at
4e-8 by depth 4, 3e-5 by 8 and O(1) by 16. Judge its errors against
:attr:`WoodburyRoute.cond` and check :meth:`WoodburyInverse.residual`.
"""

from __future__ import annotations

import warnings

import numpy as np
import pylops
from pylops import LinearOperator

from .._checks import SingularBlockError, check_choice, check_damping, check_vector
from ..hessian import hessian
from ..operators import (
    BlockBidiagonal,
    BlockDiagonal,
    BlockSparse,
    BlockTridiagonal,
    Partitioned2x2,
    Permutation,
    Woodbury,
)
from .blocks import (
    KKT_HINT,
    ScalarView,
    _blockdiag_cond,
    _inv_checked,
    _where_z,
    route_blocks,
    scalar_view,
)

__all__ = ["WoodburyConditionWarning", "WoodburyInverse", "WoodburyRoute", "woodbury_inverse"]

PARTITIONS = ("auto", "last", "printed")


class WoodburyConditionWarning(RuntimeWarning):
    """The Woodbury route will lose more digits than the requested tolerance allows."""


def _norm2(op, xp, dtype, iters: int = 20, seed: int = 0) -> float:
    """Power-iteration estimate (a lower bound) of ``‖op‖₂``."""
    n = op.shape[1]
    v = xp.asarray(np.random.default_rng(seed).standard_normal(n)).astype(dtype)
    s = 0.0
    for _ in range(iters):
        v = v / float(xp.linalg.norm(v))
        w = op.rmatvec(op.matvec(v))
        s = float(xp.linalg.norm(w)) ** 0.5
        if s == 0.0 or not np.isfinite(s):
            return s
        v = w
    return s


def _repartition(kept, moved, nz, nx):
    """The permutation to (kept ``z`` blocks; stages ``(x_k, z_k if moved)``) and stage sizes."""
    L = len(nz)
    oz = np.concatenate([[0], np.cumsum(nz)]).astype(int)
    ox = (np.concatenate([[0], np.cumsum(nx)]) + oz[-1]).astype(int)
    idx1 = [np.arange(oz[k], oz[k + 1]) for k in kept]
    stage_sizes, idx2 = [], []
    for k in range(L):
        parts = [np.arange(ox[k], ox[k + 1])]
        if k in moved:
            parts.append(np.arange(oz[k], oz[k + 1]))
        idx2.extend(parts)
        stage_sizes.append(sum(len(p) for p in parts))
    perm = np.concatenate(idx1 + idx2) if idx1 else np.concatenate(idx2)
    return perm, stage_sizes


class WoodburyRoute:
    r"""Every piece of the paper's inverse route (eqs. 25-43, corrected) as an operator.

    Parameters
    ----------
    point : Point
        A linearised pipeline (last layer a loss).
    damping : float, optional
        ``λ ≥ 0``; the route inverts ``H + λI`` exactly (folded into ``Q22``).
    partition : {"auto", "last", "printed"}
        Which ``z`` blocks stay in ``S_H11`` (eqs. 39-43). ``"last"``: all but
        ``z_L`` (the minimal correction); ``"auto"``: as ``"last"``, and any
        ``z_l`` whose ``S_H11`` block is numerically singular also joins the
        second block; ``"printed"``: as printed, ``z_L`` included (its block is
        exactly zero, so this raises; kept to demonstrate the error).
    rtol : float, optional
        Warn (:class:`WoodburyConditionWarning`) when the predicted relative
        error ``eps · max(cond(A), cond(Q22) cond(S_q), cond(S_H11), cond(Schur))``
        exceeds it (an empirical estimate: measured errors stayed below it, by
        1e1-1e5, in every case tried).
    augment : "auto", True or False
        Add the auxiliary scalar of the loss when it has no parameter.

    Notes
    -----
    The operators below act on the augmented parameter space (size ``Nx``,
    the auxiliary scalar last when the loss was augmented) and on the lifted
    space ``(z, x)`` of size ``Nz + Nx``, in the scalar view of
    :mod:`blockops.woodbury.blocks`.

    Attributes
    ----------
    M, M_inv, Dx, Dx_inv
        ``M`` (eq. 7, block lower-bidiagonal) and ``Dx`` (eq. 6).
    A, A_inv
        ``A = Dxᵀ M⁻ᵀ M⁻¹ Dx`` and ``A⁻¹ = Dx⁻¹ M Mᵀ Dx⁻ᵀ`` (eq. 27, step 1).
    U
        ``[M⁻¹ Dx; I]`` (eq. 26).
    Q11, Q12, Q21, Q22, Q
        Eqs. 30-33 and ``Q`` (eq. 27) as a :class:`Partitioned2x2`.
    S_q, S_q_inv
        Eq. 34 (block-diagonal).
    Q_inv
        Eq. 29: ``Q.inverse(A22_inv=Q22⁻¹, S_inv=S_q⁻¹, pivot="22")``.
    S_H
        Eq. 35 literally, ``Q⁻¹ + U A⁻¹ Uᵀ`` (sign of eq. 36 corrected).
    Pi
        Permutation from the natural order ``(z_1..z_L, x_1..x_L)`` to the
        repartitioned order ``(z_l for l in kept; stages (x_l[, z_l]))``.
    S_H11, S_H12, S_H21, S_H22, S_H_part
        The repartitioned blocks (explicit) and ``Pi S_H Piᵀ`` as a
        :class:`Partitioned2x2`.
    schur, schur_inv
        Eq. 40's ``S_H22 − S_H21 S_H11⁻¹ S_H12`` (:class:`BlockTridiagonal`)
        and its inverse by pivoted banded LU.
    S_H_inv
        ``Piᵀ (S_H_part⁻¹) Pi`` (eqs. 40-43, pivot ``"11"``).
    H_inv
        ``(H + λI)⁻¹`` on the augmented space by eq. 28 with the cheaper forms
        (:class:`WoodburyInverse`); ``H_inv_literal`` is eq. 28 verbatim,
        :class:`~blockops.operators.Woodbury` ``(A⁻¹, U, Q⁻¹, S_H⁻¹)``.
    kept, moved : list of int
        1-based indices ``l`` of the ``z_l`` kept in ``S_H11`` / moved to the
        second block.
    cond : dict
        Condition-number estimates (1-norm for block-diagonal pieces, exact
        from the blocks; power-iteration 2-norm estimates for ``A`` and the
        Schur complement) and ``predicted_error``.
    """

    def __init__(self, point, damping=0.0, partition="auto", rtol=None, augment="auto", s=1.0):
        check_choice("WoodburyRoute", "partition", partition, PARTITIONS)
        damping = check_damping("WoodburyRoute", damping)
        given = isinstance(point, ScalarView)  # blocks given directly (tests, study)
        view = point if given else scalar_view(point, augment=augment, s=s)
        self.point = None if given else point
        self.view, self.damping = view, damping
        rb = route_blocks(view, damping)
        self.blocks = rb
        xp, dt = view.xp, view.dtype
        self.xp, self.dtype = xp, np.dtype(dt)
        nz, nx = view.z_sizes, view.x_sizes
        self.Nz, self.Nx = sum(nz), sum(nx)
        self.n_user = view.n_user if view.augmented else self.Nx
        self._build_lift(view, rb, nz)
        self._build_partition(rb, partition, nz, nx)
        self.H_inv = WoodburyInverse(self, n_out=self.Nx)
        # eq. 28 verbatim through the generic operator (no cheaper forms)
        self.H_inv_literal = Woodbury(self.A_inv, self.U, self.Q_inv, S_inv=self.S_H_inv)
        self._estimate_conditioning(rtol)

    # -- eqs. 6-7, 26-34 -----------------------------------------------------------
    def _build_lift(self, view, rb, nz):
        xp, dt, L = self.xp, self.dtype, view.n_layers
        subs = [-view.Jz[k] for k in range(1, L)]
        self.M = BlockBidiagonal(subs, name="M", block_sizes=nz, dtype=dt)
        self.M_inv = self.M.inverse()
        self.Dx = BlockDiagonal(view.Jx, name="Dx")
        self.Dx_inv = BlockDiagonal(rb.Jx_inv, name="Dx^-1")
        G = self.M_inv @ self.Dx
        self.A = G.H @ G
        self.A_inv = self.Dx_inv @ self.M @ self.M.H @ self.Dx_inv.H
        self.U = pylops.VStack([G, pylops.Identity(self.Nx, dtype=dt)])
        self.Q11 = BlockDiagonal(rb.Q11, name="Q11")
        zeros = [xp.zeros((n, n), dtype=dt) for n in nz]
        self.Q21 = BlockBidiagonal(
            [view.Kxz[k] for k in range(1, L)], diag=zeros, name="Q21", block_sizes=nz, dtype=dt
        )
        self.Q12 = self.Q21.H
        self.Q22 = BlockDiagonal(rb.Q22, name="Q22")
        self.Q22_inv = BlockDiagonal(rb.Q22_inv, name="Q22^-1")
        self.Q = Partitioned2x2(self.Q11, self.Q12, self.Q21, self.Q22, name="Q")
        self.S_q = BlockDiagonal(rb.S_q, name="S_q")
        self.S_q_inv = BlockDiagonal(rb.S_q_inv, name="S_q^-1")
        self.Q_inv = self.Q.inverse(A22_inv=self.Q22_inv, S_inv=self.S_q_inv, pivot="22")
        self.S_H = self.Q_inv + self.U @ self.A_inv @ self.U.H

    # -- eqs. 39-43 with the repartition ------------------------------------------
    def _choose_kept(self, rb, partition, nz):
        L, names = len(nz), self.view.names
        cand = range(L) if partition == "printed" else range(L - 1)
        eps = float(np.finfo(self.dtype).eps)
        kept, SH11_inv = [], {}
        for k in cand:
            strict = partition != "auto"
            try:
                Xi, _ = _inv_checked(
                    self.xp, rb.SH11[k], "S_H11 = S_q⁻¹ + I (eqs. 38-39, item 3)", k,
                    _where_z(k, names), 0.1 / eps if strict else eps**-0.5,
                )  # fmt: skip
            except SingularBlockError:
                if strict:
                    raise
                continue
            kept.append(k)
            SH11_inv[k] = Xi
        return kept, SH11_inv

    def _build_partition(self, rb, partition, nz, nx):
        L = len(nz)
        kept, SH11_inv = self._choose_kept(rb, partition, nz)
        moved = [k for k in range(L) if k not in kept]
        self.kept, self.moved = [k + 1 for k in kept], [k + 1 for k in moved]
        self._SH11_inv = [SH11_inv[k] for k in kept]
        perm, stage_sizes = _repartition(kept, moved, nz, nx)
        self.Pi = Permutation(self.xp.asarray(perm), dtype=self.dtype)
        self.stage_sizes = stage_sizes
        D, Lo = self._stage_blocks(rb, moved, stage_sizes, nx)
        self.S_H22 = BlockTridiagonal(Lo, D, name="S_H22")
        if not kept:  # nothing to eliminate: S_H (reordered) is already block-tridiagonal
            self.S_H11 = self.S_H12 = self.S_H21 = self.S_H11_inv = None
            self.S_H_part = self.S_H22
            self.schur = self.S_H22
        else:
            self._eliminate_kept(rb, kept, SH11_inv, D, Lo, nz, nx)
        self._invert_schur(kept)

    def _stage_blocks(self, rb, moved, stage_sizes, nx):
        """Stage-ordered blocks of the block-tridiagonal ``S_H22`` (before elimination)."""
        xp, dt, L = self.xp, self.dtype, len(stage_sizes)
        D, Lo = [], []
        for k in range(L):
            if k in moved:
                D.append(xp.block([[rb.SH_xx[k], rb.SH_zx[k].T], [rb.SH_zx[k], rb.SH11[k]]]))
            else:
                D.append(rb.SH_xx[k].copy())
        for k in range(L - 1):
            lo = xp.zeros((stage_sizes[k + 1], stage_sizes[k]), dtype=dt)
            lo[: nx[k + 1], : nx[k]] = rb.SH_xx_sub[k + 1]
            if k in moved:
                lo[: nx[k + 1], nx[k] :] = rb.SH_zx_next[k].T
            Lo.append(lo)
        return D, Lo

    def _eliminate_kept(self, rb, kept, SH11_inv, D, Lo, nz, nx):
        """The Schur complement of eq. 40: eliminate the kept ``z`` blocks from ``S_H22``."""
        L, so = len(nx), np.concatenate([[0], np.cumsum(self.stage_sizes)]).astype(int)
        entries, r = [], 0
        Ds, Los = [d.copy() for d in D], [lo.copy() for lo in Lo]
        for k in kept:
            ra, W = rb.SH_zx[k], SH11_inv[k]
            entries.append((r, so[k], ra))
            Ds[k][: nx[k], : nx[k]] -= ra.T @ W @ ra
            if k < L - 1:
                rn = rb.SH_zx_next[k]
                entries.append((r, so[k + 1], rn))
                Ds[k + 1][: nx[k + 1], : nx[k + 1]] -= rn.T @ W @ rn
                Los[k][: nx[k + 1], : nx[k]] -= rn.T @ W @ ra
            r += nz[k]
        n1 = sum(nz[k] for k in kept)
        self.S_H11 = BlockDiagonal([rb.SH11[k] for k in kept], name="S_H11")
        self.S_H11_inv = BlockDiagonal([SH11_inv[k] for k in kept], name="S_H11^-1")
        self.S_H12 = BlockSparse(entries, (n1, so[-1]), self.dtype, self.xp, name="S_H12")
        self.S_H21 = self.S_H12.H
        self.S_H_part = Partitioned2x2(
            self.S_H11, self.S_H12, self.S_H21, self.S_H22, name="S_H (repartitioned)"
        )
        self.schur = BlockTridiagonal(Los, Ds, name="S_H Schur complement (eq. 40)")

    def _invert_schur(self, kept):
        """Factor the Schur complement and assemble ``S_H⁻¹`` (eqs. 41-43)."""
        try:
            self.schur_inv = self.schur.inverse()
        except SingularBlockError as err:
            raise SingularBlockError(
                f"woodbury: the Schur complement of eq. 40 is singular ({err}); so H is "
                f"singular or the route breaks down; {KKT_HINT}",
                layer=getattr(err, "layer", None),
            ) from err
        if kept:
            self.S_H_part_inv = self.S_H_part.inverse(
                A11_inv=self.S_H11_inv, S_inv=self.schur_inv, pivot="11"
            )
        else:
            self.S_H_part_inv = self.schur_inv
        self.S_H_inv = self.Pi.H @ self.S_H_part_inv @ self.Pi

    # -- conditioning ----------------------------------------------------------------
    def _estimate_conditioning(self, rtol):
        xp, dt, rb = self.xp, self.dtype, self.blocks
        eps = float(np.finfo(dt).eps)
        cond = dict(rb.cond)
        cond["A"] = _norm2(self.A, xp, dt) * _norm2(self.A_inv, xp, dt)
        kept = [k - 1 for k in self.kept]
        cond["S_H11"] = (
            _blockdiag_cond(xp, [rb.SH11[k] for k in kept], self._SH11_inv) if kept else 1.0
        )
        cond["schur"] = _norm2(self.schur, xp, dt) * _norm2(self.schur_inv, xp, dt)
        # an empirical first-order estimate: Q⁻¹ by eq. 29 loses about eps · cond(Q22) ·
        # cond(S_q); A, S_H11 and the Schur complement each lose their own condition
        # number. In ~400 measured cases (bench_woodbury.py, tests' families, depths
        # 1-16, with and without damping) the error stayed below it, by 1e1-1e5.
        worst = max(cond["A"], cond["Q22"] * cond["S_q"], cond["S_H11"], cond["schur"])
        cond["predicted_error"] = eps * worst
        self.cond = cond
        if not np.isfinite(cond["schur"]) or cond["schur"] * eps >= 1.0:
            raise SingularBlockError(
                f"woodbury: the Schur complement of eq. 40 is numerically singular "
                f"(condition ≈ {cond['schur']:.2e}): H is singular or the route breaks down; "
                f"{KKT_HINT}"
            )
        if rtol is not None and cond["predicted_error"] > rtol:
            warnings.warn(
                f"woodbury: the route will lose about {np.log10(cond['predicted_error'] / eps):.0f}"
                f" digits (cond(A) ≈ {cond['A']:.1e}, cond(Q22) ≈ {cond['Q22']:.1e}, "
                f"cond(S_H11) ≈ {cond['S_H11']:.1e}, cond(Schur) ≈ {cond['schur']:.1e}); "
                f"predicted relative error {cond['predicted_error']:.1e} > rtol = {rtol:.1e}. "
                f'inverse_hessian(..., method="kkt") is exact to about 1e-14.',
                WoodburyConditionWarning,
                stacklevel=3,
            )

    # -- convenience -------------------------------------------------------------------
    def solve(self, g):
        """``(H + λI)⁻¹ g`` for the user's parameters (``(n,)`` or ``(n, k)``)."""
        return woodbury_apply(self, g)


class WoodburyInverse(LinearOperator):
    r"""``(H + λI)⁻¹`` by eq. 28 with the cheaper forms of item 5 below (docs: derivation).

    Forward, for ``g`` (padded with zeros for the auxiliary scalar when the
    route augmented the loss, item 1):

    .. math::
        g' = \begin{bmatrix} M^T D_x^{-T} g \\ A^{-1} g \end{bmatrix} = U A^{-1} g,\quad
        g'' = S_H^{-1} g',\quad
        H^{-1} g = A^{-1} g - \left(D_x^{-1} M g''_1 + A^{-1} g''_2\right).

    Adjoint: the same with every factor replaced by its adjoint (``H⁻¹`` is
    symmetric in exact arithmetic).

    Parameters
    ----------
    route : WoodburyRoute
    n_out : int
        Size of the space acted on: ``route.Nx`` (augmented) or
        ``route.n_user`` (the user's parameters; the auxiliary entry is
        dropped, eq. 28 on ``[g; 0]``).
    """

    def __init__(self, route: WoodburyRoute, n_out: int):
        self.route = route
        self.n = int(n_out)
        super().__init__(dtype=route.dtype, shape=(self.n, self.n), name="H^-1 (Woodbury)")

    def _apply(self, G, adjoint: bool):
        r = self.route
        xp = r.xp
        if self.n < r.Nx:
            G = xp.concatenate([G, xp.zeros((r.Nx - self.n, G.shape[1]), dtype=G.dtype)])
        Ainv = r.A_inv.rmatmat if adjoint else r.A_inv.matmat
        a = Ainv(G)
        g1 = r.M.rmatmat(r.Dx_inv.rmatmat(G))
        gp = xp.concatenate([g1, a])
        gpp = r.S_H_inv.rmatmat(gp) if adjoint else r.S_H_inv.matmat(gp)
        corr = r.Dx_inv.matmat(r.M.matmat(gpp[: r.Nz])) + Ainv(gpp[r.Nz :])
        return (a - corr)[: self.n]

    def _matmat(self, X):
        return self._apply(X, adjoint=False)

    def _rmatmat(self, X):
        return self._apply(X, adjoint=True)

    def _matvec(self, x):
        return self._apply(x[:, None], adjoint=False)[:, 0]

    def _rmatvec(self, x):
        return self._apply(x[:, None], adjoint=True)[:, 0]

    def residual(self, g, x=None) -> float:
        """Certificate: ``‖(H + λI) x − g‖ / ‖g‖`` for ``x = self @ g`` (one fused HVP).

        The route's float64 error grows with the condition numbers in
        ``route.cond``; this residual says how much of it a given solve lost.
        Needs the route to have been built from a ``Point``.
        """
        r = self.route
        if r.point is None:
            raise ValueError("WoodburyInverse.residual: the route was built from blocks, no Point")
        xp = r.xp
        x = self.matvec(g) if x is None else x
        n = r.view.n_user if r.view.augmented else r.Nx
        Hx = hessian(r.point, damping=r.damping).matvec(x[:n])
        if self.n > n:  # the augmented operator: the auxiliary scalar's row is (1 + λ) s
            Hx = xp.concatenate([Hx, (1.0 + r.damping) * x[n:]])
        return float(xp.linalg.norm(Hx - g) / xp.linalg.norm(g))


def woodbury_apply(route: WoodburyRoute, g):
    """``(H + λI)⁻¹ g`` on the user's parameters by :class:`WoodburyInverse`."""
    check_vector("woodbury", g, route.n_user, name="g")
    op = WoodburyInverse(route, route.n_user)
    return op.matvec(g) if g.ndim == 1 else op.matmat(g)


def woodbury_inverse(point, damping=0.0, *, partition="auto", rtol=None, augment="auto", s=1.0):
    r"""``(H + λI)⁻¹`` of a linearised pipeline by the paper's route (eqs. 25-43, corrected).

    What ``inverse_hessian(point, method="woodbury")`` calls. When the
    pipeline's loss has no parameter (``MSELoss``, ...), the decoupled
    auxiliary scalar ``s`` of
    :class:`~blockops.network.auxiliary.AuxiliaryScalarLoss` is appended
    internally (``augment="auto"``): the route inverts
    ``H_aug = [[H, 0], [0, 1]]`` and the returned operator is the leading
    ``n × n`` part, which is exactly ``(H + λI)⁻¹`` of the user's network.

    Parameters
    ----------
    point : Point
    damping : float
        ``λ ≥ 0`` (folded into ``Q22`` exactly).
    partition, rtol, augment, s
        See :class:`WoodburyRoute`.

    Returns
    -------
    WoodburyInverse
        A square operator on the user's parameters; ``.route`` holds every
        piece (``A_inv``, ``U``, ``Q_inv``, ``S_H``, ``S_H_inv``, ``schur``,
        ``cond``, ...).

    Raises
    ------
    SingularBlockError
        When a validity condition fails (the message names it, the layer, and
        ``method="kkt"``).
    """
    route = WoodburyRoute(point, damping, partition=partition, rtol=rtol, augment=augment, s=s)
    return WoodburyInverse(route, route.n_user)
