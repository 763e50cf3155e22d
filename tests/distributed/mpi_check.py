"""Checks of :mod:`blockops.distributed.mpi` on every rank: ``mpiexec -n R python mpi_check.py``.

Launched by ``test_mpi.py`` on 2 and 4 ranks; exits non-zero (an
``AssertionError`` on some rank) on the first failed check and prints
``mpi_check: N checks passed on R ranks`` on rank 0 otherwise.

References (computed on rank 0, broadcast):

* a small pipeline mixing every hidden-layer kind: the dense Hessian by JAX
  (``tests/reference.py``, independent of blockops' numerics) and
  ``numpy.linalg.solve`` on it;
* an indefinite deep case (depth 256, width 4, batch 1, tanh, MSE): the serial
  fused HVP (``blockops.hvp``) and the serial exact inverse
  (``blockops.inverse_hessian``), whose inertia shows the indefiniteness.
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
from mpi4py import MPI

import blockops as bo
from blockops.distributed.mpi import (
    DistributedHessian,
    DistributedInverseHessian,
    distributed_solve,
    gather,
)

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
CHECKS = []


def check(name, ok, detail=""):
    """Record a check; fail this rank (and so the job) when it does not hold."""
    assert ok, f"rank {RANK}: {name} failed {detail}"
    CHECKS.append(name)
    if RANK == 0:
        print(f"  ok  {name} {detail}", flush=True)


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def mixed_point():
    """Every hidden-layer kind (Dense, Bias, Scale, Residual, Elementwise), batch 3, MSE."""
    w = 5
    net = bo.Pipeline(
        [
            bo.Dense(3, w, "tanh"),
            bo.Bias(w, "sigmoid"),
            bo.Scale(w, "softplus"),
            bo.Residual(w, "tanh", h=0.5),
            bo.Elementwise(w, "gelu"),
            bo.Dense(w, w, "tanh"),
            bo.Dense(w, w, "tanh"),
            bo.Dense(w, 2, "identity"),
            bo.MSELoss(),
        ]
    )
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((3, 3)), 3.0 * rng.standard_normal((3, 2))
    return net, net.init(seed=3), X, y


def deep_point(depth=256, width=4, batch=1, seed=0):
    net = bo.Pipeline([bo.Dense(width, width, "tanh") for _ in range(depth)] + [bo.MSELoss()])
    rng = np.random.default_rng(seed)
    X, y = rng.standard_normal((batch, width)), rng.standard_normal((batch, width))
    return net.linearize(net.init(seed=seed), X, y)


def check_against_dense():
    """Distributed HVP and solve against JAX's dense Hessian of a mixed pipeline."""
    net, x, X, y = mixed_point()
    pt = net.linearize(x, X, y)
    lam = 0.05
    Hd = None
    if RANK == 0:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from reference import dense_hessian  # JAX: imported by rank 0 only

        Hd = dense_hessian(net, x, X, y)
    Hd = COMM.bcast(Hd, root=0)
    n = pt.n_params
    ev = np.linalg.eigvalsh(Hd)
    check(
        "mixed: H is indefinite",
        ev[0] < -1e-3 and ev[-1] > 1e-3,
        f"(eig {ev[0]:.2f} .. {ev[-1]:.2f})",
    )
    rng = np.random.default_rng(7)
    v, g = rng.standard_normal(n), rng.standard_normal(n)
    H = DistributedHessian(pt, damping=lam)
    Hv = gather(H.matvec(H.distribute(v)))
    check(
        "mixed: HVP = dense JAX H v",
        rel(Hv, Hd @ v + lam * v) < 1e-12,
        f"({rel(Hv, Hd @ v + lam * v):.1e})",
    )
    A = Hd + lam * np.eye(n)
    x_ref = np.linalg.solve(A, g)
    info = {}
    xd = gather(distributed_solve(pt, g, damping=lam, info=info))
    err = rel(xd, x_ref)
    check(
        "mixed: solve = numpy.linalg.solve(H + λI, g)",
        err < 1e-10,
        f"({err:.1e}, cond {np.linalg.cond(A):.0e})",
    )
    check("mixed: residual certificate", info["residual"] < 1e-12, f"({info['residual']:.1e})")
    # symmetry through pylops-mpi's own dot: <u, H w> = <H u, w>
    u, w = H.distribute(rng.standard_normal(n)), H.distribute(rng.standard_normal(n))
    a, b = u.dot(H.matvec(w)), H.matvec(u).dot(w)
    check("mixed: <u, Hw> = <Hu, w>", abs(a - b) <= 1e-12 * abs(a), f"({abs(a - b):.1e})")


