"""AdaLoRA with torch.distributed: DDP or FSDP2, one process per GPU (or per CPU core with gloo).

    torchrun --standalone --nproc_per_node 2 examples/train_distributed.py --mode ddp
    torchrun --standalone --nproc_per_node 2 examples/train_distributed.py --mode fsdp --resume-at 20

Each rank trains on its own data; the allocator all-reduces the triplet scores before every
mask, so every rank keeps the same triplets. ``--resume-at N`` saves a distributed checkpoint
(``torch.distributed.checkpoint``) of ``model.state_dict()`` at step N, rebuilds the model,
loads it and finishes the run: the allocator's state travels in the state dict.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import fully_shard

import adalora_core as ac

STEPS = 40


def build(mode: str, device: torch.device) -> tuple[nn.Module, ac.AdaLoraModel]:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)).to(device)
    cfg = ac.AdaLoraConfig(target_modules=["0", "2", "4"], init_r=8, target_r=4, tinit=5, tfinal=10, deltaT=5,
                           total_step=STEPS)
    model = ac.get_adalora_model(base, cfg, verify_masks=True)
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model), model
    for i in (0, 2, 4):
        fully_shard(model.model[i])
    fully_shard(model)
    return model, model


def train(call: nn.Module, model: ac.AdaLoraModel, steps: range, rank: int, device: torch.device) -> float:
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.05)  # stateless, so a resume needs nothing else
    loss = torch.zeros(())
    for step in steps:
        g = torch.Generator(device=device).manual_seed(1000 * step + rank)  # each rank its own data
        x = torch.randn(16, 32, generator=g, device=device)
        loss = call(x).pow(2).mean() + model.orth_loss()
        loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
    return float(loss.detach())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--resume-at", type=int, default=None)
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if cuda else "cpu")
    call, model = build(a.mode, device)
    if a.resume_at is None:
        loss = train(call, model, range(STEPS), rank, device)
    else:
        train(call, model, range(a.resume_at), rank, device)
        path = os.path.join(tempfile.gettempdir(), f"adalora-dcp-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}")
        dcp.save(model.state_dict(), checkpoint_id=path)
        call, model = build(a.mode, device)  # a fresh model, as after a restart
        state = model.state_dict()
        dcp.load(state, checkpoint_id=path)
        model.load_state_dict(state)
        loss = train(call, model, range(a.resume_at, STEPS), rank, device)
    out = os.path.join(tempfile.gettempdir(), "adapter-distributed")
    model.save_pretrained(out)  # every rank calls it (shards are gathered); rank 0 writes
    if rank == 0:
        print(f"{a.mode}: loss {loss:.4f}, ranks {model.current_ranks()}, adapter in {out}")
    dist.barrier()  # no rank tears the group down while another still writes or prints
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
