"""Nox sessions: ``tests`` (per backend), ``lint``, ``demo``, ``bench``, ``docs``.

``nox -s tests`` runs the suite on NumPy and, where CuPy and a CUDA GPU are
present, again on CuPy; without a GPU the CuPy session skips with the reason.
"""

from __future__ import annotations

import shutil

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True


def _gpu_present() -> bool:
    return shutil.which("nvidia-smi") is not None


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
    session.env["BLOCKOPS_TEST_BACKEND"] = backend
    session.env.setdefault("OMP_NUM_THREADS", "1")
    session.run("pytest", "-q", *session.posargs)


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
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")
