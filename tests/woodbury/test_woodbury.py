"""Tests of the paper's inverse route (eqs. 25-43, corrected): blockops.woodbury.

References are independent of the code under test: the JAX dense Hessian of
``tests/reference.py``, dense NumPy solves, and (for exactness independent of
rounding) the corrected algebra re-evaluated here in 50-digit mpmath from the
per-layer blocks (taken as exact) and compared to a 50-digit dense solve of
eq. 24 assembled from the same blocks.
"""

from __future__ import annotations

import warnings

import mpmath as mp
import numpy as np
import pytest
import reference
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pylops.utils import dottest

from blockops import SingularBlockError
from blockops.network import Bias, Dense, MSELoss, Pipeline, Scale, SoftmaxCrossEntropy
from blockops.network.auxiliary import AuxiliaryScalarLoss
from blockops.woodbury import (
    WoodburyConditionWarning,
    WoodburyRoute,
    woodbury_inverse,
)
from blockops.woodbury.blocks import scalar_view

EPS = np.finfo(np.float64).eps


# -- the valid families ---------------------------------------------------------------------
def family(kind, a, depth, seed=0, loss="ce", batch=None, dtype=np.float64):
    """(pipeline, x, X, y) of a network in a valid family (see the woodbury module doc)."""
    rng = np.random.default_rng(seed)
    make = {
        "dense": lambda: Dense(a, a, "tanh"),
        "scale": lambda: Scale(a, "tanh"),
        "bias": lambda: Bias(a, "tanh"),
    }[kind]
    B = batch if batch is not None else (a + 1 if kind == "dense" else 1)
    last = SoftmaxCrossEntropy() if loss == "ce" else MSELoss()
    pipe = Pipeline([make() for _ in range(depth)] + [last])
    x = pipe.init(seed=seed, dtype=dtype)
    if kind == "scale":  # keep the scales away from zero (∇_x f = diag(σ' z) must be invertible)
        x = x + np.asarray(0.5, dtype=dtype)
    X = rng.standard_normal((B, a)).astype(dtype)
    y = rng.integers(0, a, B) if loss == "ce" else rng.standard_normal((B, a)).astype(dtype)
    return pipe, x, X, y


def dense_blocks(view):
    """Dense M, Dx, K (eq. 24 pieces) assembled by plain loops from the scalar-view blocks."""
    L, nz, nx = view.n_layers, view.z_sizes, view.x_sizes
    oz, ox = np.cumsum([0, *nz]), np.cumsum([0, *nx])
    Nz, Nx = oz[-1], ox[-1]
    M, Dx = np.eye(Nz), np.zeros((Nz, Nx))
    Kz, Kzx, Kx = np.zeros((Nz, Nz)), np.zeros((Nz, Nx)), np.zeros((Nx, Nx))
    for k in range(L):
        Dx[oz[k] : oz[k + 1], ox[k] : ox[k + 1]] = view.Jx[k]
        Kx[ox[k] : ox[k + 1], ox[k] : ox[k + 1]] = view.Kxx[k]
        if k:
            M[oz[k] : oz[k + 1], oz[k - 1] : oz[k]] = -view.Jz[k]
            Kz[oz[k - 1] : oz[k], oz[k - 1] : oz[k]] = view.Kzz[k]  # P^T DM Dzz P
            Kzx[oz[k - 1] : oz[k], ox[k] : ox[k + 1]] = view.Kxz[k].T  # P^T DM Dxz
    return M, Dx, Kz, Kzx, Kx, oz, ox


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- (a) exactness independent of rounding: the corrected algebra in 50 digits ----------------
def _mp(A):
    return mp.matrix(np.asarray(A, dtype=np.float64).tolist())


def _mp_block(mats):
    rows = []
    for row in mats:
        rows.append(np.hstack(row))
    return np.vstack(rows)


