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
# on a lucky draw; "thorough" explores at random (HYPOTHESIS_PROFILE=thorough).
settings.register_profile(
    "ci",
    max_examples=25,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BACKEND = os.environ.get("BLOCKOPS_TEST_BACKEND", "numpy")


def pytest_configure(config):
    if BACKEND == "cupy" and not cupy_available():
        raise pytest.UsageError("BLOCKOPS_TEST_BACKEND=cupy but CuPy or a CUDA GPU is absent")


@pytest.fixture
def xp():
    """Array module of the backend under test (``numpy`` or ``cupy``)."""
    return xp_for(BACKEND)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
