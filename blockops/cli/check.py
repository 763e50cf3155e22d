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
Prints PASS / FAIL per check; the exit code is 1 when any check fails.
"""

from __future__ import annotations

import importlib.util
import itertools
import shutil

import numpy as np

from . import EXIT_FAIL, EXIT_OK
from .problem import exact_inverse, hessian_operator, krylov, make_problem
from .report import environment_info, write_json

FD_STEP = 1e-5
FD_TOL = 1e-6  # relative accuracy of the finite-difference Hessian, with margin


# -- the independent reference -------------------------------------------------------------
def _reference_forward(x: np.ndarray, sizes: list[int], X: np.ndarray):
    """Weights, biases and activations ``[X, z_1, ..., z_out]`` of the tanh MLP."""
    Ws, cs, off = [], [], 0
    for a_in, a_out in itertools.pairwise(sizes):
        Ws.append(x[off : off + a_out * a_in].reshape(a_out, a_in))
        off += a_out * a_in
        cs.append(x[off : off + a_out])
        off += a_out
    last = len(Ws) - 1
    zs = [X]
    for l, (W, c) in enumerate(zip(Ws, cs)):
        t = zs[-1] @ W.T + c
        zs.append(np.tanh(t) if l < last else t)
    return Ws, zs


def reference_outputs(x: np.ndarray, sizes: list[int], X: np.ndarray) -> np.ndarray:
    """Network outputs ``(B, n_out)`` (the loss's input), plain NumPy."""
    return _reference_forward(x, sizes, X)[1][-1]


def reference_ggn(x: np.ndarray, sizes, X, h: float = FD_STEP) -> np.ndarray:
    """Gauss-Newton matrix ``Jᵀ J / B`` of the MSE loss, ``J`` by central differences."""
    n, B = x.size, X.shape[0]
    J = np.empty((reference_outputs(x, sizes, X).size, n))
    for j in range(n):
        e = np.zeros(n)
        e[j] = h
        J[:, j] = (reference_outputs(x + e, sizes, X) - reference_outputs(x - e, sizes, X)).ravel()
    J /= 2 * h
    return J.T @ J / B


def reference_loss_grad(x: np.ndarray, sizes: list[int], X: np.ndarray, y: np.ndarray):
    """Loss and gradient of the tanh MLP with MSE, in plain NumPy (hand-written backprop)."""
    Ws, zs = _reference_forward(x, sizes, X)
    last = len(Ws) - 1
    acts = zs[1:]
    B = X.shape[0]
    r = zs[-1] - y
    loss = 0.5 * float(np.sum(r * r)) / B
    delta = r / B
    grads = []
    for l in range(last, -1, -1):
        if l < last:
            delta = delta * (1.0 - acts[l] ** 2)
        grads.append(np.concatenate([(delta.T @ zs[l]).ravel(), delta.sum(axis=0)]))
        delta = delta @ Ws[l]
    return loss, np.concatenate(grads[::-1])


def reference_hessian(x: np.ndarray, sizes, X, y, h: float = FD_STEP) -> np.ndarray:
    """Dense Hessian by central differences of :func:`reference_loss_grad`, symmetrised."""
    n = x.size
    H = np.empty((n, n))
    for j in range(n):
        e = np.zeros(n)
        e[j] = h
        H[:, j] = (
            reference_loss_grad(x + e, sizes, X, y)[1] - reference_loss_grad(x - e, sizes, X, y)[1]
        ) / (2 * h)
    return 0.5 * (H + H.T)


# -- the checks ------------------------------------------------------------------------------
def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(float).tiny))


def _environment(rep) -> dict:
    from ..backend import cupy_available

    env = environment_info()
    gpu = cupy_available()
    env["gpu"] = gpu
    env["nvidia_smi"] = shutil.which("nvidia-smi") is not None
    env["optional"] = {
        m: importlib.util.find_spec(m) is not None for m in ("rich", "matplotlib", "jax", "cupy")
    }
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
    rep.table("Environment", ["item", "value"], rows)
    return env


