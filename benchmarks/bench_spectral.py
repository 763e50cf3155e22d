r"""Benchmark: exact spectral tools against stochastic estimators at equal wall time.

Width-16 tanh dense nets with an MSE loss (``bench_inverse.make_point``),
batch 1, float64, one BLAS thread, depth 256 and 1024. Every time is the
best of a few repeats (the machine may be shared). Per depth, in one run:

Diagonal of ``(H + λI)⁻¹``, ``λ = 1e-3``
    :func:`blockops.inverse.inverse_diagonal` (selected inversion) against
    the factorisation it reads (``factorisations`` = their time ratio);
    Hutchinson's estimator ``mean_j z_j ∘ (H + λI)⁻¹ z_j`` with Rademacher
    probes and *exact* solves (the same factor, ``refine=0``), one probe
    after another until the diagonal's own time is spent, then 10x and 100x
    that time; its relative error ``‖d̂ − d‖₂ / ‖d‖₂``. The naive route,
    ``eᵢᵀ (H + λI)⁻¹ eᵢ`` for all ``n`` columns, is extrapolated from 16
    columns, whose entries are also checked against the selected inversion.
Eigenvalue counts
    :func:`blockops.spectral.count_eigenvalues` in ``[-∞, -τ)`` (one
    factorisation of ``H + τI``) against stochastic Lanczos quadrature
    (SLQ, below: Rademacher probes, Lanczos with full reorthogonalisation
    on the fused HVP, Gauss quadrature of the indicator) given the count's
    time, then 10x, 100x and 1000x: up to 200 Lanczos steps per probe, new
    probes while time is left, the last one cut at the budget. At batch 1
    ``H`` has rank far below ``n``: a huge cluster of eigenvalues at 0 (the
    shift ``τ = 0`` is singular), and the nonzero ones decay over decades
    towards it, so "the number of negative eigenvalues" depends on the
    resolution. The edges are therefore relative: ``τ = 1e-3 ‖H‖`` and
    ``1e-6 ‖H‖``, with ``‖H‖`` the largest ``|θ|`` of 30 Lanczos steps (not
    timed; both methods need it). A count is exact for the factored matrix;
    an eigenvalue within rounding (``~ε‖H‖``) of an edge could be counted on
    either side, which edges this far from the cluster at 0 avoid.
Eigenpairs
    :func:`blockops.spectral.eigsh_near` (shift-invert Lanczos, every
    application an exact refined solve with ``H − σI``: two sweeps and one
    HVP) for the 10 most negative eigenvalues, ``σ = θ_min − 0.01 ‖H‖``
    below the spectrum (certified by ``count_eigenvalues(-∞, σ) == 0``),
    against SciPy's ``eigsh(LinearOperator(hvp), k=10, which="SA")``, both
    to machine precision (``tol=0``): time, operator applications, worst
    residual ``‖Hv − λv‖``, the largest eigenvalue difference over ``‖H‖``.
    Then the 10 eigenvalues nearest the interior shift ``-1e-3 ‖H‖``, where
    "SA" would need every eigenpair up to them (``scipy_k_needed``, an exact
    count). ``complete`` is ``count_eigenvalues`` over the smallest interval
    centred at ``σ`` that holds the 10 values: 10 when none was missed.

::

    OMP_NUM_THREADS=1 python benchmarks/bench_spectral.py          # depth 256 and 1024
    OMP_NUM_THREADS=1 python benchmarks/bench_spectral.py --quick  # depth 64, 256; equal time

Options: ``--json PATH`` writes the rows, ``--repeat R`` (default 5).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time

import numpy as np
import scipy
import scipy.linalg
import scipy.sparse.linalg as spla
from bench_inverse import best_times, make_point, table
from threadpoolctl import threadpool_limits

from blockops.hessian import hvp
from blockops.inverse import InverseHessian, inverse_diagonal, inverse_hessian
from blockops.spectral import count_eigenvalues, eigsh_near

DAMPING = 1e-3
DEPTHS, QUICK_DEPTHS = (256, 1024), (64, 256)
LEVELS = (1e-3, 1e-6)  # count edges -level * ‖H‖
SLQ_MAX_STEPS = 200  # per probe; SLQ in the literature uses ~100, fewer is biased here


# -- stochastic Lanczos quadrature -----------------------------------------------
def lanczos(matvec, q0, steps, deadline=math.inf):
    """Up to ``steps`` Lanczos steps from ``q0``: the tridiagonal's diagonal and off-diagonal.

    Full reorthogonalisation (Gram-Schmidt against every stored vector,
    twice) keeps the basis orthonormal, so no spurious copies of converged
    Ritz values enter the quadrature. Stops early on an invariant subspace
    or, after at least one step, at ``deadline`` (``time.perf_counter``).
    """
    Q = np.empty((steps, q0.shape[0]))
    alpha, beta = np.empty(steps), np.empty(steps)
    q = q0 / np.linalg.norm(q0)
    for k in range(steps):
        Q[k] = q
        w = matvec(q)
        alpha[k] = q @ w
        for _ in range(2):  # "twice is enough" (Kahan-Parlett)
            w -= Q[: k + 1].T @ (Q[: k + 1] @ w)
        beta[k] = np.linalg.norm(w)
        if beta[k] <= 1e-12 * np.abs(alpha[: k + 1]).max() or time.perf_counter() > deadline:
            return alpha[: k + 1], beta[:k]
        q = w / beta[k]
    return alpha, beta[:-1]


def gauss_nodes(alpha, beta):
    """Gauss quadrature of ``qᵀ f(H) q`` from Lanczos: ``Σ_i w_i f(θ_i)``."""
    theta, S = scipy.linalg.eigh_tridiagonal(alpha, beta)
    return theta, S[0] ** 2


def slq(pt, budget_s, seed=0):
    """SLQ nodes and weights of Rademacher probes until ``budget_s`` seconds are spent.

    Each probe runs up to ``SLQ_MAX_STEPS`` steps; new probes start while
    time is left, and the last one is cut at the budget (a shorter Lanczos
    run is still a Gauss quadrature, of lower degree).
    """
    rng = np.random.default_rng(seed)
    deadline = time.perf_counter() + budget_s
    out = []
    while not out or time.perf_counter() < deadline:
        z = rng.choice([-1.0, 1.0], pt.n_params)
        out.append(gauss_nodes(*lanczos(lambda v: hvp(pt, v), z, SLQ_MAX_STEPS, deadline)))
    return out


def slq_count(nodes, n, lo, hi):
    """SLQ estimate of ``#{λ_i ∈ [lo, hi)}`` and its standard error over the probes."""
    per_probe = np.array([n * w[(th >= lo) & (th < hi)].sum() for th, w in nodes])
    stderr = per_probe.std(ddof=1) / math.sqrt(len(per_probe)) if len(per_probe) > 1 else math.nan
    return float(per_probe.mean()), float(stderr)


