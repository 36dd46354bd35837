"""Fixtures: ``backend`` (every backend, each skipped with its reason where it cannot run
here; a test narrows the set with ``@pytest.mark.parametrize("backend", FUSED)`` and the
like from helpers.py) and ``device`` (where that backend's tensors live).

The helpers themselves live in helpers.py; the names below are re-exported for test files
that import them from conftest."""

import pytest

from helpers import (  # noqa: F401  (re-exported)
    ALL_BACKENDS,
    OPTION_NAMES,
    ROOT,
    TOL,
    assert_close_to,
    call,
    device_of,
    make_inputs,
    opcheck_forward_and_backward,
    reference64,
    requires_cuda,
)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """The name passed as pool_mixer(..., backend=...)."""
    return request.param


@pytest.fixture
def device(backend):
    """The device of the test's tensors: "cuda" for a backend that runs on the GPU."""
    return device_of(backend)
