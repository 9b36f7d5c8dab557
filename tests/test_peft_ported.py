"""PEFT 0.21's own AdaLoRA tests, ported: ``tests/testing_common.py`` (run by its decoder, encoder-decoder,
feature-extraction and sequence-classification suites), ``test_custom_models.py`` and ``test_config.py``.

Each test keeps PEFT's name (``_test_save_pretrained`` -> ``test_save_pretrained``), its steps and its
assertions, on tiny config-made models (``tiny_hf``) instead of Hub checkpoints, with PEFT's names
imported from this library. Where PEFT skips AdaLoRA (one trainable adapter) the test runs with the
second adapter in inference mode. A deliberate difference is asserted as such, beside PEFT's behaviour,
and listed in docs/peft-differences.md. Last, a PEFT fine-tuning script runs with only its import changed.
"""

from __future__ import annotations

import copy
import json
import os
import textwrap
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
import tiny_hf as T
from adalora_core.backends.torch_nn import SVDLayer
from torch import nn

from adalora_core import AdaLoraConfig, PeftModel, get_peft_model
from adalora_core.errors import AdaLoraWarning

pytestmark = pytest.mark.usefixtures("torch_one_thread", "quiet")

DECODERS = ["gpt2", "opt", "llama"]
ENCODER_DECODERS = ["t5", "bart"]
FEATURES = ["bert-base", "roberta-base"]
SEQ_CLS = ["bert", "roberta"]
ALL = DECODERS + ENCODER_DECODERS + FEATURES + SEQ_CLS


def config(name, **kw):
    """PEFT's ALL_CONFIGS entry for AdaLoRA: the model's task, default targets, total_step=1."""
    return AdaLoraConfig(**{"task_type": T.TASKS[name], "target_modules": None, "total_step": 1, **kw})


def weights(model):
    """The state dict less the allocator's state, which only a trainable adapter carries (PEFT keeps none)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("allocator.")}


def first(output):
    """``model(**inputs)[0]`` as PEFT's tests take it (the loss when labels are given, so labels are not)."""
    return output[0]


def run(model, name, seed=0):
    return first(model(**T.inputs(name, seed, labels=False)))


# ----------------------------------------------------------------------------- testing_common.py


@pytest.mark.parametrize("name", ALL)
def test_attributes_parametrized(name):
    model = get_peft_model(T.build(name), config(name))
    assert hasattr(model, "save_pretrained") and hasattr(model, "from_pretrained")
    assert hasattr(model, "push_to_hub")
    with pytest.raises(NotImplementedError, match="save_pretrained"):  # deliberate: nothing here talks to the Hub
        model.push_to_hub("user/repo")


@pytest.mark.parametrize("name", ALL)
def test_adapter_name(name):
    model = get_peft_model(T.build(name), config(name), adapter_name="test-adapter")
    assert any("test-adapter" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("name", DECODERS + ENCODER_DECODERS)
def test_prepare_for_training(name):
    model = get_peft_model(T.build(name), config(name))
    ids = T.inputs(name)["input_ids"]
    assert not model.get_input_embeddings()(ids).requires_grad
    model = get_peft_model(T.build(name), config(name))
    model.enable_input_require_grads()
    assert model.get_input_embeddings()(ids).requires_grad


@pytest.mark.parametrize("name", ALL)
def test_save_pretrained(name, tmp_path):
    base = T.save_local(T.build(name), tmp_path / "base")
    model = get_peft_model(base, config(name))
    model.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings(record=True) as recs:
        again = PeftModel.from_pretrained(T.save_local(T.build(name), tmp_path / "base"), tmp_path / "adapter")
    assert not any("missing adapter keys" in str(r.message) for r in recs)
    ours, theirs = weights(model), weights(again)
    assert ours.keys() == theirs.keys() and all(torch.allclose(ours[k], theirs[k]) for k in ours)
    files = os.listdir(tmp_path / "adapter")
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert "model.safetensors" not in files and "config.json" not in files
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == base.config.to_dict()["_name_or_path"]


@pytest.mark.parametrize("name", ["gpt2", "t5", "bert"])
def test_save_pretrained_selected_adapters(name, tmp_path):
    # PEFT skips this for AdaLoRA (one trainable adapter); here the second adapter is an inference one
    model = get_peft_model(T.build(name), config(name))
    model.add_adapter("new_adapter", config(name, inference_mode=True))
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(T.build(name), tmp_path)
    again.load_adapter(tmp_path / "new_adapter", "new_adapter")
    ours, theirs = weights(model), weights(again)
    assert ours.keys() == theirs.keys() and all(torch.allclose(ours[k], theirs[k]) for k in ours)
    for d in (tmp_path, tmp_path / "new_adapter"):
        assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(d))
    model.save_pretrained(tmp_path / "one", selected_adapters=["default"])
    again = PeftModel.from_pretrained(T.build(name), tmp_path / "one")
    assert "default" in again.peft_config and "new_adapter" not in again.peft_config


