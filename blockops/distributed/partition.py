r"""The per-rank pieces of a depth-partitioned Hessian and exact solve, in plain arrays.

A pipeline of ``L`` layers is cut into ``R`` contiguous layer ranges
``[l_0, l_1)``, one per rank (:func:`layer_ranges`). Everything here acts on
one range and knows nothing about MPI, so it is tested serially by chaining
the ranges by hand; :mod:`blockops.distributed.mpi` moves the few boundary
arrays between ranks.

**HVP.** The tangent sweep of :func:`blockops.hessian.hvp` is affine in the
tangent ``g_in = dz_{l_0 - 1}`` entering a range, and the adjoint sweep is
affine in the ``b'_out = b'_{l_1 - 1}`` leaving it:

.. math::

    g_{out} = T_r g_{in} + g^0_{out}, \qquad
    b'_{in} = b'_{out} T_r + b'^0_{in},

with :math:`T_r = \nabla_z f_{l_1 - 1} \cdots \nabla_z f_{l_0}` (per sample,
``(B, n_out, n_in)``) and :math:`g^0, b'^0` the sweeps started from zero.
:class:`RangeSweep` runs both sweeps of its range from given boundary states,
and holds :math:`T_r`, so that the boundary states can be chained across
ranks with one small product per rank instead of a sweep.

**Exact solve.** The lifted KKT system of :mod:`blockops.inverse.banded_kkt`,
ordered layer by layer as ``(dx_l, μ_l, dz_l)``, is block-tridiagonal. Its
unknowns are split into each range's *interior* and the *separators*
``s_r = dz_{l_1 - 1}``, the activation tangent between ranges ``r`` and
``r + 1``. A range's interior couples only to its two separators, so

.. math::

    \begin{bmatrix} A_{ii} & A_{is} \\ A_{si} & A_{ss} \end{bmatrix}
    \begin{bmatrix} u \\ s \end{bmatrix} =
    \begin{bmatrix} f \\ 0 \end{bmatrix}
    \;\Longrightarrow\;
    \Big(\sum_r A^{(r)}_{ss} - A^{(r)}_{si} (A^{(r)}_{ii})^{-1} A^{(r)}_{is}\Big) s
    = -\sum_r A^{(r)}_{si} (A^{(r)}_{ii})^{-1} f^{(r)},

and then ``u = A_ii⁻¹ (f − A_is s)`` per range. This is partitioned
elimination in the style of SPIKE: :class:`LocalKKT` factors its interior
with pivoted banded LU (exact for indefinite ``H``), keeps the spikes
``A_ii⁻¹ A_is`` (``B n`` columns per side) and contributes a
``(B n_left + B n_right)``-square Schur block; :class:`ReducedSystem` sums
those blocks into the block-tridiagonal interface system of ``R − 1``
separators and factors it, also by pivoted banded LU. ``|det KKT| =
|det(H + λI)|``, so the interiors and the reduced system are nonsingular for
a nonsingular ``H + λI`` except on a set of measure zero (an interior is
the KKT system of its range with both boundary activations fixed); a
singular one raises :class:`~blockops.SingularBlockError` naming the layers.
"""

from __future__ import annotations

import numpy as np

from .._checks import check_int
from ..backend import factor_symmetric_banded
from ..hessian.fused import MIN_RUN
from ..hessian.parts import point_structure
from ..network.layer import fused_steps
from ..singular import SingularBlockError, damping_hint

__all__ = ["LocalKKT", "RangeSweep", "ReducedSystem", "layer_ranges"]