def mp_woodbury_solve(view, moved, g):
    """Eqs. 27-43 corrected, densely in mpmath; returns (H⁻¹g by the route, dense solve)."""
    M, Dx, Kz, Kzx, Kx, oz, _ = dense_blocks(view)
    Nz, Nx = M.shape[0], Dx.shape[1]
    M, Dx, Kz, Kzx, Kx = map(_mp, (M, Dx, Kz, Kzx, Kx))
    Iz = mp.eye(Nz)
    Minv = M**-1
    H = Kx + Kzx.T * Minv * Dx + Dx.T * Minv.T * Kzx + Dx.T * Minv.T * Kz * Minv * Dx  # eq. 24
    Dxinv = Dx**-1
    Ainv = Dxinv * M * M.T * Dxinv.T  # step 1
    # Q blocks (eqs. 30-33) and Q^-1 by eq. 29 (pivot Q22, Schur S_q of eq. 34)
    Q11, Q12, Q21, Q22 = Kz - Iz, Kzx, Kzx.T, Kx
    Q22i = Q22**-1
    Sqi = (Q11 - Q12 * Q22i * Q21) ** -1
    Qt11, Qt12 = Sqi, -Sqi * Q12 * Q22i
    Qt21, Qt22 = -Q22i * Q21 * Sqi, Q22i + Q22i * Q21 * Sqi * Q12 * Q22i
    # S_H = +Q^-1 + U A^-1 U^T (eq. 35; eq. 36's sign corrected), blocks of eq. 38
    SH = mp.zeros(Nz + Nx, Nz + Nx)
    blocks = {
        (0, 0): Qt11 + Iz,
        (0, 1): Qt12 + M.T * Dxinv.T,
        (1, 0): Qt21 + Dxinv * M,
        (1, 1): Qt22 + Ainv,
    }
    offs = (0, Nz)
    for (i, j), Bk in blocks.items():
        for r in range(Bk.rows):
            for c in range(Bk.cols):
                SH[offs[i] + r, offs[j] + c] = Bk[r, c]
    # repartition: S_H11 keeps the z blocks not moved (z_L is always moved)
    moved0 = {m - 1 for m in moved}
    i1 = [i for k in range(view.n_layers) if k not in moved0 for i in range(oz[k], oz[k + 1])]
    i2 = [i for i in range(Nz + Nx) if i not in set(i1)]

    def sub(A, r, c):
        out = mp.zeros(len(r), len(c))
        for a, ra in enumerate(r):
            for b, cb in enumerate(c):
                out[a, b] = A[ra, cb]
        return out

    gm = _mp(np.asarray(g)[:, None])
    gp = mp.matrix(list(Minv * Dx * Ainv * gm) + list(Ainv * gm))  # U A^-1 g
    g1, g2 = sub(gp, i1, [0]), sub(gp, i2, [0])
    S22 = sub(SH, i2, i2)
    if i1:
        S11, S12, S21 = sub(SH, i1, i1), sub(SH, i1, i2), sub(SH, i2, i1)
        S11i = S11**-1
        St22 = (S22 - S21 * S11i * S12) ** -1  # eq. 40
        St21 = -St22 * S21 * S11i  # eq. 41
        St12 = -S11i * S12 * St22  # eq. 42 (= St21^T)
        St11 = S11i - S11i * S12 * St21  # eq. 43
        h1, h2 = St11 * g1 + St12 * g2, St21 * g1 + St22 * g2
    else:  # every z block moved (bias-only networks): S_H itself is the second block
        h1, h2 = [], S22**-1 * g2
    gpp = mp.zeros(Nz + Nx, 1)
    for a, i in enumerate(i1):
        gpp[i] = h1[a]
    for a, i in enumerate(i2):
        gpp[i] = h2[a]
    U_T_gpp = Dx.T * Minv.T * sub(gpp, range(Nz), [0]) + sub(gpp, range(Nz, Nz + Nx), [0])
    route = Ainv * gm - Ainv * U_T_gpp  # eq. 28 plus the missing final step
    return route, mp.lu_solve(H, gm)


