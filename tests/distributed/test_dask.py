"""``solve_many`` on Dask against the serial solve and a dense reference.

One two-worker ``LocalCluster`` (processes) serves the cluster tests; a
second, one-worker cluster checks that ``client=None`` starts and closes its
own. The reference is ``numpy.linalg.solve`` of the Hessian formed column by
column from the fused HVP, and the serial ``Hinv @ G`` (the issue's
equality to 1e-14, relative, per column).
"""

from __future__ import annotations

import multiprocessing
import sys
import warnings

import numpy as np
import pytest
import reference

from blockops import Dense, MSELoss, Pipeline
from blockops.distributed import solve_many
from blockops.hessian import hessian
from blockops.inverse import inverse_hessian

pytest.importorskip("dask", reason="dask is not installed (pip install 'blockops[dask]')")

DAMPING, K = 1e-3, 50
EPS = np.finfo(float).eps
NO_DISTRIBUTED = "dask.distributed is not installed (pip install 'blockops[dask]')"


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    net = Pipeline([Dense(3, 6, "tanh"), Dense(6, 6, "tanh"), Dense(6, 2, "identity"), MSELoss()])
    pt = net.linearize(
        net.init(seed=seed), rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    )
    return net, pt, rng


def _dense(net, pt, damping):
    """``H + λI`` from the independent JAX reference."""
    H = reference.dense_hessian(net.spec(), pt.params, pt.X, pt.y)
    return H + damping * np.eye(net.n_params)


@pytest.fixture(scope="module")
def problem():
    net, pt, rng = _problem()
    Hd = _dense(net, pt, DAMPING)
    G = rng.standard_normal((net.n_params, K))
    return pt, Hd, G


@pytest.fixture(scope="module")
def client():
    # "distributed.client", not "distributed": without the package, tests/distributed
    # itself would import as a namespace package of that name
    pytest.importorskip("distributed.client", reason=NO_DISTRIBUTED)
    import cloudpickle
    import distributed

    # the worker-side counters below live in this module, which workers cannot import
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


def _assert_matches(X, Hinv, G, Hd):
    """Equal to the serial solve (1e-14 per column) and to the dense solve (cond * eps)."""
    serial = Hinv @ G
    assert X.shape == serial.shape and X.dtype == serial.dtype
    diff = np.linalg.norm((X - serial).reshape(G.shape[0], -1), axis=0)
    assert np.all(diff <= 1e-14 * np.linalg.norm(serial.reshape(G.shape[0], -1), axis=0))
    ref = np.linalg.solve(Hd, G)
    bound = 10 * np.linalg.cond(Hd) * EPS
    assert np.linalg.norm(X - ref) <= bound * np.linalg.norm(ref)


@pytest.mark.parametrize("method", ["auto", "kkt"])
def test_cluster_equals_serial_and_dense(problem, client, method):
    pt, Hd, G = problem
    Hi = inverse_hessian(pt, damping=DAMPING, method=method)
    X = solve_many(Hi, G, client=client, chunk=7 if method == "kkt" else None)  # 7 ∤ 50
    _assert_matches(X, Hi, G, Hd)
    assert Hi.info["residual"].shape == (K,) and Hi.info["residual"].max() <= Hi.rtol


@pytest.mark.parametrize("chunk", [None, 1, 7, 50, 80])
def test_threads_equals_serial_and_dense(problem, chunk):
    pt, Hd, G = problem
    Hi = inverse_hessian(pt, damping=DAMPING)
    _assert_matches(solve_many(Hi, G, scheduler="threads", chunk=chunk, n_workers=2), Hi, G, Hd)


@pytest.mark.parametrize("path", ["array-large", "explicit-stage"])
def test_threads_other_factor_paths(path):
    """The array path of wide dense stages (LU pivots) and an explicit (Bias) stage.

    Not bit for bit here: one-column chunks run BLAS products of other shapes
    than the serial solve (4e-15 relative measured), within 1e-14.
    """
    from blockops import Bias
    from blockops.network.dense_stage_jit import compiled

    rng = np.random.default_rng(5)
    if path == "array-large":  # sweeps off, B a = 80 > SMALL_M: the Kronecker-structured path
        layers, B = [Dense(3, 10, "tanh"), Dense(10, 10, "tanh"), Dense(10, 2, "identity")], 8
    else:
        layers, B = [Dense(3, 5, "tanh"), Bias(5, "tanh"), Dense(5, 2, "identity")], 3
    net = Pipeline([*layers, MSELoss()])
    pt = net.linearize(net.init(seed=1), rng.standard_normal((B, 3)), rng.standard_normal((B, 2)))
    with compiled(False):
        Hi = inverse_hessian(pt, damping=1e-2)
    Hd = _dense(net, pt, 1e-2)
    G = rng.standard_normal((net.n_params, 12))
    _assert_matches(solve_many(Hi, G, scheduler="threads", chunk=1, n_workers=3), Hi, G, Hd)


def test_mixed_precision_threads(problem):
    """Refinement in float64 of a float32 factor: the same steps as the serial solve."""
    pt, Hd, G = problem
    lam = 0.1  # float32 stage pivots well clear of singular at this damping
    Hi = inverse_hessian(pt, damping=lam, precision="mixed", refine=3)
    assert Hi.work_dtype == np.float32
    Hd = Hd + (lam - DAMPING) * np.eye(Hd.shape[0])
    _assert_matches(solve_many(Hi, G, scheduler="threads", chunk=9), Hi, G, Hd)