# -- a: the diagonal of the inverse -------------------------------------------------
def hutchinson(Hi0, d, budgets, seed=0):
    """Hutchinson with exact solves: ``(probes, seconds, relative error)`` per time budget.

    One probe at a time (a single solve costs no more per column than a
    block) until each budget is spent; RNG, solve and accumulation all count.
    """
    rng = np.random.default_rng(seed)
    acc, probes, spent, out = np.zeros(d.shape[0]), 0, 0.0, []
    for budget in sorted(budgets):
        while probes == 0 or spent < budget:
            t = time.perf_counter()
            z = rng.choice([-1.0, 1.0], d.shape[0])
            acc += z * Hi0.solve(z)
            spent += time.perf_counter() - t
            probes += 1
        out.append((probes, spent, float(np.linalg.norm(acc / probes - d) / np.linalg.norm(d))))
    return out


def bench_diagonal(pt, repeat, factors):
    """Selected inversion vs its factorisation, Hutchinson at equal time, the naive route."""
    n = pt.n_params
    Hi = inverse_hessian(pt, damping=DAMPING, check=False)
    Hi0 = inverse_hessian(pt, damping=DAMPING, refine=0, check=False)  # exact direct solves
    d = inverse_diagonal(Hi)
    cols = np.random.default_rng(2).choice(n, 16, replace=False)
    E = np.zeros((n, cols.size))
    E[cols, np.arange(cols.size)] = 1.0
    t = best_times(
        {
            "factor": lambda: inverse_hessian(pt, damping=DAMPING, check=False),
            "diag": lambda: inverse_diagonal(Hi),
            "columns": lambda: Hi0.solve(E),
        },
        repeat,
    )
    z = np.ones(n)
    row = {
        "n": n,
        "factor_s": t["factor"],
        "diag_s": t["diag"],
        "factorisations": t["diag"] / t["factor"],
        "naive_s": n * t["columns"] / cols.size,
        # the naive entries e_iᵀ (H + λI)⁻¹ e_i against selected inversion: an independent check
        "naive_vs_diag": float(
            np.max(np.abs(np.diagonal(Hi0.solve(E)[cols]) - d[cols]) / np.abs(d[cols]))
        ),
        "solve_certificate": float(Hi0.residual(z, Hi0.solve(z))),
    }
    for f, (m, s, err) in zip(factors, hutchinson(Hi0, d, [f * t["diag"] for f in factors])):
        row.update({f"hutch{f}x_probes": m, f"hutch{f}x_s": s, f"hutch{f}x_err": err})
    return row


