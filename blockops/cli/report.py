"""Output of the command line: console tables and progress, JSON files, figures.

``rich`` and ``matplotlib`` are optional (the ``bench`` extra). The console
uses rich when it is installed and falls back to plain text otherwise, so
``python -m blockops check`` works on a bare install; figures need
matplotlib, and :func:`require_matplotlib` says how to get it. Figures use
the non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "MissingDependency",
    "Reporter",
    "environment_info",
    "fit_slope",
    "fmt_float",
    "fmt_time",
    "loss_figure",
    "panel_grid",
    "plot_loss_curves",
    "plot_scaling",
    "require_matplotlib",
    "scaling_figure",
    "write_json",
]

INSTALL_HINT = "pip install 'blockops[bench]'"


class MissingDependency(RuntimeError):
    """An optional package the command needs is not installed."""


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend, or :class:`MissingDependency`."""
    if not has_module("matplotlib"):
        raise MissingDependency(
            f"figures need matplotlib, which is not installed: {INSTALL_HINT} "
            "(or pass --no-figures)"
        )
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# -- formatting ----------------------------------------------------------------
def fmt_time(seconds: float | None) -> str:
    """``1.23 s``, ``45.6 ms``, ``789 µs``; ``-`` for missing."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds >= 1.0:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def fmt_float(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


# -- console ---------------------------------------------------------------------
class _PlainProgress:
    """Stand-in for a rich progress bar: one line per finished item."""

    def __init__(self, reporter: Reporter, total: int, description: str):
        self.reporter, self.total, self.done = reporter, total, 0
        self.reporter.print(f"{description} ({total} items)")

    def advance(self, description: str | None = None) -> None:
        self.done += 1
        if description:
            self.reporter.print(f"  [{self.done}/{self.total}] {description}")


class _RichProgress:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def advance(self, description: str | None = None) -> None:
        kw = {"description": description} if description else {}
        self.progress.update(self.task, advance=1, **kw)


class Reporter:
    """Console output through rich when installed, plain text otherwise.

    Parameters
    ----------
    plain : bool, optional
        Force plain text (``None``: rich when available).
    quiet : bool
        Print only tables and errors.
    """

    def __init__(self, plain: bool | None = None, quiet: bool = False):
        self.rich = (not plain) and has_module("rich")
        self.quiet = quiet
        if self.rich:
            from rich.console import Console

            # a fresh Console per reporter picks up the current sys.stdout (tests capture it)
            self.console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
            if not self.console.is_terminal:  # files and pipes: wide tables, not 80 columns
                self.console.width = 140

    def print(self, message: str = "", style: str | None = None) -> None:
        if self.quiet and style not in ("error", "bad"):
            return
        if self.rich:
            colours = {"good": "green", "bad": "bold red", "error": "bold red", "dim": "dim"}
            self.console.print(message, style=colours.get(style, style), markup=False)
        else:
            print(message, file=sys.stdout, flush=True)

    def error(self, message: str) -> None:
        if self.rich:
            from rich.console import Console

            Console(file=sys.stderr, highlight=False).print(
                f"error: {message}", style="bold red", markup=False
            )
        else:
            print(f"error: {message}", file=sys.stderr, flush=True)

    def rule(self, title: str) -> None:
        if self.quiet:
            return
        if self.rich:
            self.console.rule(title)
        else:
            print(f"\n== {title} ==", flush=True)

    def table(
        self,
        title: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        caption: str | None = None,
    ) -> None:
        """A table of strings (other cell types are shown with ``str``)."""
        cells = [[str(c) for c in row] for row in rows]
        if self.rich:
            from rich.table import Table

            t = Table(title=title, caption=caption, caption_justify="left")
            for i, c in enumerate(columns):
                t.add_column(c, justify="left" if i == 0 else "right")
            for row in cells:
                t.add_row(*row)
            self.console.print(t)
            return
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
        line = "  ".join("-" * w for w in widths)
        out = [title, line, "  ".join(c.ljust(w) for c, w in zip(columns, widths)), line]
        out += [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
            )
            for r in cells
        ]
        out.append(line)
        if caption:
            out.append(caption)
        print("\n".join(out), flush=True)

    @contextlib.contextmanager
    def progress(self, total: int, description: str) -> Iterator[Any]:
        """Context manager yielding an object with ``advance(description=None)``."""
        if self.rich and not self.quiet:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            cols = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            with Progress(*cols, console=self.console) as prog:
                yield _RichProgress(prog, prog.add_task(description, total=total))
        else:
            yield _PlainProgress(self, total, description) if not self.quiet else _NullProgress()


class _NullProgress:
    def advance(self, description: str | None = None) -> None:
        pass


# -- machine-readable output -----------------------------------------------------
def environment_info() -> dict:
    """Versions, platform, BLAS libraries and thread counts, backends found."""
    import pylops
    import scipy
    from threadpoolctl import threadpool_info

    from ..backend import available_backends
    from .preflight import package_version

    blas = [
        {
            "library": i.get("internal_api"),
            "user_api": i.get("user_api"),
            "version": i.get("version"),
            "threads": i.get("num_threads"),
            "architecture": i.get("architecture"),
        }
        for i in threadpool_info()
    ]
    return {
        "blockops": package_version(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "pylops": pylops.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "backends": list(available_backends()),
        "threadpools": blas,
    }


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON has no NaN / Inf
    return v


def write_json(path: str | os.PathLike, payload: dict) -> str:
    """Write ``payload`` plus an ``environment`` and ``created`` stamp; return the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment_info(),
        **payload,
    }
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(_jsonable(doc), fh, indent=2, allow_nan=False)
        fh.write("\n")
    return str(path)


