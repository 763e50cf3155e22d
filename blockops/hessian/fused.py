r"""The fused Hessian: Pearlmutter's ``R{backprop}`` (Appendix A, eqs. 46-54).

:func:`hvp` runs one forward sweep of directional derivatives ``g^α``
(eq. 53) and one backward sweep of ``b'`` (eq. 52, corrected:
``Mᵀ b'ᵀ = Pᵀ D_M (D_zz P g^α + D_xz v)``), all directions at once, through
each layer's declared steps (``jvp_keep`` / ``hvp_vjp`` of
:class:`~blockops.network.Layer`) and the stacked sweeps layers register
(``Layer.stack_key`` / ``Layer.stacked_sweep``). The same ``H v`` as eq. 24 at
the cost of about two gradients. :func:`ggn_vp` is the Gauss-Newton
counterpart and :class:`FusedHessian` wraps both as a LinearOperator.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from pylops import LinearOperator

from .._checks import KINDS, check_choice, check_damping, check_finite, check_on_backend
from ..network.layer import fused_steps
from ..operators._common import ArrayOperands
from .parts import point_structure

__all__ = ["FusedHessian", "ggn_vp", "hvp", "stacked_runs"]

MIN_RUN = 2  # a run of one layer gains nothing over the per-layer step


class _Run(NamedTuple):
    """Layers ``l0 .. l1-1`` swept by one stacked ``sweep``."""

    l0: int
    l1: int
    sweep: Any


def stacked_runs(point, st) -> dict:
    """``{l0: sweep}`` for the maximal runs of layers sharing one ``stack_key``.

    The loss is never stacked. Runs shorter than ``MIN_RUN`` use the per-layer
    steps. Kept in ``point.memo`` (built once per point).
    """
    memo = point.memo
    if "stacked_runs" in memo:
        return memo["stacked_runs"]
    layers, off = st.layers, st.x_offsets
    keys = [ly.stack_key() for ly in layers[:-1]] + [None]
    runs, l = {}, 0
    while l < len(layers) - 1:
        e = l + 1
        while keys[l] is not None and keys[e] == keys[l]:
            e += 1
        if keys[l] is not None and e - l >= MIN_RUN:
            build = type(layers[l]).stacked_sweep
            runs[l] = _Run(l, e, build(st.caches[l:e], st.bs[l:e], slice(off[l], off[e])))
        l = e
    memo["stacked_runs"] = runs
    return runs


def _directions(owner: str, st, V):
    """``V`` of shape ``(n,)`` or ``(n, k)`` as a ``(k, n)`` array of the point's dtype."""
    if not hasattr(V, "shape") or not hasattr(V, "dtype"):
        raise TypeError(f"{owner}: V must be an array, got {type(V).__name__}")
    check_on_backend(owner, "V", V, st.xp)
    n = st.n_params
    if V.ndim not in (1, 2) or V.shape[0] != n:
        raise ValueError(f"{owner}: V has shape {tuple(V.shape)}; expected ({n},) or ({n}, k)")
    if V.dtype.kind not in "fiu":
        raise TypeError(f"{owner}: V has dtype {V.dtype}; expected a real dtype")
    check_finite(owner, "V", V)
    W = V[None, :] if V.ndim == 1 else V.T
    # one contiguous (k, n) copy at most, so each layer's slice reshapes without copying
    return st.xp.ascontiguousarray(W, dtype=st.dtype)


def _result(st, out, V):
    return out[0] if V.ndim == 1 else st.xp.ascontiguousarray(out.T)


