"""Seeded initialisers, drawn through the backend's generator (the Array API has none)."""

from __future__ import annotations

from typing import Any

from .triplet import Triplet


def init_triplet(
    rng: Any, r: int, in_features: int, out_features: int, dtype: Any = "float32", init_lora_weights: bool = True
) -> tuple[Triplet, Any]:
    """``(Triplet(A, E, B), ranknum)`` for one module, in PEFT's draw order.

    PEFT draws ``A = randn(r, in)``, ``E = randn(r, 1)``, ``B = randn(out, r)``,
    ``ranknum = randn(1)`` (then filled with r), and with ``init_lora_weights``
    zeroes E and redraws ``A, B ~ N(0, 0.02)``. With the torch backend and
    ``rng(None)`` (torch's default generator) the values equal PEFT's.
    """
    A = rng.normal((r, in_features), dtype=dtype)
    E = rng.normal((r, 1), dtype=dtype)
    B = rng.normal((out_features, r), dtype=dtype)
    ranknum = rng.normal((1,), dtype=dtype) * 0 + float(r)
    if init_lora_weights:
        E = E * 0
        A = rng.normal((r, in_features), mean=0.0, std=0.02, dtype=dtype)
        B = rng.normal((out_features, r), mean=0.0, std=0.02, dtype=dtype)
    return Triplet(A, E, B), ranknum
