"""Tiny models and lock-step training runs, ours and PEFT's, for parity tests, conformance and benchmarks.

Every model is built from a config (no downloads) and seeded, so two copies
are identical. ``trajectory(impl, kind, ...)`` trains one implementation for
a number of steps in PEFT's documented order and records, per step, the loss
(with the regulariser), the regulariser, every adapter gradient, every adapter
weight after ``update_and_allocate`` and the rank pattern, as NumPy arrays:
two implementations agree bit for bit when the arrays are equal.

PEFT is imported only inside the functions that use it.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import adalora_core as ac

from .model import AdaLoraModel, get_adalora_model

VOCAB = 48


class TinyMLP(nn.Module):
    """A two-block MLP regressor; returns an object with ``.loss`` and ``.logits`` as HF models do."""

    def __init__(self, d: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(hidden, hidden), "down": nn.Linear(hidden, hidden)}) for _ in range(2))
        self.head = nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        h = torch.relu(self.fc_in(x))
        for block in self.blocks:
            h = h + block["down"](torch.tanh(block["up"](h)))  # type: ignore[index]  # ModuleDicts
        logits = self.head(h)
        loss = None if labels is None else nn.functional.mse_loss(logits, labels)
        return types.SimpleNamespace(loss=loss, logits=logits)


class TinyConvNet(nn.Module):
    """Two 3x3 convolutions and a linear head on 8x8 images (PEFT's SVDConv2d path)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        logits = self.head(h.flatten(1))
        loss = None if labels is None else nn.functional.mse_loss(logits, labels)
        return types.SimpleNamespace(loss=loss, logits=logits)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def build(kind: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny base model of ``kind`` (``gpt2``, ``llama``, ``mlp``, ``conv``), seeded: always the same weights."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if kind == "gpt2":
            _quiet_transformers()
            from transformers import GPT2Config, GPT2LMHeadModel

            model: nn.Module = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=VOCAB,
                                                          n_positions=16, bos_token_id=0, eos_token_id=0))
        elif kind == "llama":
            _quiet_transformers()
            from transformers import LlamaConfig, LlamaForCausalLM

            model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                                 max_position_embeddings=16, bos_token_id=0, eos_token_id=0,
                                                 pad_token_id=0))
        elif kind == "mlp":
            model = TinyMLP()
        elif kind == "conv":
            model = TinyConvNet()
        else:
            raise ValueError(f"unknown model kind {kind!r}")
    model.train()
    return model.to(dtype)


TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mlp": ["fc_in", "up", "down"],
    "conv": ["conv1", "conv2", "head"],
}

# A schedule with warm-up, cubic budgeting with deltaT > 1, the final allocation and replay.
SCHEDULE = {"init_r": 4, "target_r": 2, "tinit": 5, "tfinal": 12, "deltaT": 3, "total_step": 60, "lora_alpha": 8}


