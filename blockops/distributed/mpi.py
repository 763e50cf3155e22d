r"""The Hessian and its exact inverse partitioned by depth across MPI ranks (pylops-mpi).

Rank ``r`` of ``R`` holds a contiguous range of layers ``[l_0, l_1)``
(:func:`~blockops.distributed.partition.layer_ranges`, balanced by
parameter count) and the matching slice of the parameter vector, a
:class:`pylops_mpi.DistributedArray` with ``Partition.SCATTER``.

:class:`DistributedHessian` applies ``H + λI`` as a
:class:`pylops_mpi.MPILinearOperator`. The tangent sweep of the HVP is affine
in the tangent entering a range and the adjoint sweep in the ``b'`` leaving
it (:mod:`blockops.distributed.partition`), so each rank sweeps its range
from zero, the ranks chain the boundary states along ``0 → R−1`` (tangent)
and ``R−1 → 0`` (adjoint) with one ``(B, n, n)``-batched product and one
``k B n``-sized message per hop, and each rank sweeps again from the true
boundary state: about twice the work of a range per sweep, in parallel, in
place of a pipeline whose time grows with the whole depth.

:class:`DistributedInverseHessian` (and :func:`distributed_solve`) solves
``(H + λI) x = g`` exactly, indefinite ``H`` allowed: each rank factors the
interior of its range of the lifted KKT system by pivoted banded LU and
sends its Schur block (``2 B n``-square) to rank 0, which factors the
block-tridiagonal interface system of the ``R − 1`` separators. A solve is
two local banded solves, one gather and one scatter of ``2 B n k`` numbers
per rank, then ``refine`` steps of iterative refinement
``x ← x + F⁻¹(g − (H + λI) x)`` against the distributed HVP, and the
relative residual ``‖(H + λI) x − g‖ / ‖g‖`` as the certificate
(``info["residual"]``, a ``RuntimeWarning`` above ``rtol``), as
:class:`~blockops.inverse.InverseHessian` does.

Every rank builds the same :class:`~blockops.network.Point` (the
linearisation is replicated) and reads only its own layers from it. Run a
script on ``R`` ranks with ``mpiexec -n R python script.py``. Needs
``mpi4py`` and ``pylops-mpi`` (``pip install "blockops[mpi]"``).
"""

from __future__ import annotations

import time
import warnings

import numpy as np

try:
    from mpi4py import MPI
    from pylops_mpi import DistributedArray, MPILinearOperator, Partition
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "blockops.distributed.mpi needs mpi4py and pylops-mpi: pip install 'blockops[mpi]' "
        "(or pip install mpich mpi4py pylops-mpi)"
    ) from err

from .._checks import check_damping, check_int
from ..singular import SingularBlockError
from .partition import LocalKKT, RangeSweep, ReducedSystem, layer_ranges

__all__ = ["DistributedHessian", "DistributedInverseHessian", "distributed_solve", "gather"]

_TANGENT, _ADJOINT = 11, 12  # message tags of the two chains


def _check_ranges(point, ranges, size):
    """The caller's ranges (``size`` contiguous ones covering all layers), or balanced ones."""
    if ranges is None:
        return layer_ranges(point, size)
    ranges = [(int(a), int(b)) for a, b in ranges]
    ok = len(ranges) == size and ranges[0][0] == 0 and ranges[-1][1] == point.n_layers
    ok = ok and all(a < b for a, b in ranges)
    ok = ok and all(ranges[r][1] == ranges[r + 1][0] for r in range(size - 1))
    if not ok:
        raise ValueError(
            f"DistributedHessian: ranges={ranges}; expected {size} contiguous non-empty layer "
            f"ranges (l0, l1) covering 0..{point.n_layers} (one per rank), or None"
        )
    return ranges


def _raise_if_any(comm, err):
    """Raise the first rank's error on every rank (a rank alone raising would deadlock the rest)."""
    errs = comm.allgather(None if err is None else (type(err), str(err), err.layer))
    first = next((e for e in errs if e is not None), None)
    if first is not None:
        cls, msg, layer = first
        raise cls(msg, layer=layer) if cls is SingularBlockError else cls(msg)


def _plus(a, b):
    """``a + b`` where ``None`` is zero."""
    if a is None:
        return b
    return a if b is None else a + b


