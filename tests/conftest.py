"""Shared test fixtures: the array backend under test and random generators.

``BLOCKOPS_TEST_BACKEND`` (set by the nox ``tests`` session) picks ``numpy``
or ``cupy``; CuPy-only tests skip with a reason when no GPU is present.
"""

from __future__ import annotations

import functools
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from blockops.backend import cupy_available, xp_for

# "ci" (the default) draws the same examples on every run, so a landing never hinges
# on a lucky draw; "thorough" explores at random, 1000 draws per property
# (HYPOTHESIS_PROFILE=thorough; ``nox -s thorough``). A test's own
# ``@settings(max_examples=k)`` caps the ci run only (see pytest_collection_modifyitems).
settings.register_profile(
    "ci",
    max_examples=25,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)

BACKEND = os.environ.get("BLOCKOPS_TEST_BACKEND", "numpy")


def pytest_configure(config):
    if BACKEND == "cupy" and not cupy_available():
        raise pytest.UsageError("BLOCKOPS_TEST_BACKEND=cupy but CuPy or a CUDA GPU is absent")
    config.addinivalue_line(
        "markers", "property: a Hypothesis property test (added by conftest; `-m property`)"
    )


# Every jax.jit compilation (the JAX references compile once per pipeline structure,
# and random structures rarely repeat) maps ~9 memory regions that JAX keeps while
# the compiled function is cached. A thorough run of one property compiles thousands:
# at vm.max_map_count (65530 by default) XLA's next compilation segfaults. So, every
# _TRIM_EVERY examples, JAX's caches are cleared once half the limit is in use (the
# cached jitted functions stay valid and recompile on their next call).
_TRIM_EVERY = 25
_examples_run = 0


def _max_map_count() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530


_MAPS_TRIM_AT = _max_map_count() // 2


def _trim_jax_caches() -> None:
    global _examples_run
    _examples_run += 1
    if _examples_run % _TRIM_EVERY or "jax" not in sys.modules:
        return
    try:
        with open("/proc/self/maps", "rb") as f:
            in_use = sum(1 for _ in f)
    except OSError:  # not Linux: no such limit to guard
        return
    if in_use > _MAPS_TRIM_AT:
        sys.modules["jax"].clear_caches()


def _trimming(inner):
    """``inner`` (a Hypothesis ``inner_test``) trimming JAX's caches before each example."""
    if getattr(inner, "_trims_jax_caches", False):  # collected twice: wrap once
        return inner

    @functools.wraps(inner)
    def run(*args, **kwargs):
        _trim_jax_caches()
        return inner(*args, **kwargs)

    run._trims_jax_caches = True
    return run


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Mark every ``@given`` test ``property``, trim JAX's caches between its examples
    (see ``_trim_jax_caches``) and, under "thorough", lift its own cap.

    The slow properties (JAX references) cap their draws with
    ``@settings(max_examples=k)`` for the ci run; that cap must not shrink the
    thorough run, which promises the profile's ``max_examples`` draws of every
    property. Hypothesis reads the settings from the wrapped test when it runs and
    has no public way to override an explicit ``@settings``, hence the attribute.
    """
    want = settings.get_profile("thorough").max_examples
    for item in items:
        fn = getattr(item, "obj", None)
        if not getattr(fn, "is_hypothesis_test", False):
            continue
        item.add_marker(pytest.mark.property)
        fn.hypothesis.inner_test = _trimming(fn.hypothesis.inner_test)  # as pytest-asyncio does
        if PROFILE != "thorough":
            continue
        own = getattr(fn, "_hypothesis_internal_use_settings", None)
        if own is None:  # a Hypothesis upgrade renamed it: fail loudly, never under-draw
            raise pytest.UsageError(f"{item.nodeid}: cannot lift its @settings cap to {want}")
        if own.max_examples < want:
            fn._hypothesis_internal_use_settings = settings(own, max_examples=want)


@pytest.fixture
def xp():
    """Array module of the backend under test (``numpy`` or ``cupy``)."""
    return xp_for(BACKEND)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