# -- b: eigenvalue counts -------------------------------------------------------
def bench_counts(pt, norm, repeat, factors):
    """``count_eigenvalues(-∞, -level ‖H‖)`` vs SLQ given 1x, 10x, ... its time."""
    n, rows = pt.n_params, []
    for level in LEVELS:
        hi = -level * norm
        exact = count_eigenvalues(pt, -np.inf, hi)
        t_count = best_times({"c": lambda hi=hi: count_eigenvalues(pt, -np.inf, hi)}, repeat)["c"]
        row = {"n": n, "level": level, "edge": hi, "exact": int(exact), "count_s": t_count}
        for f in factors:
            t0 = time.perf_counter()
            nodes = slq(pt, f * t_count)
            est, se = slq_count(nodes, n, -np.inf, hi)
            row[f"slq{f}x_s"] = time.perf_counter() - t0
            row[f"slq{f}x"] = f"{len(nodes)}x{max(th.size for th, _ in nodes)}"
            row[f"slq{f}x_hvps"] = sum(th.size for th, _ in nodes)
            row[f"slq{f}x_est"], row[f"slq{f}x_stderr"] = est, se
            row[f"slq{f}x_err"] = abs(est - exact) / exact
        rows.append(row)
    return rows


# -- c: eigenpairs -----------------------------------------------------------------
@contextlib.contextmanager
def counting_solves():
    """Count ``InverseHessian.solve`` columns (ARPACK applies the operator one vector at a time)."""
    calls, original = [0], InverseHessian.solve

    def solve(self, G):
        calls[0] += 1 if G.ndim == 1 else G.shape[1]
        return original(self, G)

    InverseHessian.solve = solve
    try:
        yield calls
    finally:
        InverseHessian.solve = original


def hvp_operator(pt):
    """The fused HVP as a SciPy operator, and a list whose entry counts the columns applied."""
    calls = [0]

    def matvec(v):
        calls[0] += 1 if v.ndim == 1 else v.shape[1]
        return hvp(pt, v)

    n = pt.n_params
    return spla.LinearOperator((n, n), matvec=matvec, matmat=matvec, dtype=pt.dtype), calls


def near(pt, sigma, norm, repeat, k):
    """``eigsh_near`` at ``σ``: time, solves, worst residual, and the pairs' completeness count.

    ``count_eigenvalues`` over the smallest interval centred at ``σ`` that holds
    the ``k`` found eigenvalues (widened by ``1e-9`` relative): ``k`` means none was missed.
    """
    with counting_solves() as solves:
        lam, _, res = eigsh_near(pt, sigma, k=k)
    t = best_times({"near": lambda: eigsh_near(pt, sigma, k=k)}, repeat, budget=10.0)["near"]
    r = np.abs(lam - sigma).max() * (1 + 1e-9) + 1e-12 * norm
    row = {"sigma": sigma, "near_s": t, "near_solves": solves[0], "near_residual": float(res.max())}
    row["complete"] = int(count_eigenvalues(pt, sigma - r, sigma + r))
    return np.sort(lam), row


def bench_eigs(pt, norm, theta_min, repeat, k=10):
    """The ``k`` most negative pairs (``eigsh_near`` vs SciPy's "SA" on the HVP); ``k`` interior."""
    margin = 0.01 * norm
    while count_eigenvalues(pt, -np.inf, theta_min - margin) != 0:  # σ must be below λ_min
        margin *= 2
    lam, low = near(pt, theta_min - margin, norm, repeat, k)
    op, hvps = hvp_operator(pt)
    w, V = spla.eigsh(op, k=k, which="SA", tol=0)
    low.update(
        target=f"{k} most negative",
        scipy_hvps=hvps[0],
        scipy_s=best_times({"s": lambda: spla.eigsh(op, k=k, which="SA", tol=0)}, repeat, 10.0)[
            "s"
        ],
        scipy_residual=float(np.linalg.norm(hvp(pt, V) - V * w, axis=0).max()),
        agreement=float(np.abs(lam - np.sort(w)).max() / norm),
    )
    # interior: the k nearest the count edge -1e-3 ‖H‖; SciPy on the HVP alone would need all
    # the eigenpairs below them ("SA" with k = that count, exact from the factorisation)
    lam, mid = near(pt, -LEVELS[0] * norm, norm, repeat, k)
    mid.update(
        target=f"{k} nearest -1e-3|H|",
        scipy_k_needed=int(count_eigenvalues(pt, -np.inf, lam[-1] + 1e-9 * norm)),
    )
    return [low, mid]


