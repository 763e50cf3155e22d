"""Benchmark: blockops against curvlinops on the same torch model.

The model is ``nn.Sequential`` of ``depth`` blocks ``Linear(16, 16) + Tanh``
and a final ``Linear(16, 16)``; the loss is ``nn.MSELoss(reduction="mean")``
(the mean over all ``B·16`` entries); random inputs and targets; float64;
fixed seeds; one BLAS / torch thread (``threadpoolctl.threadpool_limits(1)``,
``torch.set_num_threads(1)``). Blockops sees the model through
:func:`blockops.interop.torch.from_torch`; curvlinops
(``curvlinops-for-pytorch``) through its operators on the same
``nn.Module``, loss and batch. Grid: width 16, depth 16 / 64 / 256 / 1024,
batch 1 and 8, damping ``λ = 1e-3``.

Per case, in one run:

HVP
    blockops ``hessian(point) @ v`` (the fused product) against curvlinops'
    ``HessianLinearOperator(model, loss, params, [(X, y)]) @ v``; best of a
    few calls each (``blockops.cli.problem.best_time``), after one warm-up
    call (curvlinops' first product pays a large one-off ``torch.func``
    cost, reported on its own); their ratio and the relative difference of
    the two products.
``(H + λI)⁻¹ g`` (``g`` the loss gradient)
    blockops' exact ``inverse_hessian(point, damping=λ, check=False)``
    (factor and solve timed separately) against curvlinops' inverse
    operators on ``H + λI`` (``HessianLinearOperator + λ·Identity``):
    ``CGInverseLinearOperator`` with linear_operator's default CG settings
    (tolerance 1 on the mean relative residual, at least 11 iterations),
    the same with ``tolerance=1e-8``, and ``LSMRInverseLinearOperator``
    (``atol = btol = 1e-8``; LSMR, unlike CG, is valid for an indefinite
    matrix); SciPy MINRES (``rtol=1e-8``) on blockops' fused ``H + λI`` as
    a further column. Every iterative solve is capped at
    ``max(10, budget / (c · t))`` iterations: ``t`` the median time of one
    product measured before, ``c`` 1.15 for CG (its vector updates), 2.3 for
    LSMR (two products and SciPy round trips per iteration), 1 for MINRES;
    ``budget`` seconds per solve (``--budget``, default 10; 3 with
    ``--quick``). CG is also capped at linear_operator's default
    ``max_iter = 1000``, MINRES at 20000. A solve that stops at its cap is
    marked ``*``. Solves are timed once (best of up to 3 when under 2 s).
    CG's iterates do not depend on its tolerance, so when the
    default-tolerance run ends at the cap the ``tolerance=1e-8`` run would
    repeat it step for step: it is then not run again and shares its
    numbers (``cg_same_run_as_default`` in the JSON).
``(G + λI)⁻¹ g``, the damped GGN (a different, positive-definite matrix)
    curvlinops' ``CGInverseLinearOperator`` (``tolerance=1e-8``, capped) on
    ``GGNLinearOperator + λ·Identity`` against blockops'
    ``inverse_hessian(point, damping=λ, kind="ggn")``: CG is designed for
    this kind of matrix. linear_cg's defaults ``eps = 1e-10`` (a step whose
    curvature ``pᵀAp``, for the right-hand side scaled to norm 1, is below
    it is dropped) and ``stop_updating_after = 1e-10`` stall it near a
    relative residual of 1e-5 at ``λ = 1e-3``; a second run passes both as
    1e-30 (column "CG-eps").

True residuals ``‖(A + λI) x − g‖ / ‖g‖`` come from one independent product
with curvlinops' operator (``HessianLinearOperator`` or
``GGNLinearOperator``, plus ``λ x``) on all solutions of a case at once.

::

    python benchmarks/bench_curvlinops.py            # the full grid, < 15 min on 2 cores
    python benchmarks/bench_curvlinops.py --quick    # depth 16 / 64, short budget

Options: ``--json PATH`` (default: ``bench_curvlinops.json`` or
``bench_curvlinops_quick.json`` next to this file), ``--budget S`` (seconds
per iterative solve), ``--deadline S`` (cases not started by then are
skipped, default 840), ``--plain`` (no rich table), ``--rst JSON`` (print a
saved run's tables as reStructuredText).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch / NumPy load their pools

import argparse
import datetime
import json
import math
import platform
import sys
import time
import warnings
from importlib.metadata import PackageNotFoundError, version

import numpy as np
from threadpoolctl import threadpool_limits

WIDTH, DAMPING, RTOL = 16, 1e-3, 1e-8
TINY = 1e-30  # linear_cg's eps and stop_updating_after in the "CG-eps" column
DEPTHS, BATCHES = (16, 64, 256, 1024), (1, 8)
QUICK_DEPTHS = (16, 64)
CG_DEFAULT_MAX_ITER = 1000  # linear_operator.settings.max_cg_iterations
MINRES_MAX_ITER = 20000
# seconds per iteration / seconds per product (median product time): CG's vector updates,
# LSMR's two products and SciPy round trips; the caps below budget with these
CG_OVERHEAD, LSMR_OVERHEAD = 1.15, 2.3
HERE = os.path.dirname(os.path.abspath(__file__))


# -- the model ------------------------------------------------------------------------------
def make_case(depth: int, batch: int, seed: int = 0):
    """``(model, loss, X, y)``: ``depth`` × (Linear(16,16) + Tanh), Linear(16,16), mean MSE."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    mods = []
    for _ in range(depth):
        mods += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    mods.append(nn.Linear(WIDTH, WIDTH))
    model = nn.Sequential(*mods).to(torch.float64)
    gen = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(batch, WIDTH, generator=gen, dtype=torch.float64)
    y = torch.randn(batch, WIDTH, generator=gen, dtype=torch.float64)
    return model, nn.MSELoss(reduction="mean"), X, y


