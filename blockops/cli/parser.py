"""The argument parser of ``python -m blockops``: one builder per subcommand.

Argument types raise :class:`argparse.ArgumentTypeError`, which argparse
turns into a usage message and exit code 2. Subcommands use
:class:`SubcommandParser`, so that an option a subcommand does not know is
reported with that subcommand's usage, not the top-level one.
"""

from __future__ import annotations

import argparse

from .preflight import package_version

__all__ = [
    "SubcommandParser",
    "build_parser",
    "int_list",
    "nonneg_int",
    "positive_float",
    "positive_int",
]

PROG = "python -m blockops"


# -- argument types ------------------------------------------------------------------------
def _number(kind: type, ok, what: str):
    """An argparse type: ``kind(text)`` that must satisfy ``ok``, else a usage error."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive finite number")


def int_list(text: str) -> list[int]:
    """``"64,128,256"`` -> ``[64, 128, 256]`` (positive, sorted, unique)."""
    try:
        vals = sorted({positive_int(t.strip()) for t in text.split(",") if t.strip()})
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of positive integers, got {text!r}"
        ) from None
    if not vals:
        raise argparse.ArgumentTypeError(f"expected at least one positive integer, got {text!r}")
    return vals


class SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser that rejects the arguments it does not know itself.

    argparse hands a subparser's leftovers back to the top-level parser, which
    then prints the top-level usage: no help for ``demo --bogus``.
    """

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


# -- the subcommands --------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser, out_default: str | None) -> None:
    p.add_argument(
        "--backend",
        choices=("numpy", "cupy"),
        default="numpy",
        help="array backend (cupy needs CuPy and a CUDA GPU; default numpy)",
    )
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default 0)")
    p.add_argument("--plain", action="store_true", help="plain-text output (no rich)")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="BLAS threads (default 1: fastest for the small per-layer products)",
    )
    if out_default is not None:
        p.add_argument(
            "--out",
            default=out_default,
            help=f"folder for figures and JSON (default {out_default}/)",
        )
        p.add_argument("--no-figures", action="store_true", help="write no PNG figures")


def _add_demo_sizes(d: argparse.ArgumentParser) -> None:
    d.add_argument("--depth", type=positive_int, help="dense layers (default 256 [24])")
    d.add_argument("--width", type=positive_int, help="hidden width (default 16 [8])")
    d.add_argument("--batch", type=positive_int, help="samples (default 8 [4])")
    d.add_argument(
        "--damping",
        type=positive_float,
        default=1e-3,
        help="damping λ of (H + λI)^-1 g, and the floor of the Newton runs' λ (default 1e-3)",
    )


def _add_demo_optimisers(d: argparse.ArgumentParser) -> None:
    d.add_argument(
        "--steps",
        type=nonneg_int,
        help="Newton steps at most (default: none with --budget time, where --newton-time "
        "stops them; 8 [6] with --budget steps)",
    )
    d.add_argument(
        "--newton-time",
        type=positive_float,
        help="stop each Newton run after this many seconds (default 12 [3]); with "
        "--budget time, gradient descent and Adam get the longest Newton run's time and "
        "the table compares every loss at the same instant",
    )
    d.add_argument(
        "--newton-damping",
        type=positive_float,
        default=1.0,
        help="initial λ of the Newton runs (default 1; it adapts, never below --damping; the "
        "inertia-controlled run raises it until H + λI is positive definite). A start at 1e-3 "
        "wastes steps: the overparameterised model's Newton step is huge where the curvature "
        "is tiny",
    )
    d.add_argument(
        "--budget",
        choices=("time", "steps"),
        default="time",
        help="gradient descent and Adam get Newton's wall-clock time (time, default) "
        "or its number of steps (steps)",
    )
    d.add_argument(
        "--lr-gd",
        type=positive_float,
        default=0.01,
        help="gradient-descent step size (default 0.01)",
    )
    d.add_argument(
        "--lr-adam", type=positive_float, default=1e-3, help="Adam step size (default 1e-3)"
    )


def _add_demo_solvers(d: argparse.ArgumentParser) -> None:
    d.add_argument(
        "--depths",
        type=int_list,
        help="depths for the solve-time figure (default depth/8,depth/4,depth/2,depth)",
    )
    d.add_argument(
        "--krylov-tol",
        type=positive_float,
        default=1e-8,
        help="relative tolerance of MINRES and CG (default 1e-8)",
    )
    d.add_argument(
        "--krylov-maxiter",
        type=positive_int,
        help="iteration cap of MINRES and CG (default 100)",
    )
    d.add_argument(
        "--init",
        choices=("orthogonal", "default"),
        default="orthogonal",
        help="orthogonal weights and zero biases (default; trainable at depth) or "
        "the layers' Gaussian fan-in init (samples collapse at depth 256)",
    )