@pytest.mark.parametrize("name", ["gpt2", "bart", "roberta"])
def test_from_pretrained_config_construction(name, tmp_path):
    cfg = config(name)
    model = get_peft_model(T.build(name), cfg)
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(T.build(name), tmp_path, is_trainable=False, config=cfg)
    assert again.peft_config["default"].inference_mode
    # deliberate: configs are frozen, so the model holds a copy (inference_mode set), not `config` itself
    assert again.peft_config["default"] is not cfg
    assert again.peft_config["default"].replace(inference_mode=False) == model.peft_config["default"]


@pytest.mark.parametrize("name", ALL)
def test_merge_layers(name, tmp_path):
    model = get_peft_model(T.build(name), config(name, init_lora_weights=False)).eval()
    logits = run(model, name)
    model.merge_adapter()
    logits_merged = run(model, name)
    model.unmerge_adapter()
    logits_unmerged = run(model, name)
    model = model.merge_and_unload()
    assert not any(isinstance(m, SVDLayer) for m in model.modules())
    assert not hasattr(model, "peft_config")
    logits_merged_unloaded = run(model, name)
    for other in (logits_merged, logits_unmerged, logits_merged_unloaded):
        assert torch.allclose(logits, other, atol=1e-2, rtol=1e-2)  # PEFT's AdaLoRA tolerance
    assert not torch.allclose(logits_merged, run(T.build(name), name), atol=1e-10, rtol=1e-10)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert torch.allclose(logits_merged, run(reloaded, name), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("name", ["gpt2", "t5", "bert-base"])
def test_merge_layers_nan(name):
    model = get_peft_model(T.build(name), config(name)).eval()
    logits_unmerged = run(model, name)
    model = model.merge_and_unload()
    assert torch.allclose(logits_unmerged, run(model, name), atol=1e-3, rtol=1e-3)
    for value in (torch.nan, torch.inf):
        model = get_peft_model(T.build(name), config(name))
        for n, p in model.named_parameters():
            if model.prefix in n:
                p.data[0] = value
        snapshot = {k: v.clone() for k, v in model.state_dict().items()}
        # PEFT's message: "NaNs detected in the merged weights. The adapter default seems to be broken"
        with pytest.raises(ValueError, match="non-finite values into the weight; the adapter is broken"):
            model.merge_and_unload(safe_merge=True)
        for k, v in model.state_dict().items():  # refused before any weight was written
            torch.testing.assert_close(v, snapshot[k], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", DECODERS + ENCODER_DECODERS)
def test_generate(name):
    model = get_peft_model(T.build(name), config(name))
    batch = T.inputs(name, labels=False)
    model.generate(**batch, max_new_tokens=3)
    model.generate(batch["input_ids"], max_new_tokens=3)  # positional, as test_generate_pos_args
    model = get_peft_model(T.build(name), config(name, lora_dropout=0.0))  # test_generate_adalora_no_dropout
    model.generate(**batch, max_new_tokens=3)


@pytest.mark.parametrize("name", DECODERS + ENCODER_DECODERS)
def test_generate_half_prec(name):
    model = get_peft_model(T.build(name).to(torch.bfloat16), config(name))
    model.generate(input_ids=torch.LongTensor([[1, 1, 1], [2, 1, 2]]),
                   attention_mask=torch.LongTensor([[1, 1, 1], [1, 0, 1]]), max_new_tokens=2)


@pytest.mark.parametrize("name", ALL)
def test_training(name):
    model = get_peft_model(T.build(name), config(name))
    run(model, name).sum().backward()
    for n, p in model.named_parameters():
        if (model.prefix in n or "modules_to_save" in n) and p.requires_grad:
            # PEFT skips RoBERTa here ("no gradients on the dense layer"): the pooler's dense layer is not on
            # the path to last_hidden_state, so its adapter gets no gradient; every other adapter does
            assert (p.grad is None) == (".pooler." in n), n
        else:
            assert p.grad is None, n


@pytest.mark.parametrize("name", ALL)
def test_inference_safetensors(name, tmp_path):
    model = get_peft_model(T.build(name), config(name))
    run(model, name).sum().backward()
    model.eval()
    logits = run(model, name)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert "adapter_model.safetensors" in os.listdir(tmp_path) and "adapter_model.bin" not in os.listdir(tmp_path)
    again = PeftModel.from_pretrained(T.build(name), tmp_path)
    assert torch.allclose(logits, run(again, name), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_training_layer_indexing(name, tmp_path):
    model = get_peft_model(T.build(name), config(name, layers_to_transform=[0]))
    run(model, name).sum().backward()
    adapted = [n for n, _ in model.named_parameters() if model.prefix in n]
    assert adapted and all(".0." in n or ".h.0." in n for n in adapted)
    model.eval()
    logits = run(model, name)
    model.save_pretrained(tmp_path)
    assert torch.allclose(logits, run(PeftModel.from_pretrained(T.build(name), tmp_path), name), atol=1e-4)
    everything = get_peft_model(T.build(name), config(name))
    assert len(adapted) < len([n for n, _ in everything.named_parameters() if everything.prefix in n])


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("name", DECODERS + ["bart", "bert-base"])
def test_training_gradient_checkpointing(name, use_reentrant):
    model = get_peft_model(T.build(name), config(name))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    model.train(True)
    (run(model, name) ** 2).sum().backward()
    normal = {n for n, p in params if p.grad is not None and p.grad.abs().sum() > 0}
    for _, p in params:
        p.grad = None
    model.prepare_model_for_gradient_checkpointing(model)
    model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    (run(model, name) ** 2).sum().backward()
    checkpointed = {n for n, p in params if p.grad is not None and p.grad.abs().sum() > 0}
    assert normal == checkpointed and normal


@pytest.mark.parametrize("name", ["gpt2", "t5", "bert"])
def test_delete_adapter(name):
    # PEFT skips this for AdaLoRA; with the second adapter in inference mode it applies
    model = get_peft_model(T.build(name), config(name))
    model.add_adapter("delete_me", config(name, inference_mode=True))
    for activate in (True, False):  # test_delete_adapter / test_delete_inactive_adapter
        if "delete_me" not in model.peft_config:
            model.add_adapter("delete_me", config(name, inference_mode=True))
        if activate:
            model.set_adapter("delete_me")
        model.delete_adapter("delete_me")
        assert "delete_me" not in model.peft_config and model.active_adapters == ["default"]
        for m in model.modules():
            for attr in getattr(m, "adapter_layer_names", ()):
                assert "delete_me" not in getattr(m, attr)
            assert "delete_me" not in getattr(m, "modules_to_save", {})
    model.delete_adapter("default")
    assert "default" not in model.peft_config and model.active_adapters == []
    model.base_model(**T.inputs(name, labels=False))  # does not raise
    with pytest.raises(ValueError, match="'unknown-adapter' does not exist"):
        model.delete_adapter("unknown-adapter")


@pytest.mark.parametrize("name", ["gpt2", "bart"])
def test_adding_multiple_adapters_with_bias_raises(name):
    model = get_peft_model(T.build(name), config(name, bias="all"), "adapter0")
    with pytest.raises(ValueError):
        model.add_adapter("adapter1", config(name, bias="all", init_r=6, target_r=4))
    assert "adapter1" not in model.peft_config and "adapter1" not in model.base_model.peft_config


@pytest.mark.parametrize("name", ALL)
def test_unload_adapter(name):
    base = T.build(name)
    n_base = len(base.state_dict())
    logits_transformers = run(base, name)
    model = get_peft_model(base, config(name, init_lora_weights=False))
    logits_with_adapter = run(model, name)
    model.eval()
    model = model.unload()
    assert not any(isinstance(m, SVDLayer) for m in model.modules()) and not hasattr(model, "peft_config")
    logits_unload = run(model, name)
    assert not torch.allclose(logits_with_adapter, logits_unload, atol=1e-10, rtol=1e-10)
    assert torch.allclose(logits_transformers, logits_unload, atol=1e-4, rtol=1e-4)
    assert len(model.state_dict()) == n_base


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_weighted_combination_of_adapters(name):
    with pytest.raises(TypeError, match="does not support add_weighted_adapter"):
        get_peft_model(T.build(name), config(name)).add_weighted_adapter(["default"], [1.0], "x")


@pytest.mark.parametrize("name", ALL)
def test_disable_adapter(name):
    base = T.build(name)
    before = run(base, name)
    model = get_peft_model(base, config(name, init_lora_weights=False))
    with_adapter = run(model, name)
    assert not torch.allclose(before, with_adapter)
    with model.disable_adapter():
        assert torch.allclose(before, run(model, name), atol=1e-6, rtol=1e-6)
    assert torch.allclose(with_adapter, run(model, name), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_passing_input_embeds_works(name):
    model = get_peft_model(T.build(name), config(name), adapter_name="test-adapter")
    batch = T.inputs(name, labels=False)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    extra = {"decoder_input_ids": batch["input_ids"]} if name in ENCODER_DECODERS else {}
    model.forward(inputs_embeds=embeds, **extra)


# ----------------------------------------------------------------------------- test_custom_models.py


class MLP(nn.Module):
    """PEFT's test MLP."""

    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.float())))))


