"""The paper's inverse route (eqs. 25-43, corrected) against the general exact route.

For square networks of the valid families (docs: derivation, "The
mathematics", item 1) and depths 2 to 256, this measures the time to build and apply ``H⁻¹`` by
:func:`blockops.woodbury.woodbury_inverse` and by
``inverse_hessian(method="kkt")``, the relative residual
``‖H x − g‖ / ‖g‖`` of each (``H`` the fused Hessian-vector product), their
relative difference, and the route's condition-number estimates
(``cond(A)``, ``cond(Q22)``, ``cond(S_H11)``, ``cond(Schur)``) plus the dense
``cond(H)`` where the Hessian is small enough to form.

Run ``python benchmarks/bench_woodbury.py [--quick] [--damping 1e-3]`` for the table, or call
:func:`run` (``list[dict]``) from the command line interface.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
from threadpoolctl import threadpool_limits

from blockops import SingularBlockError
from blockops.cli.problem import best_time
from blockops.hessian import hessian
from blockops.inverse import inverse_hessian
from blockops.network import Dense, MSELoss, Pipeline, Scale, SoftmaxCrossEntropy
from blockops.woodbury import woodbury_inverse

FAMILIES = {
    # name: (layer factory, width, batch, loss)
    "dense a=2 B=3": (lambda a: Dense(a, a, "tanh"), 2, 3, "mse"),
    "dense a=4 B=5": (lambda a: Dense(a, a, "tanh"), 4, 5, "mse"),
    "scale a=8 B=1": (lambda a: Scale(a, "tanh"), 8, 1, "ce"),
}


def _network(family: str, depth: int, seed: int = 0):
    make, a, B, loss = FAMILIES[family]
    rng = np.random.default_rng(seed)
    pipe = Pipeline([make(a) for _ in range(depth)] + [MSELoss() if loss == "mse" else
                                                       SoftmaxCrossEntropy()])  # fmt: skip
    x = pipe.init(seed=seed)
    if family.startswith("scale"):
        x = x + 0.5  # scales away from zero
    X = rng.standard_normal((B, a))
    y = rng.standard_normal((B, a)) if loss == "mse" else rng.integers(0, a, B)
    return pipe.linearize(x, X, y)


def _residual(H, x, g) -> float:
    return float(np.linalg.norm(H @ x - g) / np.linalg.norm(g))


def run(quick: bool = False, damping: float = 1e-3) -> list[dict]:
    """One row per (family, depth): times, residuals and condition numbers.

    ``damping`` (default ``1e-3``) keeps ``H + λI`` invertible at depth (the
    undamped Hessian of a deep tanh net is numerically singular: measured
    ``cond(H)`` 1e12 at depth 32, 1e21 at 64); both routes invert ``H + λI``
    exactly, the Woodbury route by folding ``λ`` into ``Q22``.
    """
    depths = [2, 4, 8, 16] if quick else [2, 4, 8, 16, 32, 64, 128, 256]
    rows = []
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for family in FAMILIES:
            for depth in depths:
                pt = _network(family, depth)
                H = hessian(pt, damping=damping)
                g = np.random.default_rng(1).standard_normal(H.shape[0])
                row = {"family": family, "depth": depth, "n_params": H.shape[0], "damping": damping}
                try:
                    t_wb, Wi = best_time(lambda pt=pt: woodbury_inverse(pt, damping=damping))
                    t_wa, xw = best_time(lambda Wi=Wi, g=g: Wi @ g, repeat=3)
                    r = Wi.route
                    row.update(
                        woodbury_build_s=t_wb, woodbury_apply_s=t_wa,
                        woodbury_residual=_residual(H, xw, g),
                        cond_A=r.cond["A"], cond_Q22=r.cond["Q22"],
                        cond_S_H11=r.cond["S_H11"], cond_schur=r.cond["schur"],
                        predicted_error=r.cond["predicted_error"],
                    )  # fmt: skip
                except SingularBlockError as err:
                    xw = None
                    row.update(woodbury_error=str(err)[:120])
                try:
                    t_kb, Ki = best_time(
                        lambda pt=pt: inverse_hessian(pt, method="kkt", damping=damping)
                    )
                    t_ka, xk = best_time(lambda Ki=Ki, g=g: Ki @ g, repeat=3)
                    row.update(kkt_build_s=t_kb, kkt_apply_s=t_ka, kkt_residual=_residual(H, xk, g))
                    if xw is not None:
                        row["rel_diff"] = float(np.linalg.norm(xw - xk) / np.linalg.norm(xk))
                except SingularBlockError as err:
                    row.update(kkt_error=str(err)[:120])
                if H.shape[0] <= 1200:
                    row["cond_H"] = float(np.linalg.cond(H.matmat(np.eye(H.shape[0]))))
                rows.append(row)
    return rows


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.2e}"
    return str(v)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    damping = float(argv[argv.index("--damping") + 1]) if "--damping" in argv else 1e-3
    rows = run(quick="--quick" in argv, damping=damping)
    cols = [
        "family", "depth", "n_params", "woodbury_build_s", "woodbury_apply_s",
        "woodbury_residual", "kkt_build_s", "kkt_apply_s", "kkt_residual", "rel_diff",
        "cond_H", "cond_A", "cond_Q22", "cond_S_H11", "cond_schur", "predicted_error",
    ]  # fmt: skip
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(_fmt(row.get(c, "-")) for c in cols))
        for key in ("woodbury_error", "kkt_error"):
            if key in row:
                print(f"   {key}:", row[key])


if __name__ == "__main__":
    main()