def inputs(kind: str, step: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    if kind in ("gpt2", "llama"):
        ids = torch.randint(0, VOCAB, (2, 8), generator=g)
        return {"input_ids": ids, "labels": ids}
    if kind == "mlp":
        return {"x": torch.randn(4, 16, generator=g).to(dtype), "labels": torch.randn(4, 4, generator=g).to(dtype)}
    return {"x": torch.randn(2, 3, 8, 8, generator=g).to(dtype), "labels": torch.randn(2, 4, generator=g).to(dtype)}


def config_kwargs(kind: str, **overrides: Any) -> dict[str, Any]:
    return {**SCHEDULE, "target_modules": TARGETS[kind], **overrides}


def ours(base: nn.Module, adapter_seed: int = 1, **cfg: Any) -> AdaLoraModel:
    """Our wrapper around a deep copy of ``base``, adapters drawn after ``torch.manual_seed(adapter_seed)``.

    PEFT's exact op order unless ``exact_peft=False`` is passed: these models are compared with PEFT's.
    """
    exact = cfg.pop("exact_peft", True)
    model = copy.deepcopy(base)
    torch.manual_seed(adapter_seed)
    return get_adalora_model(model, ac.AdaLoraConfig(**cfg), exact_peft=exact)


def peft(base: nn.Module, adapter_seed: int = 1, **cfg: Any) -> Any:
    """PEFT's ``get_peft_model`` on a deep copy of ``base``, after the same seed."""
    import peft as _peft

    model = copy.deepcopy(base)
    torch.manual_seed(adapter_seed)
    return _peft.get_peft_model(model, _peft.AdaLoraConfig(**cfg))


def peft_layers(pm: Any) -> dict[str, Any]:
    from peft.tuners.adalora import AdaLoraLayer

    return {k: m for k, m in pm.base_model.model.named_modules() if isinstance(m, AdaLoraLayer)}


def adapter_params(model: Any, name: str = "default") -> list[tuple[str, torch.Tensor]]:
    """``(path.part, param)`` for every adapter weight, in module order, A, E, B; ours or PEFT's."""
    layers = model.svd_layers() if isinstance(model, AdaLoraModel) else peft_layers(model)
    out = []
    for path, layer in layers.items():
        if name in layer.lora_A:
            for part in ("lora_A", "lora_E", "lora_B"):
                out.append((f"{path}.{part}", getattr(layer, part)[name]))
    return out


def loss_and_out(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
    """The training loss with the regulariser: ours explicit, PEFT's added inside its tuner's forward."""
    if isinstance(model, AdaLoraModel):
        out = model(**batch)
        return out.loss + model.orth_loss(), out
    out = model.base_model(**batch)  # the tuner's forward is where PEFT adds the regulariser
    return out.loss, out


def orth_value(model: Any) -> torch.Tensor:
    """The weighted regulariser alone (PEFT's: its loss minus the base loss)."""
    if isinstance(model, AdaLoraModel):
        return model.orth_loss()
    raise TypeError("use loss_and_out for PEFT")


def rank_pattern(model: Any) -> dict[str, list[bool]]:
    if isinstance(model, AdaLoraModel):
        return model.rank_pattern
    rp = model.peft_config["default"].rank_pattern or {}
    return {k.replace(".lora_E.default", ".lora_E"): list(v) for k, v in rp.items()}


def update(model: Any, step: int) -> None:
    if isinstance(model, AdaLoraModel):
        model.update_and_allocate(step)
    else:
        model.base_model.update_and_allocate(step)


def _flat(ts: list[torch.Tensor]) -> Any:
    return torch.cat([t.detach().reshape(-1).float() for t in ts]).cpu().numpy().copy()


def trajectory(model: Any, kind: str, steps: int, lr: float = 1e-2,
               hook: Callable[[int, Any], None] | None = None, device: Any = None) -> dict[str, Any]:
    """Train ``model`` (ours or PEFT's) for ``steps`` optimizer steps; record everything per step.

    Arrays: ``loss (steps,)``, ``grads (steps, n)``, ``weights (steps, n)``
    (after the allocator), ``E (steps, modules * r)`` (the singular values
    alone), ``masks (steps, modules * init_r)`` (all True before the first
    mask), and ``logits`` of the last step.
    """
    import numpy as np

    params = adapter_params(model)
    opt = torch.optim.AdamW([p for _, p in params], lr=lr)
    modules = [name[: -len(".lora_A")] for name, _ in params[::3]]
    losses, grads, weights, masks = [], [], [], []
    out = None
    for step in range(steps):
        batch = inputs(kind, step)
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        torch.manual_seed(10_000 + step)  # same dropout draws in both implementations
        loss, out = loss_and_out(model, batch)
        loss.backward()
        grads.append(_flat([p.grad for _, p in params]))  # type: ignore[misc]  # all set by backward()
        opt.step()
        update(model, step)
        if hook is not None:
            hook(step, model)
        opt.zero_grad()
        losses.append(loss.detach().float().item())
        weights.append(_flat([p for _, p in params]))
        rp = rank_pattern(model)
        r = params[1][1].shape[0]
        masks.append(np.array([b for m in modules for b in rp.get(f"{m}.lora_E", [True] * r)], dtype=bool))
    weights_ = np.stack(weights)
    assert out is not None, "steps must be >= 1"
    sizes = [p.numel() for _, p in params]
    starts = np.cumsum([0, *sizes])
    e_cols = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in range(1, len(params), 3)])
    return {"loss": np.array(losses, dtype=np.float32), "grads": np.stack(grads), "weights": weights_,
            "E": weights_[:, e_cols], "masks": np.stack(masks),
            "logits": out.logits.detach().float().cpu().numpy().copy()}