@pytest.mark.parametrize("second", [["lin0"], ["lin1"]], ids=["AdaLora Same", "AdaLora Different"])
def test_multiple_active_adapters_forward_and_merge(second):
    torch.manual_seed(0)
    X = {"X": torch.arange(90).view(9, 10)}
    model = MLP().eval()
    base_output = model(**X)
    kw = {"init_lora_weights": False, "inference_mode": True, "total_step": 1}
    model = get_peft_model(model, AdaLoraConfig(target_modules=["lin0"], **kw), adapter_name="adapter_1").eval()
    model.add_adapter("adapter_2", AdaLoraConfig(target_modules=second, **kw))
    model.set_adapter("adapter_1")
    out_1 = model(**X)
    model.set_adapter("adapter_2")
    out_2 = model(**X)
    model.base_model.set_adapter(["adapter_1", "adapter_2"])
    combined = model(**X)
    assert model.active_adapters == ["adapter_1", "adapter_2"]
    for a, b in ((out_1, out_2), (out_1, combined), (out_2, combined)):
        assert not torch.allclose(a, b, atol=1e-5)
    model.merge_adapter()
    assert torch.allclose(model(**X), combined, atol=1e-4)
    model.unmerge_adapter()
    with model.disable_adapter():
        assert torch.allclose(model(**X), base_output, atol=1e-4)


