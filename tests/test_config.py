from __future__ import annotations

import copy
import dataclasses
import json
import math
import pickle
import warnings

import pytest

from adalora_core import AdaLoraConfig, EwcConfig, MicroLoraConfig
from adalora_core.errors import AdaLoraWarning

OK = {"total_step": 100}


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"total_step": None}, "total_step"),
        ({"total_step": 0}, "total_step"),
        ({"total_step": -5}, "total_step"),
        ({"total_step": 10.5}, "total_step"),
        ({"tinit": 90, "tfinal": 10}, "tinit"),
        ({"tinit": 100}, "tinit"),
        ({"orth_reg_weight": -0.1}, "orth_reg_weight"),
        ({"orth_reg_weight": math.inf}, "orth_reg_weight"),
        ({"init_r": 0}, "init_r"),
        ({"target_r": -1}, "target_r"),
        ({"target_r": 13}, "target_r"),
        ({"deltaT": 0}, "deltaT"),
        ({"beta1": 0.0}, "beta1"),
        ({"beta1": 1.0}, "beta1"),
        ({"beta2": 1.5}, "beta2"),
        ({"beta2": math.nan}, "beta2"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"tinit": -1}, "tinit"),
        ({"tfinal": -1}, "tfinal"),
        ({"lora_alpha": math.nan}, "lora_alpha"),
        ({"bias": "some"}, "bias"),
        ({"target_modules": 3}, "target_modules"),
        ({"target_modules": "q.*", "layers_to_transform": [0]}, "layers_to_transform"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
        ({"rank_pattern": {"a.lora_E": [True]}}, "rank_pattern"),
    ],
)
def test_every_rule_names_field_and_value(changes, field):
    with pytest.raises(ValueError) as err:
        AdaLoraConfig(**{**OK, **changes})
    msg = str(err.value)
    assert msg.startswith(f"{field}=") and "invalid" in msg


def test_defaults_match_peft():
    c = AdaLoraConfig(total_step=10)
    assert (c.init_r, c.target_r, c.tinit, c.tfinal, c.deltaT) == (12, 8, 0, 0, 1)
    assert (c.beta1, c.beta2, c.orth_reg_weight, c.lora_alpha, c.lora_dropout) == (0.85, 0.85, 0.5, 8, 0.0)


def test_target_equal_init_is_allowed():
    assert AdaLoraConfig(total_step=10, init_r=4, target_r=4).target_r == 4


def test_round_trip_and_peft_json():
    c = AdaLoraConfig(total_step=50, init_r=6, target_r=3, target_modules=["q", "v"],
                      rank_pattern={"m.lora_E": [True] * 6})
    d = c.to_dict()
    assert d["peft_type"] == "ADALORA"
    assert AdaLoraConfig.from_dict({**d, "r": 8, "use_rslora": False}) == c.replace(target_modules=["q", "v"])
    with pytest.raises(ValueError, match="peft_type"):
        AdaLoraConfig.from_dict({**d, "peft_type": "LORA"})


def test_peft_accepts_our_dict():
    peft = pytest.importorskip("peft")
    d = AdaLoraConfig(total_step=50, init_r=6, target_r=3, target_modules=["q"]).to_dict()
    cfg = peft.AdaLoraConfig(**{k: v for k, v in d.items() if k != "peft_type"})
    assert (cfg.init_r, cfg.total_step) == (6, 50)


# --- every field is type-checked --------------------------------------------------------------

@pytest.mark.parametrize("cls, base", [(AdaLoraConfig, OK), (MicroLoraConfig, {}), (EwcConfig, {})])
def test_every_field_refuses_a_foreign_object(cls, base):
    for f in dataclasses.fields(cls):
        with pytest.raises(ValueError) as err:
            cls(**{**base, f.name: object()})
        assert str(err.value).startswith(f"{f.name}="), (f.name, str(err.value))


@pytest.mark.parametrize("field", ["inference_mode", "fan_in_fan_out", "init_lora_weights"])
@pytest.mark.parametrize("value", ["False", "no", 0, 1, None, "gaussian"])
def test_bool_fields_take_only_bools(field, value):
    with pytest.raises(ValueError) as err:
        AdaLoraConfig(**{**OK, field: value})
    assert str(err.value) == f"{field}={value!r} is invalid: must be a bool (true or false)"


def test_inference_mode_string_from_yaml_does_not_freeze():
    with pytest.raises(ValueError, match="inference_mode='False'"):
        AdaLoraConfig(total_step=10, inference_mode="False")
    assert AdaLoraConfig(total_step=10, inference_mode=False, init_lora_weights=False).inference_mode is False


# --- containers are immutable copies -------------------------------------------------------------

FULL = {"total_step": 50, "init_r": 4, "target_r": 2, "target_modules": ["q", "v"], "exclude_modules": ["q_x"],
            "modules_to_save": ["head"], "layers_to_transform": [0, 2], "layers_pattern": ["h"],
            "rank_pattern": {"a.q.lora_E": [True, False, True, False]}}