@pytest.mark.parametrize("scheduler", ["distributed", "threads"])
def test_single_vector(problem, scheduler, request):
    pt, Hd, G = problem
    Hi = inverse_hessian(pt, damping=DAMPING)
    use = request.getfixturevalue("client") if scheduler == "distributed" else None
    x = solve_many(Hi, G[:, 3], client=use, scheduler=scheduler)
    assert x.shape == (G.shape[0],)
    _assert_matches(x, Hi, G[:, 3], Hd)
    assert isinstance(Hi.info["residual"], float)


@pytest.mark.parametrize("scheduler", ["distributed", "threads"])
def test_caller_G_is_not_mutated(problem, scheduler, request):
    """Fortran order: each column chunk is a contiguous view, the easiest to write into."""
    pt, _, G = problem
    Hi = inverse_hessian(pt, damping=DAMPING)
    Gf = np.asfortranarray(G)
    before = Gf.copy()
    use = request.getfixturevalue("client") if scheduler == "distributed" else None
    solve_many(Hi, Gf, client=use, scheduler=scheduler, chunk=8)
    np.testing.assert_array_equal(Gf, before)


def test_threads_progress_bar(problem, capsys):
    pt, Hd, G = problem
    Hi = inverse_hessian(pt, damping=DAMPING)
    _assert_matches(solve_many(Hi, G, scheduler="threads", chunk=25, progress=True), Hi, G, Hd)
    assert "100%" in capsys.readouterr().out


def test_no_columns(problem):
    pt, _, G = problem
    X = solve_many(inverse_hessian(pt, damping=DAMPING), G[:, :0], scheduler="threads")
    assert X.shape == (G.shape[0], 0)


def test_bad_inputs_are_refused(problem):
    pt, _, G = problem
    Hi = inverse_hessian(pt, damping=DAMPING)
    n = G.shape[0]
    bad = [
        ((Hi, G[:-1]), {}, ValueError, "shape"),
        ((Hi, G[None]), {}, ValueError, "shape"),
        ((Hi, G + 1j), {}, TypeError, "complex"),
        ((Hi, np.ones((n, 2), int)), {}, TypeError, "dtype"),
        ((Hi, np.where(np.arange(n)[:, None] == 5, np.nan, G)), {}, ValueError, "NaN"),
        ((hessian(pt, damping=DAMPING), G), {}, TypeError, "InverseHessian"),
        ((Hi, G), {"chunk": 0}, ValueError, "chunk"),
        ((Hi, G), {"chunk": 2.5}, ValueError, "chunk"),
        ((Hi, G), {"n_workers": 0}, ValueError, "n_workers"),
        ((Hi, G), {"scheduler": "processes"}, ValueError, "scheduler"),
        ((Hi, G), {"client": object(), "scheduler": "threads"}, ValueError, "client"),
    ]
    for args, kwargs, err, match in bad:
        with pytest.raises(err, match=match):
            solve_many(*args, **kwargs)


def test_residual_warning_once(problem):
    """Chunks never warn by themselves; the call warns once on the worst residual."""
    pt, _, G = problem
    Hi = inverse_hessian(pt, damping=DAMPING, rtol=1e-300)  # every residual exceeds it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        solve_many(Hi, G, scheduler="threads", chunk=5)
    assert [str(w.message).count("relative residual") for w in caught] == [1]


# -- the factor is shipped, not recomputed --------------------------------------------
def _install_counters():
    """On a worker: count factorisations (every entry that factors, down to a stage) and solves."""
    from blockops.inverse import BandedKKT, ExplicitStage, InverseHessian, StagewiseFactor
    from blockops.network.dense_stage import DenseSegment

    if hasattr(InverseHessian, "_test_counts"):
        return
    counts = {"factor": 0, "solve": 0}

    def wrap(cls, name, key):
        orig = getattr(cls, name)

        def counted(self, *args, **kwargs):
            counts[key] += 1
            return orig(self, *args, **kwargs)

        setattr(cls, name, counted)

    for cls, name in (
        (InverseHessian, "_factorize"),
        (StagewiseFactor, "__init__"),
        (BandedKKT, "__init__"),
        (ExplicitStage, "factor"),
        (DenseSegment, "factor"),
    ):
        wrap(cls, name, "factor")
    wrap(InverseHessian, "solve", "solve")
    InverseHessian._test_counts = counts


def _read_and_reset_counters():
    from blockops.inverse import InverseHessian

    counts = InverseHessian._test_counts
    out = dict(counts)
    counts.update(factor=0, solve=0)
    return out


def test_factor_is_not_recomputed_on_workers(problem, client):
    pt, _, G = problem
    client.run(_install_counters)
    client.run(_read_and_reset_counters)
    # the counters see a factorisation on a worker (the control) ...
    client.submit(inverse_hessian, pt, damping=DAMPING, pure=False).result()
    control = client.run(_read_and_reset_counters)
    assert sum(c["factor"] for c in control.values()) >= 2  # InverseHessian + StagewiseFactor
    # ... and solve_many's chunks are solved there without one
    Hi = inverse_hessian(pt, damping=DAMPING)
    chunk = 5
    solve_many(Hi, G, client=client, chunk=chunk)
    counts = client.run(_read_and_reset_counters)
    assert sum(c["solve"] for c in counts.values()) == K // chunk
    assert all(c["factor"] == 0 for c in counts.values()), counts


@pytest.mark.slow  # starts a cluster: a few seconds, more on a loaded machine
def test_own_local_cluster_is_started_and_closed(problem):
    pytest.importorskip("distributed.client", reason=NO_DISTRIBUTED)
    pt, Hd, G = problem
    Hi = inverse_hessian(pt, damping=DAMPING)
    before = {p.pid for p in multiprocessing.active_children()}
    X = solve_many(Hi, G[:, :6], n_workers=1)
    _assert_matches(X, Hi, G[:, :6], Hd)
    assert {p.pid for p in multiprocessing.active_children()} <= before
