"""adalora-core: AdaLoRA and MicroLoRA/EWC++ written once against the Python Array API.

The algorithms live in this package and run unchanged on NumPy, PyTorch, CuPy
and array-api-strict arrays; ``adalora_core.backends`` adapts each library and
``adalora_core.conformance`` checks them all against a float64 reference.
"""

from __future__ import annotations

from typing import Any

from .allocator import RankAllocator
from .checkpoint import load_adapter, load_arrays, save_adapter, save_arrays
from .config import KNOWN_MODULES, AdaLoraConfig, EwcConfig, MicroLoraConfig, TaskType
from .errors import AdaLoraWarning, CheckpointError
from .ewc import EwcState
from .lora import LoraAdapter
from .microlora import AdaptFeedback, MicroLoRA
from .optim import SGD, Adam
from .pool import AdapterPool
from .schedule import budget_schedule
from .triplet import Triplet

__version__ = "0.1.0"


def get_backend(name: Any = None, device: Any = None) -> Any:
    """The backend called ``name`` (see ``available_backends()``); None picks the default."""
    from .backends import get_backend as _get

    return _get(name, device)


def available_backends() -> list[str]:
    from .backends import available_backends as _available

    return _available()


def native_info() -> dict[str, Any]:
    """What the C extension build produced and which kernel path runs (or why none)."""
    try:
        from .backends import native
    except ImportError as exc:
        return {"built": False, "reason": str(exc)}
    return native.info()


def __getattr__(name: str) -> Any:
    # torch-only names load torch on first use, never at import time.
    if name in ("get_adalora_model", "get_peft_model", "AdaLoraModel", "PeftModel", "AdaLoraCallback",
                "AdaLoraTrainer", "add_orth_loss"):
        from .backends import torch_nn

        return getattr(torch_nn, name)
    raise AttributeError(f"module 'adalora_core' has no attribute {name!r}")


__all__ = [
    "KNOWN_MODULES",
    "SGD",
    "AdaLoraConfig",
    "AdaLoraWarning",
    "Adam",
    "AdaptFeedback",
    "AdapterPool",
    "CheckpointError",
    "EwcConfig",
    "EwcState",
    "LoraAdapter",
    "MicroLoRA",
    "MicroLoraConfig",
    "RankAllocator",
    "TaskType",
    "Triplet",
    "available_backends",
    "budget_schedule",
    "get_backend",
    "load_adapter",
    "load_arrays",
    "native_info",
    "save_adapter",
    "save_arrays",
]
