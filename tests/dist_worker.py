"""One process of the 2-process gloo runs in test_distributed.py (and docs/distributed.md's example).

``python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py SCENARIO OUT_DIR`` (or
the tests' spawn, which runs every scenario in one pair of processes) trains a tiny MLP with AdaLoRA for 24 steps (warm-up, budgeting, the final
allocation) on different data per rank and writes what each rank ends with to
``OUT_DIR/<scenario>.<rank>.pt``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

import torch
import torch.distributed as dist

import adalora_core as ac

STEPS, RESUME_AT = 24, 10
CFG = ac.AdaLoraConfig(total_step=STEPS, init_r=5, target_r=2, tinit=2, tfinal=4, deltaT=2,
                       target_modules=["0", "2", "4"], orth_reg_weight=0.1)


def _base() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 24), torch.nn.ReLU(),
                               torch.nn.Linear(24, 8))


def _batch(step: int, rank: int, micro: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    return torch.randn(6, 16, generator=g) * (1 + rank)  # each rank sees different data


def _model(scenario: str) -> tuple[Any, Any]:
    """(the module to call, the AdaLoraModel) for one scenario's wrapping."""
    model = ac.get_adalora_model(_base(), CFG, verify_masks=True)
    if scenario.startswith("ddp"):
        return torch.nn.parallel.DistributedDataParallel(model), model
    if scenario.startswith("fsdp"):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if "bf16" in scenario else MixedPrecisionPolicy()
        reshard = "noreshard" not in scenario
        for i in (0, 2, 4):
            fully_shard(model.model[i], reshard_after_forward=reshard, mp_policy=mp)
        fully_shard(model, reshard_after_forward=reshard, mp_policy=mp)
    return model, model


def _train(call: Any, model: Any, opt: Any, steps: range, rank: int, scenario: str) -> None:
    for step in steps:
        if "nosync" in scenario:  # gradient accumulation: the first micro-batch's backward does not sync
            with call.no_sync():
                (call(_batch(step, rank, 1)).float().pow(2).mean() / 2).backward()
        loss = call(_batch(step, rank)).float().pow(2).mean() + model.orth_loss()
        (loss / 2 if "nosync" in scenario else loss).backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()


def _result(model: Any) -> dict[str, Any]:
    from adalora_core.backends.torch_nn.distributed import full

    weights = {k: full(v.detach()).clone() for k, v in model.named_parameters() if "lora_" in k}
    state = {k: full(v).clone() for k, v in model.state_dict().items() if k.startswith("allocator.")}
    return {"weights": weights, "state": state, "pattern": model.rank_pattern}


def run(scenario: str, out: str) -> None:
    rank = dist.get_rank()
    call, model = _model(scenario)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.05)  # stateless: a resume needs no optimizer state
    if scenario.endswith("resume"):
        _train(call, model, opt, range(RESUME_AT), rank, scenario)
        _resume(scenario, model, out)
        call, model = _model(scenario)
        _load(scenario, model, out)
        opt = torch.optim.SGD(model.trainable_parameters(), lr=0.05)
        _train(call, model, opt, range(RESUME_AT, STEPS), rank, scenario)
    else:
        _train(call, model, opt, range(STEPS), rank, scenario)
    torch.save(_result(model), os.path.join(out, f"{scenario}.{rank}.pt"))
    if scenario == "ddp" and rank == 0 or scenario == "fsdp":
        model.save_pretrained(os.path.join(out, f"{scenario}-adapter"))  # every rank calls it; rank 0 writes


def _resume(scenario: str, model: Any, out: str) -> None:
    if scenario.startswith("fsdp"):
        import torch.distributed.checkpoint as dcp

        dcp.save(model.state_dict(), checkpoint_id=os.path.join(out, "dcp"))
    elif dist.get_rank() == 0:
        torch.save(model.state_dict(), os.path.join(out, "model.pt"))
    dist.barrier()


def _load(scenario: str, model: Any, out: str) -> None:
    if scenario.startswith("fsdp"):
        import torch.distributed.checkpoint as dcp

        sd = model.state_dict()
        dcp.load(sd, checkpoint_id=os.path.join(out, "dcp"))
        model.load_state_dict(sd)
    else:
        model.load_state_dict(torch.load(os.path.join(out, "model.pt")))


def main(rank: int, world: int, port: int, scenarios: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for scenario in scenarios:
            run(scenario, out)
        dist.barrier()  # no rank tears the group down while another still writes
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # under torchrun
    dist.init_process_group("gloo")
    try:
        run(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp())
    finally:
        dist.destroy_process_group()
