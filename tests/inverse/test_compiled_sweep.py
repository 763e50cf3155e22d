"""The compiled (numba) sweeps of the dense stage against its array path.

On host NumPy the dense stage's sequential loops (the backward Riccati sweep
of the factorisation and both sweeps of a solve) run as compiled kernels
(:mod:`blockops.network.dense_stage_jit`); the array code stays the reference
and the CuPy path. Both compute the same quantities in a different order, so
they agree to rounding: ``≤ 1e-12`` relative in float64 where the problem is
well conditioned. Where it is not (tiny damping makes the stage pivots
ill-conditioned even when ``H + λI`` is not), the bound is ten times the
spread between the two array paths that already exist (host LAPACK and the
backend-generic kernels) or, for the gains ``T⁻¹R``, ten times
``ε cond(T)`` (the forward error of a backward-stable solve; the two array
paths can round identically on one BLAS), and for solves also three times
the array solve's own error (one step of iterative refinement against the
HVP estimates it).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from blockops import SingularBlockError
from blockops.backend import generic_linalg
from blockops.hessian import hvp
from blockops.inverse import inverse_hessian
from blockops.inverse.stagewise import StagewiseFactor, stages_from_point
from blockops.network import Dense, MSELoss, Pipeline
from blockops.network.dense_selected import _pivot_inverses
from blockops.network.dense_stage import DenseSegment
from blockops.network.dense_stage_jit import available, compiled

requires_numba = pytest.mark.skipif(
    not available(), reason="numba is not installed: the dense stage runs its array path"
)

FLOOR = {np.float64: 1e-12, np.float32: 2e-5}  # rounding-level agreement, well conditioned


def _point(depth, batch, width, a_in=None, act="tanh", seed=0, dtype=np.float64, scale=1.0):
    a_in = a_in or width
    layers = [Dense(a_in, width, act)] + [Dense(width, width, act) for _ in range(depth - 1)]
    net = Pipeline([*layers, MSELoss()])
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, a_in)).astype(dtype)
    y = (scale * rng.standard_normal((batch, width))).astype(dtype)
    return net, net.linearize(net.init(seed=seed, dtype=dtype), X, y)


def _factor(pt, lam, mode):
    """``StagewiseFactor`` by the ``"compiled"``, ``"array"`` or ``"generic"`` path."""
    if mode == "generic":
        with generic_linalg():
            return StagewiseFactor(stages_from_point(pt, lam))
    with compiled(mode == "compiled"):
        return StagewiseFactor(stages_from_point(pt, lam))


def _segments(F):
    return [st for st in F.stages if isinstance(st, DenseSegment)]


def _rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(x - ref) / (den if den > 0 else 1.0))


# (depth, batch, width, a_in, damping, activation, dtype): depths 1-40, batch 1-4, widths 2-16,
# damping from 10 down to 1e-9 and 0 (full basis only), indefinite pivots (LU) and definite
# ones, pivots of order k = ρ a below 32 (loops) and from 32 (LAPACK potrf / getrf)
CASES = [
    (1, 1, 2, None, 1e-2, "tanh", np.float64),
    (3, 1, 4, 3, 1e-2, "tanh", np.float64),
    (5, 2, 3, None, 1e-3, "tanh", np.float64),
    (40, 1, 16, None, 1e-3, "tanh", np.float64),
    (12, 2, 16, 5, 1e-3, "tanh", np.float64),
    (8, 3, 2, None, 1e-9, "tanh", np.float64),  # full basis: tiny damping allowed
    (8, 1, 6, None, 10.0, "sigmoid", np.float64),
    (6, 3, 2, None, 0.0, "tanh", np.float64),
    (4, 4, 8, 3, 1e-2, "softplus", np.float64),
    (5, 4, 16, None, 1e-2, "tanh", np.float64),  # B a = 64: compiled, array path 'large'
    (3, 8, 16, None, 1e-2, "tanh", np.float64),  # B a = 128 = JIT_M: k = 128, BLAS update
    (10, 1, 8, None, 1e-2, "tanh", np.float32),
    (6, 2, 16, None, 1e-1, "tanh", np.float32),  # k = 32: LAPACK potrf / getrf in float32
    (8, 2, 4, 3, 1e-1, "tanh", np.float32),
]


def _id(c):
    return f"d{c[0]}-b{c[1]}-w{c[2]}-in{c[3]}-lam{c[4]:g}-{c[5]}-{np.dtype(c[6]).name}"


@requires_numba
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_compiled_matches_array_path(case):
    depth, batch, width, a_in, lam, act, dt = case
    net, pt = _point(depth, batch, width, a_in, act, seed=depth + batch, dtype=dt)
    Fc, Fa, Fg = (_factor(pt, lam, m) for m in ("compiled", "array", "generic"))
    segs_c, segs_a, segs_g = _segments(Fc), _segments(Fa), _segments(Fg)
    assert all(s._jit is not None for s in segs_c)
    assert all(s._jit is None for s in segs_a + segs_g)

    floor = FLOOR[dt]

    def check(name, xc, xa, xg, bound=0.0):
        spread = _rel(xg, xa)  # what the problem's conditioning does to rounding
        err = _rel(xc, xa)
        assert err <= max(floor, 10 * spread, bound), (
            f"{name}: {err:.1e} (array paths {spread:.1e}, conditioning {bound:.1e})"
        )

    eps = float(np.finfo(dt).eps)
    for sc, sa, sg in zip(segs_c, segs_a, segs_g):
        # T Z = R solved in another order: forward error up to about eps cond(T)
        cond = float(np.linalg.cond(_pivot_inverses(sc, slice(None))).max())  # = cond(T)
        check("T^-1 R", sc.gains(), sa.gains(), sg.gains(), 10 * eps * cond)
        if sa.small:
            check("Psi", sc.Psi, sa.Psi, sg.Psi, 10 * eps * cond)
        check("logdet", sc.logdet, sa.logdet, sg.logdet)
        assert sc.inertia == sa.inertia == sg.inertia
    assert Fc.inertia == Fa.inertia
    G = np.random.default_rng(1).standard_normal((net.n_params, 3)).astype(dt)
    for cols in (slice(None), slice(0, 1)):  # three columns, and one (the vector layout)
        Xc, Xa, Xg = Fc.solve(G[:, cols]), Fa.solve(G[:, cols]), Fg.solve(G[:, cols])
        # the array solve's own error, estimated by one refinement step against the HVP
        step = Fa.solve(G[:, cols] - (hvp(pt, Xa) + lam * Xa))
        own = _rel(Xa + step, Xa)
        err, spread = _rel(Xc, Xa), _rel(Xg, Xa)
        assert err <= max(floor, 10 * spread, 3 * own), (
            f"solve: {err:.1e} ({spread:.1e}, {own:.1e})"
        )


@requires_numba
def test_lu_fallback_and_cholesky_are_both_exercised():
    """Indefinite pivots take the LU branch (and agree); definite ones Cholesky."""
    _, pt = _point(40, 1, 16, seed=41)
    (seg,) = _segments(_factor(pt, 1e-3, "compiled"))
    (ref,) = _segments(_factor(pt, 1e-3, "array"))
    assert seg._islu.all()  # T indefinite in every layer
    assert seg.inertia == ref.inertia and seg.inertia[0] > 0  # from T rebuilt out of its LU
    _, pt = _point(8, 1, 6, act="sigmoid", seed=9)
    (seg,) = _segments(_factor(pt, 10.0, "compiled"))
    assert not seg._islu.any() and seg.inertia[0] == 0
    _, pt = _point(1024, 1, 16, seed=0)  # the benchmark net: both kinds of pivots
    (seg,) = _segments(_factor(pt, 1e-3, "compiled"))
    assert 0 < seg._islu.sum() < seg.nlayers
    ud_lu = np.abs(np.diagonal(seg._F[seg._islu], axis1=1, axis2=2))  # |diag U| of the LU
    assert np.all(ud_lu > 0)
    net, pt = _point(30, 2, 16, seed=2)  # k = 32: LAPACK's potrf and getrf, both kinds
    Fc, Fa = _factor(pt, 1e-3, "compiled"), _factor(pt, 1e-3, "array")
    (seg,), (ref,) = _segments(Fc), _segments(Fa)
    assert seg.k >= seg._jit.LAPACK_K and 0 < seg._islu.sum() < seg.nlayers
    assert seg.inertia == ref.inertia
    assert _rel(seg.gains(), ref.gains()) <= 1e-12
    # solves through gains from the BLAS update (Cholesky layers) and from LU ones
    G = np.random.default_rng(3).standard_normal((net.n_params, 2))
    assert _rel(Fc.solve(G), Fa.solve(G)) <= 1e-11
    assert _rel(Fc.solve(G[:, :1]), Fa.solve(G[:, :1])) <= 1e-11


@requires_numba
@pytest.mark.parametrize("batch, lam", [(1, 1e-2), (2, 1e-1), (3, 1e-2)])
def test_exact_inverse_against_dense_solve(batch, lam):
    """The compiled factor's solve (no refinement) against NumPy on the dense H + λI."""
    net, pt = _point(3, batch, 4, a_in=3, seed=batch)
    n = net.n_params
    Hd = hvp(pt, np.eye(n)) + lam * np.eye(n)
    Hd = 0.5 * (Hd + Hd.T)
    g = np.random.default_rng(2).standard_normal((n, 2))
    F = _factor(pt, lam, "compiled")
    assert all(s._jit is not None for s in _segments(F))
    x = F.solve(g)
    assert _rel(Hd @ x, g) <= 1e-12
    xd = np.linalg.solve(Hd, g)
    assert _rel(x, xd) <= 1e-14 * np.linalg.cond(Hd)
    w = np.linalg.eigvalsh(Hd)
    assert F.inertia == (int((w < 0).sum()), 0, int((w > 0).sum()))
    assert F.logdet == pytest.approx(np.linalg.slogdet(Hd)[1], rel=1e-11)