def layer_ranges(point, n_parts) -> list:
    """Contiguous layer ranges ``[(l0, l1), ...]``, one per part, balanced by parameter count.

    Cut ``r`` falls at the first layer where the running parameter count
    reaches ``r / n_parts`` of the total; every part gets at least one layer.
    A cut then moves deeper until the range before it has at least ``B n``
    parameters (``n`` the width at the cut): the exact solve fixes the
    activation at each cut, and a range whose parameters cannot move its
    output in all ``B n`` directions has a singular interior (see
    :class:`LocalKKT`).

    Parameters
    ----------
    point : Point
    n_parts : int
        Number of ranks, ``1 <= n_parts <= point.n_layers``.
    """
    n_parts = check_int("layer_ranges", "n_parts", n_parts, 1)
    L = point.n_layers
    if n_parts > L:
        raise ValueError(
            f"layer_ranges: n_parts={n_parts} but the pipeline has {L} layers (loss included); "
            f"run on at most {L} ranks (mpiexec -n {L}) or use a deeper pipeline"
        )
    p = np.array([ly.n_params for ly in point.layers])
    cum, need = np.cumsum(p), [point.batch_size * ly.n_out for ly in point.layers]
    cuts = [0]
    for r in range(1, n_parts):
        c = int(np.searchsorted(cum, cum[-1] * r / n_parts, side="left")) + 1
        c = min(max(c, cuts[-1] + 1), L - (n_parts - r))
        while c < L - (n_parts - r) and p[cuts[-1] : c].sum() < need[c - 1]:
            c += 1  # too few parameters to move the activation at the cut
        cuts.append(c)
    cuts.append(L)
    short = [
        r for r in range(n_parts - 1) if p[cuts[r] : cuts[r + 1]].sum() < need[cuts[r + 1] - 1]
    ]
    if short:
        a, b = cuts[short[0]], cuts[short[0] + 1]
        raise ValueError(
            f"layer_ranges: cannot cut {L} layers into {n_parts} ranges that each hold at least "
            f"batch * width parameters at their end (layers {a + 1}..{b} hold "
            f"{p[a:b].sum()} < {need[b - 1]}), which the exact solve needs; use fewer ranks"
        )
    return [(cuts[r], cuts[r + 1]) for r in range(n_parts)]


def _check_range(owner, point, l0, l1):
    L = point.n_layers
    if not (0 <= l0 < l1 <= L):
        raise ValueError(f"{owner}: layer range [{l0}, {l1}) is not inside [0, {L}) or is empty")


