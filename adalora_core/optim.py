"""Tiny functional optimizers, so NumPy and CuPy users can train without a framework.

State is a dict: arrays (``"m.<name>"``, ``"v.<name>"``) and a JSON-ready
``"step"`` entry; every call returns new params and new state. Adam follows
``torch.optim.Adam`` (bias-corrected, L2 ``weight_decay`` added to the
gradient, and a step count per parameter that does not advance while the
parameter has no gradient) so a NumPy run can be compared with a torch one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._xp import Array, namespace
from .config import check_float


@dataclass(frozen=True)
class Adam:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_float("lr", self.lr, 0.0)
        check_float("beta1", self.beta1, 0.0, 1.0, high_open=True)
        check_float("beta2", self.beta2, 0.0, 1.0, high_open=True)
        check_float("eps", self.eps, 0.0)
        check_float("weight_decay", self.weight_decay, 0.0)

    def init(self, params: Mapping[str, Array]) -> dict[str, Any]:
        state: dict[str, Any] = {"step": dict.fromkeys(params, 0)}
        for k, p in params.items():
            xp = namespace(p)
            state[f"m.{k}"] = xp.zeros_like(p)
            state[f"v.{k}"] = xp.zeros_like(p)
        return state

    def step(
        self, params: Mapping[str, Array], grads: Mapping[str, Array | None], state: Mapping[str, Any]
    ) -> tuple[dict[str, Array], dict[str, Any]]:
        """One update; parameters whose gradient is None are left as they are."""
        steps = dict(state["step"])
        new_p: dict[str, Array] = {}
        new_s: dict[str, Any] = {"step": steps}
        for k, p in params.items():
            g = grads.get(k)
            m, v = state[f"m.{k}"], state[f"v.{k}"]
            if g is None:
                new_p[k], new_s[f"m.{k}"], new_s[f"v.{k}"] = p, m, v
                continue
            steps[k] = t = steps[k] + 1
            bc1 = 1 - self.beta1**t
            bc2 = 1 - self.beta2**t
            xp = namespace(p, g)
            if self.weight_decay:
                g = g + self.weight_decay * p
            m = self.beta1 * m + (1 - self.beta1) * g
            v = self.beta2 * v + (1 - self.beta2) * (g * g)
            # a step count traced under jit is an array: its correction too (a float keeps torch's rounding)
            denom = xp.sqrt(v) / (math.sqrt(bc2) if isinstance(bc2, float) else xp.sqrt(bc2)) + self.eps
            new_p[k] = p - (self.lr / bc1) * (m / denom)
            new_s[f"m.{k}"], new_s[f"v.{k}"] = m, v
        return new_p, new_s


@dataclass(frozen=True)
class SGD:
    lr: float = 1e-2

    def __post_init__(self) -> None:
        check_float("lr", self.lr, 0.0)

    def init(self, params: Mapping[str, Array]) -> dict[str, Any]:
        return {"step": 0}

    def step(
        self, params: Mapping[str, Array], grads: Mapping[str, Array | None], state: Mapping[str, Any]
    ) -> tuple[dict[str, Array], dict[str, Any]]:
        out = {k: (p if (g := grads.get(k)) is None else p - self.lr * g) for k, p in params.items()}
        return out, {"step": state["step"] + 1}
