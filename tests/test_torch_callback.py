"""transformers Trainer integration: the allocator per optimizer step with gradients present, orth in training only."""

from __future__ import annotations

import types

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from adalora_core.backends.torch_nn import AdaLoraCallback, AdaLoraTrainer, add_orth_loss
from adalora_core.backends.torch_nn import _parity as P

import adalora_core as ac

STEPS = 8
CFG = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "total_step": STEPS, "lora_alpha": 8,
           "target_modules": ["c_attn", "c_proj"]}


pytestmark = pytest.mark.usefixtures("torch_one_thread", "quiet")


class Ids(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, P.VOCAB, (n, 8), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def args(tmp_path, **kw):
    base = {"output_dir": str(tmp_path), "max_steps": STEPS, "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 2, "learning_rate": 1e-2, "save_strategy": "no", "report_to": [],
                "use_cpu": True, "disable_tqdm": True, "logging_strategy": "no", "dataloader_num_workers": 0, "seed": 0}
    return transformers.TrainingArguments(**{**base, **kw})


def model(adapter_name="default", **overrides):
    torch.manual_seed(1)
    return ac.get_adalora_model(P.build("gpt2"), ac.AdaLoraConfig(**{**CFG, **overrides}), adapter_name)


class Spy(transformers.TrainerCallback):
    """Records whether adapter gradients exist at each hook."""

    def __init__(self, om):
        self.om, self.events = om, []

    def _grads(self):
        return all(p.grad is not None for p in self.om.trainable_parameters())

    def on_optimizer_step(self, args, state, control, **kw):
        self.events.append(("optimizer_step", state.global_step, self._grads()))

    def on_step_end(self, args, state, control, **kw):
        self.events.append(("step_end", state.global_step, self._grads()))


def test_allocator_runs_once_per_optimizer_step_with_gradients(tmp_path):
    om = model()
    calls = []
    real = om.update_and_allocate

    def spy_update(step):
        calls.append((step, all(p.grad is not None for p in om.trainable_parameters())))
        real(step)

    om.update_and_allocate = spy_update
    spy = Spy(om)
    trainer = AdaLoraTrainer(model=om, args=args(tmp_path), train_dataset=Ids(), callbacks=[spy])
    trainer.train()
    assert calls == [(s, True) for s in range(STEPS)]  # 0-based optimizer steps, not micro-batches
    # why on_optimizer_step: by on_step_end Trainer has zeroed the gradients
    assert [e for e in spy.events if e[0] == "optimizer_step"] == [("optimizer_step", s, True) for s in range(STEPS)]
    assert [e for e in spy.events if e[0] == "step_end"] == [("step_end", s + 1, False) for s in range(STEPS)]
    assert om.allocator.finalized
    assert sum(om.current_ranks().values()) == CFG["target_r"] * len(om.current_ranks())


def test_9_peft_with_trainer_never_allocates(tmp_path):
    """Defect 9: PEFT has no Trainer hook, so a plain Trainer never calls its allocator."""
    peft = pytest.importorskip("peft")
    pm = P.peft(P.build("gpt2"), task_type="CAUSAL_LM", **CFG)
    transformers.Trainer(model=pm, args=args(tmp_path), train_dataset=Ids()).train()
    assert pm.peft_config["default"].rank_pattern is None  # never pruned
    om = model()
    AdaLoraTrainer(model=om, args=args(tmp_path), train_dataset=Ids()).train()
    assert om.allocator.finalized and om.rank_pattern
    del peft


def test_skipped_optimizer_steps_are_not_allocated():
    om = model()
    cb = AdaLoraCallback(om)
    state = types.SimpleNamespace(global_step=0, max_steps=STEPS)
    cb.on_optimizer_step(None, state, None, optimizer=types.SimpleNamespace(step_was_skipped=True))
    assert (cb.calls, cb.skipped) == (0, 1)
    assert om.allocator.last_step is None


def test_total_step_too_small_for_the_run(tmp_path):
    om = model()
    with pytest.raises(ValueError, match="total_step"):
        AdaLoraTrainer(model=om, args=args(tmp_path, max_steps=STEPS + 5), train_dataset=Ids()).train()


def test_orth_loss_in_training_only(tmp_path):
    om = model(init_lora_weights=False)
    trainer = AdaLoraTrainer(model=om, args=args(tmp_path), train_dataset=Ids())
    batch = {k: v.unsqueeze(0) for k, v in Ids()[0].items()}
    om.train()
    torch.manual_seed(0)
    plain = om(**batch).loss
    torch.manual_seed(0)
    with_reg = trainer.compute_loss(om, batch)
    assert torch.equal(with_reg, plain + om.orth_loss())
    om.eval()
    with torch.no_grad():
        assert torch.equal(trainer.compute_loss(om, batch), om(**batch).loss)
    om.train()
    with torch.no_grad():  # training mode but no autograd (e.g. a metric pass): no regulariser either
        torch.manual_seed(0)
        got = trainer.compute_loss(om, batch)
        torch.manual_seed(0)
        assert torch.equal(got, om(**batch).loss)


def test_orth_counts_once_per_optimizer_step_under_accumulation():
    om = model(init_lora_weights=False)
    loss = torch.tensor(1.0)
    orth = om.orth_loss()
    scaled = types.SimpleNamespace(loss_is_scaled_for_ga=True, current_gradient_accumulation_steps=4)
    assert torch.allclose(add_orth_loss(scaled, om, loss), loss + orth / 4)  # Trainer will not divide
    unscaled = types.SimpleNamespace(loss_is_scaled_for_ga=False, current_gradient_accumulation_steps=4)
    assert torch.equal(add_orth_loss(unscaled, om, loss), loss + orth)  # Trainer divides the sum by 4


@pytest.mark.parametrize("extras", [{}, {"bias": "lora_only", "modules_to_save": ["ln_f"], "adapter_name": "mine"}])
def test_trainer_checkpoint_resume_is_exact(tmp_path, extras):
    kw = {"save_strategy": "steps", "save_steps": 4, "gradient_accumulation_steps": 1}
    full = model(**extras)
    AdaLoraTrainer(model=full, args=args(tmp_path / "a", **kw), train_dataset=Ids()).train()
    first = model(**extras)
    AdaLoraTrainer(model=first, args=args(tmp_path / "b", **kw), train_dataset=Ids()).train()
    ckpt = tmp_path / "b" / "checkpoint-4"
    saved = ckpt / extras.get("adapter_name", "")  # PEFT's layout: an adapter not named "default" in its subdirectory
    assert (saved / "adapter_model.safetensors").exists() and (ckpt / AdaLoraTrainer.TRAINING_STATE_NAME).exists()
    resumed = model(**extras)
    assert len(resumed.trainable_parameters()) == len(full.trainable_parameters())
    AdaLoraTrainer(model=resumed, args=args(tmp_path / "c", **kw), train_dataset=Ids()).train(
        resume_from_checkpoint=str(ckpt))
    for a, b in zip(full.trainable_parameters(), resumed.trainable_parameters()):
        assert torch.equal(a, b)
    assert full.rank_pattern == resumed.rank_pattern


def test_save_model_keeps_the_runs_checkpoints(tmp_path):
    """``trainer.save_model()`` into output_dir writes the adapter beside checkpoint-*/, never over them."""
    kw = {"save_strategy": "steps", "save_steps": 2, "gradient_accumulation_steps": 1}
    trainer = AdaLoraTrainer(model=model(), args=args(tmp_path, **kw), train_dataset=Ids())
    trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (2, 4, 6, 8)]
    before = {p: p.read_bytes() for p in tmp_path.glob("checkpoint-*/**/*") if p.is_file()}
    trainer.save_model()
    assert {p: p.read_bytes() for p in tmp_path.glob("checkpoint-*/**/*") if p.is_file()} == before
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "adapter_config.json").exists()
