"""Pickling an ``InverseHessian`` ships its factor: unpickling solves identically, never factors.

Every factorisation variant (compiled, small and large array paths of the dense
stage, explicit stages, the banded KKT LU, and the generic kernels of CuPy run
on NumPy) is pickled, unpickled under a counter of factorisations, and solved:
the result must equal the original's bit for bit and a dense
``numpy.linalg.solve`` of the Hessian formed column by column from the fused HVP.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from blockops import Bias, Dense, MSELoss, Pipeline
from blockops.backend import generic_linalg
from blockops.hessian import hessian
from blockops.inverse import BandedKKT, InverseHessian, StagewiseFactor, inverse_hessian
from blockops.inverse.stagewise import ExplicitStage
from blockops.network.dense_stage import DenseSegment
from blockops.network.dense_stage_jit import available, compiled

DAMPING = 1e-2


def _point(kind):
    rng = np.random.default_rng(3)
    if kind == "mixed-layers":  # dense segments and an explicit (Bias) stage
        layers = [
            Dense(3, 5, "tanh"),
            Bias(5, "tanh"),
            Dense(5, 5, "tanh"),
            Dense(5, 2, "identity"),
        ]
        B = 3
    elif kind == "large":  # B a = 140 > JIT_M, SMALL_M: the Kronecker-structured array path
        layers, B = [Dense(3, 10, "tanh"), Dense(10, 10, "tanh"), Dense(10, 2, "identity")], 14
    else:
        layers, B = [Dense(3, 4, "tanh"), Dense(4, 4, "tanh"), Dense(4, 2, "identity")], 2
    net = Pipeline([*layers, MSELoss()])
    X, y = rng.standard_normal((B, 3)), rng.standard_normal((B, 2))
    return net, net.linearize(net.init(seed=1), X, y)


@pytest.fixture
def factor_counter(monkeypatch):
    """Count factorisations: every entry that factors ``H + λI``, down to one stage.

    Unpickling calls no ``__init__``, so ``__init__`` alone could not see a
    ``__setstate__`` that factored again; the factoring methods are counted too.
    """
    from blockops.inverse import ExplicitStage
    from blockops.network.dense_stage import DenseSegment

    calls = []
    for cls, name in (
        (InverseHessian, "__init__"),
        (InverseHessian, "_factorize"),
        (StagewiseFactor, "__init__"),
        (BandedKKT, "__init__"),
        (ExplicitStage, "factor"),
        (DenseSegment, "factor"),
    ):
        orig = getattr(cls, name)

        def counted(self, *args, _orig=orig, **kwargs):
            calls.append(type(self).__name__)
            return _orig(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, counted)
    return calls


CASES = {
    "compiled": ("small", {}, True, False),
    "array-small": ("small", {}, False, False),
    "array-large": ("large", {}, False, False),  # indefinite pivots: LU
    "array-large-ggn": ("large", {"kind": "ggn"}, False, False),  # definite: Cholesky
    "explicit-stage": ("mixed-layers", {}, True, False),
    "kkt": ("mixed-layers", {"method": "kkt"}, True, False),
    "generic-riccati": ("mixed-layers", {}, False, True),
    "generic-large": ("large", {}, False, True),
    "generic-kkt": ("small", {"method": "kkt"}, False, True),
    "mixed-precision-ggn": (
        "small",
        {"precision": "mixed", "kind": "ggn", "refine": 3},
        True,
        False,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_unpickled_factor_solves_identically_without_factoring(case, factor_counter):
    kind, options, jit, generic = CASES[case]
    if jit and not available():
        pytest.skip("numba is not installed: the compiled sweeps do not run")
    net, pt = _point(kind)
    with compiled(jit), generic_linalg(generic):
        Hi = inverse_hessian(pt, damping=DAMPING, **options)
    G = np.random.default_rng(0).standard_normal((net.n_params, 3))
    X = Hi @ G
    del factor_counter[:]
    blob = pickle.dumps(Hi)
    H2, H3 = pickle.loads(blob), copy.deepcopy(Hi)
    assert factor_counter == []  # neither unpickling nor a deep copy factors again
    for other in (H2, H3):
        np.testing.assert_array_equal(other @ G, X)
        np.testing.assert_array_equal(other @ G[:, 0], Hi @ G[:, 0])
        assert other.logdet == Hi.logdet and other.inertia == Hi.inertia
        assert other.method == Hi.method
    # and the shipped factor is right: against a dense solve of the Hessian (or GGN)
    dense = hessian(pt, damping=DAMPING, kind=options.get("kind", "hessian")) @ np.eye(net.n_params)
    ref = np.linalg.solve(dense, G)
    bound = 10 * np.linalg.cond(dense) * np.finfo(float).eps
    assert np.linalg.norm(H2 @ G - ref) <= bound * np.linalg.norm(ref)


def test_pickled_stages_hold_no_module():
    """The stage objects themselves pickle (the parts a custom driver may ship)."""
    _, pt = _point("mixed-layers")
    Hi = inverse_hessian(pt, damping=DAMPING)
    kinds = {type(st) for st in Hi._factor.stages}
    assert kinds == {DenseSegment, ExplicitStage}
    for st in Hi._factor.stages:
        back = pickle.loads(pickle.dumps(st))
        assert back.xp is np


@pytest.mark.skipif(not available(), reason="numba is not installed")
def test_compiled_factor_refuses_to_unpickle_without_the_sweeps():
    """Its arrays are in the compiled sweeps' layout: a clear error, not a wrong solve."""
    _, pt = _point("small")
    with compiled(True):
        blob = pickle.dumps(inverse_hessian(pt, damping=DAMPING))
    with compiled(False), pytest.raises(RuntimeError, match="compiled sweeps"):
        pickle.loads(blob)
