"""PEFT's idioms on tiny transformers models, ours beside PEFT's own: task types, modules_to_save, bias,
PeftModel's names, the config API, Trainer columns, the regulariser, several active adapters.

Each test builds the same seeded base model twice, wraps one copy with PEFT
and one with this library (``exact_peft=True`` where outputs are compared bit
for bit), drives both the way a PEFT script does and compares outputs, saved
keys and config fields.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
import tiny_hf as T
from adalora_core.backends.torch_nn import AdaLoraCallback, AdaLoraModel, get_peft_model
from adalora_core.backends.torch_nn.modules_to_save import ModulesToSaveWrapper
from safetensors.numpy import load_file

import adalora_core as ac
from adalora_core.errors import AdaLoraWarning

pytestmark = pytest.mark.usefixtures("torch_one_thread", "quiet")

SCHEDULE = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "total_step": 6}


def pair(name, add_orth_to_loss=True, **cfg):
    """(PEFT's model, ours) on copies of one base; same seed before each wrap, so the adapters are equal."""
    base = T.build(name)
    kwargs = {"task_type": T.TASKS[name], **cfg}
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**kwargs))
    torch.manual_seed(1)
    om = get_peft_model(copy.deepcopy(base), ac.AdaLoraConfig(**kwargs), exact_peft=True,
                        add_orth_to_loss=add_orth_to_loss)
    return pm, om


def trainable(model, prefix):
    return sorted(n.removeprefix(prefix) for n, p in model.named_parameters() if p.requires_grad)


