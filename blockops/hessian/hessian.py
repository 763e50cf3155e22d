r"""The Hessian of a pipeline: eq. 24 literally, eq. 26 lifted, and a fused HVP.

Three forms of the same operator ``H = ∂²z_L/∂x²`` at a linearised point:

``literal_hessian``
    eq. 24 written as operator algebra of :func:`~blockops.hessian.parts.hessian_parts`,
    so that the code reads like the paper.
``lifted_hessian``
    eq. 26, ``Uᵀ K U`` with ``U = [M⁻¹ D_x; I]`` and ``K`` the 2×2 block of
    first- and second-derivative operators.
``FusedHessian`` / :func:`hvp`
    Pearlmutter's ``R{backprop}`` (Appendix A, eqs. 46-54): one forward sweep
    of directional derivatives ``g^α`` (eq. 53) and one backward sweep of
    ``b'`` (eq. 52, corrected: ``Mᵀ b'ᵀ = Pᵀ D_M (D_zz P g^α + D_xz v)``),
    all directions at once, with the layers' fused ``jvp``, ``vjp`` and
    ``hvp``. This is the default: the same ``H v`` as eq. 24 at the cost of
    about two gradients.

:func:`hessian` picks a form, adds damping ``λ I``, and offers the
generalized Gauss-Newton matrix (``kind="ggn"``).
"""

from __future__ import annotations

import functools

import numpy as np
import pylops
from pylops import LinearOperator

from .._checks import check_finite
from ..backend import is_cupy_array
from .dense_run import dense_runs
from .parts import Layerwise, hessian_parts, point_structure

__all__ = [
    "FusedHessian",
    "ggn_vp",
    "hessian",
    "hvp",
    "lifted_hessian",
    "literal_ggn",
    "literal_hessian",
]


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


def _directions(owner: str, st, V):
    """``V`` of shape ``(n,)`` or ``(n, k)`` as a ``(k, n)`` array of the point's dtype."""
    if not hasattr(V, "shape") or not hasattr(V, "dtype"):
        raise TypeError(f"{owner}: V must be an array, got {type(V).__name__}")
    if is_cupy_array(V) != (st.xp is not np):
        raise TypeError(
            f"{owner}: V is a {type(V).__module__.split('.')[0]} array but the point holds "
            f"{st.xp.__name__} arrays; move it to one backend first"
        )
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
    :class:`~blockops.network.Dense` does; other layers go through their
    ``jvp``, ``hvp`` and ``vjp``. Runs of square dense layers are swept
    stacked (:mod:`blockops.hessian.dense_run`). Width 16, batch 1, depth
    1024, one BLAS thread: 14 ms stacked, 35 ms with the fused per-layer
    steps, 52 ms with the three separate calls (``benchmarks/bench_hvp.py``;
    noisy shared 2-core machine).

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
    runs = dense_runs(point, st)
    vs, g, keep = _tangent_sweep(st, runs, W, len(layers) - 1)
    out = st.xp.empty(W.shape, dtype=st.dtype)
    # backward sweep, eqs. 46-52: one fused step per layer gives
    # (h^z_l + b'_l ∇_z f_l, h^x_l + b'_l ∇_x f_l), h^x written into its rows of out
    bprime = None  # b'_L = 0
    for l, run in _reversed_steps(runs, len(layers) - 1):
        if run is not None:
            bprime = run.backward(keep[run.l0], bprime, out)
        elif g[l] is None and vs[l] is None:  # parameter-free layer(s) at the start: h = 0
            if bprime is not None:
                bprime = layers[l].vjp(caches[l], bprime)[0]
        else:
            rows = out[:, off[l] : off[l + 1]]
            step = _hvp_vjp(layers[l])
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
        if l in runs:  # a run of square dense layers: one stacked step (dense_run.py)
            run = runs[l]
            g[run.l1], keep[l] = run.forward(g[l], W)
            l = run.l1
            continue
        if g[l] is not None or vs[l] is not None:  # else dz_l = 0 (nothing varies yet)
            g[l + 1], keep[l] = _jvp_keep(st.layers[l])(st.caches[l], g[l], vs[l])
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


