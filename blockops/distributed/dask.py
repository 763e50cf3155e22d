r"""Many right-hand sides of the exact inverse on Dask: factor once, solve in parallel.

An :class:`~blockops.inverse.InverseHessian` holds one factorisation ``F`` of
``H + λI``. The columns of ``X = (H + λI)⁻¹ G`` are independent, so for
``G`` of shape ``(n, k)`` and column chunks ``J_1, …, J_m``

.. math::

    X_{:, J_c} = x_0 + \sum_{i=1}^{\text{refine}} F^{-1}\big(G_{:, J_c} - (H + λI)\, x_{i-1}\big),
    \qquad x_0 = F^{-1} G_{:, J_c},

is exactly what ``Hinv @ G`` computes for those columns (same factor, same
refinement, same residual certificate), solved chunk by chunk on Dask
workers. :func:`solve_many` ships the factor to each worker once (pickling an
``InverseHessian`` ships its factor: a worker never factors again), scatters
the chunks, solves them in parallel and gathers one ``(n, k)`` array.

When to use it: many right-hand sides (influence scores, a Hutchinson or
Krylov block, the columns of a selected inverse) whose solves outweigh
shipping ``G``, ``X`` and the factor (a few MB at depth 256, batch 1;
``n k`` numbers each way). One factor for one right-hand side is a serial
job; a model too deep for one machine's memory is the depth-partitioned MPI
solve's (:mod:`blockops.distributed.mpi`).

Dask is optional (``pip install "blockops[dask]"``) and imported when
:func:`solve_many` runs, not when this module is imported.
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import numpy as np

from .._checks import (
    check_choice,
    check_dtype,
    check_finite,
    check_int,
    check_on_backend,
    check_vector,
)
from ..backend import to_numpy
from ..inverse.operator import InverseHessian

__all__ = ["solve_many"]

OWNER = "solve_many"
SCHEDULERS = ("distributed", "threads")
# Bytes of one chunk of G (and of X): a chunk is a message to a worker and a working set
# there. 64 MiB is 120 columns at depth 256, width 16 (n = 69632, float64).
CHUNK_BYTES = 64 * 2**20


def _import_dask(scheduler):
    """Import Dask (and ``distributed`` for the cluster scheduler) or say how to install it."""
    try:
        import dask

        distributed = None
        if scheduler == "distributed":
            import distributed
    except ImportError as err:
        raise ImportError(
            f'{OWNER}: needs Dask ({err}); install it with pip install "blockops[dask]" '
            '(or pip install "dask[distributed]")'
        ) from None
    return dask, distributed


def _cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_chunk(n: int, k: int, workers: int, itemsize: int = 8) -> int:
    """Columns per chunk: two chunks per worker, at most :data:`CHUNK_BYTES` each.

    Two chunks per worker let a fast worker take a second chunk while a slow
    one finishes; the byte cap bounds each message and each worker's working
    set (``G`` chunk, ``X`` chunk, refinement residual).
    """
    cap = max(1, CHUNK_BYTES // max(1, n * itemsize))
    return max(1, min(math.ceil(k / (2 * max(1, workers))), cap))


def _check_G(Hinv, G):
    """``G`` as an array of ``Hinv``'s backend, checked: shape, dtype, finite."""
    xp = Hinv.xp
    if not hasattr(G, "shape"):
        G = xp.asarray(G)
    if np.dtype(G.dtype).kind == "c":
        raise TypeError(
            f"{OWNER}: G is complex; H is real, so solve the real and imaginary parts "
            "separately (solve_many(Hinv, G.real) + 1j * solve_many(Hinv, G.imag))"
        )
    check_dtype(OWNER, "G", G)
    check_on_backend(OWNER, "G", G, xp)
    check_vector(OWNER, G, Hinv.shape[0], name="G")
    check_finite(OWNER, "G", G)
    return G


def _solve_chunk(Hinv, G):
    """``Hinv @ G`` for one chunk, on a shallow copy: its ``info`` and warnings stay local.

    The copy shares the factor and the point (threads solving at once each
    record their own residuals) and has ``rtol = inf``, so a chunk never warns
    by itself; :func:`solve_many` warns once, on the caller's side, on the
    worst residual of all chunks. Returns ``(X, residuals or None)``.
    """
    local = object.__new__(type(Hinv))
    local.__dict__.update(Hinv.__dict__, info=dict(Hinv.info), rtol=np.inf)
    X = local.solve(G)
    return X, local.info.get("residual")


def _run_threads(dask, Hinv, chunks, n_workers, progress):
    """The chunks on Dask's threaded scheduler: no cluster, the factor shared in memory."""
    from dask.diagnostics import ProgressBar

    tasks = [dask.delayed(_solve_chunk, pure=False)(Hinv, Gc) for Gc in chunks]
    with ProgressBar() if progress else contextlib.nullcontext():
        return dask.compute(*tasks, scheduler="threads", num_workers=n_workers)


def _run_cluster(distributed, client, Hinv, chunks, progress):
    """The chunks on a ``distributed`` client: the factor broadcast once, chunks scattered."""
    hinv = client.scatter(Hinv, broadcast=True, hash=False)  # one copy per worker
    parts = client.scatter(list(chunks), hash=False)  # spread over the workers
    futures = [client.submit(_solve_chunk, hinv, Gc, pure=False) for Gc in parts]
    if progress:
        distributed.progress(futures)
    return client.gather(futures)