def _add_demo(sub) -> argparse.ArgumentParser:
    d = sub.add_parser(
        "demo",
        help="a deep narrow network: HVP, exact H^-1 g, Krylov, Newton vs Adam",
        description="Deep, narrow tanh network on a damped-oscillator task: "
        "gradient, fused HVP, exact damped H^-1 g with certificate and inertia, "
        "MINRES, CG and GMRES with valid preconditioners, and inertia-controlled Newton, "
        "exact damped Newton and Gauss-Newton against gradient descent and Adam at equal "
        "wall-clock time. Defaults (quick defaults in brackets) are shown per option.",
    )
    _add_demo_sizes(d)
    _add_demo_optimisers(d)
    _add_demo_solvers(d)
    d.add_argument("--quick", action="store_true", help="small sizes (a few seconds; for tests)")
    _add_common(d, "demo_out")
    return d


def _add_bench_caps(b: argparse.ArgumentParser) -> None:
    b.add_argument(
        "--minres-time-cap",
        type=positive_float,
        help="MINRES time budget per case: its iterations are capped at this many seconds "
        "of HVPs, and it is not run at larger depths once predicted to exceed it "
        "(default 20 [2])",
    )
    b.add_argument(
        "--case-time-cap",
        type=positive_float,
        help="skip a case whose predicted factor time exceeds this many seconds (default 60 [4])",
    )
    b.add_argument(
        "--max-memory-gb",
        type=positive_float,
        help="skip a case whose estimated memory exceeds this many GB (default 8, or half of "
        "this machine's memory if less); a case it admits that needs more than half of the "
        "machine's memory refuses the run",
    )


def _add_bench(sub) -> argparse.ArgumentParser:
    b = sub.add_parser(
        "bench",
        help="scaling study: time against depth, width and batch",
        description="Scaling study: factor, solve, fused HVP, gradient and "
        "MINRES time against depth for several widths and batches. Cases "
        "predicted to exceed --case-time-cap are skipped and listed.",
    )
    b.add_argument(
        "--depths", type=int_list, help="default 64,128,256,512,1024,2048,4096 [64,128,256,512]"
    )
    b.add_argument("--widths", type=int_list, help="default 8,16,32 [8,16]")
    b.add_argument("--batches", type=int_list, help="default 1,32 [1,8]")
    b.add_argument("--damping", type=positive_float, default=1e-3, help="damping λ (1e-3)")
    b.add_argument(
        "--minres-tol", type=positive_float, default=1e-8, help="MINRES relative tolerance (1e-8)"
    )
    b.add_argument(
        "--minres-maxiter", type=positive_int, help="MINRES iteration cap (default 2000 [100])"
    )
    _add_bench_caps(b)
    b.add_argument("--repeat", type=positive_int, help="timing repeats, best kept (default 3 [1])")
    b.add_argument("--quick", action="store_true", help="about a minute on 2 cores")
    _add_common(b, "bench_out")
    return b


def _add_check(sub) -> argparse.ArgumentParser:
    c = sub.add_parser(
        "check",
        help="environment self-test and a dense-Hessian correctness check",
        description="Environment (backends, BLAS, threads, GPU), then H v, "
        "gradient and (H + λI)^-1 g of a small network against a dense Hessian "
        "built by finite differences of a plain NumPy re-implementation.",
    )
    c.add_argument("--depth", type=positive_int, default=4, help="dense layers (default 4)")
    c.add_argument("--width", type=positive_int, default=3, help="hidden width (default 3)")
    c.add_argument("--batch", type=positive_int, default=3, help="samples (default 3)")
    c.add_argument("--damping", type=positive_float, default=1e-2, help="damping λ (1e-2)")
    c.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    _add_common(c, None)
    return c


def build_parser() -> argparse.ArgumentParser:
    """The ``blockops`` argument parser with its three subcommands.

    ``parser.commands`` maps each subcommand to its parser, for the usage
    errors found after parsing.
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Exact Hessians and inverse Hessians of deep pipelines: demo, bench, check.",
    )
    parser.add_argument("--version", action="version", version=f"blockops {package_version()}")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{demo,bench,check}",
        parser_class=SubcommandParser,
    )
    parser.commands = {"demo": _add_demo(sub), "bench": _add_bench(sub), "check": _add_check(sub)}
    return parser
