"""Checkpoints move both ways between PEFT and us, with identical outputs, pruned-to-zero modules included."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from adalora_core.backends.torch_nn import AdaLoraModel
from adalora_core.backends.torch_nn import _parity as P

import adalora_core as ac
from adalora_core.errors import CheckpointError

# init_r 4 -> target 1 on 8 GPT-2 modules: the final allocation leaves some modules at rank 0
CFG = {"init_r": 4, "target_r": 1, "tinit": 2, "tfinal": 4, "deltaT": 2, "total_step": 20, "lora_alpha": 8}


pytestmark = pytest.mark.usefixtures("torch_one_thread", "quiet")


def _train(model, kind, steps=21):
    P.trajectory(model, kind, steps, lr=3e-2)
    return model


def _kept(pattern):
    return {k: sum(v) for k, v in pattern.items()}


def _logits(model, kind, step=123):
    model.eval()
    with torch.no_grad():
        out = model(**P.inputs(kind, step)) if not isinstance(model, peft.PeftModel) else \
            model.base_model.model(**P.inputs(kind, step))
    return out.logits


@pytest.mark.parametrize("kind", ["gpt2", "llama", "conv"])
def test_peft_checkpoint_loads_in_ours(kind, tmp_path):
    base = P.build(kind)
    cfg = P.config_kwargs(kind, **CFG)
    pm = _train(P.peft(base, **cfg), kind)
    pm.save_pretrained(tmp_path)
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    kept = _kept(pattern)
    if kind == "gpt2":
        assert 0 in kept.values(), kept  # a module pruned to rank 0 travels too

    import copy

    torch.manual_seed(3)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    rng_peft = torch.rand(3)
    torch.manual_seed(3)
    ours = AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path, exact_peft=True)
    rng_ours = torch.rand(3)
    assert torch.equal(rng_peft, rng_ours)  # same draws while building and resizing
    assert torch.equal(_logits(ref, kind), _logits(ours, kind))
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    assert ours.rank_pattern == pattern
    assert ours.current_ranks() == {k[: -len(".lora_E")]: v for k, v in kept.items()}
    for path, layer in ours.svd_layers().items():
        assert layer.lora_A["default"].shape[0] == kept[f"{path}.lora_E"]
        assert layer.ranknum["default"].item() == CFG["init_r"]  # ranknum stays init_r


@pytest.mark.parametrize("kind", ["gpt2", "mlp"])
def test_our_checkpoint_loads_in_peft(kind, tmp_path):
    import copy

    base = P.build(kind)
    cfg = P.config_kwargs(kind, **CFG)
    om = _train(P.ours(base, **cfg), kind)
    om.save_pretrained(tmp_path)
    if kind == "gpt2":
        assert 0 in om.current_ranks().values()
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    back = AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path, exact_peft=True)
    assert torch.equal(_logits(ref, kind), _logits(back, kind))
    # and the loaded PEFT model saves a directory that loads back into ours, still identical
    ref.save_pretrained(tmp_path / "again")
    again = AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "again", exact_peft=True)
    assert torch.equal(_logits(back, kind), _logits(again, kind))


def test_resave_of_a_loaded_pruned_adapter_is_stable(tmp_path):
    import copy

    base = P.build("gpt2")
    om = _train(P.ours(base, **P.config_kwargs("gpt2", **CFG)), "gpt2")
    om.save_pretrained(tmp_path / "a")
    loaded = AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text()) == \
        json.loads((tmp_path / "b" / "adapter_config.json").read_text())


def test_continue_training_a_pruned_checkpoint(tmp_path):
    """is_trainable=True on a pruned directory: budgets come from the loaded ranks (PEFT's stay at init_r * N)."""
    import copy

    base = P.build("mlp")
    om = _train(P.ours(base, **P.config_kwargs("mlp", **CFG)), "mlp")
    om.save_pretrained(tmp_path)
    resumed = AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert resumed.allocator.init_bgt == sum(resumed.current_ranks().values()) < CFG["init_r"] * 5
    assert all(p.requires_grad for p in resumed.trainable_parameters())
    P.trajectory(resumed, "mlp", 3)  # runs, masks over the loaded ranks
    resumed.save_pretrained(tmp_path / "again")  # patterns are composed back to init_r
    again = AdaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "again")
    assert torch.equal(_logits(resumed, "mlp"), _logits(again, "mlp"))


# ------------------------------------------------------------------------ bad input


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(module, snap):
    now = module.state_dict()
    return list(now) == list(snap) and all(torch.equal(now[k], snap[k]) for k in snap)


def test_checkpoint_with_wrong_shapes_changes_nothing(tmp_path):
    om = P.ours(P.build("gpt2"), **P.config_kwargs("gpt2", **CFG))
    om.save_pretrained(tmp_path)
    from transformers import GPT2Config, GPT2LMHeadModel

    other = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=P.VOCAB, n_positions=16))
    snap = _snapshot(other)
    with pytest.raises(CheckpointError, match="shape"):
        AdaLoraModel.from_pretrained(other, tmp_path)
    assert _unchanged(other, snap)
    # an existing AdaLoraModel is left as it was too
    host = P.ours(P.build("mlp"), **P.config_kwargs("mlp", **CFG))
    snap = _snapshot(host)
    with pytest.raises((CheckpointError, ValueError)):
        host.load_adapter(tmp_path, "x")
    assert _unchanged(host, snap) and list(host.peft_config) == ["default"]


def test_rank_pattern_for_missing_modules_changes_nothing(tmp_path):
    om = P.ours(P.build("gpt2"), **P.config_kwargs("gpt2", **CFG))
    om.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"transformer.h.7.attn.c_attn.lora_E": [True, False, True, False]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    fresh = P.build("gpt2")
    snap = _snapshot(fresh)
    with pytest.raises(ValueError, match="rank_pattern"):
        AdaLoraModel.from_pretrained(fresh, tmp_path)
    assert _unchanged(fresh, snap)
    with pytest.raises(ValueError, match="rank_pattern"):
        ac.get_adalora_model(fresh, ac.AdaLoraConfig(**P.config_kwargs("gpt2", **CFG),
                                                     rank_pattern=cfg["rank_pattern"]))
    assert _unchanged(fresh, snap)


def test_corrupt_weights_file_changes_nothing(tmp_path):
    om = P.ours(P.build("mlp"), **P.config_kwargs("mlp", **CFG))
    om.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    fresh = P.build("mlp")
    snap = _snapshot(fresh)
    with pytest.raises(CheckpointError):
        AdaLoraModel.from_pretrained(fresh, tmp_path)
    assert _unchanged(fresh, snap)