def _local_cluster(distributed, n_workers):
    """A ``LocalCluster`` of ``n_workers`` single-threaded processes and its client."""
    cluster = distributed.LocalCluster(  # dashboard on a free port: never a port clash
        n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    return cluster, distributed.Client(cluster)


def solve_many(
    Hinv, G, client=None, chunk=None, scheduler="distributed", n_workers=None, progress=False
):
    r"""``(H + λI)⁻¹ G`` for many right-hand sides, column chunks solved in parallel on Dask.

    Each chunk ``G[:, J]`` is solved as ``Hinv @ G[:, J]`` (the factor's two
    sweeps, ``Hinv.refine`` steps of iterative refinement
    ``x ← x + F⁻¹(g − (H + λI) x)``, the residual certificate), so the result
    equals ``Hinv @ G`` up to the rounding of differently sized products.

    Parameters
    ----------
    Hinv : InverseHessian
        The factored inverse (:func:`blockops.inverse.inverse_hessian`). It is
        factored once, by the caller; workers receive the factor.
    G : array (n,) or (n, k)
        Right-hand sides, float32 or float64, finite, on ``Hinv``'s backend.
        Not modified.
    client : distributed.Client, optional
        The cluster to use. ``None`` with ``scheduler="distributed"`` starts a
        ``LocalCluster`` of ``n_workers`` single-threaded processes for this
        call and closes it afterwards (a few seconds: pass a client to solve
        several times).
    chunk : int, optional
        Columns per task, ``>= 1``; default ``ceil(k / (2 workers))``, capped
        so that a chunk of ``G`` is at most 64 MiB (:func:`default_chunk`).
    scheduler : {"distributed", "threads"}
        ``"distributed"``: a Dask cluster (``client``, or a local one), the
        factor broadcast to each worker once and the chunks scattered.
        ``"threads"``: Dask's threaded scheduler in this process, no cluster,
        the factor shared in memory (no ``client``).
    n_workers : int, optional
        Worker processes of the local cluster, or threads of the threaded
        scheduler; default: this machine's cores, at most one per column.
        Ignored with a ``client`` (its workers are used).
    progress : bool
        Show Dask's progress bar.

    Returns
    -------
    X : array (n,) or (n, k)
        ``(H + λI)⁻¹ G`` in ``Hinv``'s output dtype, the shape of ``G``.

    Notes
    -----
    As ``Hinv @ G`` does, a call records ``Hinv.info["residual"]`` (per
    column; a float for a vector) and ``Hinv.info["solve_time"]`` (the whole
    call), and warns once (``RuntimeWarning``) when the worst relative
    residual exceeds ``Hinv.rtol`` (with ``Hinv.check``).
    """
    if not isinstance(Hinv, InverseHessian):
        raise TypeError(
            f"{OWNER}: Hinv is a {type(Hinv).__name__}; expected an InverseHessian "
            "(blockops.inverse.inverse_hessian(point, damping=...), not method='woodbury')"
        )
    check_choice(OWNER, "scheduler", scheduler, SCHEDULERS)
    if client is not None and scheduler == "threads":
        raise ValueError(
            f"{OWNER}: a client was given with scheduler='threads'; pass "
            "scheduler='distributed' to use the client, or drop the client"
        )
    G = _check_G(Hinv, G)
    vec = G.ndim == 1
    G2 = G[:, None] if vec else G
    n, k = G2.shape
    if chunk is not None:
        chunk = check_int(OWNER, "chunk", chunk, 1)
    if n_workers is not None:
        n_workers = check_int(OWNER, "n_workers", n_workers, 1)
    dask, distributed = _import_dask(scheduler)
    t0 = time.perf_counter()
    X = Hinv.xp.empty((n, k), Hinv.out_dtype)
    res = np.empty(k) if Hinv.check else None
    if k:
        parts = _solve_parts(dask, distributed, Hinv, G2, client, chunk, n_workers, progress)
        for sl, (Xc, rc) in parts:
            X[:, sl] = Xc
            if res is not None:
                res[sl] = to_numpy(rc)
    Hinv.info["solve_time"] = time.perf_counter() - t0
    if res is not None:
        Hinv.info["residual"] = float(res[0]) if vec else res
        _warn(Hinv, float(res.max()) if k else 0.0)
    return X[:, 0] if vec else X


def _solve_parts(dask, distributed, Hinv, G, client, chunk, n_workers, progress):
    """``[(column slice, (X chunk, residuals))]`` of every chunk, by the chosen scheduler."""
    n, k = G.shape
    if client is not None:
        workers = max(1, sum(client.nthreads().values()))
    else:
        workers = n_workers or min(_cores(), k)
    chunk = chunk or default_chunk(n, k, workers, np.dtype(G.dtype).itemsize)
    slices = [slice(a, min(a + chunk, k)) for a in range(0, k, chunk)]
    chunks = [G[:, sl] for sl in slices]
    if distributed is None:
        return list(zip(slices, _run_threads(dask, Hinv, chunks, workers, progress)))
    if client is not None:
        return list(zip(slices, _run_cluster(distributed, client, Hinv, chunks, progress)))
    cluster, own = _local_cluster(distributed, min(workers, len(slices)))
    try:
        return list(zip(slices, _run_cluster(distributed, own, Hinv, chunks, progress)))
    finally:
        own.close()
        cluster.close()


def _warn(Hinv, worst):
    """The residual warning of ``Hinv @ G``, once for the whole call.

    A frame of its own so that the warning's ``stacklevel`` points at the caller of
    :func:`solve_many`, as it points at the caller of ``Hinv @ G``.
    """
    Hinv._warn_residual(worst)