def n_params(depth: int) -> int:
    return (depth + 1) * WIDTH * (WIDTH + 1)


def mem_available() -> float:
    """Bytes the kernel reports as available (``inf`` when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


def mem_estimate(depth: int, batch: int) -> float:
    """A generous bound on the bytes one case needs.

    Blockops keeps O(width²) dense blocks per layer and sample, torch.func
    keeps the activations and their tangents, the solvers a few dozen
    parameter-sized vectors.
    """
    n = n_params(depth)
    per_layer = 8 * (batch + 4) * (4 * WIDTH) ** 2 * 8
    return 64 * 8 * n + depth * per_layer


# -- curvlinops helpers -----------------------------------------------------------------------
def _counted_operator(A):
    """``A`` wrapped so that the number of columns it multiplies is counted."""
    from curvlinops._torch_base import PyTorchLinearOperator

    class Counted(PyTorchLinearOperator):
        SELF_ADJOINT = True

        def __init__(self, A):
            super().__init__(A._in_shape, A._out_shape)
            self._A, self.count = A, 0

        def _matmat(self, X):
            self.count += X[0].shape[-1]
            return self._A._matmat(X)

        def _adjoint(self):
            return self

        @property
        def dtype(self):
            return self._A.dtype

        @property
        def device(self):
            return self._A.device

    return Counted(A)


def damped(A, params, lam):
    """``A + λ I`` as a curvlinops operator."""
    from curvlinops.examples import IdentityLinearOperator

    I = IdentityLinearOperator([tuple(p.shape) for p in params], A.device, A.dtype)
    return A + lam * I


def cg_solve(A, g, params, lam, **kw):
    """curvlinops' ``CGInverseLinearOperator(A + λI, **kw) @ g``: ``(x, iters, converged)``."""
    import torch
    from curvlinops import CGInverseLinearOperator
    from linear_operator.utils.warnings import NumericalWarning

    Ac = _counted_operator(damped(A, params, lam))
    # linear_cg refuses max_iter below its Lanczos default (20) unless this is lowered too
    kw.setdefault("max_tridiag_iter", min(kw.get("max_iter", CG_DEFAULT_MAX_ITER), 20))
    inv = CGInverseLinearOperator(Ac, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NumericalWarning)
        x = inv @ torch.from_numpy(g)
    converged = not any(issubclass(w.category, NumericalWarning) for w in caught)
    return x.numpy(), Ac.count - 1, converged  # one product for the initial residual


