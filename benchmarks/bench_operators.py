"""Micro-benchmarks of the structured operators (issue 3, item 7).

* ``BlockDiagonal`` (1024 blocks of 16x16, one batched ``matmul``) against
  ``pylops.BlockDiag`` of ``MatrixMult`` blocks on the same data.
* ``BlockBidiagonal.inverse()`` (block forward / back substitution) against
  ``scipy.sparse.linalg.spsolve_triangular`` on the same matrix as CSR, with
  1024 blocks of 16x16 and with per-sample blocks (batch ``B = 8``).

Run ``python benchmarks/bench_operators.py [--quick]`` for a table, or
``python -m pytest benchmarks/bench_operators.py --benchmark-only``. The CLI
calls :func:`run`. Every comparison first checks that both sides agree.
"""

from __future__ import annotations

import sys
import time
from functools import partial

import numpy as np
import pylops
import pytest
import scipy.sparse as sp
from scipy.sparse.linalg import spsolve_triangular
from threadpoolctl import threadpool_limits

from blockops.operators import BlockBidiagonal, BlockDiagonal

NBLOCKS, WIDTH = 1024, 16


def _timeit(fn, repeat: int) -> float:
    """Best wall time of ``repeat`` calls (after one warm-up call)."""
    fn()
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def blockdiag_case(nblocks=NBLOCKS, width=WIDTH, seed=0):
    rng = np.random.default_rng(seed)
    blocks = rng.standard_normal((nblocks, width, width))
    ours = BlockDiagonal(blocks)
    ref = pylops.BlockDiag([pylops.MatrixMult(b) for b in blocks])
    x = rng.standard_normal(nblocks * width)
    np.testing.assert_allclose(ours.matvec(x), ref.matvec(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours.rmatvec(x), ref.rmatvec(x), rtol=1e-12, atol=1e-12)
    return ours, ref, x


def bidiag_case(nblocks=NBLOCKS, width=WIDTH, batch=None, seed=0):
    """M with sub-diagonal blocks scaled so that substitution stays bounded."""
    rng = np.random.default_rng(seed)
    if batch is None:
        sub = rng.standard_normal((nblocks - 1, width, width)) / (2 * np.sqrt(width))
        dense_blocks = list(sub)
    else:
        sub = rng.standard_normal((nblocks - 1, batch, width, width)) / (2 * np.sqrt(width))
        dense_blocks = [sp.block_diag(list(s)) for s in sub]
    M = BlockBidiagonal(sub)
    n = M.block_sizes[0]
    lower = sp.block_diag(dense_blocks, format="csr")  # rows of blocks 1.., cols of blocks ..L-2
    N = M.shape[0]
    zeros = [sp.csr_matrix((n, N - n)), sp.csr_matrix((n, n))]
    S = sp.bmat([zeros, [lower, None]], format="csr")  # lower at block position (j+1, j)
    csr = (sp.identity(N, format="csr") + S).tocsr()
    csr_T = csr.T.tocsr()
    Minv = M.inverse()
    y = rng.standard_normal(N)
    np.testing.assert_allclose(Minv.matvec(y), spsolve_triangular(csr, y, lower=True), rtol=1e-9)
    np.testing.assert_allclose(
        Minv.rmatvec(y), spsolve_triangular(csr_T, y, lower=False), rtol=1e-9
    )
    return Minv, csr, csr_T, y


def run(quick: bool = False) -> list[dict]:
    """Measure the comparisons; one dict per row (times in seconds, best of repeats)."""
    rep = 3 if quick else 10
    rows = []
    with threadpool_limits(1):  # per-block products are small: one BLAS thread is fastest
        ours, ref, x = blockdiag_case()
        size = f"{NBLOCKS} blocks {WIDTH}x{WIDTH}"
        for what in ("matvec", "rmatvec"):
            t_ours = _timeit(partial(getattr(ours, what), x), rep * 10)
            t_ref = _timeit(partial(getattr(ref, what), x), rep)
            rows.append(_row(f"BlockDiagonal {what}", "pylops.BlockDiag", t_ours, t_ref, size))
        for batch in (None, 8):
            Minv, csr, csr_T, y = bidiag_case(batch=batch)
            size = f"{NBLOCKS} blocks {WIDTH}x{WIDTH}" + ("" if batch is None else f", B={batch}")
            rs = max(1, rep // 3)
            t1 = _timeit(partial(Minv.matvec, y), rep)
            t2 = _timeit(partial(spsolve_triangular, csr, y, lower=True), rs)
            rows.append(_row("M^-1 matvec (forward subst.)", "spsolve_triangular", t1, t2, size))
            t1 = _timeit(partial(Minv.rmatvec, y), rep)
            t2 = _timeit(partial(spsolve_triangular, csr_T, y, lower=False), rs)
            rows.append(_row("M^-T rmatvec (back subst.)", "spsolve_triangular", t1, t2, size))
    return rows


def _row(name, ref_name, t_ours, t_ref, size):
    return {
        "benchmark": name,
        "size": size,
        "blockops_s": t_ours,
        "reference": ref_name,
        "reference_s": t_ref,
        "speedup": t_ref / t_ours,
    }


def _print_table(rows):
    head = (
        f"{'benchmark':32} {'size':30} {'blockops':>10} {'reference':>22} "
        f"{'ref time':>10} {'speedup':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['benchmark']:32} {r['size']:30} {r['blockops_s'] * 1e3:8.3f}ms "
            f"{r['reference']:>22} {r['reference_s'] * 1e3:8.2f}ms {r['speedup']:7.1f}x"
        )


# ------------------------------------------------------------ pytest-benchmark
@pytest.fixture(scope="module")
def bd():
    return blockdiag_case()


@pytest.fixture(scope="module", params=[None, 8], ids=["B1", "B8"])
def bidiag(request):
    return bidiag_case(batch=request.param)


@pytest.mark.benchmark(group="blockdiag-matvec")
def test_blockdiagonal_matvec(benchmark, bd):
    ours, _, x = bd
    benchmark(ours.matvec, x)


@pytest.mark.benchmark(group="blockdiag-matvec")
def test_pylops_blockdiag_matvec(benchmark, bd):
    _, ref, x = bd
    benchmark(ref.matvec, x)


@pytest.mark.benchmark(group="bidiag-inverse")
def test_bidiagonal_inverse_matvec(benchmark, bidiag):
    Minv, _, _, y = bidiag
    benchmark(Minv.matvec, y)


@pytest.mark.benchmark(group="bidiag-inverse")
def test_bidiagonal_inverse_rmatvec(benchmark, bidiag):
    Minv, _, _, y = bidiag
    benchmark(Minv.rmatvec, y)


@pytest.mark.benchmark(group="bidiag-inverse")
def test_spsolve_triangular_lower(benchmark, bidiag):
    _, csr, _, y = bidiag
    benchmark(spsolve_triangular, csr, y, lower=True)


if __name__ == "__main__":
    _print_table(run(quick="--quick" in sys.argv))
