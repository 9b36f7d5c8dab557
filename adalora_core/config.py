"""Validated, frozen configuration dataclasses.

Every rule is checked in ``__post_init__`` and fails with a ValueError that names
the field, the bad value and the rule, so a wrong config never gets as far as a
training step (PEFT's AdaLoRA fails late, inside ``kthvalue``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def _fail(name: str, value: Any, rule: str) -> None:
    raise ValueError(f"{name}={value!r} is invalid: {rule}")


def check_int(name: str, value: Any, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, "must be an int")
    if minimum is not None and value < minimum:
        _fail(name, value, f"must be >= {minimum}")


def check_float(name: str, value: Any, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """``value`` is a finite real in the interval given by ``low``/``high``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, value, "must be a number")
    if not math.isfinite(value):
        _fail(name, value, "must be finite")
    lo_ok = low is None or (value > low if low_open else value >= low)
    hi_ok = high is None or (value < high if high_open else value <= high)
    if not (lo_ok and hi_ok):
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        _fail(name, value, f"must lie in {lo or '(-inf'}, {hi or 'inf)'}")


def _names(name: str, value: Any) -> None:
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        _fail(name, value, "must be None, a regex string, or a list of module names")


@dataclass(frozen=True)
class AdaLoraConfig:
    """AdaLoRA hyperparameters, with PEFT's field names and defaults.

    ``tfinal`` is a duration: the final phase starts at ``total_step - tfinal``.
    ``target_r == init_r`` is allowed and gives a constant budget (no pruning).
    """

    total_step: int | None = None
    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    rank_pattern: Mapping[str, Sequence[bool]] | None = None
    target_modules: Sequence[str] | str | None = None
    exclude_modules: Sequence[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Sequence[str] | None = None
    init_lora_weights: bool = True
    layers_to_transform: Sequence[int] | int | None = None
    layers_pattern: Sequence[str] | str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if self.total_step is None:
            _fail("total_step", None, "is required: the number of optimizer steps of the run (> 0)")
        check_int("total_step", self.total_step, 1)
        check_int("init_r", self.init_r, 1)
        check_int("target_r", self.target_r, 0)
        if self.target_r > self.init_r:
            _fail("target_r", self.target_r, f"must be <= init_r={self.init_r} (ranks are only pruned)")
        check_int("tinit", self.tinit, 0)
        check_int("tfinal", self.tfinal, 0)
        check_int("deltaT", self.deltaT, 1)
        if self.tinit >= self.total_step - self.tfinal:
            _fail("tinit", self.tinit, f"must be < total_step - tfinal = {self.total_step - self.tfinal} "
                  "so that a budgeting phase exists; decrease tinit/tfinal or increase total_step")
        check_float("beta1", self.beta1, 0.0, 1.0, low_open=True, high_open=True)
        check_float("beta2", self.beta2, 0.0, 1.0, low_open=True, high_open=True)
        check_float("orth_reg_weight", self.orth_reg_weight, 0.0)
        check_float("lora_alpha", self.lora_alpha, 0.0, low_open=True)
        check_float("lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True)
        if self.bias not in ("none", "all", "lora_only"):
            _fail("bias", self.bias, "must be 'none', 'all' or 'lora_only'")
        _names("target_modules", self.target_modules)
        _names("exclude_modules", self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            _fail("layers_to_transform", self.layers_to_transform,
                  "cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            _fail("layers_pattern", self.layers_pattern, "needs layers_to_transform as well")
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, Mapping):
                _fail("rank_pattern", self.rank_pattern, "must be a dict '<module>.lora_E' -> list of bool")
            for key, mask in self.rank_pattern.items():
                if not isinstance(key, str) or len(mask) != self.init_r:
                    _fail("rank_pattern", {key: mask}, f"each entry must be a list of init_r={self.init_r} bools")

    @property
    def final_step(self) -> int:
        """``T_f``: the first step of the final phase."""
        assert self.total_step is not None
        return self.total_step - self.tfinal

    @property
    def scaling(self) -> float:
        """The adapter scale, ``lora_alpha`` (AdaLoRA does not divide by r)."""
        return float(self.lora_alpha)

    def replace(self, **changes: Any) -> AdaLoraConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values, plus ``peft_type`` (PEFT's adapter_config.json)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (tuple, list, set, frozenset)):
                v = list(v)
            elif isinstance(v, Mapping):
                v = {k: [bool(b) for b in m] for k, m in v.items()}
            out[f.name] = v
        out["peft_type"] = "ADALORA"
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdaLoraConfig:
        """A config from ``to_dict`` output or PEFT's adapter_config.json (unknown keys ignored)."""
        peft_type = data.get("peft_type", "ADALORA")
        if peft_type != "ADALORA":
            raise ValueError(f"peft_type={peft_type!r} is invalid: expected 'ADALORA'")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


__all__ = ["AdaLoraConfig", "check_float", "check_int"]
