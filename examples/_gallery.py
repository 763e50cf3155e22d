"""Shared by the gallery scripts: show figures on a display, save them when headless."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt


def show_figures(name):
    """``plt.show()`` on a display; in a headless run save the open figures as PNGs.

    Headless means a non-interactive matplotlib backend (``MPLBACKEND=Agg``, or
    no display, where matplotlib falls back to Agg). The PNGs go to
    ``$BLOCKOPS_EXAMPLE_OUT``, default ``examples_out/`` in the current
    directory. The sphinx-gallery build captures the figures itself.
    """
    import sys
    from pathlib import Path

    headless = plt.get_backend().lower() in {"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"}
    if not headless or "sphinx_gallery" in sys.modules:
        plt.show()
        return
    out = Path(os.environ.get("BLOCKOPS_EXAMPLE_OUT") or "examples_out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    for k, num in enumerate(plt.get_fignums(), start=1):
        path = out / f"{name}_{k}.png"
        plt.figure(num).savefig(path, dpi=110)
        print(f"headless run: figure saved to {path}")