class RangeSweep:
    """The two sweeps of the fused HVP restricted to layers ``l0 .. l1-1``.

    Parameters
    ----------
    point : Point
    l0, l1 : int
        The range (0-based, ``l1`` excluded).

    Attributes
    ----------
    offsets : list of int
        Where each layer's parameters start in the range's slice (``offsets[-1]``
        is its length ``n_local``); ``x_slice`` is that slice of the full vector.
    T : array ``(B, n_out, n_in)``
        The range's tangent map :math:`T_r` (see the module docstring).
    """

    def __init__(self, point, l0, l1):
        _check_range("RangeSweep", point, l0, l1)
        st = point_structure(point)
        self.l0, self.l1, self.last = l0, l1, l1 == len(st.layers)
        self.xp, self.dtype, self.B = st.xp, st.dtype, st.B
        self.layers, self.caches, self.bs = st.layers[l0:l1], st.caches[l0:l1], st.bs[l0:l1]
        self.offsets = [o - st.x_offsets[l0] for o in st.x_offsets[l0 : l1 + 1]]
        self.x_slice = slice(st.x_offsets[l0], st.x_offsets[l1])
        self.n_in, self.n_out = st.n[l0], st.n[l1]
        self.runs = self._runs()
        self.T = self._tangent_map()

    def _runs(self) -> dict:
        """``{i: (i_end, sweep)}`` for maximal stacked runs inside the range (never the loss)."""
        n = len(self.layers)
        stop = n - 1 if self.last else n  # the loss is never stacked
        keys = [ly.stack_key() for ly in self.layers[:stop]] + [None] * (n - stop + 1)
        runs, i, off = {}, 0, self.offsets
        while i < stop:
            e = i + 1
            while keys[i] is not None and e < stop and keys[e] == keys[i]:
                e += 1
            if keys[i] is not None and e - i >= MIN_RUN:
                build = type(self.layers[i]).stacked_sweep
                runs[i] = (e, build(self.caches[i:e], self.bs[i:e], slice(off[i], off[e])))
            i = e
        return runs

    def _tangent_map(self):
        """``T_r = ∇_z f_{l1-1} ⋯ ∇_z f_{l0}`` per sample (one batched product per layer)."""
        xp = self.xp
        T = xp.broadcast_to(xp.eye(self.n_in, dtype=self.dtype), (self.B, self.n_in, self.n_in))
        for ly, c in zip(self.layers, self.caches):
            T = xp.asarray(ly.jacobian_z(c), self.dtype) @ T
        return xp.ascontiguousarray(T)

    def forward(self, W, g_in):
        """Tangent sweep of the range: ``(g_out, state)``.

        ``W`` is the ``(k, n_local)`` block of the directions (C-contiguous);
        ``g_in`` the ``(k, B, n_in)`` tangent entering the range or ``None``
        (zero). ``g_out`` is the tangent leaving it (``None`` for the last
        range, whose sweep stops at the loss's input).
        """
        n, off = len(self.layers), self.offsets
        vs = [W[:, off[i] : off[i + 1]] if off[i + 1] > off[i] else None for i in range(n)]
        g, keep = [None] * (n + 1), [None] * n
        g[0] = g_in
        stop, i = (n - 1 if self.last else n), 0
        while i < stop:
            if i in self.runs:
                e, sweep = self.runs[i]
                g[e], keep[i] = sweep.forward(g[i], W)
                i = e
                continue
            if g[i] is not None or vs[i] is not None:  # else nothing varies yet
                g[i + 1], keep[i] = fused_steps(self.layers[i])[0](self.caches[i], g[i], vs[i])
            i += 1
        return (None if self.last else g[n]), (vs, g, keep)

    def backward(self, state, bprime, out):
        """Adjoint sweep of the range from ``b'`` leaving it (``None``: zero).

        Fills ``out`` (``(k, n_local)``, the range's rows of ``H V``) and
        returns ``b'`` entering the range (``None`` if nothing varied).
        """
        vs, g, keep = state
        ends = {e - 1: (i, sweep) for i, (e, sweep) in self.runs.items()}
        i, off = len(self.layers) - 1, self.offsets
        while i >= 0:
            if i in ends:
                start, sweep = ends[i]
                bprime = sweep.backward(keep[start], bprime, out)
                i = start - 1
                continue
            if g[i] is None and vs[i] is None:  # parameter-free and nothing varies: h = 0
                if bprime is not None:
                    bprime = self.layers[i].vjp(self.caches[i], bprime)[0]
            else:
                rows = out[:, off[i] : off[i + 1]]
                step = fused_steps(self.layers[i])[1]
                bprime, hx = step(self.caches[i], self.bs[i], g[i], vs[i], bprime, keep[i], rows)
                if hx is not rows:
                    rows[...] = hx
            i -= 1
        return bprime

    def push_tangent(self, g_in):
        """``T_r g_in`` for ``g_in`` of shape ``(k, B, n_in)``."""
        return (self.T[None] @ g_in[..., None])[..., 0]

    def pull_adjoint(self, b_out):
        """``b_out T_r`` for ``b_out`` of shape ``(k, B, n_out)``."""
        return (b_out[:, :, None, :] @ self.T[None])[:, :, 0, :]


def _block_diagonal(xp, blocks, dtype):
    """``blockdiag`` of a ``(B, r, c)`` stack as one ``(B r, B c)`` matrix."""
    Bn, r, c = blocks.shape
    out = xp.zeros((Bn * r, Bn * c), dtype)
    for s in range(Bn):
        out[s * r : (s + 1) * r, s * c : (s + 1) * c] = blocks[s]
    return out