# -- the run ----------------------------------------------------------------------
def spectrum_scale(pt, steps=30):
    """``‖H‖`` and ``θ_min`` from ``steps`` Lanczos steps (Ritz values lie inside the spectrum)."""
    z = np.random.default_rng(3).standard_normal(pt.n_params)
    theta, _ = gauss_nodes(*lanczos(lambda v: hvp(pt, v), z, steps))
    return float(np.abs(theta).max()), float(theta[0])


def factors(quick):
    """Time multiples of the exact method given to the estimators (diagonal, counts)."""
    return ((1,), (1,)) if quick else ((1, 10, 100), (1, 10, 100, 1000))


def run(quick=False, repeat=5, log=print):
    diag_f, count_f = factors(quick)
    out = {"diagonal": [], "counts": [], "eigs": []}
    for depth in QUICK_DEPTHS if quick else DEPTHS:
        _, pt = make_point(depth, 1)
        g = np.ones(pt.n_params)
        inverse_hessian(pt, damping=DAMPING, check=False).solve(g)  # warm: numba cache, pages
        norm, theta_min = spectrum_scale(pt)
        hvp_s = best_times({"h": lambda pt=pt, g=g: hvp(pt, g)}, repeat)["h"]
        log(f"depth {depth}: n = {pt.n_params}, ‖H‖ ≈ {norm:.4g}, HVP {hvp_s * 1e3:.2f} ms")
        base = {"depth": depth, "norm": norm, "hvp_s": hvp_s}
        out["diagonal"].append({**base, **bench_diagonal(pt, repeat, diag_f)})
        log(table(out["diagonal"][-1:], diag_columns(diag_f)))
        rows = [{**base, **r} for r in bench_counts(pt, norm, repeat, count_f)]
        out["counts"] += rows
        log(table(rows, count_columns(count_f)))
        rows = [{**base, **r} for r in bench_eigs(pt, norm, theta_min, min(repeat, 3))]
        out["eigs"] += rows
        log(table(rows, EIG_COLUMNS))
    return out


def diag_columns(factors):
    cols = [("depth", "{}"), ("n", "{}"), ("factor_s", "{:.4f}"), ("diag_s", "{:.4f}")]
    cols += [("factorisations", "{:.1f}"), ("naive_s", "{:.1f}"), ("naive_vs_diag", "{:.0e}")]
    for f in factors:
        cols += [(f"hutch{f}x_probes", "{}"), (f"hutch{f}x_s", "{:.3f}")]
        cols += [(f"hutch{f}x_err", "{:.2f}")]
    return cols


def count_columns(factors):
    cols = [("depth", "{}"), ("level", "{:.0e}"), ("exact", "{}"), ("count_s", "{:.4f}")]
    for f in factors:
        cols += [(f"slq{f}x", "{}"), (f"slq{f}x_s", "{:.3f}"), (f"slq{f}x_est", "{:.0f}")]
        cols += [(f"slq{f}x_err", "{:.2f}")]
    return cols


EIG_COLUMNS = [
    ("depth", "{}"),
    ("target", "{}"),
    ("sigma", "{:.4g}"),
    ("near_s", "{:.3f}"),
    ("near_solves", "{}"),
    ("near_residual", "{:.0e}"),
    ("complete", "{}"),
    ("scipy_s", "{:.3f}"),
    ("scipy_hvps", "{}"),
    ("scipy_residual", "{:.0e}"),
    ("agreement", "{:.0e}"),
    ("scipy_k_needed", "{}"),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="depth 64 / 256, equal time only")
    ap.add_argument("--repeat", type=int, default=5, help="repeats per timing (best is kept)")
    ap.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with threadpool_limits(1):
        out = run(args.quick, args.repeat, log=lambda s: print(s, flush=True))
    diag_f, count_f = factors(args.quick)
    print()
    print(table(out["diagonal"], diag_columns(diag_f)))
    print()
    print(table(out["counts"], count_columns(count_f)))
    print()
    print(table(out["eigs"], EIG_COLUMNS))
    meta = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "threads": 1,
        "damping": DAMPING,
        "run_s": time.perf_counter() - t0,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, **out}, f, indent=1)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
