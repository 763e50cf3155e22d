"""``python -m blockops check``: environment self-test, then correctness against a dense Hessian.

The reference is independent of the code under test: the network is
re-implemented here in plain NumPy from the documented parameter layout
(``x_l = concat(W.ravel(), c)``, ``W`` of shape ``(out, in)``; tanh hidden
layers, linear last layer, ``MSE = mean_s ½‖z_s - y_s‖²``) with a
hand-written backprop, and the dense Hessian is built column by column by
central finite differences of that gradient (error ``O(h²)``, about 1e-9
relative here). Against it: the loss, the gradient, fused and literal
``H v``, the exact ``(H + λI)⁻¹ g`` (backward error against the
finite-difference Hessian, and its own certificate), the inertia, and MINRES.
Prints PASS / FAIL per check; the exit code is 1 when any check fails. The
reference lives in :mod:`blockops.cli.numpy_reference`.
"""

from __future__ import annotations

import importlib.util
import itertools
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import to_numpy
from . import EXIT_FAIL, EXIT_OK
from .data import damped_oscillator
from .numpy_reference import FD_STEP, reference_ggn, reference_hessian, reference_loss_grad
from .preflight import memory_problem, output_file_problem
from .problem import exact_inverse, hessian_operator, krylov, make_problem
from .report import environment_info, write_json

FD_TOL = 1e-6  # relative accuracy of the finite-difference Hessian, with margin
DENSE_COPIES = 16  # n x n float64 matrices alive at once: references, dense H, solves, SVD


def preflight(args) -> str | None:
    """Why the check cannot run as asked (bad ``--json``, dense Hessians too big), or ``None``."""
    if args.json:
        problem = output_file_problem(args.json, "--json")
        if problem:
            return problem
    task = damped_oscillator(1)
    sizes = [task.n_in] + [args.width] * (args.depth - 1) + [task.n_out]
    n = sum((a + 1) * b for a, b in itertools.pairwise(sizes))
    return memory_problem(
        DENSE_COPIES * 8.0 * n * n,
        f"check with {n:,} parameters (dense {n:,} x {n:,} Hessians)",
        "pass a smaller --depth or --width",
    )


# -- the environment --------------------------------------------------------------------------
def _environment(rep) -> dict:
    from ..backend import cupy_available

    env = environment_info()
    env["gpu"] = cupy_available()
    env["nvidia_smi"] = shutil.which("nvidia-smi") is not None
    env["optional"] = {
        m: importlib.util.find_spec(m) is not None for m in ("rich", "matplotlib", "jax", "cupy")
    }
    rep.table("Environment", ["item", "value"], _environment_rows(env))
    return env


def _environment_rows(env: dict) -> list[list[str]]:
    gpu = env["gpu"]
    rows = [
        ["blockops", env["blockops"]],
        [
            "python / numpy / scipy / pylops",
            f"{env['python']} / {env['numpy']} / {env['scipy']} / {env['pylops']}",
        ],
        ["platform", env["platform"]],
        ["CPU cores", str(env["cpu_count"])],
        ["backends found", ", ".join(env["backends"])],
        [
            "GPU (CuPy + CUDA device)",
            "yes" if gpu else ("nvidia-smi found but CuPy unusable" if env["nvidia_smi"] else "no"),
        ],
    ]
    for tp in env["threadpools"]:
        rows.append(
            [
                f"{tp['user_api']}: {tp['library']} {tp['version'] or ''}".strip(),
                f"{tp['threads']} threads ({tp['architecture'] or '?'})",
            ]
        )
    if not env["threadpools"]:
        rows.append(["BLAS", "no thread pool found by threadpoolctl"])
    rows.append(
        [
            "optional packages",
            ", ".join(f"{m} {'yes' if ok else 'no'}" for m, ok in env["optional"].items()),
        ]
    )
    return rows


# -- the checks ------------------------------------------------------------------------------
Check = tuple[str, Any, Any, Any, str]  # (name, value, tolerance, passed, note)


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(float).tiny))


@dataclass
class _Case:
    """The network under test at ``x0``, its NumPy copies and the reference Hessian.

    The later checks fill in what the earlier ones computed (the dense ``H``,
    the exact inverse), so that a failure stops the run where it happens.
    """

    prob: Any
    point: Any
    lam: float
    sizes: list
    x0: np.ndarray
    X: np.ndarray
    y: np.ndarray
    v: np.ndarray
    H_fd: np.ndarray
    H_dense: np.ndarray | None = None
    Hinv: Any = None
    xs: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.x0.size

    @property
    def g(self):
        return self.point.gradient

    @property
    def gn(self) -> np.ndarray:
        return to_numpy(self.point.gradient)

    @property
    def vb(self):
        return self.prob.xp.asarray(self.v)

    @property
    def A_fd(self) -> np.ndarray:
        return self.H_fd + self.lam * np.eye(self.n)