class LocalKKT:
    """The interior factor, spikes and Schur block of one layer range of the lifted KKT system.

    The interior holds ``(dx_l, μ_l, dz_l)`` for ``l0 <= l < l1``, except
    ``dz_{l1-1}`` when the range is not the last (it is the right separator);
    the left separator is ``dz_{l0-1}`` (none for the first range). Only this
    range's layers are read: the separator's diagonal block
    ``K_zz`` of layer ``l0`` belongs to this range's Schur block.

    Parameters
    ----------
    point : Point
    l0, l1 : int
        The range.
    damping : float
        ``λ ≥ 0``.

    Attributes
    ----------
    n_left, n_right : int
        Sizes of the left and right separators (``B n``; 0 at the ends).
    schur : array ``(n_left + n_right, n_left + n_right)``
        ``A_ss − A_si A_ii⁻¹ A_is`` of this range (symmetric).
    """

    def __init__(self, point, l0, l1, damping=0.0):
        _check_range("LocalKKT", point, l0, l1)
        st = point_structure(point)
        self.l0, self.l1, self.damping = l0, l1, float(damping)
        self.xp, self.dtype = st.xp, st.dtype
        B, n, p, L = st.B, st.n, st.p, len(st.layers)
        self.n_left = B * n[l0] if l0 > 0 else 0
        self.n_right = B * n[l1] if l1 < L else 0
        # interior layout: dx_l at xpos, mu_l at xpos + p_l, dz_l after it
        xpos, pos = [], 0
        for l in range(l0, l1):
            xpos.append(pos)
            pos += p[l] + B * n[l + 1] * (1 if (l == l1 - 1 and l1 < L) else 2)
        self.n_interior = Ni = pos
        self._blocks = [*xpos, Ni]
        self._xsel = np.concatenate([np.arange(x, x + p[l]) for x, l in zip(xpos, range(l0, l1))])
        self.n_local = int(self._xsel.size)
        self._factor(st, xpos)

    def _entries(self, st, xpos):
        """``(row0, col0, block)`` in the extended index space [interior | left | right]."""
        xp, lam, dt, B = self.xp, self.damping, self.dtype, st.B
        Ni = self.n_interior
        zpos = {self.l0 - 1: Ni}  # the left separator
        for l, x0 in zip(range(self.l0, self.l1), xpos):
            ly, c, b = st.layers[l], st.caches[l], st.bs[l]
            p, n_in, n_out = st.p[l], B * st.n[l], B * st.n[l + 1]
            m0 = x0 + p
            zpos[l] = m0 + n_out if l < self.l1 - 1 or self.n_right == 0 else Ni + self.n_left
            Bx = xp.asarray(ly.jacobian_x(c), dt).reshape(n_out, p)
            Kzz, Kxz, Kxx = ly.hessian_blocks(c, b)
            eye = xp.eye(n_out, dtype=dt)
            yield x0, x0, xp.asarray(Kxx, dt).reshape(p, p) + lam * xp.eye(p, dtype=dt)
            yield x0, m0, -Bx.T
            yield m0, x0, -Bx
            yield m0, zpos[l], eye
            yield zpos[l], m0, eye
            if l > 0:  # layer l reads dz_{l-1}: an interior unknown or the left separator
                z = zpos[l - 1]
                Ablk = _block_diagonal(xp, xp.asarray(ly.jacobian_z(c), dt), dt)
                Kxz = xp.asarray(Kxz, dt).reshape(p, n_in)
                yield z, z, _block_diagonal(xp, xp.asarray(Kzz, dt), dt)
                yield x0, z, Kxz
                yield z, x0, Kxz.T
                yield m0, z, -Ablk
                yield z, m0, -Ablk.T

    def _factor(self, st, xpos):
        xp, dt, Ni = self.xp, self.dtype, self.n_interior
        ns = self.n_left + self.n_right
        interior, A_is, A_si = [], xp.zeros((Ni, ns), dt), xp.zeros((ns, Ni), dt)
        A_ss = xp.zeros((ns, ns), dt)
        for r0, c0, blk in self._entries(st, xpos):
            h, w = blk.shape
            if r0 < Ni and c0 < Ni:
                interior.append((r0, c0, blk))
            elif r0 < Ni:
                A_is[r0 : r0 + h, c0 - Ni : c0 - Ni + w] += blk
            elif c0 < Ni:
                A_si[r0 - Ni : r0 - Ni + h, c0 : c0 + w] += blk
            else:
                A_ss[r0 - Ni : r0 - Ni + h, c0 - Ni : c0 - Ni + w] += blk
        name = f"LocalKKT (layers {self.l0 + 1}..{self.l1})"
        try:
            self._fac = factor_symmetric_banded(interior, self._blocks, dt, xp, name)
        except SingularBlockError as err:
            l = self.l0 + err.layer  # 1-based global layer of the failing block row
            raise SingularBlockError(
                f"{name}: the interior of the lifted KKT system is numerically singular at "
                f"{st.layers[l - 1].name}: either H + damping*I is singular or nearly so "
                f"({damping_hint(self.damping, dt)}), or this range's parameters cannot move "
                "the activation at its end in every direction with its input held fixed "
                "(e.g. it ends in per-feature layers and batch > 1): cut elsewhere "
                "(ranges=...) or use fewer ranks",
                layer=l,
            ) from None
        self.logdet = self._fac.logdet
        self.spikes = self._fac.solve(A_is) if ns else A_is  # A_ii^-1 A_is, (Ni, ns)
        self._A_si = A_si
        self.schur = A_ss - A_si @ self.spikes

    def condense(self, G):
        """Interior solve of a right-hand side: ``(Y, t)``.

        ``G`` is ``(n_local, k)``, the range's rows of ``g``; ``Y = A_ii⁻¹ f``
        (``f`` holds ``G`` in the ``dx`` rows) and ``t = −A_si Y`` is this
        range's share of the reduced right-hand side, ``(n_left + n_right, k)``.
        """
        f = self.xp.zeros((self.n_interior, G.shape[1]), self.dtype)
        f[self._xsel] = G
        Y = self._fac.solve(f)
        return Y, -(self._A_si @ Y)

    def expand(self, Y, s):
        """The range's ``dx`` rows of the solution from ``Y`` and its separators ``s``.

        ``s`` is ``(n_left + n_right, k)``: ``[s_left; s_right]``.
        """
        U = Y - self.spikes @ s if s.shape[0] else Y
        return U[self._xsel]