def test_active_adapter():
    model = get_peft_model(MLP(), AdaLoraConfig(target_modules=["lin0"], total_step=1))
    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    model.add_adapter("other", AdaLoraConfig(target_modules=["lin0"], total_step=1, inference_mode=True))
    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    model.set_adapter("other")
    assert model.active_adapters == ["other"] and model.active_adapter == "other"
    model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default", "other"] and model.base_model.active_adapter == ["default", "other"]


def test_disable_adapters_exiting_context_restores_previous_state():
    model = get_peft_model(MLP(), AdaLoraConfig(target_modules=["lin0", "lin1"], total_step=1))
    layers = list(model.svd_layers().values())
    with model.disable_adapter():
        pass
    assert not any(m.disable_adapters for m in layers)
    model.disable_adapter_layers()
    with model.disable_adapter():
        pass
    assert all(m.disable_adapters for m in layers)


def test_disable_adapters_exiting_context_irregular_state():
    model = get_peft_model(MLP(), AdaLoraConfig(target_modules=["lin0", "lin1"], total_step=1))
    layers = list(model.svd_layers().values())
    layers[0].disable_adapters = True
    msg = "The model contains some adapter layers that are enabled and others that are disabled"
    with pytest.warns(UserWarning, match=msg), model.disable_adapter():
        pass
    assert not any(m.disable_adapters for m in layers)