class DistributedHessian(MPILinearOperator):
    r"""``H + λI`` of a :class:`~blockops.network.Point` partitioned by depth over MPI ranks.

    Parameters
    ----------
    point : Point
        The linearised pipeline, the same on every rank (each rank reads only
        its layers).
    damping : float
        ``λ ≥ 0``.
    comm : mpi4py.MPI.Comm, optional
        Defaults to ``MPI.COMM_WORLD``; one layer range per rank.
    ranges : list of (int, int), optional
        The layer range ``[l0, l1)`` of each rank; default
        :func:`~blockops.distributed.partition.layer_ranges`.

    Attributes
    ----------
    ranges : list of (int, int)
    local_shapes : list of tuple
        The parameter slice length of each rank (the ``local_shapes`` of the
        :class:`pylops_mpi.DistributedArray` this operator takes and returns).
    x_slice : slice
        This rank's slice of the full parameter vector.
    """

    def __init__(self, point, damping=0.0, comm=None, ranges=None):
        comm = MPI.COMM_WORLD if comm is None else comm
        self.point, self.damping = point, check_damping("DistributedHessian", damping)
        self.ranges = _check_ranges(point, ranges, comm.Get_size())
        super().__init__(shape=(point.n_params,) * 2, dtype=np.dtype(point.dtype), base_comm=comm)
        self.comm = comm
        self.l0, self.l1 = self.ranges[self.rank]
        off = point.pipeline.offsets
        self.local_shapes = [(int(off[b] - off[a]),) for a, b in self.ranges]
        self.sweep = RangeSweep(point, self.l0, self.l1)
        self.x_slice = self.sweep.x_slice
        self.n_local = self.local_shapes[self.rank][0]

    # -- distributed arrays ------------------------------------------------------
    def zeros(self) -> DistributedArray:
        """A zero :class:`pylops_mpi.DistributedArray` partitioned as this operator's vectors."""
        y = DistributedArray(
            global_shape=self.shape[0],
            base_comm=self.comm,
            partition=Partition.SCATTER,
            local_shapes=self.local_shapes,
            dtype=self.dtype,
        )
        y[:] = 0
        return y

    def distribute(self, v) -> DistributedArray:
        """A full vector ``v`` (``(n,)``, the same on every rank) as a DistributedArray (copied)."""
        v = np.asarray(v)
        if v.shape != (self.shape[0],):
            raise ValueError(
                f"DistributedHessian.distribute: v has shape {v.shape}; expected ({self.shape[0]},)"
            )
        y = self.zeros()
        y[:] = v[self.x_slice]
        return y

    def local(self, x, name="x"):
        """This rank's slice of a DistributedArray, checked against the partition."""
        if not isinstance(x, DistributedArray):
            raise TypeError(
                f"DistributedHessian: {name} is a {type(x).__name__}; expected a "
                "pylops_mpi.DistributedArray (make one with .distribute(v) or .zeros())"
            )
        shapes = [tuple(s) for s in x.local_shapes]
        if shapes != self.local_shapes:
            raise ValueError(
                f"DistributedHessian: {name} has local shapes {shapes}; expected "
                f"{self.local_shapes} (the layer partition; use .distribute(v) or .zeros())"
            )
        return x.local_array

    # -- the HVP --------------------------------------------------------------------
    def apply_local(self, W):
        """This rank's rows of ``(H + λI) V`` from its rows ``W`` (``(k, n_local)``); collective."""
        W = np.ascontiguousarray(W, dtype=self.dtype)
        sw, comm, r, R = self.sweep, self.comm, self.rank, self.size
        # tangent chain 0 -> R-1: g_in(r + 1) = T_r g_in(r) + g0_out(r)
        g_in = None
        if 0 < r < R - 1:
            g0_out, _ = sw.forward(W, None)  # from zero, in parallel with the other ranks
        if r > 0:
            g_in = comm.recv(source=r - 1, tag=_TANGENT)
        if r == 0 and R > 1:
            g_out, state = sw.forward(W, None)
            comm.send(g_out, dest=1, tag=_TANGENT)
        elif r < R - 1:
            comm.send(
                _plus(None if g_in is None else sw.push_tangent(g_in), g0_out), r + 1, _TANGENT
            )
        if r > 0 or R == 1:
            _, state = sw.forward(W, g_in)
        out = np.empty_like(W)
        # adjoint chain R-1 -> 0: b'_out(r - 1) = b'_out(r) T_r + b'0_in(r)
        b_out = None
        if 0 < r < R - 1:
            b0_in = sw.backward(state, None, out)  # from zero; out is rewritten below
        if r < R - 1:
            b_out = comm.recv(source=r + 1, tag=_ADJOINT)
        if r == R - 1 and R > 1:
            comm.send(sw.backward(state, None, out), dest=r - 1, tag=_ADJOINT)
        elif r > 0:
            push = None if b_out is None else sw.pull_adjoint(b_out)
            comm.send(_plus(push, b0_in), dest=r - 1, tag=_ADJOINT)
        if r < R - 1 or R == 1:
            sw.backward(state, b_out, out)
        if self.damping:
            out += self.damping * W
        return out

    def _matvec(self, x):
        y = self.zeros()
        y[:] = self.apply_local(self.local(x)[None, :])[0]
        return y

    def _rmatvec(self, x):  # symmetric
        return self._matvec(x)