class ReducedSystem:
    """The interface system of ``R − 1`` separators, summed from the ranges' Schur blocks.

    Parameters
    ----------
    schurs : list of arrays
        ``LocalKKT.schur`` of ranges ``0 .. R-1`` in order (rank 0's first).
    sizes : list of (int, int)
        ``(n_left, n_right)`` of each range.
    dtype, xp
        Element type and array module.
    ranges : list of (int, int)
        The layer ranges (for error messages).
    """

    def __init__(self, schurs, sizes, dtype, xp, ranges):
        self.xp, self.dtype, self.sizes = xp, np.dtype(dtype), list(sizes)
        sep = [nr for _, nr in sizes[:-1]]  # separator j sits between ranges j and j + 1
        self.offsets = np.concatenate([[0], np.cumsum(sep)]).astype(int).tolist()
        self.n = self.offsets[-1]
        self._fac = None
        if not sep:
            return
        entries = []
        for r, S in enumerate(schurs):
            base = self.offsets[r - 1] if r > 0 else 0  # S covers [s_{r-1}; s_r], contiguous
            if S.size:
                entries.append((base, base, xp.asarray(S, self.dtype)))
        try:
            self._fac = factor_symmetric_banded(entries, self.offsets, self.dtype, xp, "Reduced")
        except SingularBlockError as err:
            j = err.layer  # 1-based separator
            raise SingularBlockError(
                f"ReducedSystem: the interface system is numerically singular at the "
                f"interface after layer {ranges[j - 1][1]} (between ranks {j - 1} and {j}): "
                "H + damping*I is singular or nearly so; add damping",
                layer=ranges[j - 1][1],
            ) from None
        self.logdet = self._fac.logdet

    def solve(self, ts):
        """Each range's separators ``[s_{r-1}; s_r]`` from all ranges' ``t`` (``condense``)."""
        xp, off = self.xp, self.offsets
        k = ts[0].shape[1]
        if self._fac is None:
            return [xp.zeros((0, k), self.dtype) for _ in ts]
        rhs = xp.zeros((self.n, k), self.dtype)
        for r, t in enumerate(ts):
            base = off[r - 1] if r > 0 else 0
            rhs[base : base + t.shape[0]] += t
        s = self._fac.solve(rhs)
        return [
            s[(off[r - 1] if r > 0 else 0) : off[min(r + 1, len(off) - 1)]] for r in range(len(ts))
        ]
