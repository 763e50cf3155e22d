r"""The named pieces of the Hessian, eq. 24, as linear operators.

:func:`hessian_parts` builds, from a :class:`~blockops.network.Point` (a
pipeline linearised at parameters ``x`` and a batch), the operators of the
recap after eq. 24 of the paper:

.. math::
    H = D_D D_{xx} + D_D D_{zx} P M^{-1} D_x
        + D_x^T M^{-T} P^T D_M D_{xz}
        + D_x^T M^{-T} P^T D_M D_{zz} P M^{-1} D_x .

The vector spaces, and how they map to the paper's
---------------------------------------------------
With ``B`` samples, ``n_l`` features per sample after layer ``l``
(``n_L = 1``: the loss) and ``p_l`` parameters in layer ``l``:

``x`` space (size ``Σ_l p_l``)
    ``concat(x_1, ..., x_L)``, the pipeline's parameter layout.
``z`` space (size ``B Σ_{l=1}^{L} n_l``)
    ``(z_1, ..., z_L)``, each block sample-major (``z_l.ravel()``). The
    batch is stacked into the activations, so the paper's ``a``-vector
    ``z_l`` becomes ``B n_l`` entries, and ``∇_z f_l`` is block-diagonal over
    samples. The loss block ``z_L`` has ``B`` rows, the per-sample
    contributions whose sum is the loss: ``b_L = 1`` on each and the last
    diagonal block of ``M`` is ``I_B`` (the paper's scalar ``1``).
shifted ``z`` space (size ``B Σ_{l=0}^{L-1} n_l``)
    ``(z_0, ..., z_{L-1})``: the inputs of the layers, the range of ``P``.
    It differs in size from the ``z`` space when ``n_0 ≠ n_L``, so ``P`` is
    rectangular (the paper's square ``P`` assumes equal widths).
``∇_x f`` space (size ``Σ_l B n_l p_l``)
    per layer the column-major ``vec`` of the ``(B n_l, p_l)`` matrix
    ``∇_x f_l`` (eq. 10). ``D_{xx}`` and ``D_{zx}`` map into it, and ``D_D``
    contracts it with ``b_l`` (``b_l`` raveled, a row of ``B n_l``):
    ``(I_{p_l} ⊗ b_l) vec(X) = (b_l X)^T``, literally eq. 11.
``∇_z f`` space (size ``Σ_l B n_l n_{l-1}``)
    ``∇_z f_l`` is block-diagonal over samples, so only the diagonal blocks
    are kept: per sample ``s`` the column-major ``vec`` of the
    ``(n_l, n_{l-1})`` block, samples one after the other. ``D_{xz}`` and
    ``D_{zz}`` map into it; ``D_M`` contracts each sample's block with
    ``b_{l,s}`` (``I_{n_{l-1}} ⊗ b_{l,s}``, eqs. 19-21), which is the paper's
    ``I ⊗ b_l`` restricted to the non-zero blocks.

Indexing (docs: derivation, "The mathematics"): the second-derivative tensors of
layer ``l`` are taken at ``(z_{l-1}, x_l)`` and pair with ``b_l`` of the same
``l``; ``P`` delivers ``dz_{l-1}`` to layer ``l``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pylops import LinearOperator

from .._checks import check_dtype, check_on_backend
from ..backend import backend_name, get_array_module
from ..operators import BlockBidiagonal, BlockDiagonal, KronContract, Shift

__all__ = ["HessianParts", "Layerwise", "hessian_parts", "point_structure"]


@dataclass(frozen=True)
class PointStructure:
    """Sizes and offsets of a point's spaces (see the module docstring)."""

    layers: list
    caches: list
    bs: list
    B: int
    n: list  # [n_0, ..., n_L] features per sample
    p: list  # [p_1, ..., p_L] parameters per layer
    x_offsets: list  # L + 1 offsets into the x space
    dtype: np.dtype
    xp: Any

    @property
    def n_params(self) -> int:
        return self.x_offsets[-1]