class DistributedInverseHessian(MPILinearOperator):
    r"""Exact ``(H + λI)⁻¹`` partitioned by depth: SPIKE-style elimination of the lifted KKT system.

    Factored once (collective); each :meth:`solve` is two local banded
    solves, one gather to rank 0 and one scatter of the separators, then
    ``refine`` steps of iterative refinement against the distributed HVP and
    the residual certificate. Parameters as :class:`DistributedHessian`, and

    Parameters
    ----------
    refine : int
        Iterative-refinement steps per solve (each one distributed HVP and one
        distributed solve).
    rtol : float, optional
        Warn (``RuntimeWarning``) when the final relative residual exceeds it;
        default ``√ε`` of the point's dtype.
    check : bool
        Compute the residual certificate (one more distributed HVP).

    Attributes
    ----------
    hessian : DistributedHessian
        ``H + λI`` on the same partition (its ``distribute`` / ``zeros`` make vectors).
    info : dict
        ``factor_time``, ``solve_time``, ``residual`` (after a solve),
        ``ranges``, ``reduced_size`` (rows of the interface system), and the
        bytes each rank sends: ``factor_bytes`` (its Schur block), per solve
        of ``k`` right-hand sides ``solve_bytes_per_rhs`` (gather + scatter)
        and per HVP ``hvp_bytes_per_rhs`` (two boundary states).
    """

    def __init__(self, point, damping=0.0, comm=None, ranges=None, refine=1, rtol=None, check=True):
        t0 = time.perf_counter()
        self.hessian = H = DistributedHessian(point, damping, comm, ranges)
        super().__init__(shape=H.shape, dtype=H.dtype, base_comm=H.comm)
        self.comm, self.damping = H.comm, H.damping
        self.refine = check_int("DistributedInverseHessian", "refine", refine, 0)
        self.check = bool(check)
        self.rtol = float(np.sqrt(np.finfo(H.dtype).eps)) if rtol is None else float(rtol)
        if not np.isfinite(self.rtol) or self.rtol <= 0:
            raise ValueError(f"DistributedInverseHessian: rtol={self.rtol}; expected a value > 0")
        kkt, err = None, None
        try:
            kkt = LocalKKT(point, H.l0, H.l1, H.damping)
        except SingularBlockError as e:
            err = e
        _raise_if_any(self.comm, err)
        self.kkt = kkt
        blocks = self.comm.gather((kkt.schur, (kkt.n_left, kkt.n_right)), root=0)
        self._reduced, err = None, None
        if self.rank == 0:
            try:
                schurs, sizes = zip(*blocks)
                self._reduced = ReducedSystem(schurs, sizes, H.dtype, np, H.ranges)
            except SingularBlockError as e:
                err = e
        _raise_if_any(self.comm, err if self.rank == 0 else None)
        item, ns = np.dtype(H.dtype).itemsize, kkt.n_left + kkt.n_right
        sw, last = H.sweep, self.rank == self.size - 1
        sent = sw.B * (sw.n_in * (self.rank > 0) + sw.n_out * (not last))  # one state per chain
        self.info = {
            "ranges": H.ranges,
            "reduced_size": self._reduced.n if self.rank == 0 else None,
            "factor_bytes": ns * ns * item,
            "solve_bytes_per_rhs": 2 * ns * item,
            "hvp_bytes_per_rhs": sent * item,
            "factor_time": time.perf_counter() - t0,
        }

    def _inverse_local(self, G):
        """This rank's rows of ``F⁻¹ G`` for its rows ``G`` (``(n_local, k)``); collective."""
        Y, t = self.kkt.condense(G)
        ts = self.comm.gather(t, root=0)
        seps = self._reduced.solve(ts) if self.rank == 0 else None
        return self.kkt.expand(Y, self.comm.scatter(seps, root=0))

    def _apply_H(self, X):
        return self.hessian.apply_local(X.T).T

    def _norms(self, *cols):
        """Global 2-norms of the given local arrays (one allreduce)."""
        sq = np.array([float(np.vdot(c, c)) for c in cols])
        return np.sqrt(self.comm.allreduce(sq, op=MPI.SUM))

    def solve_local(self, G):
        """This rank's rows of ``(H + λI)⁻¹ G`` for its rows ``G`` (``n_local`` rows, 1-D or 2-D).

        Collective: every rank calls it with its rows. Refined and certified.
        """
        H, G = self.hessian, np.asarray(G)
        vec = G.ndim == 1
        G2 = (G[:, None] if vec else G).astype(self.dtype, copy=False)
        shape_ok = G2.ndim == 2 and G2.shape[0] == H.n_local
        # both checks are collective: a rank raising alone would leave the others waiting
        bad = self.comm.allreduce(
            np.array([not shape_ok, shape_ok and not np.all(np.isfinite(G2))], dtype=int),
            op=MPI.SUM,
        )
        if bad[0]:
            raise ValueError(
                f"DistributedInverseHessian: g has the wrong shape on {bad[0]} rank(s) (here "
                f"{G.shape}; expected ({H.n_local},) or ({H.n_local}, k) for layers "
                f"{H.l0 + 1}..{H.l1}): pass each rank its rows, or use solve(g)"
            )
        if bad[1]:
            raise ValueError(
                f"DistributedInverseHessian: g has inf or NaN entries on {bad[1]} rank(s)"
            )
        t0 = time.perf_counter()
        X = self._inverse_local(G2)
        for _ in range(self.refine):
            X += self._inverse_local(G2 - self._apply_H(X))
        if self.check:
            res = self._norms(G2 - self._apply_H(X), G2)
            self.info["residual"] = res[0] / (res[1] if res[1] else 1.0)
            if self.info["residual"] > self.rtol:
                warnings.warn(
                    f"DistributedInverseHessian: relative residual {self.info['residual']:.2e} "
                    f"exceeds rtol={self.rtol:.0e}; H + damping*I may be ill-conditioned. "
                    "Increase refine or add damping.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        self.info["solve_time"] = time.perf_counter() - t0
        return X[:, 0] if vec else X

    def solve(self, g) -> DistributedArray:
        """``(H + λI)⁻¹ g`` for a DistributedArray ``g`` (or one full vector on every rank)."""
        local = self.hessian.local(g, "g") if isinstance(g, DistributedArray) else None
        if local is None:
            local = self.hessian.distribute(g).local_array
        x = self.hessian.zeros()
        x[:] = self.solve_local(local)
        return x

    def _matvec(self, x):
        return self.solve(x)

    def _rmatvec(self, x):  # symmetric
        return self.solve(x)


def distributed_solve(
    point, g, damping=0.0, *, comm=None, ranges=None, refine=1, rtol=None, check=True, info=None
):
    r"""``(H + λI)⁻¹ g`` solved exactly across the ranks of ``comm``, partitioned by depth.

    Collective: call it on every rank with the same ``point``. See
    :class:`DistributedInverseHessian` for the method and the parameters.

    Parameters
    ----------
    point : Point
    g : DistributedArray or array ``(n,)``
        A DistributedArray partitioned as :class:`DistributedHessian`'s
        vectors, or the full vector (the same on every rank).
    damping : float
        ``λ ≥ 0``; ``H + λI`` may be indefinite, it must be nonsingular.
    info : dict, optional
        Filled with the solver's ``info`` (``residual``, timings, message sizes).

    Returns
    -------
    DistributedArray
        ``x``, partitioned by layer ranges (:func:`gather` makes a full vector).
    """
    Hinv = DistributedInverseHessian(point, damping, comm, ranges, refine, rtol, check)
    x = Hinv.solve(g)
    if info is not None:
        info.update(Hinv.info)
    return x


def gather(x, root=None):
    """A DistributedArray as one NumPy vector: on every rank (``root=None``) or on ``root`` only.

    On the other ranks, with a ``root``, returns ``None``.
    """
    if root is None:
        return np.asarray(x.asarray())
    parts = x.base_comm.gather(np.asarray(x.local_array), root=root)
    return np.concatenate(parts) if x.base_comm.Get_rank() == root else None