@pytest.mark.parametrize(
    "kind,a,depth,loss",
    [("scale", 2, 3, "ce"), ("bias", 2, 3, "ce"), ("dense", 1, 3, "mse"), ("dense", 2, 2, "ce")],
)
def test_exact_in_high_precision(kind, a, depth, loss):
    pipe, x, X, y = family(kind, a, depth, seed=4, loss=loss)
    pt = pipe.linearize(x, X, y)
    route = WoodburyRoute(pt)
    g = np.random.default_rng(0).standard_normal(route.Nx)
    with mp.workdps(50):
        got, want = mp_woodbury_solve(route.view, route.moved, g)
        err = mp.norm(got - want) / mp.norm(want)
        assert err < mp.mpf(10) ** -40, (kind, err)


# -- (b) float64 against the independent JAX Hessian ------------------------------------------
def route_cond(r):
    """Dense condition number that scales the route's float64 error (computed in the test).

    The route inverts A and S_H (Woodbury, eq. 28) and gets Q⁻¹ by pivoting on
    Q22 (eq. 29); when that pivot is worse conditioned than Q itself, the
    excess is lost too.
    """
    c = np.linalg.cond
    cQ = c(r.Q.todense())
    excess = max(1.0, c(r.Q22.todense()) / cQ, c(r.S_q.todense()) / cQ)
    return c(r.A.todense()) * c(r.S_H.todense()) * excess


def _check_against_jax(kind, a, depth, seed, loss, damping):
    pipe, x, X, y = family(kind, a, depth, seed=seed, loss=loss)
    pt = pipe.linearize(x, X, y)
    Href = np.asarray(reference.dense_hessian(pipe, x, X, y)) + damping * np.eye(x.shape[0])
    try:
        Hinv = woodbury_inverse(pt, damping=damping)
    except SingularBlockError as err:  # a numerically singular draw: rejected, never wrong
        assert 'method="kkt"' in str(err)
        assume(False)
    g = np.random.default_rng(seed + 1).standard_normal(x.shape[0])
    g0 = g.copy()
    got = Hinv @ g
    assert np.array_equal(g, g0)  # caller's array untouched
    want = np.linalg.solve(Href, g)
    cond = route_cond(Hinv.route)
    # The route's float64 error is c·eps·cond, c <= 23 on 1500 draws of the dense
    # family (<= 1 for the diagonal ones). The bound below is capped at 1e-7 so that
    # it can fail; that cap holds only while 23·eps·cond < 1e-7, i.e. cond <= 1e7:
    # the former cond <= 1e13 let a thorough run draw a=2, depth=2, seed=98,
    # damping=0 (cond 2.1e12, error 1.9e-7, ~4e-4 of eps·cond). Past ~1e13 the route
    # certifies nothing (it warns; see test_condition_warning).
    assume(cond <= 1e7)
    assert rel(got, want) < min(1e-13 * cond, 1e-7), (rel(got, want), cond)
    return rel(got, want), cond


@settings(max_examples=6)
@given(
    kind=st.sampled_from(["scale", "bias"]),
    a=st.integers(2, 4),
    depth=st.integers(1, 6),
    seed=st.integers(0, 1000),
    damping=st.sampled_from([0.0, 1e-3, 0.5]),
)
def test_diagonal_families_match_jax(kind, a, depth, seed, damping):
    _check_against_jax(kind, a, depth, seed, "ce", damping)


@settings(max_examples=6)
@given(
    a=st.integers(1, 3),
    depth=st.integers(1, 3),
    seed=st.integers(0, 1000),
    loss=st.sampled_from(["mse", "ce"]),
    damping=st.sampled_from([0.0, 1e-2]),
)
def test_dense_family_matches_jax(a, depth, seed, loss, damping):
    if loss == "ce" and a == 1:
        loss = "mse"  # a one-class softmax has a zero Hessian
    _check_against_jax("dense", a, depth, seed, loss, damping)


