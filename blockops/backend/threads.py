"""BLAS thread limits that are safe when several Python threads factor or solve at once.

``threadpoolctl.threadpool_limits`` saves the current limits on entry and
restores them on exit. Entered from two threads at once, the second saves
the first's temporary limit and restores *that* last, leaving the whole
process with one BLAS thread. :func:`blas_threads` counts its entrants: the
first sets the limit, the last to leave restores what was there before.
"""

from __future__ import annotations

import contextlib
import threading

from threadpoolctl import ThreadpoolController

__all__ = ["blas_threads"]

_lock = threading.Lock()
_depth = 0
_limiter = None
_controller = None  # built once: a fresh threadpool_limits rescans the libraries (~0.85 ms)


@contextlib.contextmanager
def blas_threads(n: int):
    """Limit BLAS to ``n`` threads inside the block (while any entrant is inside).

    Concurrent entrants share the first entrant's limit; the original limits
    come back when the last one leaves.
    """
    global _depth, _limiter, _controller
    with _lock:
        if _depth == 0:
            if _controller is None:
                _controller = ThreadpoolController()
            _limiter = _controller.limit(limits=n)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _limiter.restore_original_limits()
                _limiter = None