def hvp(point, V):
    r"""Hessian-vector products ``H V`` by Pearlmutter's ``R{backprop}`` (eqs. 46-54).

    Forward sweep (eq. 53): ``g_l = ∇_z f_l g_{l-1} + ∇_x f_l v_l``, ``g_0 = 0``.
    Backward sweep (eqs. 46-52), ``b'_L = 0`` because ``b_L = 1`` is constant:

    .. math::
        (h^z_l, h^x_l) = K_l [g_{l-1}; v_l], \quad
        (Hv)_l = b'_l ∇_x f_l + h^x_l, \quad
        b'_{l-1} = b'_l ∇_z f_l + h^z_l ,

    with ``K_l`` the Hessian of ``b_l · f_l`` in ``(z_{l-1}, x_l)``
    (``layer.hvp``). Stacked, this is eq. 54 = eq. 24.

    A layer may fuse the two steps: ``jvp_keep`` (``jvp`` without input
    checks, plus what the backward step reuses) and ``hvp_vjp`` (``hvp`` and
    ``vjp`` of ``b'`` through one adjoint, writing ``(Hv)_l`` in place), as
    :class:`~blockops.network.Dense` does; the defaults on
    :class:`~blockops.network.Layer` go through ``jvp``, ``hvp`` and ``vjp``.
    Runs of square dense layers are swept stacked
    (:mod:`blockops.network.dense_sweep`, its recurrences compiled on the
    CPU when numba is installed). Width 16, batch 1, depth 1024, one BLAS
    thread: 2.1 ms compiled, 7.6 ms stacked array loops, 35 ms with the
    fused per-layer steps, 52 ms with the three separate calls
    (``benchmarks/bench_hvp.py``; noisy shared 2-core machine).

    Parameters
    ----------
    point : Point
        Linearised pipeline.
    V : array ``(n,)`` or ``(n, k)``
        One or ``k`` directions; all ``k`` go through each layer at once.
        Cast to the point's dtype; never modified.

    Returns
    -------
    array of ``V``'s shape
    """
    st = point_structure(point)
    W = _directions("hvp", st, V)
    layers, caches, bs, off = st.layers, st.caches, st.bs, st.x_offsets
    runs = stacked_runs(point, st)
    vs, g, keep = _tangent_sweep(st, runs, W, len(layers) - 1)
    out = st.xp.empty(W.shape, dtype=st.dtype)
    # backward sweep, eqs. 46-52: one fused step per layer gives
    # (h^z_l + b'_l ∇_z f_l, h^x_l + b'_l ∇_x f_l), h^x written into its rows of out
    bprime = None  # b'_L = 0
    for l, run in _reversed_steps(runs, len(layers) - 1):
        if run is not None:
            bprime = run.sweep.backward(keep[run.l0], bprime, out)
        elif g[l] is None and vs[l] is None:  # parameter-free layer(s) at the start: h = 0
            if bprime is not None:
                bprime = layers[l].vjp(caches[l], bprime)[0]
        else:
            rows = out[:, off[l] : off[l + 1]]
            step = fused_steps(layers[l])[1]
            bprime, hx = step(caches[l], bs[l], g[l], vs[l], bprime, keep[l], rows)
            if hx is not rows:
                rows[...] = hx
    return _result(st, out, V)


def _tangent_sweep(st, runs, W, stop):
    """Forward sweep of eq. 53 over layers ``0 .. stop-1``: ``(vs, g, keep)``.

    ``vs[l]`` is layer ``l``'s block of the directions ``W``; ``g[l] = dz_{l-1}``
    pushed forward (``None`` while nothing varies, ``g[0] = dz_0 = 0``);
    ``keep[l]`` is what the layer's backward step reuses (a dense layer's
    pre-activation derivative; a stacked run's state, at its first layer).
    """
    L, off = len(st.layers), st.x_offsets
    vs = [W[:, off[l] : off[l + 1]] if st.p[l] else None for l in range(L)]
    g, keep = [None] * L, [None] * L
    l = 0
    while l < stop:
        if l in runs:  # a stacked run (e.g. square dense layers): one stacked step
            run = runs[l]
            g[run.l1], keep[l] = run.sweep.forward(g[l], W)
            l = run.l1
            continue
        if g[l] is not None or vs[l] is not None:  # else dz_l = 0 (nothing varies yet)
            g[l + 1], keep[l] = fused_steps(st.layers[l])[0](st.caches[l], g[l], vs[l])
        l += 1
    return vs, g, keep