def test_explicit_auxiliary_loss_matches_internal_augmentation():
    pipe, x, X, y = family("scale", 3, 3, seed=5)
    aux = Pipeline([*pipe.layers[:-1], AuxiliaryScalarLoss(SoftmaxCrossEntropy())])
    xa = np.concatenate([x, [1.0]])
    pa = aux.linearize(xa, X, y)
    assert aux.n_params == pipe.n_params + 1
    assert abs(pa.loss - (pipe.loss(x, X, y) + 0.5)) < 1e-14
    assert pa.gradient[-1] == 1.0
    Ha = woodbury_inverse(pa)  # loss already augmented: the full augmented inverse
    Hu = woodbury_inverse(pipe.linearize(x, X, y))  # augmented internally
    g = np.random.default_rng(2).standard_normal(x.shape[0])
    ga = np.concatenate([g, [0.0]])
    Href = reference.dense_hessian(pipe, x, X, y)
    want = np.linalg.solve(Href, g)
    assert Ha.shape == (x.shape[0] + 1,) * 2 and Hu.shape == (x.shape[0],) * 2
    assert rel((Ha @ ga)[:-1], want) < 1e-12
    assert abs((Ha @ ga)[-1]) < 1e-12  # decoupled: H_aug⁻¹ [g; 0] = [H⁻¹ g; 0]
    assert rel(Hu @ g, want) < 1e-12


# -- (c) identities ---------------------------------------------------------------------------
# seeds chosen so every condition-scaled bound below is < 1e-5 (checked in the test):
# with seed 7 they reached 1e17-1e18 and the bounds could not fail.
@pytest.mark.parametrize(
    "kind,a,depth,loss,seed", [("scale", 3, 3, "ce", 0), ("dense", 2, 2, "mse", 20)]
)
def test_identities(kind, a, depth, loss, seed):
    pipe, x, X, y = family(kind, a, depth, seed=seed, loss=loss)
    pt = pipe.linearize(x, X, y)
    r = WoodburyRoute(pt)
    n = x.shape[0]
    # eq. 27 equals eq. 24: A + Uᵀ Q U (scalar view, augmented) vs the JAX Hessian
    H27 = r.A.todense() + r.U.H.todense() @ r.Q.todense() @ r.U.todense()
    Href = np.asarray(reference.dense_hessian(pipe, x, X, y))
    scale = np.abs(Href).max()
    assert np.abs(H27[:n, :n] - Href).max() < 1e-12 * scale * np.linalg.cond(r.A.todense())
    assert np.abs(H27[n:, :n]).max() < 1e-12 * scale * np.linalg.cond(r.A.todense())
    assert abs(H27[n, n] - 1.0) < 1e-9  # the auxiliary scalar's block
    # eq. 24 from the view blocks in plain numpy
    M, Dx, Kz, Kzx, Kx, _, _ = dense_blocks(r.view)
    Mi = np.linalg.inv(M)
    H24 = Kx + Kzx.T @ Mi @ Dx + Dx.T @ Mi.T @ Kzx + Dx.T @ Mi.T @ Kz @ Mi @ Dx
    assert np.abs(H24 - H27).max() < 1e-12 * scale * np.linalg.cond(r.A.todense())
    # A⁻¹ A = I, Q Q⁻¹ = I, S_H S_H⁻¹ = I, condition-scaled: a partitioned inverse
    # loses about eps · cond(pivot) · cond(Schur complement) (Q: pivot Q22, Schur S_q,
    # eq. 29; S_H: pivot S_H11, Schur of eq. 40), and S_H carries Q⁻¹'s error
    c = np.linalg.cond
    cQ, cSH = c(r.Q.todense()), c(r.S_H.todense())
    q_piv = max(cQ, c(r.Q22.todense()) * c(r.S_q.todense()))
    sh_piv = max(cSH, c(r.S_H11.todense()) * c(r.schur.todense()))
    bounds = {
        "A": c(r.A.todense()),
        "Q": q_piv,
        "S_H": sh_piv * q_piv / cQ,
        "S_q": c(r.S_q.todense()),
    }
    assert 1e-13 * max(max(bounds.values()), route_cond(r)) < 1e-5  # the bounds can fail
    for key, op, inv in (
        ("A", r.A, r.A_inv),
        ("Q", r.Q, r.Q_inv),
        ("S_H", r.S_H, r.S_H_inv),
        ("S_q", r.S_q, r.S_q_inv),
    ):
        D, Di = op.todense(), inv.todense()
        err = np.abs(D @ Di - np.eye(D.shape[0])).max()
        assert err < 1e-13 * bounds[key], (key, err, bounds[key])
    # the Schur complement (eq. 40) equals the dense one of the repartitioned S_H
    SH = r.Pi.todense() @ r.S_H.todense() @ r.Pi.todense().T
    n1 = SH.shape[0] - r.schur.shape[0]
    S = SH[n1:, n1:] - SH[n1:, :n1] @ np.linalg.solve(SH[:n1, :n1], SH[:n1, n1:])
    assert np.abs(S - r.schur.todense()).max() < 1e-12 * np.abs(S).max() * np.linalg.cond(
        SH[:n1, :n1]
    )
    # the explicit blocks agree with the literal eq. 35 composition (both carry the
    # error of the Q22 / S_q pivots)
    assert np.abs(r.S_H_part.todense() - SH).max() < 1e-13 * q_piv / cQ * np.abs(SH).max()
    # cheap forms vs eq. 28 verbatim (operators.Woodbury)
    g = np.random.default_rng(1).standard_normal(r.Nx)
    assert rel(r.H_inv @ g, r.H_inv_literal @ g) < 1e-13 * route_cond(r)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dottest_and_dtype(dtype):
    pipe, x, X, y = family("scale", 3, 3, seed=11, dtype=dtype)
    r = WoodburyRoute(pipe.linearize(x, X, y))
    tol = 1e-10 if dtype == np.float64 else 1e-3
    for op in (r.A_inv, r.U, r.Q_inv, r.S_H, r.S_H_inv, r.schur_inv, r.H_inv):
        assert dottest(op, *op.shape, rtol=tol)
        assert op.dtype == dtype
    g = np.ones(x.shape[0], dtype=dtype)
    out = woodbury_inverse(pipe.linearize(x, X, y)) @ g
    assert out.dtype == dtype
    want = np.linalg.solve(reference.dense_hessian(pipe, x.astype(np.float64), X, y), g)
    assert rel(out, want) < (1e-12 if dtype == np.float64 else 1e-3)


