"""Training-step and allocator time: our torch integration against PEFT's AdaLoRA, same model, same config, CPU.

    python benchmarks/bench_torch_vs_peft.py [--model llama|gpt2] [--hidden 256] [--layers 4]
                                             [--seq 64] [--batch 4] [--steps 30] [--threads N]

Both implementations wrap deep copies of one base model (built from a config,
no download) after the same seed; they are checked to agree bit for bit on
the first steps before anything is timed. Measured, each as the median over
``--steps`` timed steps (after warm-up), the two implementations interleaved
step by step so drift hits both alike:

* **train step**: forward, loss + orthogonal regulariser, backward,
  ``AdamW.step()``, ``update_and_allocate(step)``, ``zero_grad()``; every
  step is a masking step (``deltaT=1``, budgeting phase), the allocator's
  most expensive case;
* **allocator**: ``update_and_allocate(step)`` alone, on fixed gradients;
* **forward**: inference forward under ``no_grad`` (ours also on its default path; ``ours`` is ``exact_peft=True``).

Prints a markdown table (CPU, date, versions) ready for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import time
import warnings
from typing import Any

import torch
from machine import cpu_name


def build(kind: str, hidden: int, layers: int) -> tuple[torch.nn.Module, list[str]]:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                             num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                             num_key_value_heads=max(1, hidden // 128), vocab_size=1024,
                                             max_position_embeddings=512))
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(n_embd=hidden, n_layer=layers, n_head=max(1, hidden // 64),
                                           vocab_size=1024, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0,
                                           attn_pdrop=0.0))
        targets = ["c_attn", "c_proj", "c_fc"]
    return model.train(), targets


class Runner:
    """One implementation: its model, optimizer and a training step."""

    def __init__(self, impl: str, base: torch.nn.Module, cfg: dict[str, Any], exact: bool = True) -> None:
        self.impl = impl
        model = copy.deepcopy(base)
        torch.manual_seed(1)
        if impl == "peft":
            import peft

            self.model = peft.get_peft_model(model, peft.AdaLoraConfig(task_type="CAUSAL_LM", **cfg))
            self.params = [p for p in self.model.parameters() if p.requires_grad]
            self.update = self.model.base_model.update_and_allocate
        else:
            import adalora_core as ac

            self.model = ac.get_adalora_model(model, ac.AdaLoraConfig(**cfg), exact_peft=exact)
            self.params = self.model.trainable_parameters()
            self.update = self.model.update_and_allocate
        self.opt = torch.optim.AdamW(self.params, lr=1e-3)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        if self.impl == "peft":
            return self.model(input_ids=ids, labels=ids).loss  # the regulariser is added inside
        return self.model(input_ids=ids, labels=ids).loss + self.model.orth_loss()

    def train_step(self, step: int, ids: torch.Tensor) -> float:
        t0 = time.perf_counter()
        loss = self.loss(ids)
        loss.backward()
        self.opt.step()
        self.update(step)
        self.opt.zero_grad()
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["llama", "gpt2"], default="llama")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--init-r", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    import peft
    import transformers

    base, targets = build(args.model, args.hidden, args.layers)
    total = 10 * (args.warmup + args.steps) + 10
    cfg = {"target_modules": targets, "init_r": args.init_r, "target_r": args.init_r // 2, "tinit": 0, "tfinal": 0,
               "deltaT": 1, "total_step": total, "lora_alpha": 16}
    runners = {"peft": Runner("peft", base, cfg), "ours": Runner("ours", base, cfg),
               "ours (default)": Runner("ours", base, cfg, exact=False)}
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 1024, (args.batch, args.seq), generator=g) for _ in range(4)]

    # agreement first: the exact paths must be bit-identical on the first steps
    for step in range(3):
        for r in (runners["peft"], runners["ours"]):
            r.train_step(step, batches[step % 4])
    same = all(torch.equal(a, b) for a, b in zip(runners["peft"].params, runners["ours"].params))
    runners["ours (default)"].train_step(0, batches[0])  # keep its step count in line
    for step in (1, 2):
        runners["ours (default)"].train_step(step, batches[step % 4])

    times: dict[str, dict[str, list[float]]] = {k: {"train": [], "alloc": [], "forward": []} for k in runners}
    step = 3
    for i in range(args.warmup + args.steps):
        for name, r in runners.items():
            t = r.train_step(step, batches[step % 4])
            if i >= args.warmup:
                times[name]["train"].append(t)
        step += 1
    # allocator alone: keep one set of gradients and call it on successive steps
    for r in runners.values():
        r.loss(batches[0]).backward()
    for i in range(args.warmup + args.steps):
        for name, r in runners.items():
            t0 = time.perf_counter()
            r.update(step)
            if i >= args.warmup:
                times[name]["alloc"].append(time.perf_counter() - t0)
        step += 1
    for r in runners.values():
        r.opt.zero_grad()
        r.model.eval()
    with torch.no_grad():
        for i in range(args.warmup + args.steps):
            for name, r in runners.items():
                t0 = time.perf_counter()
                r.model(input_ids=batches[i % 4])
                if i >= args.warmup:
                    times[name]["forward"].append(time.perf_counter() - t0)

    med = {k: {m: statistics.median(v) * 1e3 for m, v in d.items()} for k, d in times.items()}
    n_modules = len(runners["ours"].model.svd_layers())
    print(f"### AdaLoRA torch integration vs PEFT ({args.model}, CPU)\n")
    print(f"- CPU: {cpu_name()}, torch threads: {torch.get_num_threads()}")
    print(f"- date: {datetime.date.today().isoformat()}; torch {torch.__version__}, peft {peft.__version__}, "
          f"transformers {transformers.__version__}, Python {platform.python_version()}")
    print(f"- model: {args.model}, hidden {args.hidden}, {args.layers} layers, {n_modules} adapted modules, "
          f"init_r {args.init_r}, batch {args.batch} x {args.seq} tokens; every step a masking step")
    print(f"- median of {args.steps} timed steps after {args.warmup} warm-up, implementations interleaved")
    print(f"- exact path bit-identical to PEFT on the checked steps: {'yes' if same else 'NO'}\n")
    print("| measurement | PEFT (ms) | ours exact_peft (ms) | ours / PEFT | ours default (ms) |")
    print("|---|---:|---:|---:|---:|")
    labels = {"train": "train step (fwd+bwd+AdamW+allocator)", "alloc": "update_and_allocate alone",
              "forward": "inference forward (no_grad)"}
    for m, label in labels.items():
        p, o, f = med["peft"][m], med["ours"][m], med["ours (default)"][m]
        print(f"| {label} | {p:.3f} | {o:.3f} | {o / p:.2f} | {f:.3f} |")


if __name__ == "__main__":
    main()
