"""AdaLoRA at the cost of LoRA? One training step and its parts: PEFT LoRA, PEFT AdaLoRA, adalora-core.

    python benchmarks/bench_gpu_step.py                          # both shapes on cuda, the full table
    python benchmarks/bench_gpu_step.py --blocks 8 --reps 9      # scaled down when memory or time is short
    python benchmarks/bench_gpu_step.py --quick --device cpu     # a tiny run of the whole script, anywhere

Shapes (synthetic stacks, every linear adapted, bf16 base, fp32 adapters,
rank 12, AdamW):

* ``llama7b``: 32 blocks of q, k, v, o (4096 x 4096), gate, up (4096 ->
  11008), down (11008 -> 4096): 224 modules; 1 x 512 tokens;
* ``bert``: 12 blocks of the same seven linears at d 768, ffn 3072: 84
  modules; 8 x 512 tokens.

AdaLoRA runs with ``tinit=0, deltaT=1``: every timed step is a masking step
of the budgeting phase, the allocator's most expensive case. Each part is
timed alone, with a device synchronisation before and after, median of
``--reps``:

* ``fwd+bwd+AdamW``: forward, loss, backward, ``AdamW.step``, ``zero_grad``
  (no regulariser, no allocator);
* ``regulariser``: the orthogonal regulariser's forward and backward alone
  (PEFT's, as its tuner's forward computes it, around a stub model);
* ``update_and_allocate``: one allocator step on fixed gradients;
* ``full step``: all of it, as a training loop runs it.

``syncs/step`` counts the host-device synchronisations of one full step
(``torch.cuda.set_sync_debug_mode``); ``peak GiB`` is the peak allocated
over the full steps (weights, optimizer state, activations). Before timing,
a check on two blocks of each shape reports whether ``exact_peft=True``
matches PEFT's AdaLoRA bit for bit on this device, and the default path's
error against it. The table is markdown, ready for benchmarks/RESULTS.md
(``--json FILE`` writes the figures too).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import subprocess
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from machine import cpu_name
from torch import nn

TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]
RANK = 12
IMPLS = ("lora", "peft_adalora", "ours", "ours_exact")
LABELS = {"lora": f"PEFT LoRA r={RANK}", "peft_adalora": "PEFT AdaLoRA", "ours": "adalora-core",
          "ours_exact": "adalora-core exact_peft"}


@dataclass(frozen=True)
class Shape:
    d: int
    ffn: int
    blocks: int
    batch: int
    seq: int


SHAPES = {"llama7b": Shape(4096, 11008, 32, 1, 512), "bert": Shape(768, 3072, 12, 8, 512)}
QUICK = Shape(64, 96, 2, 1, 16)


class Block(nn.Module):
    """Seven bias-free linears mixed by cheap elementwise ops (no attention: the adapters are what is measured)."""

    def __init__(self, s: Shape, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        def linear(n_in: int, n_out: int) -> nn.Linear:
            return nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype)

        self.q, self.k, self.v, self.o = (linear(s.d, s.d) for _ in range(4))
        self.gate, self.up, self.down = linear(s.d, s.ffn), linear(s.d, s.ffn), linear(s.ffn, s.d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.o(torch.nn.functional.silu(self.q(x)) * self.k(x) + self.v(x))
        return x + self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


class Stack(nn.Module):
    """Blocks with a mean-square loss; returns ``.loss`` and ``.logits`` as Hugging Face models do."""

    def __init__(self, s: Shape, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(s, device, dtype) for _ in range(s.blocks))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        for b in self.blocks:
            x = b(x)
        loss = None if labels is None else (x.float() - labels).square().mean()
        return types.SimpleNamespace(loss=loss, logits=x)


def build_base(s: Shape, device: torch.device, dtype: torch.dtype) -> Stack:
    torch.manual_seed(0)
    with torch.no_grad():
        base = Stack(s, device, dtype)
        for p in base.parameters():
            p.mul_(0.5)  # keep activations of a deep stack in range
    return base.train()


def batch(s: Shape, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(s.batch, s.seq, s.d, generator=g, device=device).to(dtype)
    return {"x": x, "labels": torch.randn(s.batch, s.seq, s.d, generator=g, device=device)}


def adalora_cfg() -> dict[str, Any]:
    return {"target_modules": TARGETS, "init_r": RANK, "target_r": RANK * 2 // 3, "tinit": 0, "tfinal": 0,
            "deltaT": 1, "total_step": 1_000_000, "lora_alpha": 16}


class Runner:
    """One implementation around its own model: the parts of a step, each a call."""

    model: Any

    def __init__(self, impl: str, base: Stack, data: dict[str, torch.Tensor]) -> None:
        self.impl, self.data, self.step = impl, data, 0
        torch.manual_seed(1)
        if impl == "lora":
            import peft

            self.model = peft.get_peft_model(base, peft.LoraConfig(target_modules=TARGETS, r=RANK, lora_alpha=16))
            params = [p for p in self.model.parameters() if p.requires_grad]
        elif impl == "peft_adalora":
            import peft

            self.model = peft.get_peft_model(base, peft.AdaLoraConfig(**adalora_cfg()))
            # A, E, B only: with a bf16 base PEFT leaves ranknum trainable, and AdamW would move it
            params = [p for n, p in self.model.named_parameters() if p.requires_grad and ".lora_" in n]
        else:
            import adalora_core as ac

            self.model = ac.get_adalora_model(base, ac.AdaLoraConfig(**adalora_cfg()), exact_peft=impl == "ours_exact")
            params = self.model.trainable_parameters()
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=1e-4)

    @property
    def adalora(self) -> bool:
        return self.impl != "lora"

    def _plain_loss(self) -> torch.Tensor:
        if self.impl == "peft_adalora":  # the inner model: PEFT's tuner forward would add the regulariser
            return self.model.base_model.model(**self.data).loss
        return self.model(**self.data).loss

    def _full_loss(self) -> torch.Tensor:
        if self.impl == "peft_adalora":
            return self.model.base_model(**self.data).loss
        if self.impl == "lora":
            return self.model(**self.data).loss
        return self.model(**self.data).loss + self.model.orth_loss()

    def _allocate(self) -> None:
        (self.model.base_model if self.impl == "peft_adalora" else self.model).update_and_allocate(self.step)
        self.step += 1

    def fwd_bwd_adamw(self) -> None:
        self._plain_loss().backward()
        self.opt.step()
        self.opt.zero_grad()

    def regulariser(self) -> None:
        if self.impl == "peft_adalora":
            self._peft_regulariser().backward()
        else:
            self.model.orth_loss().backward()

    def _peft_regulariser(self) -> torch.Tensor:
        """PEFT's tuner forward around a stub model: what it adds to the loss, and nothing else."""
        tuner: Any = self.model.base_model
        zero = torch.zeros((), device=self.data["x"].device, requires_grad=True)
        tuner.model.forward = lambda **_: types.SimpleNamespace(loss=zero.clone())
        try:
            return tuner(**self.data).loss
        finally:
            del tuner.model.forward

    def full_step(self) -> None:
        self._full_loss().backward()
        self.opt.step()
        if self.adalora:
            self._allocate()
        self.opt.zero_grad()

    def prepare_allocator(self) -> Callable[[], None]:
        """Gradients in place (one backward, kept) and the allocator call to time on them."""
        self.opt.zero_grad()
        self._plain_loss().backward()
        return self._allocate


