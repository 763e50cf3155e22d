"""Checks made before any computation: the output folder, memory, the installed package.

A run of ``demo`` or ``bench`` takes seconds to hours, so everything that
would make it fail at the end (an output folder that cannot be written) or
take the machine down (a size that cannot fit in memory) is found here first
and reported as one line.

Memory model (:func:`layer_memory`): the peak bytes per layer of one measured
case (problem, gradient, fused HVP, exact factor and solve), fitted to
``tracemalloc`` peaks over widths 2-64 and batches 1-256 at depths 32-48 and
rounded up (it overestimates each of those by 1.1 to 1.8 times). With
``p = width² + width`` parameters and ``s = batch·width`` activations per
layer, and ``m = min(s + width, p)`` the size of the per-layer value
matrices, it is ``8·(1500 + 24 p + 48 s + 1.4 s m + 1.8 m² + 0.22 s²)``
bytes, plus ``8·5 (s + k)²`` with ``k = min(width + 1, batch)·width`` for the
small stages (``s <= 32``): about 130 KB at width 16, batch 1, and quadratic
in ``batch·width`` for large batches. ``demo`` holds two factorisations at
once (a Newton step's and the previous one's, or H's and G's).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import tempfile
from types import ModuleType

__all__ = [
    "case_memory",
    "fmt_bytes",
    "layer_memory",
    "memory_limit",
    "memory_problem",
    "out_folder_problem",
    "output_file_problem",
    "package_version",
    "shadowed_package",
]

PACKAGE = __name__.partition(".")[0]
MEMORY_FRACTION = 0.5  # leave the rest to the OS, the interpreter and other programs
SMALL_STAGE = 32  # batch * width up to which a dense stage takes its small, square form


# -- output locations -------------------------------------------------------------------
def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _folder_problem(folder: str) -> str | None:
    """Why ``folder`` cannot be created or written, or ``None``.

    The probe creates and removes a temporary folder in the nearest existing
    ancestor: permission bits alone miss read-only and virtual file systems
    (``/proc``) and say nothing useful for root.
    """
    if os.path.exists(folder) and not os.path.isdir(folder):
        return f"{folder} is a file, not a folder"
    base = _nearest_existing(folder)
    if not os.path.isdir(base):
        return f"{base} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".blockops-probe-", dir=base))
    except OSError as exc:
        return f"cannot create anything in {base} ({exc.strerror or exc})"
    return None


def out_folder_problem(path: str, option: str = "--out") -> str | None:
    """Why ``path`` cannot become the output folder, or ``None`` when it can."""
    why = _folder_problem(os.path.abspath(path))
    return None if why is None else f"{option} {path}: {why}"


def output_file_problem(path: str, option: str) -> str | None:
    """Why the file ``path`` cannot be written, or ``None`` (its folder may not exist yet)."""
    if os.path.isdir(path):
        return f"{option} {path}: is a folder, expected a file name"
    why = _folder_problem(os.path.dirname(os.path.abspath(path)))
    return None if why is None else f"{option} {path}: {why}"


# -- memory -------------------------------------------------------------------------------
def layer_memory(width: int, batch: int) -> float:
    """Peak bytes per layer of one measured case (see the module docstring)."""
    p = width * width + width
    s = batch * width
    m = min(s + width, p)
    doubles = 1500 + 24 * p + 48 * s + 1.4 * s * m + 1.8 * m * m + 0.22 * s * s
    if s <= SMALL_STAGE and not _compiled_stage(s):
        # small stages are factored in a stacked (s + k)-square form, k = rank(z) * width,
        # kept in about five copies: this dominates at batch * width near 32 (the
        # compiled sweeps keep none of them: measured 2-4x less at depth 24)
        k = min(width + 1, batch) * width
        doubles += 5 * (s + k) ** 2
    return 8.0 * doubles


def _compiled_stage(s: int) -> bool:
    """Whether a dense stage with ``B a = s`` runs the compiled sweeps here."""
    from ..network import dense_stage, dense_stage_jit

    return s <= dense_stage.JIT_M and dense_stage_jit.enabled()


def case_memory(depth: int, width: int, batch: int) -> float:
    """Peak bytes of one case: everything the factorisation keeps is per layer."""
    return depth * layer_memory(width, batch)


def physical_memory() -> int | None:
    """Bytes of RAM, or ``None`` where the OS does not say (then nothing is refused)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def memory_limit() -> float | None:
    """The most a run may need: half of the physical memory."""
    total = physical_memory()
    return None if total is None else MEMORY_FRACTION * total


def fmt_bytes(n: float) -> str:
    """``512 MB``, ``3.5 GB``, ``120,000 GB`` (no exponents in a message)."""
    if n < 2**30:
        return f"{n / 2**20:.3g} MB"
    gb = n / 2**30
    return f"{gb:.3g} GB" if gb < 1000 else f"{gb:,.0f} GB"


def memory_problem(needed: float, what: str, advice: str) -> str | None:
    """A refusal when ``what`` needs more than :func:`memory_limit`, else ``None``."""
    limit = memory_limit()
    if limit is None or needed <= limit:
        return None
    return (
        f"{what} needs about {fmt_bytes(needed)} of memory, more than half of this "
        f"machine's {fmt_bytes(limit / MEMORY_FRACTION)}; {advice}"
    )


# -- the installed package -------------------------------------------------------------
def shadowed_package(pkg: ModuleType | None = None) -> str | None:
    """A message when ``import blockops`` found a plain folder instead of the package.

    Running ``python -m blockops`` from a folder that holds a directory named
    ``blockops`` without ``__init__.py`` (a clone's parent, say) makes Python
    import that directory as a namespace package; the submodules may still
    load from the installed copy, but the package itself is empty.
    """
    pkg = sys.modules.get(PACKAGE) if pkg is None else pkg
    if pkg is None or getattr(pkg, "__file__", None) is not None:
        return None
    where = ", ".join(str(p) for p in getattr(pkg, "__path__", [])) or "an unknown location"
    return (
        f"'import {PACKAGE}' found the folder {where}, which is not the {PACKAGE} package "
        f"(no __init__.py); run from another folder or rename that one, and install {PACKAGE} "
        "if it is not installed (pip install -e <repository>)"
    )


def package_version() -> str:
    """``blockops.__version__``, else the installed distribution's version, else ``unknown``."""
    version = getattr(sys.modules.get(PACKAGE), "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