# -- (d) the printed sign of eq. 36 and the printed partition ----------------------------------
def test_printed_sign_gives_wrong_answer():
    pipe, x, X, y = family("scale", 3, 3, seed=2)
    pt = pipe.linearize(x, X, y)
    r = WoodburyRoute(pt)
    g = np.random.default_rng(3).standard_normal(r.Nx)
    g[-1] = 0.0
    want = np.linalg.solve(reference.dense_hessian(pipe, x, X, y), g[:-1])
    # printed eq. 36: S_H' = -Q⁻¹ - U A⁻¹ Uᵀ = -S_H, so S_H'⁻¹ = -S_H⁻¹ in eq. 28
    printed = r.A_inv + r.A_inv @ r.U.H @ r.S_H_inv @ r.U @ r.A_inv
    corrected = r.A_inv - r.A_inv @ r.U.H @ r.S_H_inv @ r.U @ r.A_inv
    assert rel((corrected @ g)[:-1], want) < 1e-12
    assert rel((printed @ g)[:-1], want) > 0.1


@pytest.mark.parametrize("a", [1, 2])
def test_printed_partition_has_zero_pivot(a):
    pipe, x, X, y = family("dense", a, 2, seed=4, loss="mse")
    pt = pipe.linearize(x, X, y)
    r = WoodburyRoute(pt, partition="last")  # the minimal correction: only z_L moved
    assert r.moved == [len(pipe.layers)]
    # the z_L block of S_H11 = S_q⁻¹ + I is exactly zero (item 3): S_q's block is -1
    assert r.blocks.S_q[-1].tolist() == [[-1.0]] and r.blocks.SH11[-1].tolist() == [[0.0]]
    # and the literal eq. 35 composition agrees to rounding (z_L meets no other z)
    SH = r.S_H.todense()
    assert np.abs(SH[r.Nz - 1, : r.Nz]).max() < 1e-13
    with pytest.raises(SingularBlockError, match="z_L"):
        WoodburyRoute(pt, partition="printed")
    # the corrected partition gives the right answer
    g = np.random.default_rng(0).standard_normal(x.shape[0])
    want = np.linalg.solve(reference.dense_hessian(pipe, x, X, y), g)
    assert rel(woodbury_inverse(pt, partition="last") @ g, want) < 1e-13 * route_cond(r)