def check_deep_indefinite():
    """Depth 256, indefinite: distributed HVP / solve against the serial ones."""
    pt = deep_point()
    lam = 1e-2
    n = pt.n_params
    rng = np.random.default_rng(11)
    V, g = rng.standard_normal((n, 3)), rng.standard_normal(n)
    H = DistributedHessian(pt, damping=lam)
    ref = bo.hvp(pt, V) + lam * V
    HV = np.column_stack([gather(H.matvec(H.distribute(V[:, j]))) for j in range(3)])
    check(
        "deep: HVP = serial bo.hvp",
        rel(HV, ref) < 1e-12,
        f"({rel(HV, ref):.1e}, ranges {H.ranges})",
    )
    Hinv_serial = bo.inverse_hessian(pt, damping=lam)
    neg, _, pos = Hinv_serial.inertia
    check(
        "deep: H + λI is indefinite (serial inertia)",
        neg > 0 and pos > 0,
        f"({neg} negative of {n})",
    )
    x_ref = Hinv_serial.matvec(g)
    Hinv = DistributedInverseHessian(pt, damping=lam)
    x = Hinv.solve(g)
    err = rel(gather(x), x_ref)
    check("deep: solve = serial inverse_hessian", err < 1e-10, f"({err:.1e})")
    check(
        "deep: residual certificate",
        Hinv.info["residual"] < 1e-10,
        f"({Hinv.info['residual']:.1e})",
    )
    # the DistributedArray route and a second right-hand side through the same factor
    g2 = rng.standard_normal(n)
    x2 = gather(Hinv.matvec(H.distribute(g2)))
    err2 = rel(x2, Hinv_serial.matvec(g2))
    check("deep: second solve through the factor (matvec)", err2 < 1e-10, f"({err2:.1e})")
    # several columns at once on each rank's rows
    G = rng.standard_normal((n, 2))
    X = Hinv.solve_local(G[H.x_slice])
    full = np.concatenate(COMM.allgather(X))
    err3 = rel(full, Hinv_serial.matmat(G))
    check("deep: two columns at once (solve_local)", err3 < 1e-10, f"({err3:.1e})")


def check_uneven_ranges_and_errors():
    """Caller-given ranges give the same solve; bad input raises on every rank."""
    pt = deep_point(depth=24, width=3, batch=2, seed=5)
    L, lam, n = pt.n_layers, 0.1, pt.n_params
    cuts = np.linspace(0, L, SIZE + 1).astype(int)
    cuts[1:-1] = np.minimum(cuts[1:-1] + 2, L - (SIZE - np.arange(1, SIZE)))  # skewed
    ranges = list(zip(cuts[:-1].tolist(), cuts[1:].tolist()))
    g = np.random.default_rng(2).standard_normal(n)
    x = gather(distributed_solve(pt, g, damping=lam, ranges=ranges))
    ref = bo.inverse_hessian(pt, damping=lam).matvec(g)
    check("uneven ranges: solve = serial", rel(x, ref) < 1e-10, f"({rel(x, ref):.1e}, {ranges})")
    bad = [(0, L)] + [(L, L)] * (SIZE - 1)
    try:
        DistributedHessian(pt, ranges=bad)
    except ValueError as err:
        check("bad ranges raise ValueError", "ranges" in str(err))
    else:
        check("bad ranges raise ValueError", False)
    H = DistributedHessian(pt, damping=lam)
    g_nan = g.copy()
    g_nan[-1] = np.nan  # on the last rank only: every rank must raise
    try:
        DistributedInverseHessian(pt, damping=lam).solve(H.distribute(g_nan))
    except ValueError as err:
        check("NaN in g raises on every rank", "NaN" in str(err))
    else:
        check("NaN in g raises on every rank", False)
    try:
        H.matvec(DistributedHessian(pt, ranges=ranges).distribute(g)) if SIZE > 1 else None
    except ValueError as err:
        check("mismatched partition raises", "local shapes" in str(err))
    # a singular H + λI (λ = 0, batch 2: H has rank below n) is refused on every rank
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            distributed_solve(pt, g, damping=0.0)
        except bo.SingularBlockError as err:
            check("singular H raises SingularBlockError on every rank", "singular" in str(err))
        else:
            check("singular H raises SingularBlockError on every rank", False)


def main():
    if RANK == 0:
        print(f"mpi_check on {SIZE} ranks", flush=True)
    check_against_dense()
    check_deep_indefinite()
    check_uneven_ranges_and_errors()
    counts = COMM.gather(len(CHECKS), root=0)
    if RANK == 0:
        assert len(set(counts)) == 1, f"ranks ran different numbers of checks: {counts}"
        print(f"mpi_check: {len(CHECKS)} checks passed on {SIZE} ranks", flush=True)


if __name__ == "__main__":
    main()
