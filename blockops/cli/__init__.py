"""The command line: ``python -m blockops demo | bench | check``.

* ``demo``: a deep, narrow tanh network on a generated regression task;
  gradient, fused HVP, the exact damped ``H⁻¹g`` with its certificate and
  inertia, the same solve by MINRES, CG and GMRES with valid preconditioners,
  and inertia-controlled Newton, exact damped Newton and Gauss-Newton against
  gradient descent and Adam at equal wall-clock time, as tables and PNG
  figures (:mod:`blockops.cli.demo`).
* ``bench``: the scaling study in depth, width and batch
  (:mod:`blockops.cli.bench`), with a table, a JSON file and a log-log figure.
* ``check``: environment self-test and a correctness check against a dense
  Hessian built independently of the code under test
  (:mod:`blockops.cli.check`).

Exit codes: 0 success, 1 a check failed (or a run failed), 2 usage error
(bad argument, unavailable backend, an output path that cannot be written,
a size that cannot fit in half of the machine's memory), 3 a needed optional
package or blockops component is missing (or ``import blockops`` found a
folder that is not the package).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .parser import build_parser
from .preflight import shadowed_package

__all__ = ["EXIT_FAIL", "EXIT_MISSING", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_MISSING = 0, 1, 2, 3


def _usage_error(parser: argparse.ArgumentParser, command: str, message: str) -> int:
    sub = parser.commands.get(command, parser)
    sub.print_usage(sys.stderr)
    print(f"{sub.prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _backend_problem(backend: str) -> str | None:
    from ..backend import available_backends

    if backend in available_backends():
        return None
    return (
        f"--backend {backend} needs CuPy and a CUDA GPU, and none was found "
        f"(available backends: {', '.join(available_backends())})"
    )


def _command(name: str):
    """The module of a subcommand: ``preflight(args)`` and ``run(args, reporter)``."""
    if name == "demo":
        from . import demo as module
    elif name == "bench":
        from . import bench as module
    else:
        from . import check as module
    return module


def _run(run, args) -> int:
    from threadpoolctl import threadpool_limits

    from .report import MissingDependency, Reporter

    rep = Reporter(plain=args.plain)
    try:
        with threadpool_limits(args.threads):
            return run(args, rep)
    except MissingDependency as exc:
        rep.error(str(exc))
        return EXIT_MISSING
    except KeyboardInterrupt:
        rep.error("interrupted")
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m blockops`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    shadowed = shadowed_package()
    if shadowed:  # nothing below would work, and the ImportError would not say why
        print(f"error: {shadowed}", file=sys.stderr)
        return EXIT_MISSING
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help / --version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    problem = _backend_problem(args.backend)
    if problem:
        return _usage_error(parser, args.command, problem)
    command = _command(args.command)
    # a bad --out or a size that cannot fit in memory, before any work: one line, no usage
    problem = command.preflight(args)
    if problem:
        print(f"{parser.commands[args.command].prog}: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    return _run(command.run, args)