def train(model, name, steps=4):
    """PEFT's documented loop: loss (the regulariser inside it), step, ``base_model.update_and_allocate``."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(steps):
        loss = model(**T.inputs(name, step)).loss
        loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    return model


def logits(model, name):
    model.eval()
    with torch.no_grad():
        return model(**T.inputs(name, 99, labels=False)).logits


# ----------------------------------------------------------------------------- 1-3: task_type, modules_to_save, bias


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
@pytest.mark.parametrize("name", ["roberta", "bert"])
def test_seq_cls_trains_and_saves_the_head_as_peft(name, bias, tmp_path):
    pm, om = pair(name, bias=bias, **SCHEDULE)
    assert om.peft_config["default"].modules_to_save == ("classifier", "score")
    assert trainable(om, "model.") == trainable(pm, "base_model.model.")
    assert not any(k.startswith("classifier") for k in om.svd_layers())  # RoBERTa's classifier.dense: not adapted
    train(pm, name)
    train(om, name)
    assert torch.equal(logits(pm, name), logits(om, name))
    pm.save_pretrained(tmp_path / "peft")
    om.save_pretrained(tmp_path / "ours")
    theirs, ours = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    # with bias="all" PEFT also writes the wrapper's internal copies of the head's biases: documented
    duplicates = {k for k in theirs if ".original_module." in k or ".modules_to_save." in k}
    assert (bias == "all") == bool(duplicates)
    assert set(ours) == set(theirs) - duplicates
    assert all((ours[k] == theirs[k]).all() for k in ours)
    for src in ("peft", "ours"):  # both directions, same outputs
        torch.manual_seed(5)
        a = AdaLoraModel.from_pretrained(T.build(name), tmp_path / src, exact_peft=True)
        torch.manual_seed(5)
        b = peft.PeftModel.from_pretrained(T.build(name), str(tmp_path / src))
        assert torch.equal(logits(a, name), logits(om, name))
        assert torch.equal(logits(b, name), logits(om, name))


def test_adapter_config_json_has_peft_fields(tmp_path):
    pm, om = pair("roberta", total_step=5)
    pm.save_pretrained(tmp_path / "peft")
    om.save_pretrained(tmp_path / "ours")
    theirs, ours = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours"))
    assert set(ours) == set(theirs) - {"peft_version"}  # we are not PEFT: no PEFT version is claimed
    different = {k for k in ours if ours[k] != theirs[k] and k != "target_modules"}
    assert different == set(), {k: (ours[k], theirs[k]) for k in different}
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])  # PEFT writes a set
    assert (ours["peft_type"], ours["task_type"]) == ("ADALORA", "SEQ_CLS")
    assert peft.PeftConfig.from_pretrained(str(tmp_path / "ours")).task_type == "SEQ_CLS"
    again = ac.AdaLoraConfig.from_pretrained(tmp_path / "peft")
    assert (again.peft_type, again.task_type, again.modules_to_save) == ("ADALORA", "SEQ_CLS", ("classifier", "score"))


def test_modules_to_save_wraps_as_peft(tmp_path):
    pm, om = pair("llama", modules_to_save=["lm_head"], target_modules=["q_proj", "v_proj"], **SCHEDULE)
    head = om.model.lm_head
    assert isinstance(head, ModulesToSaveWrapper) and head.active_adapter == "default"
    assert trainable(om, "model.") == trainable(pm, "base_model.model.")
    assert head.weight is head.modules_to_save["default"].weight  # attributes reach the active copy
    train(pm, "llama")
    train(om, "llama")
    assert torch.equal(logits(pm, "llama"), logits(om, "llama"))
    with om.disable_adapter(), pm.disable_adapter():  # the original head runs, as PEFT's
        base = logits(T.build("llama"), "llama")
        assert torch.equal(logits(om, "llama"), base) and torch.equal(logits(pm, "llama"), base)
    pm.save_pretrained(tmp_path / "peft")
    om.save_pretrained(tmp_path / "ours")
    theirs, ours = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert set(ours) == set(theirs) and "base_model.model.lm_head.weight" in ours
    merged = om.merge_and_unload()
    assert type(merged.lm_head) is torch.nn.Linear  # the trained copy replaces the wrapper, as PEFT's unload
    assert torch.equal(logits(merged, "llama"), logits(pm.merge_and_unload(), "llama"))


def test_modules_to_save_bad_names_change_nothing():
    m = T.build("llama")
    snap = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="modules_to_save=\\['lm_haed'\\] matches no module.*lm_head"):
        get_peft_model(m, ac.AdaLoraConfig(total_step=5, target_modules=["q_proj"], modules_to_save=["lm_haed"]))
    assert all(torch.equal(v, snap[k]) for k, v in m.state_dict().items()) and list(m.state_dict()) == list(snap)
    # the task's default heads may be absent (a causal LM has no classifier), as in PEFT
    ok = get_peft_model(T.build("llama"), ac.AdaLoraConfig(total_step=5, task_type="SEQ_CLS",
                                                           target_modules=["q_proj"]))
    assert ok.modules_to_save_wrappers() == {}


def test_a_second_adapter_with_bias_is_refused_as_peft():
    om = get_peft_model(T.build("llama"), ac.AdaLoraConfig(total_step=5, target_modules=["q_proj"], bias="all"))
    with pytest.raises(ValueError, match="already trains biases"):
        om.add_adapter("other", ac.AdaLoraConfig(total_step=5, target_modules=["q_proj"], bias="all",
                                                 inference_mode=True))
    assert "other" not in om.peft_config


def test_disabling_with_bias_warns_as_peft():
    om = get_peft_model(T.build("bert"), ac.AdaLoraConfig(total_step=5, task_type="SEQ_CLS", bias="lora_only"))
    with pytest.warns(UserWarning, match="Careful, disabling adapter layers with bias"), om.disable_adapter():
        pass


# ----------------------------------------------------------------------------- 4: PeftModel's names


def test_peftmodel_names_behave_as_peft():
    pm, om = pair("gpt2", init_lora_weights=False, **SCHEDULE)
    assert om.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    assert om.base_model.model is om.get_base_model() and om.active_adapter == "default"
    ref = logits(pm, "gpt2")
    assert torch.equal(logits(om, "gpt2"), ref)
    pm.merge_adapter()
    om.merge_adapter()
    assert torch.equal(logits(om, "gpt2"), logits(pm, "gpt2"))
    with pytest.warns(UserWarning, match="All adapters are already merged"):
        om.merge_adapter()
    om.unmerge_adapter()
    pm.unmerge_adapter()
    assert torch.equal(logits(om, "gpt2"), logits(pm, "gpt2"))
    om.disable_adapter_layers()
    pm.base_model.disable_adapter_layers()
    assert torch.equal(logits(om, "gpt2"), logits(pm, "gpt2"))  # unmerged weights: base up to rounding
    assert torch.allclose(logits(om, "gpt2"), logits(T.build("gpt2"), "gpt2"), atol=1e-4)
    assert om.get_model_status().enabled is False
    om.enable_adapter_layers()
    pm.base_model.enable_adapter_layers()
    assert torch.equal(logits(om, "gpt2"), logits(pm, "gpt2"))
    assert torch.allclose(logits(om, "gpt2"), ref, atol=1e-4)  # after unmerge: rounding
    for ours, theirs in zip(om.get_layer_status(), pm.get_layer_status(), strict=True):
        a, b = vars(ours), vars(theirs)
        assert {k: v for k, v in a.items() if k != "module_type"} == {k: v for k, v in b.items() if k != "module_type"}
    a, b = vars(om.get_model_status()), vars(pm.get_model_status())
    same = ("trainable_params", "total_params", "num_adapter_layers", "enabled", "active_adapters",
            "merged_adapters", "requires_grad", "available_adapters", "devices", "peft_types", "base_model_type")
    assert {k: a[k] for k in same} == {k: b[k] for k in same}


def test_merge_and_unload_with_peft_arguments():
    pm, om = pair("opt", init_lora_weights=False, target_modules=["q_proj", "v_proj"], **SCHEDULE)
    ref = logits(om, "opt")
    merged = om.merge_and_unload(safe_merge=True, adapter_names=["default"])
    assert torch.allclose(logits(merged, "opt"), ref, atol=1e-5)
    assert torch.equal(logits(merged, "opt"), logits(pm.merge_and_unload(safe_merge=True), "opt"))


def test_nan_adapter_refuses_to_merge():
    om = get_peft_model(T.build("opt"), ac.AdaLoraConfig(total_step=5, target_modules=["q_proj"]))
    for name, p in om.named_parameters():
        if om.prefix in name:
            p.data[0] = torch.nan
    with pytest.raises(ValueError, match="non-finite"):
        om.merge_and_unload(safe_merge=True)


def test_disable_adapter_with_a_mixed_state_warns_and_enables_all():
    om = get_peft_model(T.build("gpt2"), ac.AdaLoraConfig(total_step=5, target_modules=["c_attn"]))
    layers = list(om.svd_layers().values())
    layers[0].disable_adapters = True
    with pytest.warns(UserWarning, match="some adapter layers that are enabled and others that are disabled"), \
            om.disable_adapter():
        assert all(layer.disable_adapters for layer in layers)
    assert not any(layer.disable_adapters for layer in layers)
    om.disable_adapter_layers()
    with om.disable_adapter():  # all disabled: they stay so, as PEFT
        pass
    assert all(layer.disable_adapters for layer in layers)


def test_save_pretrained_selected_adapters_layout(tmp_path):
    om = get_peft_model(T.build("gpt2"), ac.AdaLoraConfig(total_step=5, target_modules=["c_attn"]))
    om.add_adapter("other", ac.AdaLoraConfig(total_step=5, target_modules=["c_attn"], inference_mode=True))
    om.save_pretrained(tmp_path / "all", safe_serialization=True)
    assert (tmp_path / "all" / "adapter_model.safetensors").exists()
    assert (tmp_path / "all" / "other" / "adapter_config.json").exists()
    om.save_pretrained(tmp_path / "one", selected_adapters=["default"])
    assert not (tmp_path / "one" / "other").exists()
    loaded = peft.PeftModel.from_pretrained(T.build("gpt2"), str(tmp_path / "all"))
    loaded.load_adapter(str(tmp_path / "all" / "other"), "other")
    assert set(loaded.peft_config) == {"default", "other"}
    with pytest.raises(ValueError, match="safe_serialization=False"):
        om.save_pretrained(tmp_path / "pickle", safe_serialization=False)


def test_add_weighted_adapter_is_refused_as_peft():
    om = get_peft_model(T.build("gpt2"), ac.AdaLoraConfig(total_step=5, target_modules=["c_attn"]))
    with pytest.raises(TypeError, match="does not support add_weighted_adapter"):
        om.add_weighted_adapter(["default"], [1.0], "w")


# ----------------------------------------------------------------------------- 5: the config API


def test_config_api_as_peft(tmp_path):
    cfg = ac.AdaLoraConfig(total_step=10, init_r=6, target_r=4, task_type=peft.TaskType.CAUSAL_LM,
                           target_modules=["q"])
    assert cfg.task_type == "CAUSAL_LM" and type(cfg.task_type) is str
    cfg.save_pretrained(tmp_path)
    assert ac.AdaLoraConfig.from_pretrained(tmp_path) == cfg
    theirs = peft.AdaLoraConfig.from_pretrained(str(tmp_path))
    assert (theirs.init_r, theirs.task_type, theirs.total_step) == (6, "CAUSAL_LM", 10)
    assert ac.AdaLoraConfig.from_json_file(tmp_path / "adapter_config.json") == \
        peft.AdaLoraConfig.from_json_file(str(tmp_path / "adapter_config.json"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ac.AdaLoraConfig(peft_type="ADALORA", task_type="SEQ_2_SEQ_LM", init_r=12, lora_alpha=32, total_step=1)
    with pytest.warns(UserWarning, match="Note that `r` is not used in AdaLora and will be ignored."):
        ac.AdaLoraConfig(r=10, total_step=1)
    with pytest.raises(ValueError, match="task_type='CAUSAL'"):
        ac.AdaLoraConfig(total_step=1, task_type="CAUSAL")


def test_from_pretrained_without_a_model_and_autopeftmodel(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = T.save_local(T.build("llama"), tmp_path / "base")
    om = get_peft_model(base, ac.AdaLoraConfig(total_step=5, task_type="CAUSAL_LM", init_lora_weights=False))
    assert om.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")
    om.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tmp_path / "base")
    again = AdaLoraModel.from_pretrained(tmp_path / "adapter")
    assert type(again.get_base_model()).__name__ == "LlamaForCausalLM"
    assert torch.equal(logits(again, "llama"), logits(om, "llama"))
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    assert torch.allclose(logits(auto, "llama"), logits(om, "llama"), atol=1e-6)
    anon = get_peft_model(T.build("llama"), ac.AdaLoraConfig(total_step=5, task_type="CAUSAL_LM"))
    anon.save_pretrained(tmp_path / "anon")  # built from a config: no name to load it by
    with pytest.raises(ValueError, match="names no base model"):
        AdaLoraModel.from_pretrained(tmp_path / "anon")


# ----------------------------------------------------------------------------- 6: a plain Trainer


def test_plain_trainer_keeps_the_columns_and_reports_eval_loss(tmp_path):
    from transformers import Trainer, TrainingArguments

    om = get_peft_model(T.build("gpt2"), ac.AdaLoraConfig(total_step=4, target_modules=["c_attn"], tinit=1,
                                                          tfinal=1, init_r=4, target_r=2))
    # a plain list of rows with a column the model does not take: the Trainer must drop it
    data = [{**{k: v[0] for k, v in T.inputs("gpt2", i).items()}, "text": "unused"} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    cb = AdaLoraCallback(om)
    trainer = Trainer(model=om, args=args, train_dataset=data, eval_dataset=data, callbacks=[cb])
    with pytest.warns(AdaLoraWarning, match="orth_loss\\(\\) was never called"):
        trainer.train()
    assert cb.calls == 4 and om.rank_pattern
    assert "eval_loss" in trainer.evaluate()


# ----------------------------------------------------------------------------- 7: the regulariser


def test_orth_warning_fires_once_and_not_when_used():
    om = get_peft_model(T.build("gpt2"), ac.AdaLoraConfig(target_modules=["c_attn"], **SCHEDULE))
    with pytest.warns(AdaLoraWarning, match="never called") as rec:
        train(om, "gpt2", steps=3)
    assert len([w for w in rec if issubclass(w.category, AdaLoraWarning)]) == 1
    for kw in ({"orth_reg_weight": 0.0}, {}):
        om = get_peft_model(T.build("gpt2"), ac.AdaLoraConfig(target_modules=["c_attn"], **SCHEDULE, **kw))
        with warnings.catch_warnings():
            warnings.simplefilter("error", AdaLoraWarning)
            if kw:
                train(om, "gpt2", steps=2)
            else:
                out = om(**T.inputs("gpt2"))
                (out.loss + om.orth_loss()).backward()
                om.update_and_allocate(0)


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_add_orth_to_loss_equals_peft_loss(name):
    pm, om = pair(name, init_lora_weights=False, **SCHEDULE)
    batch = T.inputs(name)
    assert torch.equal(pm(**batch).loss, om(**batch).loss)  # PEFT's task model adds it; ours on request
    plain = get_peft_model(T.build(name), ac.AdaLoraConfig(task_type=T.TASKS[name], **SCHEDULE))
    assert plain.add_orth_to_loss is False
    assert torch.equal(plain(**batch).loss, T.build(name)(**batch).loss)  # never added silently


# ----------------------------------------------------------------------------- 10: several active adapters


def test_several_active_adapters_equal_peft(tmp_path):
    base = T.build("llama")
    cfgs = [{"target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, "total_step": 5,
             "inference_mode": True},
            {"target_modules": ["v_proj", "o_proj"], "init_lora_weights": False, "total_step": 5,
             "inference_mode": True, "init_r": 3, "target_r": 2}]
    torch.manual_seed(2)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**cfgs[0]), adapter_name="a")
    pm.add_adapter("b", peft.AdaLoraConfig(**cfgs[1]))
    torch.manual_seed(2)
    om = get_peft_model(copy.deepcopy(base), ac.AdaLoraConfig(**cfgs[0]), adapter_name="a", exact_peft=True)
    om.add_adapter("b", ac.AdaLoraConfig(**cfgs[1]))
    pm.base_model.set_adapter(["a", "b"])
    om.set_adapter(["a", "b"])
    assert om.active_adapters == pm.active_adapters == ["a", "b"] and om.active_adapter == ["a", "b"]
    both = logits(om, "llama")
    assert torch.equal(both, logits(pm, "llama"))
    om.set_adapter("a")
    assert not torch.equal(logits(om, "llama"), both)
    om.set_adapter(["a", "b"])
    om.merge_adapter()
    assert torch.allclose(logits(om, "llama"), both, atol=1e-5)


def test_two_active_adapters_with_one_head_copy_each_are_refused():
    om = get_peft_model(T.build("bert"), ac.AdaLoraConfig(total_step=5, task_type="SEQ_CLS", inference_mode=True))
    om.add_adapter("b", ac.AdaLoraConfig(total_step=5, task_type="SEQ_CLS", inference_mode=True))
    with pytest.raises(ValueError, match="only one of them can be active"):
        om.set_adapter(["default", "b"])
    assert om.active_adapters == ["default"] and om.model.classifier.active_adapter == "default"


def test_an_inference_only_model_takes_labels(tmp_path):
    """PEFT defect: a task model loaded for inference (no trainable adapter) fails on a batch with labels,
    looking up the trainable adapter's regulariser weight. Here the loss is the wrapped model's."""
    _, om = pair("roberta", total_step=5)
    om.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(T.build("roberta"), str(tmp_path))
    batch = T.inputs("roberta")
    with pytest.raises(AttributeError, match="trainable_adapter_name"):
        theirs(**batch)
    ours = AdaLoraModel.from_pretrained(T.build("roberta"), tmp_path, add_orth_to_loss=True)
    theirs.eval()
    with torch.no_grad():
        assert torch.equal(ours(**batch).loss, theirs.base_model.model(**batch).loss)
