"""Shared test fixtures: the array backend under test and random generators.

``BLOCKOPS_TEST_BACKEND`` (set by the nox ``tests`` session) picks ``numpy``
or ``cupy``; CuPy-only tests skip with a reason when no GPU is present.
"""

from __future__ import annotations

import os

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


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Mark every ``@given`` test ``property``; under "thorough", lift its own cap.

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