def test_containers_are_copied_and_frozen():
    src = copy.deepcopy(FULL)
    c = AdaLoraConfig(**src)
    src["target_modules"].append("k")
    src["rank_pattern"]["a.q.lora_E"][0] = False
    src["layers_to_transform"].append(-1)
    assert c.target_modules == ("q", "v") and c.layers_to_transform == (0, 2)
    assert c.rank_pattern == FULL["rank_pattern"]  # equal to the plain dict it was made from
    with pytest.raises(AttributeError):
        c.target_modules.append(3)  # type: ignore[union-attr]
    with pytest.raises(TypeError):
        c.rank_pattern["b.lora_E"] = [True] * 4  # type: ignore[index]
    with pytest.raises(TypeError):
        c.rank_pattern["a.q.lora_E"][0] = False  # type: ignore[index]
    for name in ("exclude_modules", "modules_to_save", "layers_pattern"):
        assert isinstance(getattr(c, name), tuple), name


def test_frozen_config_keeps_value_semantics():
    c = AdaLoraConfig(**FULL)
    same = AdaLoraConfig(**copy.deepcopy(FULL))
    assert c == same and hash(c) == hash(same) and len({c, same}) == 1
    assert pickle.loads(pickle.dumps(c)) == c and copy.deepcopy(c) == c and copy.copy(c) == c
    assert c.replace(target_r=1).rank_pattern == c.rank_pattern
    assert c != c.replace(rank_pattern={"a.q.lora_E": [True] * 4})
    assert AdaLoraConfig(total_step=5, target_modules={"v", "q"}).target_modules == ("q", "v")  # PEFT's sets
    assert AdaLoraConfig(total_step=5, layers_to_transform=3).layers_to_transform == 3


def test_to_dict_is_plain_json_as_peft_writes_it():
    d = AdaLoraConfig(**FULL).to_dict()
    assert json.loads(json.dumps(d)) == d
    for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern"):
        assert type(d[name]) is list and d[name] == FULL[name], name
    assert type(d["rank_pattern"]) is dict and d["rank_pattern"] == FULL["rank_pattern"]
    assert all(type(v) is list for v in d["rank_pattern"].values())
    assert AdaLoraConfig.from_dict(d) == AdaLoraConfig(**FULL)


def test_microlora_module_dims_are_frozen():
    dims = {"q_proj": [64, 32]}
    c = MicroLoraConfig(module_dims=dims)
    dims["q_proj"][0] = 1
    assert c.dims("q_proj") == (64, 32) and hash(c) == hash(MicroLoraConfig(module_dims={"q_proj": (64, 32)}))
    with pytest.raises(TypeError):
        c.module_dims["v_proj"] = (1, 1)  # type: ignore[index]
    assert pickle.loads(pickle.dumps(c)) == c and MicroLoraConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("pattern", [
    {"m.lora_E": "TrueFalseTru"},  # 12 characters, init_r=12
    {"m.lora_E": 3},
    {"m.lora_E": [1] * 12},
    {"m.lora_E": [True] * 11},
    {"m.lora_E": None},
    {3: [True] * 12},
    [("m.lora_E", [True] * 12)],
    "m.lora_E",
])
def test_rank_pattern_must_map_names_to_init_r_bools(pattern):
    with pytest.raises(ValueError) as err:
        AdaLoraConfig(total_step=10, rank_pattern=pattern)
    assert str(err.value).startswith("rank_pattern") and "init_r=12" in str(err.value)


@pytest.mark.parametrize("value", ["abc", -3, [1.5], [True], [0, -1], True, 1.0, "1", [[0]]])
def test_layers_to_transform_takes_ints_from_zero(value):
    with pytest.raises(ValueError) as err:
        AdaLoraConfig(total_step=10, layers_to_transform=value)
    assert str(err.value).startswith("layers_to_transform=")


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules", "modules_to_save", "layers_pattern"])
@pytest.mark.parametrize("value", [3, [3], ["q", None], b"q", {"q": 1}])
def test_name_lists_take_only_strings(field, value):
    extra = {"layers_to_transform": 0} if field == "layers_pattern" else {}
    with pytest.raises(ValueError) as err:
        AdaLoraConfig(total_step=10, **extra, **{field: value})
    assert str(err.value).startswith(f"{field}=")


# --- from_dict: JSON objects only, unknown keys visible ------------------------------------------

@pytest.mark.parametrize("cls", [AdaLoraConfig, MicroLoraConfig, EwcConfig])
@pytest.mark.parametrize("data", [[["total_step", 10]], "total_step", None, 3])
def test_from_dict_wants_a_json_object(cls, data):
    with pytest.raises(ValueError, match=f"{cls.__name__}: expected a JSON object"):
        cls.from_dict(data)


def test_unknown_keys_warn_once_naming_them():
    d = AdaLoraConfig(total_step=10).to_dict()
    with pytest.warns(AdaLoraWarning) as rec:
        c = AdaLoraConfig.from_dict({**d, "beta_1": 0.5, "totl_step": 3})
    assert len(rec) == 1 and "['beta_1', 'totl_step']" in str(rec[0].message)
    assert c == AdaLoraConfig(total_step=10)  # ignored, as PEFT's from_dict would


def test_peft_keys_do_not_warn(tmp_path):
    peft = pytest.importorskip("peft")
    from adalora_core.config import PEFT_ONLY_KEYS

    pc = peft.AdaLoraConfig(total_step=10, init_r=4, target_r=2, target_modules=["q", "v"],
                            base_model_name_or_path="gpt2", revision="main", task_type="CAUSAL_LM")
    pc.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(saved) <= {f.name for f in dataclasses.fields(AdaLoraConfig)} | set(PEFT_ONLY_KEYS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = AdaLoraConfig.from_dict(saved)
    assert (c.init_r, c.target_r, set(c.target_modules)) == (4, 2, {"q", "v"})
