"""PEFT parity cases: our torch integration (run) against Hugging Face PEFT itself (reference), bit for bit.

Each case builds the same tiny seeded base model (GPT-2 with Conv1D, a
Llama-style model with Linear layers, a plain MLP, a small Conv2d net) for
both sides, wraps a deep copy after the same ``torch.manual_seed``, and
returns host NumPy arrays. The tolerance is 0 in float32: any difference is a
failure. The cases apply to the ``torch`` backend on CPU only, and load only
when torch, transformers and peft import (``peft_cases`` raises ImportError
otherwise, which the case loader reports as skipped).
"""

from __future__ import annotations

import copy
import importlib
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

EXACT32 = {"float32": 0.0}
KINDS = ("gpt2", "llama", "mlp", "conv")


def _skip_unless_cpu_float32(backend: Any, dtype: str) -> None:
    from .cases import Skip

    if dtype != "float32":
        raise Skip("PEFT parity is defined in float32")
    device = getattr(backend, "device", None)
    if device is not None and str(device) != "cpu" and getattr(device, "type", "cpu") != "cpu":
        raise Skip("PEFT parity cases run on CPU")


def _quiet(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Warnings off and one torch thread (tiny models; no stalls when other processes share the cores)."""

    def wrapped(*args: Any) -> dict[str, Any]:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return fn(*args)
        finally:
            torch.set_num_threads(threads)

    return wrapped


def _P() -> Any:
    from adalora_core.backends.torch_nn import _parity

    return _parity


def _logits(model: Any, kind: str, step: int = 321) -> np.ndarray:
    import torch

    P = _P()
    model.eval()
    with torch.no_grad():
        inner = model if isinstance(model, P.AdaLoraModel) else model.base_model.model
        return inner(**P.inputs(kind, step)).logits.float().numpy().copy()


# ------------------------------------------------------------------------- forward


def _forward_case(kind: str) -> dict[str, Any]:
    def build(impl: str) -> np.ndarray:
        P = _P()
        cfg = P.config_kwargs(kind, init_lora_weights=False)  # E = randn: a non-trivial delta
        model = (P.ours if impl == "ours" else P.peft)(P.build(kind), **cfg)
        return _logits(model, kind)

    def run(backend: Any, dtype: str) -> dict[str, Any]:
        _skip_unless_cpu_float32(backend, dtype)
        return {"logits": build("ours")}

    return {"name": f"peft.forward.{kind}", "run": _quiet(run), "reference": _quiet(lambda dtype: {"logits": build("peft")}),
                "tol": EXACT32, "backends": ("torch",)}


# ------------------------------------------------------------ 61-step training run


def _train_case(kind: str, dtype_name: str = "float32", steps: int = 61) -> dict[str, Any]:
    keys = ("loss", "grads", "E", "weights", "masks", "logits")

    def build(impl: str) -> dict[str, Any]:
        import torch

        P = _P()
        base = P.build(kind, getattr(torch, dtype_name))
        model = (P.ours if impl == "ours" else P.peft)(base, **P.config_kwargs(kind))
        traj = P.trajectory(model, kind, steps)
        return {k: traj[k] for k in keys}

    def run(backend: Any, dtype: str) -> dict[str, Any]:
        _skip_unless_cpu_float32(backend, dtype)
        return build("ours")

    suffix = "" if dtype_name == "float32" else f".{dtype_name}_base"
    return {"name": f"peft.train{steps}.{kind}{suffix}", "run": _quiet(run), "reference": _quiet(lambda dtype: build("peft")),
                "tol": EXACT32, "backends": ("torch",), "stateful": True}


# ------------------------------------------------------------------- regulariser


def _orth_case(weight: float) -> dict[str, Any]:
    kind = "gpt2"

    def build(impl: str) -> dict[str, Any]:
        import torch

        P = _P()
        model = (P.ours if impl == "ours" else P.peft)(
            P.build(kind), **P.config_kwargs(kind, init_lora_weights=False, orth_reg_weight=weight))
        model.eval()
        x = P.inputs(kind, 5)
        with torch.no_grad():
            loss, _ = P.loss_and_out(model, x)
        return {"loss_with_orth": np.array([loss.item()], dtype=np.float32)}

    def run(backend: Any, dtype: str) -> dict[str, Any]:
        _skip_unless_cpu_float32(backend, dtype)
        return build("ours")

    return {"name": f"peft.orth.w{weight:g}", "run": _quiet(run), "reference": _quiet(lambda dtype: build("peft")),
                "tol": EXACT32, "backends": ("torch",)}


# ------------------------------------------------------------------------- merge


def _merge_case(kind: str) -> dict[str, Any]:
    def build(impl: str) -> dict[str, Any]:
        P = _P()
        model = (P.ours if impl == "ours" else P.peft)(P.build(kind), **P.config_kwargs(kind))
        P.trajectory(model, kind, 8)
        merged = model.merge_and_unload()
        out = {n: p.detach().numpy().copy() for n, p in merged.named_parameters()}
        merged.eval()
        import torch

        with torch.no_grad():
            out["logits"] = merged(**P.inputs(kind, 77)).logits.numpy().copy()
        return out

    def run(backend: Any, dtype: str) -> dict[str, Any]:
        _skip_unless_cpu_float32(backend, dtype)
        return build("ours")

    return {"name": f"peft.merge_and_unload.{kind}", "run": _quiet(run), "reference": _quiet(lambda dtype: build("peft")),
                "tol": EXACT32, "backends": ("torch",), "stateful": True}


# --------------------------------------------------------------- checkpoint interop


_INTEROP = {"init_r": 4, "target_r": 1, "tinit": 2, "tfinal": 4, "deltaT": 2, "total_step": 20, "lora_alpha": 8}


def _save(impl: str, kind: str, path: Path) -> None:
    """``impl``'s save_pretrained into ``path`` after a run that prunes some modules to rank 0."""
    P = _P()
    model = (P.ours if impl == "ours" else P.peft)(P.build(kind), **P.config_kwargs(kind, **_INTEROP))
    P.trajectory(model, kind, 21, lr=3e-2)
    model.save_pretrained(path)


def _load(impl: str, kind: str, path: Path) -> np.ndarray:
    P = _P()
    base = P.build(kind)
    if impl == "ours":
        model = P.AdaLoraModel.from_pretrained(copy.deepcopy(base), path, exact_peft=True)
    else:
        import peft

        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path))
    return _logits(model, kind)