@pytest.mark.parametrize("second_target", ["lin0", "lin1"], ids=["same", "different"])
def test_requires_grad_adalora_targets(second_target):
    """PEFT's test_requires_grad_adalora_*_targets. Deliberate difference: ``set_adapter`` and
    ``disable_adapter`` never change what trains here; the one trainable adapter keeps ``requires_grad``
    (PEFT hands it to whichever adapter is active, inference ones included)."""
    def grads(m, prefix):
        return sorted(n.removeprefix(prefix) for n, p in m.named_parameters() if p.requires_grad)

    cfgs = [{"target_modules": ["lin0"], "total_step": 1},
            {"target_modules": [second_target], "total_step": 1, "inference_mode": True}]
    theirs = peft.get_peft_model(MLP(), peft.AdaLoraConfig(**cfgs[0]))
    theirs.add_adapter("adapter1", peft.AdaLoraConfig(**cfgs[1]))
    ours = get_peft_model(MLP(), AdaLoraConfig(**cfgs[0]))
    ours.add_adapter("adapter1", AdaLoraConfig(**cfgs[1]))
    default = [f"lin0.lora_{x}.default" for x in "ABE"]
    assert grads(ours, "model.") == grads(theirs, "base_model.model.") == default
    theirs.set_adapter("adapter1")
    ours.set_adapter("adapter1")
    assert grads(theirs, "base_model.model.") == [f"{second_target}.lora_{x}.adapter1" for x in "ABE"]
    assert grads(ours, "model.") == default
    with ours.disable_adapter():
        assert grads(ours, "model.") == default


# ----------------------------------------------------------------------------- test_config.py


def test_adalora_config_r_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdaLoraConfig(peft_type="ADALORA", task_type="SEQ_2_SEQ_LM", init_r=12, lora_alpha=32, total_step=1)
    with pytest.warns(UserWarning, match="Note that `r` is not used in AdaLora and will be ignored."):
        AdaLoraConfig(r=10, total_step=1)


@pytest.mark.parametrize("timing", [{"total_step": 100, "tinit": 0, "tfinal": 0},
                                    {"total_step": 100, "tinit": 10, "tfinal": 10},
                                    {"total_step": 100, "tinit": 79, "tfinal": 20},
                                    {"total_step": 100, "tinit": 80, "tfinal": 19}])
def test_adalora_config_valid_timing_works(timing):
    AdaLoraConfig(**timing)


@pytest.mark.parametrize("timing", [{"total_step": 100, "tinit": 20, "tfinal": 80},
                                    {"total_step": 100, "tinit": 80, "tfinal": 20},
                                    {"total_step": 10, "tinit": 20, "tfinal": 0},
                                    {"total_step": 10, "tinit": 0, "tfinal": 10},
                                    {"total_step": 10, "tinit": 10, "tfinal": 0},
                                    {"total_step": 10, "tinit": 20, "tfinal": 20},
                                    {"total_step": 10, "tinit": 0, "tfinal": 20}])
def test_adalora_config_timing_bounds_error(timing):
    # PEFT's message: "The supplied schedule values don't allow for a budgeting phase"
    with pytest.raises(ValueError, match="so that a budgeting phase exists"):
        AdaLoraConfig(**timing)


