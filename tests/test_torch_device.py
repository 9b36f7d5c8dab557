"""Device names: torch's ``cuda`` means the current CUDA device, in the torch backend and in the conformance harness.

A backend asked for ``torch:cuda`` used to hold ``torch.device("cuda")`` while
its tensors report ``cuda:0``, so every device check failed. CUDA is mocked
here (``is_available``, ``current_device``, ``device_count``); no kernel runs.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from adalora_core.backends.base import Backend
from adalora_core.backends.torch import TorchBackend, normalise_device
from adalora_core.conformance import cases, cases_microlora
from adalora_core.conformance.common import same_device
from array_api_compat import torch as xp_torch


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two CUDA devices, the current one settable: ``fake_cuda(1)``."""

    def use(current: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)

    return use


@pytest.mark.parametrize("spec", [None, "cpu", "cpu:0", torch.device("cpu"), "meta"])
def test_devices_without_an_index_are_named_as_their_tensors(spec):
    t = torch.empty(0, device="cpu" if spec is None else spec)
    assert normalise_device(spec) == t.device
    assert str(normalise_device(spec)) == str(t.device)


@pytest.mark.parametrize("current", [0, 1])
@pytest.mark.parametrize("spec", ["cuda", torch.device("cuda")])
def test_cuda_means_the_current_device(fake_cuda, spec, current):
    fake_cuda(current)
    assert normalise_device(spec) == torch.device("cuda", current)
    assert normalise_device("cuda:1") == torch.device("cuda", 1)  # an explicit index stays
    backend = TorchBackend(spec)
    assert backend.device == torch.device("cuda", current) and str(backend.device) == f"cuda:{current}"


def test_a_cuda_index_past_the_devices_is_refused(fake_cuda):
    fake_cuda(0)
    with pytest.raises(ValueError, match=r"'cuda:2'.*2 CUDA devices"):
        TorchBackend("cuda:2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda_is_refused():
    assert normalise_device("cuda") == torch.device("cuda")  # nothing to ask for the index
    with pytest.raises(ValueError, match="CUDA is not available"):
        TorchBackend("cuda")


@pytest.mark.parametrize("current, same", [(0, True), (1, False)])
def test_harness_compares_cuda_with_the_current_index(fake_cuda, current, same):
    fake_cuda(current)
    assert same_device(torch.device("cuda:0"), torch.device("cuda")) is same
    assert same_device(torch.device("cuda", current), f"cuda:{current}")
    assert not same_device(torch.device("cuda:0"), torch.device("cpu"))


@pytest.mark.parametrize("host", [cases._host, cases_microlora._host])
@pytest.mark.parametrize("current, ok", [(0, True), (1, False)])
def test_case_output_checks_accept_cuda_for_cuda_0(fake_cuda, monkeypatch, host, current, ok):
    """A backend holding the bare ``cuda`` and an output on ``cuda:0``: the same device iff 0 is current."""
    fake_cuda(current)
    import adalora_core._xp as xp_module

    monkeypatch.setattr(xp_module, "device", lambda x: torch.device("cuda:0"))
    b = Backend(name="torch", xp=xp_torch, device=torch.device("cuda"))
    x = torch.ones(2)
    if ok:
        assert host(b, x, "float32", "out").tolist() == [1.0, 1.0]
    else:
        with pytest.raises(AssertionError, match="lives on device"):
            host(b, x, "float32", "out")


def test_other_libraries_compare_by_name():
    assert same_device("cpu", torch.device("cpu"))
    assert same_device("CPU_DEVICE", "CPU_DEVICE") and not same_device("CPU_DEVICE", "device1")
