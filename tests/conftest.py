"""Shared fixtures: every backend available here, including array-api-strict's fake second device."""

from __future__ import annotations

import pytest
from adalora_core.backends import get_backend

BACKEND_SPECS = ["numpy", "native", "array_api_strict", "array_api_strict:device1", "torch"]


def make_backend(spec: str):
    name, _, device = spec.partition(":")
    try:
        return get_backend(name, device=device or None)
    except ValueError as exc:
        pytest.skip(f"backend {spec} unavailable: {exc}")


@pytest.fixture(params=BACKEND_SPECS)
def backend(request):
    return make_backend(request.param)


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny models run fastest on one thread, and do not stall when other processes share the cores."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def quiet():
    """PEFT and transformers warn freely about configs the tests build on purpose."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
