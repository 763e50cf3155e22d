"""Stagewise (Riccati) sweep on generic stage arrays vs a dense numpy assembly.

The test assembles ``H = Σ_l J_lᵀ K_l J_l`` itself from the same stage arrays
(``J_l`` maps ``dx`` to ``[dz_{l-1}; dx_l]`` through the recurrence
``dz_l = A_l dz_{l-1} + B_l dx_l``), independently of the sweep.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sl
from hypothesis import given
from hypothesis import strategies as st

from blockops import SingularBlockError
from blockops.inverse.stagewise import ExplicitStage, StagewiseFactor


def rand_stages(rng, widths, ps, B, dtype=np.float64):
    out = []
    for l in range(1, len(widths)):
        n0, n1, p = widths[l - 1], widths[l], ps[l - 1]
        A = rng.standard_normal((B, n1, n0))
        Bx = rng.standard_normal((B * n1, p))
        Kzz = rng.standard_normal((B, n0, n0))
        Kzz = Kzz + Kzz.transpose(0, 2, 1)
        Kxz = rng.standard_normal((p, B * n0))
        Kxx = rng.standard_normal((p, p))
        out.append(tuple(a.astype(dtype) for a in (A, Bx, Kzz, Kxz, Kxx + Kxx.T)))
    return out


def dense_H(stages):
    """Independent assembly of H from stage arrays (plain numpy)."""
    N = sum(s[4].shape[0] for s in stages)
    A0 = stages[0][0]
    Dz = np.zeros((A0.shape[0] * A0.shape[2], N))
    H = np.zeros((N, N))
    off = 0
    for A, Bx, Kzz, Kxz, Kxx in stages:
        A, Bx, Kzz, Kxz, Kxx = (np.asarray(a, np.float64) for a in (A, Bx, Kzz, Kxz, Kxx))
        p = Kxx.shape[0]
        E = np.zeros((p, N))
        E[:, off : off + p] = np.eye(p)
        K = np.block([[sl.block_diag(*Kzz), Kxz.T], [Kxz, Kxx]])
        J = np.vstack([Dz, E])
        H += J.T @ K @ J
        Dz = sl.block_diag(*A) @ Dz + Bx @ E
        off += p
    return H


def factor(stages, lam):
    return StagewiseFactor(
        [ExplicitStage(*s, lam, i + 1, f"layer {i + 1}") for i, s in enumerate(stages)]
    )


@given(
    st.lists(st.integers(1, 4), min_size=2, max_size=5),
    st.lists(st.integers(0, 5), min_size=4, max_size=4),
    st.integers(1, 3),
    st.sampled_from([0.0, 0.5]),
    st.integers(0, 2**31 - 1),
)
def test_sweep_matches_dense(widths, ps, B, lam, seed):
    rng = np.random.default_rng(seed)
    ps = [max(p, 1) for p in ps[: len(widths) - 1]]
    stages = rand_stages(rng, widths, ps, B)
    Hl = dense_H(stages) + lam * np.eye(sum(ps))
    cond = np.linalg.cond(Hl)
    G = rng.standard_normal((Hl.shape[0], 3))
    G0 = G.copy()
    try:
        F = factor(stages, lam)
    except SingularBlockError:
        # a stage pivot may be singular by chance; then the pivot test below covers it
        return
    X = F.solve(G)
    np.testing.assert_array_equal(G, G0)
    res = np.linalg.norm(Hl @ X - G) / np.linalg.norm(G)
    assert res <= 1e-13 * max(cond, 1.0) + 1e-12
    w = np.linalg.eigvalsh(Hl)
    if np.min(np.abs(w)) > 1e-9 * np.max(np.abs(w)):
        assert F.inertia == (int((w < 0).sum()), 0, int((w > 0).sum()))
        assert F.logdet == pytest.approx(np.linalg.slogdet(Hl)[1], rel=1e-9, abs=1e-9)


def test_sweep_float32():
    rng = np.random.default_rng(3)
    stages = rand_stages(rng, [3, 4, 4, 2], [5, 6, 4], 2, dtype=np.float32)
    lam = 1.0
    Hl = dense_H(stages) + lam * np.eye(15)
    G = rng.standard_normal((15, 2)).astype(np.float32)
    X = factor(stages, lam).solve(G)
    assert X.dtype == np.float32
    res = np.linalg.norm(Hl @ X - G) / np.linalg.norm(G)
    assert res <= 50 * np.finfo(np.float32).eps * np.linalg.cond(Hl)


def test_singular_stage_pivot_names_layer():
    rng = np.random.default_rng(0)
    stages = rand_stages(rng, [2, 2, 2], [2, 2], 1)
    A, Bx, Kzz, Kxz, Kxx = stages[1]
    stages[1] = (A, np.zeros_like(Bx), Kzz, Kxz, np.zeros_like(Kxx))  # Q_uu of layer 2 = 0
    with pytest.raises(SingularBlockError, match="layer 2") as err:
        factor(stages, 0.0)
    assert err.value.layer == 2
    assert "damping" in str(err.value)
