"""Solves beyond one process: optional extras, imported on first use.

:mod:`blockops.distributed.mpi` (needs ``mpi4py`` and ``pylops-mpi``:
``pip install "blockops[mpi]"``): the Hessian as a
:class:`pylops_mpi.MPILinearOperator` partitioned by depth
(:class:`~blockops.distributed.mpi.DistributedHessian`) and the exact
depth-partitioned solve (:func:`~blockops.distributed.mpi.distributed_solve`).
:mod:`blockops.distributed.partition` holds the per-rank pieces (layer
ranges, the range sweeps of the HVP, the interior factor of the lifted KKT
system and the reduced interface system) in plain NumPy.
:mod:`blockops.distributed.dask` (needs ``dask[distributed]``:
``pip install "blockops[dask]"``): :func:`~blockops.distributed.dask.solve_many`,
``(H + λI)⁻¹ G`` for thousands of right-hand sides, the factor shipped once
to each Dask worker and column chunks solved in parallel.

Nothing here is imported by ``import blockops``; a name below is imported
from its module when first used, so the package imports without the extras.
"""

from __future__ import annotations

import importlib

# public name -> module that defines it (imported on first attribute access)
_LAZY = {
    "DistributedHessian": "blockops.distributed.mpi",
    "DistributedInverseHessian": "blockops.distributed.mpi",
    "distributed_solve": "blockops.distributed.mpi",
    "gather": "blockops.distributed.mpi",
    "layer_ranges": "blockops.distributed.partition",
    "solve_many": "blockops.distributed.dask",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blockops.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__():
    return sorted([*globals(), *_LAZY])
