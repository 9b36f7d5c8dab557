"""AdaLoRA with transformers' Trainer on a tiny GPT-2 built from a config (offline, CPU, seconds).

    python examples/train_trainer.py [--steps 24] [--out /tmp/adalora-trainer]

``AdaLoraTrainer`` is ``Trainer`` plus two things: an ``AdaLoraCallback`` that
runs the rank allocator once per optimizer step (in ``on_optimizer_step``,
while the gradients are still there; gradient-accumulation aware), and a
``compute_loss`` that adds ``model.orth_loss()`` to the training loss only.
With a plain ``Trainer``, pass ``callbacks=[AdaLoraCallback(model)]`` and add
the regulariser yourself (see ``add_orth_loss``).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from adalora_core.backends.torch_nn import AdaLoraCallback, AdaLoraModel, AdaLoraTrainer
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
from transformers.utils import logging as hf_logging

import adalora_core as ac


class Copies(torch.utils.data.Dataset):
    """Sequences that repeat a random prefix: learnable by a 2-layer model in a few steps."""

    def __init__(self, n: int, length: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        half = torch.randint(0, vocab, (n, length // 2), generator=g)
        self.ids = torch.cat([half, half], dim=1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps (= total_step)")
    parser.add_argument("--accum", type=int, default=2, help="gradient accumulation steps")
    parser.add_argument("--out", default=None, help="output directory (default: a temp dir)")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    t0 = time.perf_counter()

    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))
    config = ac.AdaLoraConfig(target_modules=["c_attn", "c_proj", "c_fc"], init_r=6, target_r=3,
                              tinit=2, tfinal=4, deltaT=2, total_step=args.steps, lora_alpha=16)
    model = ac.get_adalora_model(base, config)
    model.print_trainable_parameters()

    out = args.out or tempfile.mkdtemp(prefix="adalora-trainer-")
    training_args = TrainingArguments(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=args.accum, learning_rate=5e-3, logging_steps=args.steps // 4 or 1,
        save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = AdaLoraTrainer(model=model, args=training_args, train_dataset=Copies(512, 16, 64))
    result = trainer.train()
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, AdaLoraCallback))
    print(f"train loss (with the regulariser) {result.training_loss:.4f}; allocator calls {callback.calls}")
    print("ranks kept per module:", model.current_ranks())

    model.save_pretrained(f"{out}/adapter")
    reloaded = AdaLoraModel.from_pretrained(
        GPT2LMHeadModel(base.config), f"{out}/adapter")  # a fresh base: only the adapter is reloaded here
    print(f"saved and reloaded {out}/adapter ({len(reloaded.current_ranks())} modules); "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
