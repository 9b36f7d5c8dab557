"""The allocator under ``torch.distributed``: shards, score agreement, the rank-pattern check.

Each process runs the core allocator on the adapter weights it holds: whole
tensors under DDP, its shard's rows under FSDP2 (``fully_shard`` splits
``lora_A``/``lora_E`` by triplet rows and ``lora_B`` by output rows). On mask
steps the per-triplet score parts are all-reduced before the threshold, so
every process derives the same mask:

* DDP (whole tensors, possibly different local gradients under ``no_sync``):
  the parts are averaged;
* FSDP2 (shards): each process's parts cover only its rows and are summed.

Steps that do not mask communicate nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from adalora_core.layout import Part
from adalora_core.triplet import Triplet


def is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """The part of ``t`` this process holds (``t`` itself unless it is a DTensor)."""
    if t is None or not is_dtensor(t):
        return t
    return t.to_local()  # type: ignore[attr-defined, no-any-return]


def full(t: Any) -> Any:
    """The whole of ``t``, gathered differentiably from every process if it is a DTensor."""
    return t.full_tensor() if is_dtensor(t) else t


def _rows(t: Any) -> tuple[int, int, int]:
    """``(start, stop, total)`` of the rows of dimension 0 that this process holds."""
    if not is_dtensor(t):
        return 0, t.shape[0], t.shape[0]
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(not isinstance(p, (Shard, Replicate)) or (isinstance(p, Shard) and p.dim != 0) for p in t.placements):
        raise ValueError(f"adapter weights sharded as {t.placements} are not supported: shard dimension 0 "
                         "(fully_shard's default) or replicate")
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return offset[0], offset[0] + shape[0], t.shape[0]


def parts_of(weights: Mapping[str, Triplet]) -> dict[str, Part] | None:
    """Which rows of each module this process holds; None when it holds every module whole."""
    parts = {}
    for name, (A, E, B) in weights.items():
        a, e, b = _rows(A), _rows(E), _rows(B)
        if a != e:
            raise ValueError(f"module {name!r}: lora_A holds rows {a[:2]} but lora_E {e[:2]}; shard both alike")
        parts[name] = Part(a[2], (a[0], a[1]), b[2])
    whole = all(p.rows == (0, p.rank) and (w.B.shape[0] == p.out_total and not is_dtensor(w.B))
                for p, w in zip(parts.values(), weights.values()))
    return None if whole else parts


def mesh_group(weights: Mapping[str, Triplet]) -> Any:
    """The process group of the DTensors' (one-dimensional) mesh, or None for plain tensors."""
    for trip in weights.values():
        for t in trip:
            if is_dtensor(t):
                mesh = t.device_mesh  # type: ignore[attr-defined]
                if mesh.ndim != 1:
                    raise ValueError(f"adapter weights on a {mesh.ndim}-d device mesh are not supported (HSDP); "
                                     "use a 1-d mesh")
                return mesh.get_group()
    return None


def score_reduce(group: Any, sharded: bool) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The all-reduce that makes every process's score parts agree; None on a single process."""
    if group is None or dist.get_world_size(group) == 1:
        return None
    n = dist.get_world_size(group)

    def reduce(parts: torch.Tensor) -> torch.Tensor:
        out = parts.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)  # gloo has no AVG
        return out if sharded else out / n

    return reduce


def check_agreement(keep: torch.Tensor, group: Any) -> None:
    """Raise if the processes of ``group`` hold different masks (one all-gather of a checksum)."""
    if group is None or dist.get_world_size(group) == 1:
        return
    weights = torch.arange(1, keep.numel() + 1, device=keep.device, dtype=torch.float64)
    digest = torch.stack([keep.to(torch.float64).sum(), (keep.to(torch.float64) * weights).sum()])
    gathered = [torch.empty_like(digest) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, digest, group=group)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("the rank pattern differs between processes: "
                           f"{[tuple(g.tolist()) for g in gathered]} (kept count, checksum) per process")


def like(local_t: torch.Tensor, param: Any) -> Any:
    """``local_t`` as a DTensor sharded as ``param`` is, so distributed checkpoints place it right."""
    if not is_dtensor(param):
        return local_t
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_t, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())