def test_softmax_input_block_needs_the_auto_partition():
    # the softmax Hessian is singular, so S_H11's block of z_{L-1} is singular as well
    pipe, x, X, y = family("scale", 3, 2, seed=4)
    pt = pipe.linearize(x, X, y)
    with pytest.raises(SingularBlockError, match="z_2"):
        WoodburyRoute(pt, partition="last")
    r = WoodburyRoute(pt)
    assert r.moved == [2, 3]


# -- (e) networks outside the families ----------------------------------------------------------
@pytest.mark.parametrize(
    "case,match",
    [
        ("wide_dense", "not square"),
        ("width_change", "not square"),
        ("mse_batch1", "S_q"),
        ("dense_batch_too_big", "not square"),
        ("zero_scale", "∇_x f"),
    ],
)
def test_outside_families_raise(case, match):
    rng = np.random.default_rng(0)
    if case == "wide_dense":
        pipe, x, X, y = family("dense", 3, 2, batch=2, loss="mse")
    elif case == "dense_batch_too_big":
        pipe, x, X, y = family("dense", 2, 2, batch=4, loss="mse")
    elif case == "width_change":
        pipe = Pipeline([Scale(2), Dense(2, 3), SoftmaxCrossEntropy()])
        x = pipe.init(seed=0)
        X, y = rng.standard_normal((1, 2)), np.array([1])
    elif case == "mse_batch1":
        pipe, x, X, y = family("scale", 3, 2, loss="mse")  # ∇²ℓ = I: S_q = I − I = 0
    else:
        pipe, x, X, y = family("scale", 3, 2)
        x = x.copy()
        x[:3] = 0.0  # ∇_x f_1 = diag(σ'(0) z) · 0 ... the scales multiply z: zero ⇒ singular
        X = np.zeros_like(X)
    pt = pipe.linearize(x, X, y)
    with pytest.raises(SingularBlockError, match=match) as info:
        woodbury_inverse(pt)
    assert 'method="kkt"' in str(info.value)


def test_damping_is_exact_and_validated():
    pipe, x, X, y = family("bias", 3, 4, seed=9)
    pt = pipe.linearize(x, X, y)
    H = np.asarray(reference.dense_hessian(pipe, x, X, y))
    g = np.random.default_rng(0).standard_normal(x.shape[0])
    for lam in (1e-6, 1.0, 10.0):
        Hinv = woodbury_inverse(pt, damping=lam)
        want = np.linalg.solve(H + lam * np.eye(len(g)), g)
        assert rel(Hinv @ g, want) < 1e-13 * route_cond(Hinv.route)
        rb = Hinv.route.blocks  # λ is folded into Q22 = DD Dxx + λI, nowhere else
        for Q22, Kxx in zip(rb.Q22, rb.view.Kxx):
            np.testing.assert_allclose(
                Q22 - lam * np.eye(len(Q22)), Kxx, rtol=0, atol=4 * EPS * (lam + np.abs(Kxx).max())
            )
    with pytest.raises(ValueError, match="damping"):
        woodbury_inverse(pt, damping=-1.0)