def point_structure(point) -> PointStructure:
    """Layers, caches, ``b_l`` and the sizes of the spaces of a linearised point.

    Built once per :class:`~blockops.network.Point` (kept in ``point.memo``).
    """
    memo = point.memo
    if "structure" not in memo:
        memo["structure"] = _structure(point)
    return memo["structure"]


def _structure(point) -> PointStructure:
    layers = list(point.layers)
    caches, bs = list(point.caches), list(point.bs)
    if not (len(layers) == len(caches) == len(bs)) or not layers:
        raise ValueError(
            f"hessian_parts: point has {len(layers)} layers, {len(caches)} caches and "
            f"{len(bs)} b's; expected the same positive number"
        )
    z0 = caches[0].z_prev
    B = int(z0.shape[0])
    n = [int(z0.shape[1])] + [int(c.z.shape[1]) for c in caches]
    p = [int(layer.n_params) for layer in layers]
    offsets = np.concatenate([[0], np.cumsum(p)]).astype(int).tolist()
    dtype = check_dtype("hessian_parts", "activations", caches[-1].z)
    return PointStructure(layers, caches, bs, B, n, p, offsets, dtype, get_array_module(z0))


class Layerwise(LinearOperator):
    r"""Block-diagonal over layers of one second-derivative block of eq. 24.

    ``which`` names the block as the paper does, ``∇_{uv} f = ∇_u ∇_v f``
    (derivative with respect to ``u`` of the Jacobian ``∇_v f``):

    ============  ================  ==================  ======================
    ``which``     input (per l)     output (per l)      layer call
    ============  ================  ==================  ======================
    ``"xx"``      ``dx_l``          ``vec d∇_x f_l``    ``djac_x(None, dx)``
    ``"zx"``      ``dz_{l-1}``      ``vec d∇_x f_l``    ``djac_x(dz, None)``
    ``"xz"``      ``dx_l``          ``vec d∇_z f_l``    ``djac_z(None, dx)``
    ``"zz"``      ``dz_{l-1}``      ``vec d∇_z f_l``    ``djac_z(dz, None)``
    ============  ================  ==================  ======================

    Forward: ``y_l = vec(d∇_v f_l[du_l])`` (eqs. 12-13 for ``D_xx``,
    ``D_zx``; eq. 22 for ``D_xz``, ``D_zz``); adjoint: the layer's
    ``djac_*_T`` applied to the un-vec'd ``y_l``, keeping the ``u`` part. The
    ``vec`` conventions are those of the module docstring (column-major
    ``(B n_l, p_l)`` for ``∇_x f``; per sample column-major ``(n_l, n_{l-1})``
    for ``∇_z f``).

    Parameters
    ----------
    st : PointStructure
        From :func:`point_structure`.
    which : {"xx", "zx", "xz", "zz"}
    active : sequence of bool, optional
        Layers whose block is kept (default all); the others are zero. Used
        for the Gauss-Newton term (loss layer only).
    """

    def __init__(self, st: PointStructure, which: str, active=None, name: str | None = None):
        if which not in ("xx", "zx", "xz", "zz"):
            raise ValueError(f"Layerwise: which={which!r}; expected 'xx', 'zx', 'xz' or 'zz'")
        self.st, self.which = st, which
        self.xp = st.xp
        L = len(st.layers)
        self.active = [True] * L if active is None else [bool(a) for a in active]
        B, n, p = st.B, st.n, st.p
        # per-layer input sizes (x_l or z_{l-1}) and output sizes (vec of the Jacobian)
        self._in = [p[l] if which[0] == "x" else B * n[l] for l in range(L)]
        if which[1] == "x":
            self._out = [B * n[l + 1] * p[l] for l in range(L)]
        else:
            self._out = [B * n[l + 1] * n[l] for l in range(L)]
        self._in_off = np.concatenate([[0], np.cumsum(self._in)]).astype(int).tolist()
        self._out_off = np.concatenate([[0], np.cumsum(self._out)]).astype(int).tolist()
        super().__init__(
            dtype=st.dtype,
            shape=(self._out_off[-1], self._in_off[-1]),
            name=name or f"D{which}",
        )

    # vec and un-vec between a layer's derivative array T (k, B, n_out, q) and
    # its rows of an (N, k) block (columns = directions), written in place
    def _vec_into(self, T, out_rows):
        k, B, m, q = T.shape
        if self.which[1] == "x":  # column-major vec of the (B n_out, q) matrix: (q, B, m)
            out_rows.reshape(q, B, m, k)[...] = T.transpose(3, 1, 2, 0)
        else:  # per sample column-major vec of the (m, q) block: (B, q, m)
            out_rows.reshape(B, q, m, k)[...] = T.transpose(1, 3, 2, 0)

    def _unvec(self, rows, l):
        k, B, m = rows.shape[1], self.st.B, self.st.n[l + 1]
        if self.which[1] == "x":
            q = self.st.p[l]
            return rows.reshape(q, B, m, k).transpose(3, 1, 2, 0)
        q = self.st.n[l]
        return rows.reshape(B, q, m, k).transpose(3, 0, 2, 1)

    def _apply(self, X, adjoint: bool):
        """``X (N_in, k) -> (N_out, k)``; per layer one ``djac_*`` call on all k columns."""
        xp, st = self.xp, self.st
        k = X.shape[1]
        in_off, out_off = (
            (self._out_off, self._in_off) if adjoint else (self._in_off, self._out_off)
        )
        out = xp.empty((out_off[-1], k), dtype=np.result_type(self.dtype, X.dtype))
        djac = "djac_x" if self.which[1] == "x" else "djac_z"
        for l, layer in enumerate(st.layers):
            rows = out[out_off[l] : out_off[l + 1]]
            if not self.active[l] or self._in[l] == 0 or self._out[l] == 0:
                rows[...] = 0  # empty or inactive block
                continue
            cache = st.caches[l]
            w = X[in_off[l] : in_off[l + 1]]
            if adjoint:
                dz, dx = getattr(layer, djac + "_T")(cache, self._unvec(w, l))
                res = dx if self.which[0] == "x" else dz
                rows[...] = res.reshape(k, -1).T
            elif self.which[0] == "x":
                self._vec_into(getattr(layer, djac)(cache, None, w.T), rows)
            else:
                dz = w.T.reshape(k, st.B, st.n[l])
                self._vec_into(getattr(layer, djac)(cache, dz, None), rows)
        return out

    def _check(self, X, n):
        check_on_backend(self.name, "input", X, self.xp)
        if X.shape[0] != n:
            raise ValueError(f"{self.name}: input has shape {tuple(X.shape)}; expected ({n}, ...)")

    def _matvec(self, x):
        self._check(x, self.shape[1])
        return self._apply(x.reshape(-1, 1), False).reshape(-1)

    def _rmatvec(self, x):
        self._check(x, self.shape[0])
        return self._apply(x.reshape(-1, 1), True).reshape(-1)

    def _matmat(self, X):
        self._check(X, self.shape[1])
        return self._apply(X, False)

    def _rmatmat(self, X):
        self._check(X, self.shape[0])
        return self._apply(X, True)