def _case(args) -> _Case:
    # the layers' own init: random nonzero biases exercise every block of the Hessian
    prob = make_problem(
        args.depth, args.width, args.batch, seed=args.seed, backend=args.backend, init="default"
    )
    sizes = prob.net.sizes[:-1]  # the loss's output size is not a layer width
    x0, X, y = (to_numpy(a) for a in (prob.x0, prob.X, prob.y))
    point = prob.point()
    H_fd = reference_hessian(x0, sizes, X, y)
    v = np.random.default_rng(args.seed + 1).standard_normal(x0.size)
    return _Case(prob, point, args.damping, sizes, x0, X, y, v, H_fd)


def _correctness(args) -> Iterator[Check]:
    """Yield ``(name, value, tolerance, passed, note)`` per check."""
    c = _case(args)
    yield from _gradient_checks(c)
    yield from _hvp_checks(c)
    yield from _inverse_checks(c)
    yield from _inertia_check(c)
    yield from _minres_check(c)
    yield from _ggn_checks(c)


def _gradient_checks(c: _Case) -> Iterator[Check]:
    ref_loss, ref_grad = reference_loss_grad(c.x0, c.sizes, c.X, c.y)
    loss_err = _rel(np.float64(c.point.loss), np.float64(ref_loss))
    yield ("loss vs plain NumPy", loss_err, 1e-12, None, "")
    yield ("gradient vs plain NumPy backprop", _rel(c.gn, ref_grad), 1e-10, None, "")


def _hvp_checks(c: _Case) -> Iterator[Check]:
    fd_ref = c.H_fd @ c.v
    scale = np.linalg.norm(c.H_fd, 2) * np.linalg.norm(c.v)
    for form in ("fused", "literal"):
        Hv = to_numpy(hessian_operator(c.point, form=form).matvec(c.vb))
        yield (
            f"H v ({form}) vs finite-difference Hessian",
            float(np.linalg.norm(Hv - fd_ref) / scale),
            FD_TOL,
            None,
            "relative to ‖H‖‖v‖",
        )
    eye = c.prob.xp.eye(c.n, dtype=c.point.dtype)
    c.H_dense = to_numpy(hessian_operator(c.point).matmat(eye))
    yield (
        "dense H (fused columns) vs finite differences",
        float(np.abs(c.H_dense - c.H_fd).max() / np.abs(c.H_fd).max()),
        FD_TOL,
        None,
        "max entry",
    )


def _inverse_checks(c: _Case) -> Iterator[Check]:
    lam, gn, A_fd = c.lam, c.gn, c.A_fd
    c.Hinv = exact_inverse(c.point, lam)
    xs = c.xs = to_numpy(c.Hinv.matvec(c.g))
    back = np.linalg.norm(A_fd @ xs - gn) / (np.linalg.norm(A_fd, 2) * np.linalg.norm(xs))
    yield (
        f"(H + {lam:g} I)^-1 g: backward error vs finite-difference H",
        float(back),
        FD_TOL,
        None,
        "‖(H_fd+λI)x − g‖ / (‖H_fd+λI‖‖x‖)",
    )
    A_dense = c.H_dense + lam * np.eye(c.n)
    cond = np.linalg.cond(A_dense)
    yield (
        f"(H + {lam:g} I)^-1 g vs dense solve",
        _rel(xs, np.linalg.solve(A_dense, gn)),
        1e-13 * max(cond, 1.0),
        None,
        f"tolerance 1e-13 × cond = 1e-13 × {cond:.2g}",
    )
    yield from _certificate_checks(c)


def _certificate_checks(c: _Case) -> Iterator[Check]:
    xb = c.prob.xp.asarray(c.xs)
    fused_res = _rel(to_numpy(hessian_operator(c.point, damping=c.lam).matvec(xb)), c.gn)
    yield ("residual certificate ‖(H+λI)x − g‖/‖g‖ (fused HVP)", fused_res, 1e-10, None, "")
    own = getattr(c.Hinv, "residual", None)
    if own is None:
        return
    r = float(np.max(to_numpy(own(c.g, xb))))
    yield (
        "operator's own certificate agrees",
        abs(r - fused_res),
        1e-10 + 0.5 * fused_res,
        None,
        f"reported {r:.2e}",
    )


