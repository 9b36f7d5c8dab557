from __future__ import annotations

import math

import pytest

from adalora_core import AdaLoraConfig

OK = dict(total_step=100)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(total_step=None), "total_step"),
        (dict(total_step=0), "total_step"),
        (dict(total_step=-5), "total_step"),
        (dict(total_step=10.5), "total_step"),
        (dict(tinit=90, tfinal=10), "tinit"),
        (dict(tinit=100), "tinit"),
        (dict(orth_reg_weight=-0.1), "orth_reg_weight"),
        (dict(orth_reg_weight=math.inf), "orth_reg_weight"),
        (dict(init_r=0), "init_r"),
        (dict(target_r=-1), "target_r"),
        (dict(target_r=13), "target_r"),
        (dict(deltaT=0), "deltaT"),
        (dict(beta1=0.0), "beta1"),
        (dict(beta1=1.0), "beta1"),
        (dict(beta2=1.5), "beta2"),
        (dict(beta2=math.nan), "beta2"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(lora_dropout=-0.1), "lora_dropout"),
        (dict(tinit=-1), "tinit"),
        (dict(tfinal=-1), "tfinal"),
        (dict(lora_alpha=math.nan), "lora_alpha"),
        (dict(bias="some"), "bias"),
        (dict(target_modules=3), "target_modules"),
        (dict(target_modules="q.*", layers_to_transform=[0]), "layers_to_transform"),
        (dict(layers_pattern="layers"), "layers_pattern"),
        (dict(rank_pattern={"a.lora_E": [True]}), "rank_pattern"),
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