@requires_numba
def test_inverse_hessian_with_refinement_uses_the_compiled_sweeps():
    net, pt = _point(64, 1, 16, seed=3)
    g = np.random.default_rng(4).standard_normal(net.n_params)
    Hi = inverse_hessian(pt, damping=1e-3, method="riccati", refine=1)
    assert all(s._jit is not None for s in _segments(Hi._factor))
    x = Hi.solve(g)
    assert Hi.info["residual"] <= 1e-12
    with compiled(False):
        Ha = inverse_hessian(pt, damping=1e-3, method="riccati", refine=1)
    assert _rel(x, Ha.solve(g)) <= 1e-10  # cond(H + λI) ~ 1e4: both are exact to that


def _dead_relu_point():
    """A dense stage whose pivot T is exactly zero: relu off everywhere, full basis, λ = 0."""
    net = Pipeline(
        [Dense(1, 1, "identity"), Dense(1, 1, "relu"), Dense(1, 1, "identity"), MSELoss()]
    )
    x = net.init(seed=0)
    x[2:4] = [0.0, -1.0]  # the relu layer: W = 0, c = -1, so σ' = σ'' = 0 for every sample
    X, y = np.array([[1.0], [2.0]]), np.array([[0.5], [-1.0]])
    return net.linearize(x, X, y)


