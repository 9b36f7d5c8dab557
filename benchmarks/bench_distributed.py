"""AdaLoRA under torchrun: step time per rank and mask agreement, for DDP, FSDP2 or one process.

    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py --mode ddp    # NCCL on GPUs, gloo on CPUs
    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py --mode fsdp
    python benchmarks/bench_distributed.py --mode single                      # the one-GPU reference

The model is bench_gpu_step's Llama-shaped stack (``--blocks`` of it), bf16 base, float32 adapters,
every step a masking step; each rank trains on its own batch. After the run every rank's rank
pattern is gathered and compared (``verify_masks=True`` also checks it after each mask step), and
rank 0 prints the median step time of every rank.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import bench_gpu_step as B
import torch
import torch.distributed as dist

import adalora_core as ac


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["ddp", "fsdp", "single"], required=True)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny shapes: checks the script end to end")
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    if a.mode != "single":
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if a.mode != "single" else 0
    world = dist.get_world_size() if a.mode != "single" else 1
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    s = B.QUICK if a.quick else B.Shape(4096, 11008, a.blocks, 1, 512)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = ac.get_adalora_model(B.build_base(s, device, dtype), ac.AdaLoraConfig(**B.adalora_cfg()),
                                 verify_masks=True)
    call = model
    if a.mode == "ddp":
        call = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    elif a.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for blk in model.model.blocks:
            fully_shard(blk)
        fully_shard(model)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    g = torch.Generator(device=device).manual_seed(100 + rank)
    x = torch.randn(s.batch, s.seq, s.d, generator=g, device=device).to(dtype)
    y = torch.randn(s.batch, s.seq, s.d, generator=g, device=device)
    times = []
    for step in range(a.warmup + a.steps):
        B.sync(device)
        t0 = time.perf_counter()
        loss = call(x, labels=y).loss + model.orth_loss()
        loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        B.sync(device)
        if step >= a.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    pattern = model.rank_pattern
    med = statistics.median(times)
    if world > 1:
        got: list = [None] * world
        dist.all_gather_object(got, (med, pattern))
        agree = all(g[1] == got[0][1] for g in got)
        meds = [g[0] for g in got]
    else:
        agree, meds = True, [med]
    if rank == 0:
        kept = sum(sum(v) for v in pattern.values())
        print(f"{a.mode}: {world} process(es) on {device.type} ({torch.cuda.get_device_name(device) if cuda else 'cpu'}), "
              f"torch {torch.__version__}; {s.blocks} blocks d {s.d}, {len(pattern)} adapted modules; "
              f"median step ms per rank: {', '.join(f'{m:.1f}' for m in meds)}; "
              f"rank patterns agree: {agree}; triplets kept: {kept}")
    if world > 1:
        dist.destroy_process_group()
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