def lsmr_solve(A, g, params, lam, **kw):
    """curvlinops' ``LSMRInverseLinearOperator(A + λI, **kw) @ g``: ``(x, iters, converged)``."""
    import torch
    from curvlinops import LSMRInverseLinearOperator

    inv = LSMRInverseLinearOperator(damped(A, params, lam), **kw)
    x = inv @ torch.from_numpy(g)
    istop, itn = inv._lsmr_info[0][:2]
    return x.numpy(), int(itn), istop in (1, 2, 4, 5)  # 7: iteration limit, 3/6: cond limit


def residuals(A, lam, g, xs: dict) -> dict:
    """``‖(A + λI) x − g‖ / ‖g‖`` for every ``x`` in ``xs``, by one product with ``A``."""
    import torch

    keys = list(xs)
    S = np.column_stack([xs[k] for k in keys])
    AS = (A @ torch.from_numpy(S)).numpy() + lam * S
    r = np.linalg.norm(AS - g[:, None], axis=0) / np.linalg.norm(g)
    return {k: float(v) for k, v in zip(keys, r)}


def recorded(A, v, durations: list):
    """``lambda: A @ v`` that appends each call's seconds to ``durations``."""

    def call():
        t0 = time.perf_counter()
        out = A @ v
        durations.append(time.perf_counter() - t0)
        return out

    return call


