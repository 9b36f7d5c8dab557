"""The allocator's state as entries of ``model.state_dict()``, so every standard checkpoint resumes exactly.

``torch.save(model.state_dict())``, the Trainer's checkpoints, Lightning,
accelerate and ``torch.distributed.checkpoint`` all go through
``state_dict`` / ``load_state_dict``; the allocator's EMAs, masks and step
therefore travel there, under ``<prefix>allocator.``:

* ``ema_ipt.<module>.{A,E,B}``, ``ema_unc...``: the EMAs, shaped as the
  weights (DTensors sharded as the weights under FSDP2);
* ``mask.<module>``: the last mask, bool over the module's rank;
* ``step``: int64 ``[last_step (-1: none), budget, finalized, skipped_steps,
  has_emas, has_masks]``; ``missing_grads``: int64, one count per module;
* ``schedule``: float64 ``[total_step, target_r, tinit, tfinal, deltaT, beta1, beta2]``.

Every value is a tensor of a shape fixed by the model, so the state dict
stays a flat mapping of tensors (safetensors writes it, ``v.clone()`` works
on every value) and a distributed checkpoint loads in place into a fresh
model's state dict. EMAs and masks that do not exist yet are written as
placeholders (zeros, all-kept) and flagged in ``step``.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import torch

from adalora_core.allocator import KINDS, MASK, PARTS, SCHEDULE_FIELDS, RankAllocator, ema_key
from adalora_core.triplet import Triplet
from adalora_core.validate import Problems

from .distributed import like, local

KEY = "allocator."
STEP_FIELDS = ("last_step", "budget", "finalized", "skipped_steps", "has_emas", "has_masks")


def _keys(names: list[str]) -> list[str]:
    ema = [ema_key(k, n, x) for k in KINDS for n in names for x in PARTS]
    return [*ema, *(MASK + n for n in names), "step", "missing_grads", "schedule"]


def save(alloc: RankAllocator, weights: Mapping[str, Triplet], destination: MutableMapping[str, Any],
         prefix: str) -> None:
    """Write ``alloc``'s state into ``destination`` (fresh tensors: a checkpoint loader may fill them in place)."""
    arrays, meta = alloc.state_dict()
    dev = next(iter(weights.values())).A.device
    for kind in KINDS:
        for name, trip in weights.items():
            for x, w in zip(PARTS, trip):
                t = arrays.get(ema_key(kind, name, x))
                loc = local(w)
                assert loc is not None
                destination[f"{prefix}{KEY}{kind}.{name}.{x}"] = like(
                    t.detach().clone() if t is not None else torch.zeros_like(loc), w)
    for name, r in alloc.ranks.items():
        m = arrays.get(MASK + name)
        destination[f"{prefix}{KEY}mask.{name}"] = (m.clone() if m is not None else
                                                    torch.ones(r, dtype=torch.bool, device=dev))
    has_emas = any(k.startswith("ema_ipt.") for k in arrays)
    step = [-1 if meta["last_step"] is None else meta["last_step"], meta["budget"], int(meta["finalized"]),
            meta["skipped_steps"], int(has_emas), int(any(k.startswith(MASK) for k in arrays))]
    destination[f"{prefix}{KEY}step"] = torch.tensor(step, dtype=torch.int64)
    destination[f"{prefix}{KEY}missing_grads"] = torch.tensor(
        [meta["missing_grads"].get(n, 0) for n in alloc.names], dtype=torch.int64)
    destination[f"{prefix}{KEY}schedule"] = torch.tensor(
        [float(getattr(alloc.config, f)) for f in SCHEDULE_FIELDS], dtype=torch.float64)


def load(alloc: RankAllocator, weights: Mapping[str, Triplet], state_dict: MutableMapping[str, Any], prefix: str,
         missing_keys: list[str]) -> None:
    """Take ``alloc``'s entries out of ``state_dict``, check them all, then commit; a refused state changes nothing.

    A state dict without any allocator entry (a PEFT or base-model state
    dict) leaves the allocator as it is and reports the keys as missing.
    """
    keys = [f"{prefix}{KEY}{k}" for k in _keys(alloc.names)]
    if not any(k in state_dict for k in keys):
        missing_keys.extend(keys)
        return
    entries = {k[len(prefix) + len(KEY):]: state_dict.pop(k) for k in list(state_dict)
               if k.startswith(prefix + KEY)}
    p = Problems("allocator state in the state dict")
    absent = [k for k in _keys(alloc.names) if k not in entries]
    p.require(not absent, f"missing entries {absent[:6]}{' ...' if len(absent) > 6 else ''}")
    unknown = sorted(set(entries) - set(_keys(alloc.names)))
    p.require(not unknown, f"unexpected entries {unknown[:6]}")
    step = _ints(p, entries.get("step"), "step", len(STEP_FIELDS))
    counts = _ints(p, entries.get("missing_grads"), "missing_grads", len(alloc.names))
    schedule: Any = entries.get("schedule")
    want = [float(getattr(alloc.config, f)) for f in SCHEDULE_FIELDS]
    if p.require(isinstance(schedule, torch.Tensor) and tuple(schedule.shape) == (len(want),),
                 f"'schedule' must be a tensor of {len(want)} values"):
        got = [float(v) for v in schedule.tolist()]
        p.require(got == want, f"it was computed with {dict(zip(SCHEDULE_FIELDS, got))}, this model has "
                               f"{dict(zip(SCHEDULE_FIELDS, want))}")
    p.raise_if_any()
    assert step is not None and counts is not None
    fields = dict(zip(STEP_FIELDS, step))
    meta = {"ranks": dict(alloc.ranks), "shapes": None, "last_step": None if fields["last_step"] == -1 else
            fields["last_step"], "budget": fields["budget"], "finalized": _flag(fields["finalized"]),
            "skipped_steps": fields["skipped_steps"],
            "missing_grads": {n: c for n, c in zip(alloc.names, counts) if c},
            "config": alloc.config.to_dict()}
    dev = next(iter(weights.values())).A.device
    arrays = {}
    for key, t in entries.items():
        real = (key.startswith(KINDS) and fields["has_emas"]) or (key.startswith(MASK) and fields["has_masks"])
        if real:
            arrays[key] = local(t).to(dev) if isinstance(t, torch.Tensor) else t  # type: ignore[union-attr]
    params = {n: Triplet(*(local(w) for w in trip)) for n, trip in weights.items()}
    alloc.commit(alloc.check_state(arrays, meta, params=params))


def _ints(p: Problems, t: Any, what: str, n: int) -> list[int] | None:
    ok = isinstance(t, torch.Tensor) and t.dtype == torch.int64 and tuple(t.shape) == (n,)
    if not p.require(ok, f"{what!r} must be an int64 tensor of shape ({n},)"):
        return None
    return [int(v) for v in t.tolist()]


def _flag(v: int) -> Any:
    """0/1 as a bool; anything else passes through, for the allocator's check to name."""
    return bool(v) if v in (0, 1) else v