@functools.cache
def _fused_steps(cls) -> tuple[bool, bool]:
    """Whether ``cls``'s ``jvp_keep`` / ``hvp_vjp`` may stand in for ``jvp`` / ``hvp`` + ``vjp``.

    Only when they are defined at least as far down the class tree as the
    methods they fuse: a subclass that overrides ``jvp`` or ``hvp`` (and not
    the fused method) keeps its own behaviour through the generic steps.
    """

    def owner(name):
        return next((k for k in cls.__mro__ if name in vars(k)), None)

    def fusable(fused, *parts):
        f = owner(fused)
        return f is not None and all(issubclass(f, owner(p)) for p in parts)

    return fusable("jvp_keep", "jvp"), fusable("hvp_vjp", "hvp", "vjp")


def _jvp_keep(layer):
    """The layer's ``jvp_keep`` (unchecked ``jvp`` plus state), or one built on ``jvp``."""
    if _fused_steps(type(layer))[0]:
        return layer.jvp_keep
    return lambda cache, dz_prev, dx: (layer.jvp(cache, dz_prev, dx), None)


def _hvp_vjp(layer):
    """The layer's fused ``hvp_vjp``, or one built on its ``hvp`` and ``vjp``.

    Returns a callable ``(cache, b, dz_prev, dx, bprime, keep, out) ->
    (hz + bz, hx + bx)``; ``bprime=None`` means ``b' = 0``; ``hx`` may or may
    not be written into ``out``.
    """
    if _fused_steps(type(layer))[1]:
        return layer.hvp_vjp

    def step(cache, b, dz_prev, dx, bprime, keep, out):
        hz, hx = layer.hvp(cache, b, dz_prev, dx)
        if bprime is None:
            return hz, hx
        bz, bx = layer.vjp(cache, bprime)
        if layer.n_params:
            hx = hx + bx
        return (bz if hz is None else hz + bz), hx

    return step


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
    runs = dense_runs(point, st)
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
            bprime = run.backward(keep[run.l0], bprime, out, second_order=False)
            continue
        bprime, bx = layers[l].vjp(caches[l], bprime)
        if st.p[l]:
            out[:, off[l] : off[l + 1]] = bx
    return _result(st, out, V)


class FusedHessian(LinearOperator):
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
        if kind not in ("hessian", "ggn"):
            raise ValueError(f"FusedHessian: kind={kind!r}; expected 'hessian' or 'ggn'")
        damping = float(damping)
        if not np.isfinite(damping) or damping < 0:
            raise ValueError(f"FusedHessian: damping={damping}; expected a finite value >= 0")
        self.point, self.damping, self.kind = point, damping, kind
        self.st = point_structure(point)
        self._apply = hvp if kind == "hessian" else ggn_vp
        n = self.st.n_params
        super().__init__(dtype=self.st.dtype, shape=(n, n), name=f"{kind} (fused)")

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
    if form not in ("fused", "literal", "lifted"):
        raise ValueError(f"hessian: form={form!r}; expected 'fused', 'literal' or 'lifted'")
    if kind not in ("hessian", "ggn"):
        raise ValueError(f"hessian: kind={kind!r}; expected 'hessian' or 'ggn'")
    if form == "fused":
        return FusedHessian(point, damping=damping, kind=kind)
    damping = float(damping)
    if not np.isfinite(damping) or damping < 0:
        raise ValueError(f"hessian: damping={damping}; expected a finite value >= 0")
    if kind == "ggn":
        if form == "lifted":
            raise ValueError("hessian: kind='ggn' is offered with form='fused' or 'literal'")
        H = literal_ggn(point)
    else:
        H = literal_hessian(point) if form == "literal" else lifted_hessian(point)
    if damping:
        H = H + damping * pylops.Identity(H.shape[0], dtype=H.dtype)
    return H