# -- figures ----------------------------------------------------------------------
def fit_slope(depths: Sequence[float], times: Sequence[float]) -> float | None:
    """Least-squares slope of ``log t`` against ``log depth`` (None with < 2 points)."""
    pts = [(d, t) for d, t in zip(depths, times) if t is not None and t > 0 and d > 0]
    if len(pts) < 2 or len({d for d, _ in pts}) < 2:
        return None
    ld, lt = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(ld, lt, 1)[0])


def _save(fig, title: str, path: str) -> str:
    """Title, lay out, write (creating the folder) and close a figure; return its path.

    Legends placed outside the axes (``bbox_to_anchor``) are kept inside the
    image: the layout and the tight bounding box both account for them.
    """
    plt = require_matplotlib()
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def loss_figure(histories: Sequence, t_equal: float | None = None):
    """Two panels, loss against iteration and against wall-clock time (log loss axis).

    One legend for both, below the panels (it covers no data); ``t_equal``
    (the instant at which the table compares the losses) is marked on the
    time panel.
    """
    plt = require_matplotlib()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for h in histories:
        mark = "." if h.steps < 60 else None
        ax1.semilogy(range(len(h.loss)), h.loss, marker=mark, label=h.name)
        ax2.semilogy(h.time, h.loss, marker=mark)
    handles, labels = ax1.get_legend_handles_labels()
    if t_equal is not None:
        handles.append(ax2.axvline(t_equal, color="0.4", linestyle=":", linewidth=1))
        labels.append(f"equal time ({t_equal:.3g} s)")
    ax1.set_xscale("symlog", linthresh=10.0)  # tens of Newton steps next to 1000s of GD steps
    ax1.set_xlabel("iteration (linear to 10, logarithmic beyond)")
    ax2.set_xlabel("wall-clock time [s]")
    for ax in (ax1, ax2):
        ax.set_ylabel("training loss")
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=min(len(labels), 3),
        frameon=False,
    )
    return fig


def plot_loss_curves(
    histories: Sequence, path: str, title: str, t_equal: float | None = None
) -> str:
    """:func:`loss_figure`, titled and written to ``path``."""
    return _save(loss_figure(histories, t_equal), title, path)


def panel_grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    """``(rows, cols)`` for ``n`` panels: fewest empty cells, then the squarest."""
    if n < 1:
        raise ValueError(f"panel_grid: need at least one panel, got {n}")
    shapes = [(math.ceil(n / c), c) for c in range(1, min(n, max_cols) + 1)]
    return min(shapes, key=lambda rc: (rc[0] * rc[1] - n, abs(rc[0] - rc[1]), -rc[1]))


def scaling_figure(
    records: Sequence[dict],
    quantities: Sequence[tuple[str, str]],
    panel_keys: Sequence[str] = ("batch", "width"),
    reference: str | None = "factor",
):
    """Log-log time against depth, one panel per ``panel_keys`` value that has data.

    Only the panels drawn are created (:func:`panel_grid`); each panel's
    legend (fitted slopes) sits outside it, to its right. ``reference``: the
    quantity through whose points (geometric mean) a dashed slope-1 line is
    drawn, the time a method linear in depth would take.
    """
    plt = require_matplotlib()
    panels = sorted({tuple(r[k] for k in panel_keys) for r in records})
    nrow, ncol = panel_grid(len(panels))
    fig = plt.figure(figsize=(6.6 * ncol, 3.6 * nrow))
    for i, pk in enumerate(panels):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        rows = sorted(
            (r for r in records if tuple(r[k] for k in panel_keys) == pk), key=lambda r: r["depth"]
        )
        _scaling_panel(ax, rows, quantities, reference)
        ax.set_title(", ".join(f"{k} {v}" for k, v in zip(panel_keys, pk)))
    return fig


def _scaling_panel(ax, rows: Sequence[dict], quantities, reference: str | None) -> None:
    ref = None
    for key, label in quantities:
        pts = [(r["depth"], r.get(key)) for r in rows if r.get(key)]
        if not pts:
            continue
        d, t = zip(*pts)
        s = fit_slope(d, t)
        ax.loglog(d, t, marker="o", label=f"{label} (slope {s:.2f})" if s is not None else label)
        if key == reference and len(pts) >= 2:
            ref = (label, np.array(d, dtype=float), np.array(t, dtype=float))
    if ref is not None:  # slope 1 through the geometric mean of the reference's points
        label, d, t = ref
        c = math.exp(float(np.mean(np.log(t) - np.log(d))))
        ends = np.array([d.min(), d.max()])
        ax.loglog(ends, c * ends, "--", color="0.35", lw=1, label=f"slope 1 (fit to {label})")
    depths = sorted({r["depth"] for r in rows})
    ax.set_xticks(depths, [str(d) for d in depths], minor=False)
    ax.set_xticks([], minor=True)  # log axes add unlabeled-looking minor labels otherwise
    ax.set_xlabel("depth (layers)")
    ax.set_ylabel("time [s]")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def plot_scaling(
    records: Sequence[dict],
    quantities: Sequence[tuple[str, str]],
    path: str,
    title: str,
    panel_keys: Sequence[str] = ("batch", "width"),
) -> str:
    """:func:`scaling_figure`, titled and written to ``path``.

    ``records`` are flat dicts with ``depth``, the panel keys and a time (or
    ``None``) under each key of ``quantities`` (``(key, label)`` pairs).
    """
    return _save(scaling_figure(records, quantities, panel_keys), title, path)
