"""Nox sessions: ``tests`` (per backend), ``lint``, ``demo``, ``bench``, ``docs``, ``thorough``,
``mpi``.

``nox -s tests`` runs the suite on NumPy (with the PyTorch and JAX interop
tests: a CPU torch wheel and curvlinops are installed for them) and, where
CuPy and a CUDA GPU are present, again on CuPy; without a GPU the CuPy
session skips with the reason.
"""

from __future__ import annotations

import shutil

import nox
import nox.command

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True


# The CPU-only torch wheel: the default torch wheel pulls about 3 GB of CUDA libraries.
# The interop tests need torch and curvlinops (a reference); they skip without them.
TORCH_CPU = "torch==2.13.0+cpu"
INTEROP_TEST = ("curvlinops-for-pytorch>=3",)


def _gpu_present() -> bool:
    return shutil.which("nvidia-smi") is not None


def _install_interop(session: nox.Session) -> None:
    """Torch (CPU wheel) and curvlinops for ``tests/interop``; a failure only skips those."""
    try:
        session.install(TORCH_CPU, *INTEROP_TEST)
    except nox.command.CommandFailed:
        session.warn(f"could not install {TORCH_CPU}; the torch interop tests will skip")


@nox.session
@nox.parametrize("backend", ["numpy", "cupy"])
def tests(session: nox.Session, backend: str) -> None:
    """Run the test suite on one array backend."""
    extras = "test"
    if backend == "cupy":
        if not _gpu_present():
            session.skip(
                "CuPy tests need a CUDA GPU (nvidia-smi not found); NumPy suite unaffected"
            )
        extras = "test,gpu"
    session.install("-e", f".[{extras}]")
    if backend == "numpy":
        _install_interop(session)
    session.env["BLOCKOPS_TEST_BACKEND"] = backend
    session.env.setdefault("OMP_NUM_THREADS", "1")
    session.run("pytest", "-q", *session.posargs)


@nox.session
def mpi(session: nox.Session) -> None:
    """The depth-partitioned Hessian and exact solve under ``mpiexec -n 2`` and ``-n 4``.

    MPI comes from PyPI (the ``mpich`` wheel ships ``mpiexec``), so no system
    package is needed; ``tests/distributed/test_mpi.py`` launches
    ``tests/distributed/mpi_check.py`` on 2 and 4 ranks, and
    ``test_partition.py`` checks the per-rank pieces serially.
    """
    session.install("-e", ".[test,mpi]")
    session.env["OMP_NUM_THREADS"] = "1"
    session.run(
        "pytest",
        "-q",
        "tests/distributed/test_mpi.py",
        "tests/distributed/test_partition.py",
        *session.posargs,
    )


@nox.session
def thorough(session: nox.Session) -> None:
    """Every Hypothesis property at 1000 random draws (``HYPOTHESIS_PROFILE=thorough``).

    Not in the default sessions (CI runs ``nox -s tests``): too long for CI on
    2 cores. Only the ``@given`` tests run (``-m property``, a marker that
    ``tests/conftest.py`` adds); the draws are random, so a failure prints the
    falsifying example to reproduce.
    """
    session.install("-e", ".[test]")
    session.env["HYPOTHESIS_PROFILE"] = "thorough"
    session.env["OMP_NUM_THREADS"] = "1"
    # Nearly every draw has a new structure, so the JAX references compile once per draw;
    # XLA's cheaper CPU codegen compiles them 3x faster (48 -> 15 s for 12 draws) and
    # leaves float64 results within the tests' tolerances.
    session.env.setdefault(
        "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )
    session.run("pytest", "-q", "-m", "property", "--hypothesis-show-statistics", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: ``python -m blockops demo`` (figures under ``demo_out/``)."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "blockops", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """The scaling study: ``python -m blockops bench`` (pass ``-- --quick`` for a short run)."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "blockops", "bench", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the Sphinx docs with warnings as errors."""
    session.install("-e", ".[docs,test]")
    _install_interop(session)  # the torch gallery examples
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")