@dataclass(frozen=True)
class HessianParts:
    r"""The operators of the recap after eq. 24 (see the module docstring for the spaces).

    Attributes
    ----------
    M : LinearOperator
        ``(Nz, Nz)``, eq. 7 / eq. 14: block lower-bidiagonal, identity
        diagonal blocks, ``-∇_z f_{l}`` at block ``(l, l-1)`` (1-based),
        block-diagonal over samples. ``M dz = D_x dx`` is the forward
        recursion (eq. 53).
    Minv : LinearOperator
        ``M^{-1}`` by forward substitution; its adjoint ``M^{-T}`` by back
        substitution (backprop, eq. 7).
    P : LinearOperator
        ``(Nz_shifted, Nz)``, eq. 15: ``(z_1, …, z_L) ↦ (0, z_1, …, z_{L-1})``.
    Dx : LinearOperator
        ``(Nz, Nx)``, eq. 6: ``blockdiag_l ∇_x f_l``, block ``l`` the
        ``(B n_l, p_l)`` Jacobian.
    DD : LinearOperator
        ``(Nx, N∇x)``, eq. 11: ``blockdiag_l (I_{p_l} ⊗ b_l)``.
    DM : LinearOperator
        ``(Nz_shifted, N∇z)``, eq. 21: ``blockdiag_{l,s} (I_{n_{l-1}} ⊗ b_{l,s})``.
    Dxx, Dzx : LinearOperator
        ``(N∇x, Nx)`` and ``(N∇x, Nz_shifted)``, eqs. 12-13.
    Dxz, Dzz : LinearOperator
        ``(N∇z, Nx)`` and ``(N∇z, Nz_shifted)``, eq. 22.
    structure : PointStructure
        Sizes and offsets of the spaces.
    """

    M: LinearOperator
    Minv: LinearOperator
    P: LinearOperator
    Dx: LinearOperator
    DD: LinearOperator
    DM: LinearOperator
    Dxx: LinearOperator
    Dxz: LinearOperator
    Dzx: LinearOperator
    Dzz: LinearOperator
    structure: PointStructure