def _correctness(args):
    """Yield ``(name, value, tolerance, passed, note)`` per check."""
    from ..backend import to_numpy

    lam = args.damping
    # the layers' own init: random nonzero biases exercise every block of the Hessian
    prob = make_problem(
        args.depth, args.width, args.batch, seed=args.seed, backend=args.backend, init="default"
    )
    sizes = prob.net.sizes[:-1]  # the loss's output size is not a layer width
    x0, X, y = (to_numpy(a) for a in (prob.x0, prob.X, prob.y))
    pt = prob.point()
    ref_loss, ref_grad = reference_loss_grad(x0, sizes, X, y)
    H_fd = reference_hessian(x0, sizes, X, y)
    n = x0.size
    Hn = np.linalg.norm(H_fd, 2)
    v = np.random.default_rng(args.seed + 1).standard_normal(n)
    vb = prob.xp.asarray(v)

    yield ("loss vs plain NumPy", _rel(np.float64(pt.loss), np.float64(ref_loss)), 1e-12, None, "")
    yield (
        "gradient vs plain NumPy backprop",
        _rel(to_numpy(pt.gradient), ref_grad),
        1e-10,
        None,
        "",
    )
    fd_ref = H_fd @ v
    scale = Hn * np.linalg.norm(v)
    for form in ("fused", "literal"):
        Hv = to_numpy(hessian_operator(pt, form=form).matvec(vb))
        yield (
            f"H v ({form}) vs finite-difference Hessian",
            float(np.linalg.norm(Hv - fd_ref) / scale),
            FD_TOL,
            None,
            "relative to ‖H‖‖v‖",
        )
    H_dense = to_numpy(hessian_operator(pt).matmat(prob.xp.eye(n, dtype=pt.dtype)))
    yield (
        "dense H (fused columns) vs finite differences",
        float(np.abs(H_dense - H_fd).max() / np.abs(H_fd).max()),
        FD_TOL,
        None,
        "max entry",
    )

    A_fd = H_fd + lam * np.eye(n)
    g = pt.gradient
    gn = to_numpy(g)
    Hinv = exact_inverse(pt, lam)
    xs = to_numpy(Hinv.matvec(g))
    back = np.linalg.norm(A_fd @ xs - gn) / (np.linalg.norm(A_fd, 2) * np.linalg.norm(xs))
    yield (
        f"(H + {lam:g} I)^-1 g: backward error vs finite-difference H",
        float(back),
        FD_TOL,
        None,
        "‖(H_fd+λI)x − g‖ / (‖H_fd+λI‖‖x‖)",
    )
    A_dense = H_dense + lam * np.eye(n)
    x_dense = np.linalg.solve(A_dense, gn)
    cond = np.linalg.cond(A_dense)
    yield (
        f"(H + {lam:g} I)^-1 g vs dense solve",
        _rel(xs, x_dense),
        1e-13 * max(cond, 1.0),
        None,
        f"tolerance 1e-13 × cond = 1e-13 × {cond:.2g}",
    )
    fused_res = _rel(to_numpy(hessian_operator(pt, damping=lam).matvec(prob.xp.asarray(xs))), gn)
    yield ("residual certificate ‖(H+λI)x − g‖/‖g‖ (fused HVP)", fused_res, 1e-10, None, "")
    own = getattr(Hinv, "residual", None)
    if own is not None:
        r = float(np.max(to_numpy(own(g, prob.xp.asarray(xs)))))
        yield (
            "operator's own certificate agrees",
            abs(r - fused_res),
            1e-10 + 0.5 * fused_res,
            None,
            f"reported {r:.2e}",
        )
    inertia = getattr(Hinv, "inertia", None)
    if inertia is not None:
        ev = np.linalg.eigvalsh(A_fd)
        gap = np.min(np.abs(ev))
        want = (int(np.sum(ev < 0)), 0, int(np.sum(ev > 0)))  # (n_neg, n_zero, n_pos)
        ok = tuple(int(i) for i in inertia) == want
        if gap < 1e3 * FD_TOL * Hn:
            yield (
                "inertia vs eigenvalues of the FD Hessian",
                None,
                None,
                True,
                f"not comparable: smallest |eigenvalue| {gap:.1e} within FD error",
            )
        else:
            yield (
                "inertia vs eigenvalues of the FD Hessian",
                None,
                None,
                ok,
                f"operator {tuple(inertia)}, dense {want}",
            )
    res = krylov("minres", hessian_operator(pt, damping=lam), g, tol=1e-10, maxiter=20 * n)
    yield (
        "MINRES (blockops.solvers) on H + λI: true residual",
        _rel(A_dense @ to_numpy(res.x), gn),
        1e-8,
        None,
        f"tol 1e-10, {res.iterations} iterations",
    )
    G_fd = reference_ggn(x0, sizes, X)
    Gv = to_numpy(hessian_operator(pt, kind="ggn").matvec(vb))
    yield (
        "Gauss-Newton G v vs Jᵀ J / B (finite-difference J)",
        float(np.linalg.norm(Gv - G_fd @ v) / (np.linalg.norm(G_fd, 2) * np.linalg.norm(v))),
        FD_TOL,
        None,
        "relative to ‖G‖‖v‖",
    )
    xg = to_numpy(exact_inverse(pt, lam, kind="ggn").matvec(g))
    Ag = G_fd + lam * np.eye(n)
    yield (
        f"(G + {lam:g} I)^-1 g: backward error vs finite-difference G",
        float(np.linalg.norm(Ag @ xg - gn) / (np.linalg.norm(Ag, 2) * np.linalg.norm(xg))),
        FD_TOL,
        None,
        "exact Gauss-Newton inverse (Levenberg-Marquardt step)",
    )


def run(args, rep) -> int:
    rep.rule("blockops check")
    env = _environment(rep)
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