def _inertia_check(c: _Case) -> Iterator[Check]:
    inertia = getattr(c.Hinv, "inertia", None)
    if inertia is None:
        return
    name = "inertia vs eigenvalues of the FD Hessian"
    ev = np.linalg.eigvalsh(c.A_fd)
    gap = np.min(np.abs(ev))
    # an eigenvalue within the finite-difference error has no reliable sign
    if gap < 1e3 * FD_TOL * np.linalg.norm(c.H_fd, 2):
        note = f"not comparable: smallest |eigenvalue| {gap:.1e} within FD error"
        yield (name, None, None, True, note)
        return
    want = (int(np.sum(ev < 0)), 0, int(np.sum(ev > 0)))  # (n_neg, n_zero, n_pos)
    ok = tuple(int(i) for i in inertia) == want
    yield (name, None, None, ok, f"operator {tuple(inertia)}, dense {want}")


def _minres_check(c: _Case) -> Iterator[Check]:
    A = hessian_operator(c.point, damping=c.lam)
    res = krylov("minres", A, c.g, tol=1e-10, maxiter=20 * c.n)
    A_dense = c.H_dense + c.lam * np.eye(c.n)
    yield (
        "MINRES (blockops.solvers) on H + λI: true residual",
        _rel(A_dense @ to_numpy(res.x), c.gn),
        1e-8,
        None,
        f"tol 1e-10, {res.iterations} iterations",
    )


def _ggn_checks(c: _Case) -> Iterator[Check]:
    lam, gn, v = c.lam, c.gn, c.v
    G_fd = reference_ggn(c.x0, c.sizes, c.X)
    Gv = to_numpy(hessian_operator(c.point, kind="ggn").matvec(c.vb))
    yield (
        "Gauss-Newton G v vs Jᵀ J / B (finite-difference J)",
        float(np.linalg.norm(Gv - G_fd @ v) / (np.linalg.norm(G_fd, 2) * np.linalg.norm(v))),
        FD_TOL,
        None,
        "relative to ‖G‖‖v‖",
    )
    xg = to_numpy(exact_inverse(c.point, lam, kind="ggn").matvec(c.g))
    Ag = G_fd + lam * np.eye(c.n)
    yield (
        f"(G + {lam:g} I)^-1 g: backward error vs finite-difference G",
        float(np.linalg.norm(Ag @ xg - gn) / (np.linalg.norm(Ag, 2) * np.linalg.norm(xg))),
        FD_TOL,
        None,
        "exact Gauss-Newton inverse (Levenberg-Marquardt step)",
    )


# -- running and reporting ------------------------------------------------------------------
def _collect(args) -> list[dict]:
    results = []
    try:
        for name, value, tol, passed, note in _correctness(args):
            if passed is None:
                passed = bool(value is not None and np.isfinite(value) and value <= tol)
            results.append(
                {"check": name, "value": value, "tolerance": tol, "passed": passed, "note": note}
            )
    except Exception as exc:  # a component missing or broken: report it as a failed check
        results.append(
            {
                "check": "running the checks",
                "value": None,
                "tolerance": None,
                "passed": False,
                "note": "stopped, see below",
                "error": f"{type(exc).__name__}: {exc}",
            }
        )
    return results


def _results_table(rep, results: list[dict], args) -> None:
    rows = [
        [
            r["check"],
            "-" if r["value"] is None else f"{r['value']:.2e}",
            "-" if r["tolerance"] is None else f"{r['tolerance']:.1e}",
            "PASS" if r["passed"] else "FAIL",
            r["note"],
        ]
        for r in results
    ]
    rep.table(
        f"Correctness (depth {args.depth}, width {args.width}, batch {args.batch}, "
        f"λ = {args.damping:g}, {args.backend})",
        ["check", "value", "tolerance", "result", "note"],
        rows,
        caption="reference: plain NumPy re-implementation, Hessian by central "
        f"differences of its gradient (h = {FD_STEP:g})",
    )
    for r in results:
        if r.get("error"):
            rep.print(f"{r['check']}: {r['error']}", style="bad")


def run(args, rep) -> int:
    rep.rule("blockops check")
    env = _environment(rep)
    results = _collect(args)
    _results_table(rep, results, args)
    n_fail = sum(not r["passed"] for r in results)
    if args.json:
        write_json(
            args.json,
            {
                "settings": vars(args) | {"command": "check"},
                "environment": env,
                "checks": results,
                "failed": n_fail,
            },
        )
    if n_fail:
        rep.print(f"{n_fail} of {len(results)} checks FAILED", style="bad")
        return EXIT_FAIL
    rep.print(f"all {len(results)} checks passed", style="good")
    return EXIT_OK
