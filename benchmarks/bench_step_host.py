"""Host (Python) time of the per-step library calls: ``update_and_allocate`` and ``orth_loss``, CPU.

    python benchmarks/bench_step_host.py [--layers 32] [--dim 64] [--init-r 12] [--total-step 200]
                                         [--no-peft] [--threads 1]

A stack of ``--layers`` blocks of seven ``--dim`` x ``--dim`` Linear layers
(named as Llama's projections: 224 adapted modules by default), so small that
the arithmetic is negligible and what is timed is the Python around it. The
training loop is the public one::

    loss = model(x).loss + model.orth_loss()
    loss.backward(); opt.step(); model.update_and_allocate(step); opt.zero_grad()

over ``--total-step`` steps (``tinit`` and ``tfinal`` a fifth of them each,
``deltaT`` 10), timing each ``update_and_allocate`` and ``orth_loss`` call.
Printed: the median per call in each phase of the schedule (warm-up,
budgeting on steps that mask and steps that do not, final). With peft
installed (and not ``--no-peft``), PEFT's ``AdaLoraModel`` on a copy of the
same model runs interleaved step by step: its ``update_and_allocate``, and its
regulariser through its forward's loss path (the wrapped model's forward is
skipped there, so only the regulariser PEFT adds to ``loss`` is timed).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from machine import cpu_name
from torch import nn

PHASES = ("warm-up", "budgeting, no mask", "budgeting, mask step", "final")
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        for name in PROJ:
            setattr(self, name, nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A residual sum of the projections: gradients neither vanish nor underflow to subnormals,
        whose arithmetic is many times slower on a CPU and would be timed instead of the host work."""
        return x + sum(getattr(self, name)(x) for name in PROJ) / len(PROJ)


class Stack(nn.Module):
    """Returns an object with a ``loss``, as a transformers model does; ``x=None`` skips the layers."""

    def __init__(self, layers: int, dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(dim) for _ in range(layers))

    def forward(self, x: torch.Tensor | None = None) -> SimpleNamespace:
        if x is None:
            return SimpleNamespace(loss=torch.zeros(()))
        for block in self.layers:
            x = block(x)
        return SimpleNamespace(loss=x.square().mean())


def phase(step: int, tinit: int, final_step: int, deltaT: int) -> str:
    if step <= tinit:
        return PHASES[0]
    if step >= final_step:
        return PHASES[3]
    return PHASES[2] if step % deltaT == 0 else PHASES[1]


class Runner:
    """One implementation's model, optimizer and timed calls."""

    def __init__(self, impl: str, base: nn.Module, cfg: dict[str, Any]) -> None:
        self.impl = impl
        model = copy.deepcopy(base)
        if impl == "peft":
            import peft

            # its AdaLoraModel, whose forward adds the regulariser (PeftModel's would skip it without a task type)
            self.model: Any = peft.get_peft_model(model, peft.AdaLoraConfig(**cfg)).base_model
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.update: Callable[[int], None] = self.model.update_and_allocate
        else:
            import adalora_core as ac

            self.model = ac.get_adalora_model(model, ac.AdaLoraConfig(**cfg))
            params = self.model.trainable_parameters()
            self.update = self.model.update_and_allocate
        self.opt = torch.optim.AdamW(params, lr=1e-3)
        self.times: dict[tuple[str, str], list[float]] = {}

    def orth(self) -> tuple[torch.Tensor, float]:
        """The regulariser and its time: ``orth_loss()``, or PEFT's forward on the skipped model."""
        t0 = time.perf_counter()
        reg = self.model().loss if self.impl == "peft" else self.model.orth_loss()
        return reg, time.perf_counter() - t0

    def step(self, step: int, x: torch.Tensor, label: str | None) -> None:
        """One training step; its calls' times recorded under ``label`` (None: not recorded)."""
        reg, t_orth = self.orth()
        if self.impl == "peft":
            loss = self.model(x).loss  # its forward adds the regulariser
        else:
            loss = self.model(x).loss + reg
        loss.backward()
        self.opt.step()
        t0 = time.perf_counter()
        self.update(step)
        t_update = time.perf_counter() - t0
        self.opt.zero_grad()
        if label is None:
            return
        self.times.setdefault(("update_and_allocate", label), []).append(t_update)
        self.times.setdefault(("orth_loss", label), []).append(t_orth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32, help="blocks of 7 adapted Linear layers")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--init-r", type=int, default=12)
    parser.add_argument("--total-step", type=int, default=200)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of the medians")
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: a busy neighbour stalls a multi-threaded op far more than host work)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    T = args.total_step
    tinit = tfinal = T // 5
    deltaT = 10
    cfg = {"target_modules": list(PROJ), "init_r": args.init_r, "target_r": args.init_r // 2, "tinit": tinit,
           "tfinal": tfinal, "deltaT": deltaT, "total_step": T, "lora_alpha": 16}
    torch.manual_seed(0)
    base = Stack(args.layers, args.dim).train()
    impls = ["ours"]
    if not args.no_peft:
        try:
            import peft
            impls.append("peft")
        except ImportError:
            pass
    runners = {}
    for impl in impls:
        torch.manual_seed(1)
        runners[impl] = Runner(impl, base, cfg)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, args.dim, generator=g) for _ in range(4)]
    final_step = T - tfinal
    for step in range(T + 1):
        label = phase(step, tinit, final_step, deltaT) if step >= args.skip else None
        for r in runners.values():
            r.step(step, xs[step % 4], label)

    n_modules = len(runners["ours"].model.svd_layers())
    print(f"### Host time per call, {n_modules} adapted modules ({args.dim}x{args.dim}, init_r {args.init_r}), CPU\n")
    print(f"- CPU: {cpu_name()}, torch threads: {torch.get_num_threads()}")
    versions = f"torch {torch.__version__}"
    if "peft" in runners:
        import peft

        versions += f", peft {peft.__version__}"
    print(f"- date: {datetime.date.today().isoformat()}; {versions}, Python {platform.python_version()}")
    print(f"- schedule: total_step {T}, tinit {tinit}, tfinal {tfinal}, deltaT {deltaT}; medians per phase "
          f"(first {args.skip} steps left out){'; implementations interleaved step by step' * (len(runners) > 1)}\n")
    head = "| call | phase | steps | ours (ms) |" + (" PEFT (ms) | PEFT / ours |" if "peft" in runners else "")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for key in sorted(runners["ours"].times, key=lambda k: (k[0] != "update_and_allocate", PHASES.index(k[1]))):
        ours = runners["ours"].times[key]
        row = f"| `{key[0]}` | {key[1]} | {len(ours)} | {statistics.median(ours) * 1e3:.3f} |"
        if "peft" in runners:
            theirs = statistics.median(runners["peft"].times[key]) * 1e3
            row += f" {theirs:.3f} | {theirs / (statistics.median(ours) * 1e3):.1f}x |"
        print(row)


if __name__ == "__main__":
    main()