def cap(budget: float, t_iter: float, ceiling: int) -> int:
    return int(min(ceiling, max(10, budget // max(t_iter, 1e-9))))


# -- one case ---------------------------------------------------------------------------------
def bench_case(depth: int, batch: int, budget: float, log=print) -> dict:
    import curvlinops
    import torch
    from scipy.sparse.linalg import minres

    from blockops.cli.problem import best_time
    from blockops.hessian import hessian
    from blockops.interop.torch import from_torch
    from blockops.inverse import inverse_hessian

    t_case = time.perf_counter()
    lam = DAMPING
    row: dict = {"depth": depth, "batch": batch, "n": n_params(depth), "budget_s": budget}
    skips = row["skipped"] = {}
    model, loss, X, y = make_case(depth, batch)
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == row["n"]

    # blockops: linearise the torch model
    t0 = time.perf_counter()
    pt = from_torch(model, loss, X, y)
    row["from_torch_s"] = time.perf_counter() - t0
    g = np.array(pt.gradient)
    v = np.random.default_rng(2).standard_normal(row["n"])
    data = [(X, y)]
    Hc = curvlinops.HessianLinearOperator(model, loss, params, data, check_deterministic=False)
    Gc = curvlinops.GGNLinearOperator(model, loss, params, data, check_deterministic=False)

    # -- HVP ------------------------------------------------------------------------------------
    H = hessian(pt)
    H @ v  # warm-up
    row["hvp_blockops_s"], hv_b = best_time(lambda: H @ v, repeat=20, budget=2.0)
    vt = torch.from_numpy(v)
    t0 = time.perf_counter()
    Hc @ vt
    row["hvp_curvlinops_first_s"] = time.perf_counter() - t0
    row["hvp_curvlinops_s"], hv_c = best_time(recorded(Hc, vt, durs := []), repeat=10, budget=4.0)
    t_h = row["hvp_curvlinops_typical_s"] = float(np.median(durs))
    hv_c = hv_c.numpy()
    row["hvp_ratio"] = row["hvp_curvlinops_s"] / row["hvp_blockops_s"]
    row["hvp_rel_diff"] = float(np.linalg.norm(hv_b - hv_c) / np.linalg.norm(hv_c))
    log(
        f"  HVP: blockops {row['hvp_blockops_s']:.2e} s, curvlinops {row['hvp_curvlinops_s']:.2e} s"
        f" (first {row['hvp_curvlinops_first_s']:.1f} s), rel diff {row['hvp_rel_diff']:.1e}"
    )

    # -- blockops' exact inverse of H + λI ----------------------------------------------------
    def factor():
        return inverse_hessian(pt, damping=lam, check=False)

    Hi = factor()
    row["inv_method"] = Hi.method
    row["inertia"] = list(map(int, Hi.inertia))
    row["bo_factor_s"], Hi = best_time(factor, repeat=5, budget=3.0)
    row["bo_solve_s"], x_bo = best_time(lambda: Hi @ g, repeat=10, budget=2.0)
    row["bo_total_s"] = row["bo_factor_s"] + row["bo_solve_s"]
    sols = {"bo": x_bo}

    # -- curvlinops' iterative inverses on H + λI (and MINRES on blockops' H + λI) -------------
    if 10 * t_h > 4 * budget:
        for key in ("cgd", "cg", "lsmr"):
            skips[key] = f"10 products take {10 * t_h:.0f} s > 4 x budget"
    else:
        cap_cg = cap(budget, CG_OVERHEAD * t_h, CG_DEFAULT_MAX_ITER)
        row["cgd_cap"] = cap_cg
        t, (x, it, ok) = best_time(
            lambda: cg_solve(Hc, g, params, lam, max_iter=cap_cg), repeat=3, budget=2.0
        )
        row["cgd_s"], row["cgd_iters"], row["cgd_converged"] = t, it, ok
        sols["cgd"] = x
        row["cg_cap"] = cap_cg
        if ok:
            t, (x, it, ok) = best_time(
                lambda: cg_solve(Hc, g, params, lam, tolerance=RTOL, max_iter=cap_cg),
                repeat=3,
                budget=2.0,
            )
            row["cg_same_run_as_default"] = False
        else:
            # CG's iterates do not depend on the tolerance (only its stopping test does):
            # a default run that hit the cap is the tolerance-1e-8 run, step for step.
            row["cg_same_run_as_default"] = True
        row["cg_s"], row["cg_iters"], row["cg_converged"] = t, it, ok
        sols["cg"] = x
        cap_lsmr = cap(budget, LSMR_OVERHEAD * t_h, 10**9)
        row["lsmr_cap"] = cap_lsmr
        t, (x, it, ok) = best_time(
            lambda: lsmr_solve(Hc, g, params, lam, atol=RTOL, btol=RTOL, maxiter=cap_lsmr),
            repeat=3,
            budget=2.0,
        )
        row["lsmr_s"], row["lsmr_iters"], row["lsmr_converged"] = t, it, ok
        sols["lsmr"] = x
    A_bo = hessian(pt, damping=lam)
    cap_mr = cap(budget, row["hvp_blockops_s"], MINRES_MAX_ITER)
    row["minres_cap"] = cap_mr

    def run_minres():
        count = [0]
        x, _ = minres(
            A_bo,
            g,
            rtol=RTOL,
            maxiter=cap_mr,
            callback=lambda xk: count.__setitem__(0, count[0] + 1),
        )
        return x, count[0]

    row["minres_s"], (x, it) = best_time(run_minres, repeat=3, budget=2.0)
    row["minres_iters"], row["minres_converged"] = it, it < cap_mr
    sols["minres"] = x
    for key, r in residuals(Hc, lam, g, sols).items():
        row[f"{key}_residual"] = r
    log(
        f"  H+λI: blockops {row['bo_total_s']:.2e} s res {row['bo_residual']:.1e}"
        + "".join(
            f"; {k} {row[k + '_s']:.1f} s, {row[k + '_iters']} it, res {row[k + '_residual']:.1e}"
            for k in ("cgd", "cg", "lsmr", "minres")
            if k + "_s" in row
        )
    )

    # -- the damped GGN: curvlinops' CG (its intended use) and blockops' exact GGN inverse ------
    def factor_ggn():
        return inverse_hessian(pt, damping=lam, check=False, kind="ggn")

    Gi = factor_ggn()
    row["ggn_bo_factor_s"], Gi = best_time(factor_ggn, repeat=5, budget=3.0)
    row["ggn_bo_solve_s"], xg_bo = best_time(lambda: Gi @ g, repeat=10, budget=2.0)
    row["ggn_bo_total_s"] = row["ggn_bo_factor_s"] + row["ggn_bo_solve_s"]
    gsols = {"ggn_bo": xg_bo}
    t0 = time.perf_counter()
    Gc @ vt
    row["ggn_curvlinops_first_s"] = time.perf_counter() - t0
    row["ggn_curvlinops_s"], _ = best_time(recorded(Gc, vt, durs := []), repeat=5, budget=2.0)
    t_g = row["ggn_curvlinops_typical_s"] = float(np.median(durs))
    if 10 * t_g > 4 * budget:
        skips["ggn_cg"] = skips["ggn_cge"] = f"10 products take {10 * t_g:.0f} s > 4 x budget"
    else:
        cap_g = cap(budget, CG_OVERHEAD * t_g, CG_DEFAULT_MAX_ITER)
        row["ggn_cg_cap"] = cap_g
        t, (x, it, ok) = best_time(
            lambda: cg_solve(Gc, g, params, lam, tolerance=RTOL, max_iter=cap_g),
            repeat=3,
            budget=2.0,
        )
        row["ggn_cg_s"], row["ggn_cg_iters"], row["ggn_cg_converged"] = t, it, ok
        gsols["ggn_cg"] = x
        # linear_cg zeroes a step whose curvature p'Ap (of the rhs scaled to norm 1) is below
        # eps = 1e-10, and stops updating a column once its residual norm is below 1e-10: with
        # λ = 1e-3 that stalls CG near 1e-5. The same solve with both thresholds at 1e-30:
        t, (x, it, ok) = best_time(
            lambda: cg_solve(
                Gc,
                g,
                params,
                lam,
                tolerance=RTOL,
                max_iter=cap_g,
                eps=TINY,
                stop_updating_after=TINY,
            ),
            repeat=3,
            budget=2.0,
        )
        row["ggn_cge_s"], row["ggn_cge_iters"], row["ggn_cge_converged"] = t, it, ok
        gsols["ggn_cge"] = x
    for key, r in residuals(Gc, lam, g, gsols).items():
        row[f"{key}_residual"] = r
    log(
        f"  G+λI: blockops {row['ggn_bo_total_s']:.2e} s res {row['ggn_bo_residual']:.1e}"
        + (
            f"; CG {row['ggn_cg_s']:.1f} s, {row['ggn_cg_iters']} it,"
            f" res {row['ggn_cg_residual']:.1e}; CG eps=1e-30 {row['ggn_cge_s']:.1f} s,"
            f" {row['ggn_cge_iters']} it, res {row['ggn_cge_residual']:.1e}"
            if "ggn_cg_s" in row
            else ""
        )
    )
    row["case_s"] = time.perf_counter() - t_case
    return row


# -- tables -----------------------------------------------------------------------------------
def _f(fmt):
    return lambda r, k: fmt.format(r[k]) if r.get(k) is not None else "-"


def _iters(prefix):
    def f(r, k):
        if prefix + "_iters" not in r:
            return "skip" if prefix in r.get("skipped", {}) else "-"
        return f"{r[prefix + '_iters']}{'' if r[prefix + '_converged'] else '*'}"

    return f


TABLES = {
    "HVP (one product, best of k)": [
        ("depth", "depth", _f("{}")),
        ("batch", "batch", _f("{}")),
        ("params", "n", _f("{}")),
        ("from_torch s", "from_torch_s", _f("{:.3f}")),
        ("blockops s", "hvp_blockops_s", _f("{:.2e}")),
        ("curvlinops s", "hvp_curvlinops_s", _f("{:.2e}")),
        ("ratio", "hvp_ratio", _f("{:.0f}")),
        ("curvl. 1st call s", "hvp_curvlinops_first_s", _f("{:.2f}")),
        ("rel diff", "hvp_rel_diff", _f("{:.1e}")),
    ],
    "(H + λI)⁻¹ g, λ = 1e-3: blockops exact, SciPy MINRES on blockops' HVP": [
        ("depth", "depth", _f("{}")),
        ("batch", "batch", _f("{}")),
        ("neg. eigs", "inertia", lambda r, k: str(r[k][0])),
        ("factor s", "bo_factor_s", _f("{:.4f}")),
        ("solve s", "bo_solve_s", _f("{:.4f}")),
        ("total s", "bo_total_s", _f("{:.4f}")),
        ("residual", "bo_residual", _f("{:.1e}")),
        ("MINRES s", "minres_s", _f("{:.2f}")),
        ("MINRES it", "minres_iters", _iters("minres")),
        ("MINRES res", "minres_residual", _f("{:.1e}")),
    ],
    "(H + λI)⁻¹ g, λ = 1e-3: curvlinops' iterative inverses (* = capped)": [
        ("depth", "depth", _f("{}")),
        ("batch", "batch", _f("{}")),
        ("CG-def s", "cgd_s", _f("{:.2f}")),
        ("CG-def it", "cgd_iters", _iters("cgd")),
        ("CG-def res", "cgd_residual", _f("{:.1e}")),
        ("CG s", "cg_s", _f("{:.2f}")),
        ("CG it", "cg_iters", _iters("cg")),
        ("CG res", "cg_residual", _f("{:.1e}")),
        ("LSMR s", "lsmr_s", _f("{:.2f}")),
        ("LSMR it", "lsmr_iters", _iters("lsmr")),
        ("LSMR res", "lsmr_residual", _f("{:.1e}")),
    ],
    "(G + λI)⁻¹ g, damped GGN (PSD; a different matrix)": [
        ("depth", "depth", _f("{}")),
        ("batch", "batch", _f("{}")),
        ("blockops total s", "ggn_bo_total_s", _f("{:.4f}")),
        ("blockops res", "ggn_bo_residual", _f("{:.1e}")),
        ("curvl. GGN-vp s", "ggn_curvlinops_s", _f("{:.2e}")),
        ("CG s", "ggn_cg_s", _f("{:.2f}")),
        ("CG it", "ggn_cg_iters", _iters("ggn_cg")),
        ("CG res", "ggn_cg_residual", _f("{:.1e}")),
        ("CG-eps s", "ggn_cge_s", _f("{:.2f}")),
        ("CG-eps it", "ggn_cge_iters", _iters("ggn_cge")),
        ("CG-eps res", "ggn_cge_residual", _f("{:.1e}")),
    ],
}


def plain_table(title, cols, rows) -> str:
    cells = [[h for h, _, _ in cols]] + [[f(r, k) for _, k, f in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = [title]
    for j, c in enumerate(cells):
        lines.append("  ".join(s.rjust(w) for s, w in zip(c, widths)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def rst_tables(rows) -> str:
    """The tables as reStructuredText simple tables (for the docs page)."""
    done = [r for r in rows if "hvp_blockops_s" in r]
    out = []
    for title, cols in TABLES.items():
        cells = [[h for h, _, _ in cols]] + [[f(r, k) for _, k, f in cols] for r in done]
        widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
        rule = "  ".join("=" * w for w in widths)
        lines = [title, "", rule]
        for j, c in enumerate(cells):
            lines.append("  ".join(s.rjust(w) for s, w in zip(c, widths)))
            if j == 0:
                lines.append(rule)
        out.append("\n".join([*lines, rule]))
    return "\n\n".join(out)


def print_tables(rows, plain=False) -> None:
    done = [r for r in rows if "hvp_blockops_s" in r]
    try:
        if plain:
            raise ImportError
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for title, cols in TABLES.items():
            print(plain_table(title, cols, done), end="\n\n")
    else:
        console = Console()
        console.width = max(console.width, 132)  # the tables are wide; never wrap cells
        for title, cols in TABLES.items():
            t = Table(title=title)
            for h, _, _ in cols:
                t.add_column(h, justify="right")
            for r in done:
                t.add_row(*(f(r, k) for _, k, f in cols))
            console.print(t)
    for r in rows:
        for what, why in r.get("skipped", {}).items():
            print(f"skipped: depth {r['depth']} batch {r['batch']} {what}: {why}")


# -- main -------------------------------------------------------------------------------------
def versions() -> dict:
    out = {"python": platform.python_version(), "machine": platform.machine()}
    for dist in (
        "torch",
        "curvlinops-for-pytorch",
        "linear_operator",
        "blockops",
        "numpy",
        "scipy",
    ):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    try:
        with open("/proc/cpuinfo") as f:
            out["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        out["cpu"] = platform.processor()
    out["cpu_count"] = os.cpu_count()
    return out


def warm_up() -> float:
    """Seconds of the first blockops factor + solve of the process (numba compile or cache load)."""
    from blockops.interop.torch import from_torch
    from blockops.inverse import inverse_hessian

    t0 = time.perf_counter()
    for batch in (1, 2):
        pt = from_torch(*make_case(4, batch))
        inverse_hessian(pt, damping=DAMPING, check=False) @ pt.gradient
        inverse_hessian(pt, damping=DAMPING, check=False, kind="ggn") @ pt.gradient
    return time.perf_counter() - t0


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="depth 16 / 64 only, short budget")
    ap.add_argument("--json", default=None, help="output JSON path")
    ap.add_argument("--budget", type=float, default=None, help="seconds per iterative solve")
    ap.add_argument("--deadline", type=float, default=840.0, help="start no case after S seconds")
    ap.add_argument("--plain", action="store_true", help="plain-text tables")
    ap.add_argument("--rst", metavar="JSON", help="print a saved run's tables as reST and exit")
    args = ap.parse_args(argv)
    if args.rst:
        with open(args.rst) as f:
            print(rst_tables(json.load(f)["rows"]))
        return []
    budget = args.budget if args.budget is not None else (3.0 if args.quick else 10.0)
    name = "bench_curvlinops_quick.json" if args.quick else "bench_curvlinops.json"
    path = args.json or os.path.join(HERE, name)

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
    t_start = time.perf_counter()
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "versions": versions(),
        "threads": "1 (threadpool_limits(1), torch.set_num_threads(1), OMP_NUM_THREADS=1)",
        "model": f"depth x (Linear({WIDTH},{WIDTH}) + Tanh), Linear({WIDTH},{WIDTH}); float64",
        "loss": "nn.MSELoss(reduction='mean')",
        "damping": DAMPING,
        "rtol": RTOL,
        "budget_s_per_solve": budget,
        "quick": args.quick,
    }
    rows = []
    depths = QUICK_DEPTHS if args.quick else DEPTHS
    with threadpool_limits(1):
        meta["blockops_first_call_s"] = warm_up()
        print(
            f"blockops first factor + solve of the process (not counted): "
            f"{meta['blockops_first_call_s']:.2f} s",
            flush=True,
        )
        for depth in depths:
            for batch in BATCHES:
                base = {"depth": depth, "batch": batch, "n": n_params(depth)}
                elapsed = time.perf_counter() - t_start
                need, have = mem_estimate(depth, batch), mem_available()
                if elapsed > args.deadline:
                    rows.append(
                        {**base, "skipped": {"case": f"run deadline {args.deadline:.0f} s passed"}}
                    )
                elif need > 0.8 * have:
                    rows.append(
                        {
                            **base,
                            "skipped": {
                                "case": f"needs ~{need / 2**30:.1f} GiB, "
                                f"{have / 2**30:.1f} GiB available"
                            },
                        }
                    )
                else:
                    print(f"depth {depth} batch {batch} (n = {base['n']}):", flush=True)
                    try:
                        rows.append(
                            bench_case(depth, batch, budget, log=lambda s: print(s, flush=True))
                        )
                    except MemoryError as e:
                        rows.append({**base, "skipped": {"case": f"MemoryError: {e}"}})
                print(f"  [{time.perf_counter() - t_start:.0f} s elapsed]", flush=True)
    meta["run_s"] = time.perf_counter() - t_start
    print()
    print_tables(rows, plain=args.plain)
    print(f"\nrun time {meta['run_s']:.0f} s; JSON: {path}")
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
