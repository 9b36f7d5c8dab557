"""transformers ``Trainer`` integration: the allocator once per optimizer step, the regulariser in training only.

Where the allocator runs. ``Trainer`` performs, for every optimizer step::

    optimizer.step()
    callback.on_optimizer_step(...)     # gradients still present
    lr_scheduler.step()
    model.zero_grad()                   # gradients gone (set to None)
    state.global_step += 1
    callback.on_step_end(...)

The importance score needs ``p.grad``, so :class:`AdaLoraCallback` works in
``on_optimizer_step``, where ``state.global_step`` is still the 0-based index
of the step just taken: the same ``step`` a hand-written loop passes to
``model.update_and_allocate(step)`` (and PEFT's examples pass to theirs).
``on_step_end`` would see no gradients. With gradient accumulation the hook
fires once per optimizer step, after the last micro-batch, so the allocator
counts optimizer steps, not micro-batches. When the optimizer skipped its
step (a gradient scaler found inf/NaN: accelerate's ``step_was_skipped``), the
allocator is not called either.

The regulariser. :class:`AdaLoraTrainerMixin` adds ``model.orth_loss()`` to the
loss in ``compute_loss`` only while training (``model.training`` and grad
enabled), scaled so that it counts once per optimizer step under gradient
accumulation; evaluation losses are the wrapped model's own.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.utils import find_labels

from adalora_core.errors import AdaLoraWarning

from .model import AdaLoraModel
from .peft_compat import adapter_dir


def find_adalora(model: Any) -> AdaLoraModel:
    """The :class:`AdaLoraModel` in ``model`` (itself, or inside DDP/accelerate wrappers)."""
    seen = 0
    while not isinstance(model, AdaLoraModel):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None or seen > 8:
            raise TypeError(f"expected an AdaLoraModel (from get_adalora_model), got {type(model).__name__}")
        model, seen = inner, seen + 1
    return model


class AdaLoraCallback(TrainerCallback):
    """Calls ``model.update_and_allocate(state.global_step)`` once per optimizer step.

    ``calls`` and ``skipped`` count allocator calls and optimizer steps skipped
    by a gradient scaler.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = find_adalora(model)
        self.calls = 0
        self.skipped = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        name = self.model._require_trainable()
        total = self.model.peft_config[name].total_step
        if state.max_steps and state.max_steps - 1 > total:
            raise ValueError(f"the Trainer runs {state.max_steps} optimizer steps but the adapter's "
                             f"total_step is {total}: set AdaLoraConfig(total_step={state.max_steps}) "
                             "(steps run 0 .. max_steps - 1)")

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                          **kwargs: Any) -> None:
        if bool(getattr(optimizer, "step_was_skipped", False)):
            self.skipped += 1
            return
        self.model.update_and_allocate(state.global_step)
        self.calls += 1


def add_orth_loss(trainer: Any, model: Any, loss: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """``loss + orth_loss()`` in training; ``loss`` unchanged in evaluation or under ``no_grad``.

    ``Trainer`` divides a micro-batch loss by the accumulation steps unless
    the loss is already normalised over the whole accumulated batch; the
    regulariser is divided the same way, so it counts once per optimizer step.
    """
    ada = find_adalora(model)
    if not (ada.training and torch.is_grad_enabled()) or ada.trainable_adapter_name is None:
        return loss
    if ada.peft_config[ada.trainable_adapter_name].orth_reg_weight == 0:
        return loss
    orth = ada.orth_loss()
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (bool(getattr(trainer, "model_accepts_loss_kwargs", False)) and num_items_in_batch is not None) \
            or getattr(trainer, "compute_loss_func", None) is not None
    if scaled:
        orth = orth / getattr(trainer, "current_gradient_accumulation_steps", 1)
    return loss + orth.to(loss.dtype)


class AdaLoraTrainerMixin:
    """Mix into a ``Trainer`` subclass: orth loss in training, inputs/labels from the wrapped model.

    ``class MyTrainer(AdaLoraTrainerMixin, Trainer): ...``, or use
    :class:`AdaLoraTrainer`. It adds an :class:`AdaLoraCallback` if none was
    given, reads the label names from the wrapped model's class (``Trainer``
    reads them from the model's class; the input columns it reads from the
    instance, whose ``forward`` signature is the wrapped model's), and saves
    checkpoints as the adapter directory plus the allocator's training state;
    a resume restores both (``modules_to_save`` copies and trained biases too).
    """

    TRAINING_STATE_NAME = "adalora_training_state.safetensors"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        ada = find_adalora(self.model)  # type: ignore[attr-defined]
        handler = self.callback_handler  # type: ignore[attr-defined]
        if not any(isinstance(cb, AdaLoraCallback) for cb in handler.callbacks):
            self.add_callback(AdaLoraCallback(ada))  # type: ignore[attr-defined]
        inner_cls = ada.get_base_model().__class__
        if self.args.label_names is None:  # type: ignore[attr-defined]
            self.label_names = find_labels(inner_cls)
        from transformers.utils import can_return_loss

        self.can_return_loss = can_return_loss(inner_cls)

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                     num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        loss, outputs = super().compute_loss(  # type: ignore[misc]
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch, **kwargs)
        loss = add_orth_loss(self, model, loss, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        import os

        output_dir = output_dir if output_dir is not None else self.args.output_dir  # type: ignore[attr-defined]
        if not self.args.should_save:  # type: ignore[attr-defined]
            return
        ada = find_adalora(self.model)  # type: ignore[attr-defined]
        ada.save_pretrained(output_dir)
        if ada.trainable_adapter_name is not None:
            ada.save_training_state(os.path.join(output_dir, self.TRAINING_STATE_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        import os

        ada = find_adalora(model if model is not None else self.model)  # type: ignore[attr-defined]
        path = os.path.join(resume_from_checkpoint, self.TRAINING_STATE_NAME)
        if not os.path.isfile(path):
            warnings.warn(f"{resume_from_checkpoint} has no {self.TRAINING_STATE_NAME}; the adapter and "
                          "allocator start fresh", AdaLoraWarning, stacklevel=2)
            return
        ada.load_training_state(path)
        assert ada.trainable_adapter_name is not None  # load_training_state needs it
        ada.load_saved_extras(adapter_dir(resume_from_checkpoint, ada.trainable_adapter_name))


class AdaLoraTrainer(AdaLoraTrainerMixin, Trainer):
    """``transformers.Trainer`` for an :class:`AdaLoraModel`: see :class:`AdaLoraTrainerMixin`."""
