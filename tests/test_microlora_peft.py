"""MicroLoRA adapters in PEFT's LoRA format: written here, served by PEFT's LoraModel with our outputs; read back."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
import tiny_hf as T
from safetensors.numpy import load_file, save_file

import adalora_core as ac
from adalora_core.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("torch_one_thread", "quiet")

LAYERS = {m: [f"model.layers.{i}.self_attn.{m}" for i in range(2)] for m in ("q_proj", "v_proj")}


def trained(rank=2, alpha=3.0, seed=0, **kw):
    """A torch MicroLoRA for the tiny Llama's q_proj / v_proj (16 -> 16) with random, non-zero A and B."""
    m = ac.MicroLoRA(ac.MicroLoraConfig(rank=rank, alpha=alpha, in_features=16, out_features=16,
                                        target_modules=("q_proj", "v_proj"), **kw), backend="torch")
    g = torch.Generator().manual_seed(seed)
    for name in m.modules:
        m.adapter(name).set_weights(torch.randn(rank, 16, generator=g), torch.randn(rank, 16, generator=g))
    return m


def served_by_us(micro, model):
    """``model`` with every q_proj / v_proj output plus the MicroLoRA's, through forward hooks."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in micro.modules:
            module.register_forward_hook(
                lambda _m, args, out, leaf=leaf: out + micro.forward(args[0].reshape(-1, 16), leaf).view(out.shape))
    return model


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(**T.inputs("llama", labels=False)).logits


@pytest.mark.parametrize("rank, alpha", [(2, 3.0), (1, 8.0)])
def test_peft_serves_what_save_peft_writes(rank, alpha, tmp_path):
    micro = trained(rank, alpha)
    micro.save_peft(tmp_path, LAYERS, base_model_name_or_path="tiny-llama", task_type="CAUSAL_LM")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", rank, alpha)
    assert cfg["target_modules"] == sorted(p for ps in LAYERS.values() for p in ps)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.{p}.lora_{x}.weight" for ps in LAYERS.values() for p in ps for x in "AB"}
    theirs = peft.PeftModel.from_pretrained(T.build("llama"), str(tmp_path))
    assert isinstance(theirs.base_model, peft.LoraModel)
    ours = served_by_us(micro, T.build("llama"))
    base = logits(T.build("llama"))
    assert not torch.allclose(logits(ours), base, atol=1e-3)  # the adapter does something
    assert torch.allclose(logits(theirs), logits(ours), atol=1e-6, rtol=1e-5)


def test_load_peft_round_trip_and_peft_lora_adapters(tmp_path):
    micro = trained()
    micro.save_peft(tmp_path / "ours", LAYERS)
    again = ac.MicroLoRA.load_peft(tmp_path / "ours", backend="numpy")
    assert again.config.rank == 2 and again.config.alpha == 3.0 and set(again.modules) == {"q_proj", "v_proj"}
    for m in micro.modules:
        assert np.array_equal(again.adapter(m).A, micro.adapter(m).A.numpy())
        assert np.array_equal(again.adapter(m).B, micro.adapter(m).B.numpy())
    # an adapter trained with PEFT's LoRA (one layer), read here and served with PEFT's outputs
    torch.manual_seed(0)
    pm = peft.get_peft_model(T.build("llama"), peft.LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj"],
                                                               layers_to_transform=[1], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    micro = ac.MicroLoRA.load_peft(tmp_path / "peft", backend="torch")
    assert micro.modules == ("q_proj",) and micro.config.scaling == 2.5
    peft_q = pm.base_model.model.model.layers[1].self_attn.q_proj
    assert torch.equal(micro.adapter("q_proj").A, peft_q.lora_A["default"].weight)  # one layout: (r, in)
    assert torch.equal(micro.adapter("q_proj").B, peft_q.lora_B["default"].weight.T)
    layer = {"q_proj": ["model.layers.1.self_attn.q_proj"]}
    micro.save_peft(tmp_path / "again", layer)
    ours = served_by_us(micro, T.build("llama"))
    ours.model.layers[0].self_attn.q_proj._forward_hooks.clear()  # PEFT's adapter sits on layer 1 only
    assert torch.allclose(logits(ours), logits(pm), atol=1e-6, rtol=1e-5)


def test_what_microlora_cannot_hold_is_refused(tmp_path):
    with pytest.raises(ValueError, match="use_bias"):
        trained(use_bias=True).save_peft(tmp_path / "b")
    with pytest.raises(ValueError, match="must be a path ending in '.q_proj'"):
        trained().save_peft(tmp_path / "c", {"q_proj": ["model.layers.0.self_attn.k_proj"], "v_proj": ["v_proj"]})
    with pytest.raises(ValueError, match="each adapted module"):
        trained().save_peft(tmp_path / "c", {"q_proj": ["q_proj"]})
    torch.manual_seed(0)
    peft.get_peft_model(T.build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "r4")
    with pytest.raises(CheckpointError, match="r=4: MicroLoRA holds rank 1 or 2"):
        ac.MicroLoRA.load_peft(tmp_path / "r4")
    torch.manual_seed(0)
    peft.get_peft_model(T.build("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                          init_lora_weights=False)).save_pretrained(tmp_path / "two")
    with pytest.raises(CheckpointError, match="hold different weights"):
        ac.MicroLoRA.load_peft(tmp_path / "two")
    trained().save_peft(tmp_path / "extra", LAYERS)
    tensors = load_file(tmp_path / "extra" / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, tmp_path / "extra" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor 'base_model.model.lm_head.weight'"):
        ac.MicroLoRA.load_peft(tmp_path / "extra")