def test_adalora_config_invalid_total_step_raises():
    with pytest.raises(ValueError, match="total_step=None is invalid"):  # PEFT: "does not work when `total_step`"
        AdaLoraConfig(total_step=None)


def test_save_pretrained_and_forward_compatible_config(tmp_path):
    cfg = AdaLoraConfig(total_step=1)
    cfg.save_pretrained(tmp_path)
    assert AdaLoraConfig.from_pretrained(tmp_path) == cfg
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "foobar": "baz", "spam": 123}))
    with pytest.warns(AdaLoraWarning, match=r"ignores unknown keys \['foobar', 'spam'\]") as rec:
        again = AdaLoraConfig.from_pretrained(tmp_path)
    assert len(rec) == 1 and again == cfg
    assert isinstance(peft.PeftConfig.from_pretrained(str(tmp_path)), peft.AdaLoraConfig)


# ----------------------------------------------------------------------------- a PEFT script, import changed


SCRIPT = '''
{imports}
import torch
import tiny_hf as T


def main(name, out_dir):
    model = T.build(name)
    peft_config = AdaLoraConfig(task_type=TaskType.{task}, init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=1,
                                total_step=8, lora_alpha=16, lora_dropout=0.0, beta1=0.85, beta2=0.85)
    model = get_peft_model(model, peft_config)
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for step in range(8):
        outputs = model(**T.inputs(name, step))
        loss = outputs.loss
        loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(out_dir)
    model.eval()
    with torch.no_grad():
        logits = model(**T.inputs(name, 99, labels=False)).logits
    inference = PeftModel.from_pretrained(T.build(name), out_dir)
    with torch.no_grad():
        reloaded = inference(**T.inputs(name, 99, labels=False)).logits
    merged = inference.merge_and_unload()
    with torch.no_grad():
        merged_logits = merged(**T.inputs(name, 99, labels=False)).logits
    return losses, logits, reloaded, merged_logits
'''

IMPORTS = {"peft": "from peft import AdaLoraConfig, PeftModel, TaskType, get_peft_model",
           "ours": "from adalora_core import AdaLoraConfig, PeftModel, TaskType, get_peft_model"}


def _run_script(which, name, out_dir):
    source = textwrap.dedent(SCRIPT).format(imports=IMPORTS[which], task=T.TASKS[name])
    namespace: dict = {}
    exec(compile(source, f"<{which} script>", "exec"), namespace)  # noqa: S102 (our own script text)
    torch.manual_seed(0)
    return namespace["main"](name, str(out_dir))


@pytest.mark.parametrize("name", ["llama", "roberta"])
def test_peft_fine_tuning_script_runs_with_the_import_changed(name, tmp_path):
    with pytest.warns(AdaLoraWarning, match="orth_loss\\(\\) was never called"):  # the regulariser: not silent
        losses, logits, reloaded, merged = _run_script("ours", name, tmp_path / "ours")
    p_losses, p_logits, p_reloaded, _ = _run_script("peft", name, tmp_path / "peft")
    assert len(losses) == len(p_losses) == 8 and all(map(torch.isfinite, torch.tensor(losses)))
    # step 0 sees the same model: PEFT's loss is ours plus its silently added regulariser (0.5 * orth)
    assert losses[0] < p_losses[0]
    assert torch.allclose(reloaded, logits, atol=1e-5) and torch.allclose(merged, logits, atol=1e-4)
    saved = json.loads(Path(tmp_path / "ours" / "adapter_config.json").read_text())
    assert sum(map(sum, saved["rank_pattern"].values())) == 2 * len(saved["rank_pattern"])  # target_r on average
    # each directory is read by the other library with its writer's outputs
    for src, want in (("ours", logits), ("peft", p_logits)):
        other = peft.PeftModel if src == "ours" else PeftModel
        model = other.from_pretrained(T.build(name), str(tmp_path / src))
        model.eval()
        with torch.no_grad():
            got = model(**T.inputs(name, 99, labels=False)).logits
        assert torch.allclose(got, want, atol=1e-5)
    assert copy.deepcopy(p_reloaded).shape == reloaded.shape