def _reversed_steps(runs, top):
    """Layers ``top .. 0`` backwards as ``(l, None)``, each stacked run once as ``(l, run)``."""
    ends = {run.l1 - 1: run for run in runs.values()}
    l = top
    while l >= 0:
        run = ends.get(l)
        yield l, run
        l = (run.l0 if run is not None else l) - 1


def ggn_vp(point, V):
    r"""Generalized Gauss-Newton products ``G V = Jᵀ H_ℓ J V``.

    ``J = ∂z_{L-1}/∂x`` is the Jacobian of the network output (the loss
    input) and ``H_ℓ`` the Hessian of the loss in it (``K_zz`` of the loss
    layer with ``b_L = 1``). One forward ``jvp`` sweep to ``z_{L-1}``, the
    loss Hessian, one backward ``vjp`` sweep. ``G`` is symmetric and positive
    semi-definite whenever the loss is convex in its input (MSE, softmax
    cross-entropy). A loss with parameters of its own ``x_L`` (e.g.
    :class:`~blockops.network.AuxiliaryScalarLoss`) keeps its full Hessian in
    ``(z_{L-1}, x_L)``: ``G = J̃ᵀ ∇²ℓ J̃`` with ``J̃ = ∂(z_{L-1}, x_L)/∂x``.
    """
    st = point_structure(point)
    W = _directions("ggn_vp", st, V)
    layers, caches, bs, off = st.layers, st.caches, st.bs, st.x_offsets
    L = len(layers)
    runs = stacked_runs(point, st)
    vs, g, keep = _tangent_sweep(st, runs, W, L - 1)
    out = st.xp.zeros(W.shape, dtype=st.dtype)
    dz, v_L = g[L - 1], vs[L - 1]
    if dz is None and v_L is None:  # pragma: no cover - no parameters anywhere
        return _result(st, out, V)
    if dz is None:
        dz = st.xp.zeros((W.shape[0], *caches[L - 1].z_prev.shape), dtype=st.dtype)
    bprime, hx = layers[L - 1].hvp(caches[L - 1], bs[L - 1], dz, v_L)
    if st.p[L - 1]:
        out[:, off[L - 1] : off[L]] = hx
    for l, run in _reversed_steps(runs, L - 2):
        if run is not None:
            bprime = run.sweep.backward(keep[run.l0], bprime, out, second_order=False)
            continue
        bprime, bx = layers[l].vjp(caches[l], bprime)
        if st.p[l]:
            out[:, off[l] : off[l + 1]] = bx
    return _result(st, out, V)


class FusedHessian(ArrayOperands, LinearOperator):
    r"""``H + λ I`` (or ``G + λ I``) applied by the fused sweeps of :func:`hvp` / :func:`ggn_vp`.

    Forward and adjoint are the same (``H`` is symmetric):
    ``y = H x + λ x``. ``matmat`` pushes all columns through each layer at
    once.

    Parameters
    ----------
    point : Point
        Linearised pipeline (held by reference; it is read, never modified).
    damping : float
        ``λ ≥ 0`` added on the diagonal.
    kind : {"hessian", "ggn"}
        The exact Hessian (default) or the generalized Gauss-Newton matrix.
    """

    def __init__(self, point, damping: float = 0.0, kind: str = "hessian"):
        check_choice("FusedHessian", "kind", kind, KINDS)
        damping = check_damping("FusedHessian", damping)
        self.point, self.damping, self.kind = point, damping, kind
        self.st = point_structure(point)
        self._apply = hvp if kind == "hessian" else ggn_vp
        n = self.st.n_params
        super().__init__(dtype=self.st.dtype, shape=(n, n), name=f"{kind} (fused)")

    def __reduce__(self):
        return type(self), (self.point, self.damping, self.kind)

    @property
    def xp(self):
        return self.st.xp

    def _mv(self, X):
        Y = self._apply(self.point, X)
        if self.damping:
            Y += self.damping * X
        return Y

    def _matvec(self, x):
        return self._mv(x)

    def _rmatvec(self, x):
        return self._mv(x)

    def _matmat(self, X):
        return self._mv(X)

    def _rmatmat(self, X):
        return self._mv(X)