@requires_numba
def test_singular_pivots_raise_the_same_error():
    pt = _dead_relu_point()
    errs = []
    for mode in ("compiled", "array"):
        with pytest.raises(SingularBlockError) as exc:
            _factor(pt, 0.0, mode)
        errs.append(exc.value)
    assert str(errs[0]) == str(errs[1]) and errs[0].layer == errs[1].layer
    assert "exactly singular" in str(errs[0])
    # numerically singular (damping far below eps * ||T||): the shared pivot criterion
    _, pt = _point(3, 2, 4, a_in=3, seed=1)
    errs = []
    for mode in ("compiled", "array"):
        with pytest.raises(SingularBlockError) as exc:
            _factor(pt, 1e-300, mode)
        errs.append(exc.value)
    assert errs[0].layer == errs[1].layer
    assert "numerically singular (pivot ratio" in str(errs[0])


@requires_numba
def test_generic_linalg_and_the_switch_bypass_the_kernels():
    _, pt = _point(4, 1, 4, seed=5)
    assert all(s._jit is not None for s in _segments(_factor(pt, 1e-2, "compiled")))
    assert all(s._jit is None for s in _segments(_factor(pt, 1e-2, "generic")))
    assert all(s._jit is None for s in _segments(_factor(pt, 1e-2, "array")))


def test_without_numba_the_array_path_runs():
    """numba is optional: absent, the dense stage falls back to its array path silently."""
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import numpy as np\n"
        "from blockops.network import Dense, MSELoss, Pipeline\n"
        "from blockops.inverse import inverse_hessian\n"
        "from blockops.network.dense_stage_jit import available, kernels\n"
        "net = Pipeline([Dense(3, 3, 'tanh') for _ in range(4)] + [MSELoss()])\n"
        "rng = np.random.default_rng(0)\n"
        "pt = net.linearize(net.init(), rng.standard_normal((1, 3)), rng.standard_normal((1, 3)))\n"
        "Hi = inverse_hessian(pt, damping=1e-2, method='riccati')\n"
        "x = Hi.solve(rng.standard_normal(net.n_params))\n"
        "assert not available() and kernels() is None\n"
        "assert Hi._factor.stages[0]._jit is None\n"
        "assert Hi.info['residual'] < 1e-12, Hi.info['residual']\n"
        "print('ok')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
