"""``get_backend``'s cache: one backend per device, as the device's name means it when asked."""

from __future__ import annotations

import pytest
from adalora_core.backends import get_backend

from adalora_core import backends


def test_torch_cuda_follows_the_current_device(monkeypatch):
    """``"cuda"`` is the current CUDA device: a backend cached before ``set_device`` must not be returned after.

    CUDA is faked (availability, two devices, the current index), so no GPU is needed: no tensor is made.
    """
    torch = pytest.importorskip("torch")
    current = [0]
    monkeypatch.setattr(backends, "_cache", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    first = get_backend("torch", "cuda")
    assert first.device == torch.device("cuda", 0)
    current[0] = 1  # torch.cuda.set_device(1)
    second = get_backend("torch", "cuda")
    assert second.device == torch.device("cuda", 1)
    assert get_backend("torch", "cuda:1") is second
    current[0] = 0
    assert get_backend("torch", "cuda") is first
    assert get_backend("torch", torch.device("cuda", 0)) is first


def test_torch_names_of_one_device_share_a_backend(monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setattr(backends, "_cache", {})
    cpu = get_backend("torch")
    assert get_backend("torch", "cpu") is cpu
    assert get_backend("pytorch", "cpu:0") is cpu