def _interop_case(writer: str, kind: str) -> dict[str, Any]:
    """A directory saved by ``writer``: our loader (run) against PEFT's loader (reference)."""

    def ranks(path: Path) -> np.ndarray:
        import json

        pattern = json.loads((path / "adapter_config.json").read_text())["rank_pattern"]
        return np.array([sum(v) for _, v in sorted(pattern.items())], dtype=np.int64)

    def loaded_by(loader: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="adalora-interop-") as tmp:
            path = Path(tmp) / "adapter"
            _save(writer, kind, path)
            return {"logits": _load(loader, kind, path), "ranks": ranks(path)}

    def run(backend: Any, dtype: str) -> dict[str, Any]:
        _skip_unless_cpu_float32(backend, dtype)
        return loaded_by("ours")

    return {"name": f"peft.checkpoint.{writer}_saved.{kind}", "run": _quiet(run),
            "reference": _quiet(lambda dtype: loaded_by("peft")),
            "tol": EXACT32, "backends": ("torch",), "stateful": True}


def peft_cases() -> list[dict[str, Any]]:
    """Every PEFT parity case; raises ImportError when torch, transformers or peft is missing."""
    for library in ("torch", "transformers", "peft"):
        importlib.import_module(library)  # ImportError: the loader reports the cases as skipped
    cases = [_forward_case(k) for k in KINDS]
    cases += [_train_case(k) for k in KINDS]
    cases += [_train_case("llama", "bfloat16", steps=8)]
    cases += [_orth_case(0.5), _orth_case(0.0)]
    cases += [_merge_case(k) for k in ("gpt2", "conv")]
    cases += [_interop_case(w, k) for w in ("peft", "ours") for k in ("gpt2", "mlp")]
    return cases