def test_condition_warning():
    pipe, x, X, y = family("dense", 2, 4, seed=1, loss="mse")
    pt = pipe.linearize(x, X, y)
    with pytest.warns(WoodburyConditionWarning, match="digits"):
        WoodburyRoute(pt, rtol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = WoodburyRoute(pt)  # no rtol: no warning
    assert r.cond["A"] > 1e3 and r.cond["predicted_error"] > 0


def test_scalar_view_aggregates_loss_rows():
    pipe, x, X, y = family("dense", 2, 1, seed=0, loss="mse")
    pt = pipe.linearize(x, X, y)
    v = scalar_view(pt)
    B = X.shape[0]
    assert v.Jz[-1].shape == (1, B * 2) and v.Jx[-1].shape == (1, 1) and v.augmented
    np.testing.assert_allclose(v.Jz[-1].reshape(B, 2), (pt.zs[1] - y) / B, rtol=1e-14)
    assert scalar_view(pt, augment=False).Jx[-1].shape == (1, 0)


def test_residual_certificate():
    pipe, x, X, y = family("scale", 3, 4, seed=6)
    pt = pipe.linearize(x, X, y)
    Hinv = woodbury_inverse(pt, damping=0.1)
    g = np.random.default_rng(0).standard_normal(x.shape[0])
    H = np.asarray(reference.dense_hessian(pipe, x, X, y)) + 0.1 * np.eye(len(g))
    xs = Hinv @ g
    want = np.linalg.norm(H @ xs - g) / np.linalg.norm(g)
    assert abs(Hinv.residual(g) - want) < 1e-13 * np.linalg.cond(H)
    assert Hinv.residual(g) < 1e-13 * route_cond(Hinv.route)


def test_inverse_hessian_method_woodbury():
    from blockops.inverse import inverse_hessian

    pipe, x, X, y = family("bias", 3, 3, seed=8)
    pt = pipe.linearize(x, X, y)
    g = np.random.default_rng(0).standard_normal(x.shape[0])
    Hinv = inverse_hessian(pt, method="woodbury", damping=0.01)
    np.testing.assert_array_equal(Hinv @ g, woodbury_inverse(pt, damping=0.01) @ g)


def test_auxiliary_loss_layer_interface():
    """jvp / vjp / hvp / djac of AuxiliaryScalarLoss against its explicit blocks and by hand."""
    rng = np.random.default_rng(0)
    pipe = Pipeline([Scale(3), AuxiliaryScalarLoss(MSELoss(), s0=0.7)])
    aux = pipe.layers[-1]
    B, n = 4, 3
    z = rng.standard_normal((B, n))
    y = rng.standard_normal((B, n))
    x = np.array([0.7])
    c = aux.forward(z, x, y)
    np.testing.assert_allclose(c.z[:, 0], 0.5 * ((z - y) ** 2).sum(1) / B + [0.245, 0, 0, 0])
    dz, dx = rng.standard_normal((2, B, n)), rng.standard_normal((2, 1))
    Jz, Jx = aux.jacobian_z(c), aux.jacobian_x(c)
    want = np.einsum("sij,ksj->ksi", Jz, dz) + np.einsum("sip,kp->ksi", Jx, dx)
    np.testing.assert_allclose(aux.jvp(c, dz, dx), want, rtol=1e-14)
    b = rng.standard_normal((2, B, 1))
    bz, bx = aux.vjp(c, b)
    np.testing.assert_allclose(bz, np.einsum("ksi,sij->ksj", b, Jz), rtol=1e-14)
    np.testing.assert_allclose(bx, np.einsum("ksi,sip->kp", b, Jx), rtol=1e-14)
    w = np.ones((B, 1))
    Kzz, Kxz, Kxx = aux.hessian_blocks(c, w)
    hz, hx = aux.hvp(c, w, dz, dx)
    np.testing.assert_allclose(hz, np.einsum("sij,ksj->ksi", Kzz, dz), rtol=1e-14)
    np.testing.assert_allclose(hx, np.einsum("pq,kq->kp", Kxx, dx), rtol=1e-14)
    assert Kxx.tolist() == [[1.0]] and not Kxz.any()
    T = aux.djac_x(c, dz, dx)  # ∂(∇_s f)/∂s = 1 on row 0 only
    assert np.array_equal(T[:, 0, 0, 0], dx[:, 0]) and not T[:, 1:].any()
    dzT, dxT = aux.djac_x_T(c, T)
    np.testing.assert_allclose(dxT, dx, rtol=1e-14)
    assert not dzT.any()