def hessian_parts(point) -> HessianParts:
    """The operators ``M, Minv, P, Dx, DD, DM, Dxx, Dxz, Dzx, Dzz`` of eq. 24 at ``point``.

    Parameters
    ----------
    point : Point
        A pipeline linearised at ``(x, X, y)`` (``Pipeline.linearize``).

    Returns
    -------
    HessianParts
        Operators on the point's backend and dtype. ``M``, ``Dx`` hold the
        explicit per-layer Jacobians (``B n_l × n_{l-1}`` per sample and
        ``B n_l × p_l``); the second-derivative operators are matrix-free
        (they call the layers' ``djac_*`` and adjoints).
    """
    st = point_structure(point)
    layers = st.layers
    B, n, p = st.B, st.n, st.p
    jz, jx = point.jacobians_z(), point.jacobians_x()  # built once per point
    # M (eq. 7): -∇_z f_l below the diagonal, l = 2..L; sub[j] sits at block (j+1, j)
    M = BlockBidiagonal([-J for J in jz[1:]], name="M", block_sizes=[B * m for m in n[1:]])
    Minv = M.inverse()
    P = Shift([B * m for m in n], dtype=st.dtype, backend=backend_name(st.xp))
    # Dx (eq. 6): (B n_l, p_l) Jacobians; sample-major rows as in the z space
    Dx = BlockDiagonal(
        [jx[l].reshape(B * n[l + 1], p[l]) for l in range(len(layers))],
        name="Dx",
    )
    # DD (eq. 11): I_{p_l} ⊗ b_l with b_l the raveled (B n_l) row
    DD = KronContract([b.reshape(-1) for b in st.bs], p, name="DD")
    # DM (eq. 21): per sample I_{n_{l-1}} ⊗ b_{l,s}
    DM = KronContract([b.reshape(B, -1) for b in st.bs], n[:-1], name="DM")
    return HessianParts(
        M=M,
        Minv=Minv,
        P=P,
        Dx=Dx,
        DD=DD,
        DM=DM,
        Dxx=Layerwise(st, "xx", name="Dxx"),
        Dxz=Layerwise(st, "xz", name="Dxz"),
        Dzx=Layerwise(st, "zx", name="Dzx"),
        Dzz=Layerwise(st, "zz", name="Dzz"),
        structure=st,
    )
