"""AdaLoRA in a plain PyTorch loop on a tiny Llama-style model built from a config (offline, CPU).

    python examples/train_torch.py [--steps 60]

The loop is PEFT's documented order: forward, ``loss + model.orth_loss()``,
backward, ``optimizer.step()``, ``model.update_and_allocate(step)``,
``zero_grad()``. Halfway through it saves the full training state (adapter
weights and the allocator's EMAs and masks) and the optimizer state, resumes
a second model from them, and checks that both finish bit-identical: PEFT
cannot do that (its allocator state is not saved). At the end it prints the
rank budget per step and the ranks kept per module, saves the adapter in
PEFT's layout and reloads it.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import adalora_core as ac


def batches(steps: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    """Four fixed batches, cycled: the adapters can fit them within the run."""
    g = torch.Generator().manual_seed(seed)
    fixed = torch.randint(0, vocab, (4, 8, 16), generator=g)
    return [fixed[i % 4] for i in range(steps)]


def train(model, opt, data, start: int, stop: int, log: bool = False) -> list[int]:
    budgets = []
    for step in range(start, stop):
        ids = data[step]
        out = model(input_ids=ids, labels=ids)
        loss = out.loss + model.orth_loss()  # the regulariser is explicit
        loss.backward()
        opt.step()
        model.update_and_allocate(step)  # after opt.step(), before zero_grad()
        opt.zero_grad()
        budgets.append(sum(model.current_ranks().values()))
        if log and (step % max(1, stop // 6) == 0 or step == stop - 1):
            print(f"step {step:3d}  loss {out.loss.item():.4f}  orth {model.orth_loss().item():.4f}  "
                  f"budget {budgets[-1]}")
    return budgets


def make(base, config):
    torch.manual_seed(1)
    model = ac.get_adalora_model(copy.deepcopy(base), config)
    return model, torch.optim.AdamW(model.trainable_parameters(), lr=3e-2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                        max_position_embeddings=32))
    config = ac.AdaLoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                              init_r=6, target_r=2, tinit=args.steps // 12, tfinal=args.steps // 6, deltaT=2,
                              total_step=args.steps,
                              lora_alpha=16, orth_reg_weight=0.1)
    data = batches(args.steps + 1, 64)
    tmp = tempfile.mkdtemp(prefix="adalora-torch-")
    half = args.steps // 2

    model, opt = make(base, config)
    budgets = train(model, opt, data, 0, args.steps + 1, log=True)

    first, opt1 = make(base, config)  # the same run, interrupted and resumed
    train(first, opt1, data, 0, half)
    first.save_training_state(os.path.join(tmp, "state.safetensors"))
    torch.save(opt1.state_dict(), os.path.join(tmp, "optimizer.pt"))
    second, opt2 = make(base, config)
    second.load_training_state(os.path.join(tmp, "state.safetensors"))
    opt2.load_state_dict(torch.load(os.path.join(tmp, "optimizer.pt")))
    train(second, opt2, data, half, args.steps + 1)
    same = all(torch.equal(a, b) for a, b in zip(model.trainable_parameters(), second.trainable_parameters()))
    print(f"resumed at step {half}: final adapter bit-identical to the uninterrupted run: {same}")

    print("budget per step:", budgets)
    print("ranks kept per module:", model.current_ranks())
    model.save_pretrained(os.path.join(tmp, "adapter"))
    fresh = copy.deepcopy(base)
    reloaded = ac.AdaLoraModel.from_pretrained(fresh, os.path.join(tmp, "adapter"))
    model.eval()
    with torch.no_grad():
        diff = (reloaded(input_ids=data[0]).logits - model(input_ids=data[0]).logits).abs().max().item()
    print(f"adapter saved to {tmp}/adapter and reloaded; max |logits difference| {diff:.3g}")
    print(f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
