"""PyTorch integration: AdaLoRA on real torch models, numerically identical to PEFT.

``get_adalora_model(module, config)`` injects SVD-triplet adapters into an
``nn.Module`` (``nn.Linear``, Hugging Face GPT-2 ``Conv1D``, ``nn.Conv2d``) and
returns an :class:`AdaLoraModel`; ``AdaLoraModel.from_pretrained`` loads our
directories and PEFT's. ``AdaLoraCallback`` (and ``AdaLoraTrainer``) plug the
allocator and the orthogonal regulariser into transformers' ``Trainer``; they
import transformers only when first used.
"""

from __future__ import annotations

from typing import Any

from .layer import SVDConv2d, SVDLayer, SVDLinear
from .model import AdaLoraModel, get_adalora_model, get_peft_model
from .modules_to_save import ModulesToSaveWrapper

#: PEFT's ``PeftModel`` name for the AdaLoRA wrapper (``PeftModel.from_pretrained(base, path)`` reads AdaLoRA
#: directories, ours or PEFT's; a directory of another PEFT method is refused with its ``peft_type``).
PeftModel = AdaLoraModel

_LAZY = ("AdaLoraCallback", "AdaLoraTrainerMixin", "AdaLoraTrainer", "add_orth_loss")


def __getattr__(name: str) -> Any:
    if name in _LAZY:  # these need transformers
        from . import callback

        return getattr(callback, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdaLoraCallback",
    "AdaLoraModel",
    "AdaLoraTrainer",
    "AdaLoraTrainerMixin",
    "ModulesToSaveWrapper",
    "PeftModel",
    "SVDConv2d",
    "SVDLayer",
    "SVDLinear",
    "add_orth_loss",
    "get_adalora_model",
    "get_peft_model",
]