# ----------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], reps: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of ``fn``, synchronised before and after each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def count_syncs(fn: Callable[[], object], device: torch.device) -> int | None:
    """Host-device synchronisations during ``fn()`` (CUDA's sync debug mode warns at each)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            sync(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def measure(impl: str, s: Shape, device: torch.device, dtype: torch.dtype, reps: int, warmup: int) -> dict[str, Any]:
    """Every part of ``impl``'s step on shape ``s``, its model built fresh and freed afterwards."""
    runner = Runner(impl, build_base(s, device, dtype), batch(s, device, dtype))
    row: dict[str, Any] = {"impl": impl, "modules": s.blocks * len(TARGETS)}
    if runner.adalora:
        row["fwd_bwd_adamw"] = timed(runner.fwd_bwd_adamw, reps, warmup, device)
        runner.opt.zero_grad()
        row["regulariser"] = timed(runner.regulariser, reps, warmup, device)
        row["update_and_allocate"] = timed(runner.prepare_allocator(), reps, warmup, device)
        runner.opt.zero_grad()
    for _ in range(warmup):
        runner.full_step()
    row["syncs"] = count_syncs(runner.full_step, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row["full_step"] = timed(runner.full_step, reps, 0, device)
    row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del runner
    release(device)
    return row


def release(device: torch.device) -> None:
    """Free what the last models held, so that the next one's peak memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check(s: Shape, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """On two blocks of ``s``: ``exact_peft`` against PEFT's AdaLoRA (bit for bit?), the default path's error."""
    small = replace(s, blocks=2)
    data = batch(small, device, dtype)
    runs = {impl: Runner(impl, build_base(small, device, dtype), data) for impl in ("peft_adalora", "ours_exact")}
    losses: dict[str, list[torch.Tensor]] = {impl: [] for impl in runs}
    for _ in range(3):
        for impl, r in runs.items():
            loss = r._full_loss()
            losses[impl].append(loss.detach())
            loss.backward()
            r.opt.step()
            r._allocate()
            r.opt.zero_grad()
    same = all(torch.equal(a, b) for a, b in zip(losses["peft_adalora"], losses["ours_exact"])) and all(
        torch.equal(a, b) for a, b in zip(runs["peft_adalora"].params, runs["ours_exact"].params))
    pair = {impl: Runner(impl, build_base(small, device, dtype), data) for impl in ("ours_exact", "ours")}
    grads, outs = {}, {}
    for impl, r in pair.items():
        out = r.model(**data)
        (out.loss + r.model.orth_loss()).backward()
        outs[impl] = out.logits.detach().float()
        grads[impl] = [p.grad.detach().float() for p in r.params if p.grad is not None]

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))

    result = {"exact_peft_bit_identical_to_peft": same, "fast_logits_rel_err": rel(outs["ours_exact"], outs["ours"]),
              "fast_grads_max_rel_err": max(rel(a, b) for a, b in zip(grads["ours_exact"], grads["ours"]))}
    del runs, pair, grads, outs
    release(device)
    return result


# ------------------------------------------------------------------- report


def environment(device: torch.device) -> dict[str, str]:
    import peft

    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "peft": peft.__version__,
           "python": platform.python_version()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = str(torch.version.cuda)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30, check=True)
            env["driver"] = out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = "unknown"
    else:
        env["cpu"] = cpu_name()
        env["threads"] = str(torch.get_num_threads())
    return env


def _ms(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    lora = next((r["full_step"] for r in rows if r["impl"] == "lora"), None)
    header = ("| impl | fwd+bwd+AdamW | regulariser fwd+bwd | update_and_allocate | full step | x LoRA | "
              "syncs/step | peak GiB |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['full_step'] / lora:.2f}" if lora else ""
        syncs = "" if r["syncs"] is None else str(r["syncs"])
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {LABELS[r['impl']]} | {_ms(r.get('fwd_bwd_adamw'))} | {_ms(r.get('regulariser'))} | "
                     f"{_ms(r.get('update_and_allocate'))} | {_ms(r['full_step'])} | {ratio} | {syncs} | {peak} |")
    return lines


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The goals (full step <= 1.10x LoRA, parts <= 1 ms, ...) against the default path's figures."""
    by = {r["impl"]: r for r in rows}
    if "lora" not in by or "ours" not in by:
        return []
    lora, ours = by["lora"], by["ours"]
    goals = [("full step <= 1.10x LoRA", ours["full_step"], 1.10 * lora["full_step"], "ms"),
             ("fwd+bwd+AdamW <= 1.05x LoRA step", ours["fwd_bwd_adamw"], 1.05 * lora["full_step"], "ms"),
             ("regulariser fwd+bwd <= 1 ms", ours["regulariser"], 1.0, "ms"),
             ("update_and_allocate <= 1 ms", ours["update_and_allocate"], 1.0, "ms")]
    if ours["syncs"] is not None:
        goals.append(("syncs per step == 0", ours["syncs"], 0, ""))
    if ours["peak_gib"] is not None:
        goals.append(("peak memory <= 1.05x LoRA", ours["peak_gib"], 1.05 * lora["peak_gib"], "GiB"))
    return [f"- {name}: {got:.3g}{unit} against {limit:.3g}{unit}: {'met' if got <= limit else 'MISSED'}"
            for name, got, limit, unit in goals]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", default="llama7b,bert", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--impls", default="lora,peft_adalora,ours", help=f"comma-separated, of {list(IMPLS)}")
    parser.add_argument("--blocks", type=int, default=None, help="blocks per shape (default: the shape's own)")
    parser.add_argument("--reps", type=int, default=15, help="timed calls per part (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", help="the base model's dtype (adapters stay float32)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and 3 reps: checks the script end to end")
    parser.add_argument("--no-check", action="store_true", help="skip the exact-path and error check")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available here (try --quick --device cpu)")
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    bad = [s for s in shapes if s not in SHAPES] + [i for i in impls if i not in IMPLS]
    if bad:
        parser.error(f"unknown shapes or impls {bad}; shapes: {sorted(SHAPES)}, impls: {list(IMPLS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    reps, warmup = (3, 1) if args.quick else (args.reps, args.warmup)
    dtype = getattr(torch, args.dtype)
    warnings.filterwarnings("ignore", message=".*(already been|lora_alpha|no effect).*")

    env = environment(device)
    report: dict[str, Any] = {"environment": env, "shapes": {}}
    print("## AdaLoRA training step against LoRA: " + ", ".join(f"{k} {v}" for k, v in env.items()) + "\n")
    for name in shapes:
        s = QUICK if args.quick else SHAPES[name]
        if args.blocks:
            s = replace(s, blocks=args.blocks)
        print(f"### {name}{' (quick)' if args.quick else ''}: {s.blocks} blocks, d {s.d}, ffn {s.ffn}, "
              f"{s.blocks * len(TARGETS)} adapted modules, {s.batch} x {s.seq} tokens, {args.dtype} base, "
              f"rank {RANK}; median of {reps} (ms)\n")
        checked = None if args.no_check else check(s, device, dtype)
        rows = [measure(impl, s, device, dtype, reps, warmup) for impl in impls]
        print("\n".join(table(rows)))
        if checked is not None:
            print(f"\n- check (2 blocks): exact_peft bit-identical to PEFT's AdaLoRA over 3 steps: "
                  f"{'yes' if checked['exact_peft_bit_identical_to_peft'] else 'NO'}; default path against "
                  f"exact_peft: logits {checked['fast_logits_rel_err']:.1e}, gradients "
                  f"{checked['fast_grads_max_rel_err']:.1e} (max relative)")
        goals = targets(rows)
        if goals:
            print("\n" + "\n".join(goals))
        print()
        report["shapes"][name] = {"shape": s.__dict__, "rows": rows, "check": checked}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
