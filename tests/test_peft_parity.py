"""Bit-exact parity with PEFT's AdaLoRA in float32 on CPU, on the same base models and seeds.

Each test builds the base model once, deep-copies it for PEFT and for us, and
seeds torch identically before wrapping. "Equal" means ``torch.equal`` /
``np.array_equal``: no tolerance anywhere in this file.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from adalora_core.backends.torch_nn import _parity as P

KINDS = ["gpt2", "llama", "mlp", "conv"]
STEPS = 61  # steps 0..60 = total_step: warm-up, budgeting (deltaT=3), final allocation at 48, replay


pytestmark = pytest.mark.usefixtures("torch_one_thread", "quiet")


@functools.cache
def base(kind: str, dtype: str = "float32"):
    return P.build(kind, getattr(torch, dtype))


def pair(kind: str, dtype: str = "float32", **overrides):
    cfg = P.config_kwargs(kind, **overrides)
    b = base(kind, dtype)
    return P.peft(b, **cfg), P.ours(b, **cfg)


def peft_path_params(pm):
    return {n.replace("base_model.model.", "", 1): p for n, p in pm.named_parameters()
            if ".lora_" in n or ".ranknum." in n}


def our_path_params(om):
    return {n.replace("model.", "", 1): p for n, p in om.named_parameters() if ".lora_" in n or ".ranknum." in n}


@functools.cache
def trajectories(kind: str, **extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm, om = pair(kind, **dict(extra))
        return P.trajectory(pm, kind, STEPS), P.trajectory(om, kind, STEPS)


# ------------------------------------------------------------------ initialisation


@pytest.mark.parametrize("kind", KINDS)
def test_initialisation_and_rng_order(kind):
    cfg = P.config_kwargs(kind)
    b = base(kind)
    pm = P.peft(b, **cfg)
    after_peft = torch.rand(4)
    om = P.ours(b, **cfg)
    after_ours = torch.rand(4)
    pp, op = peft_path_params(pm), our_path_params(om)
    assert list(pp) == list(op)  # same names (…lora_A.default, …ranknum.default), same order
    for k in pp:
        assert torch.equal(pp[k], op[k]), k
        assert pp[k].requires_grad == op[k].requires_grad, k
    assert torch.equal(after_peft, after_ours)  # the same number of draws from the default generator
    frozen_p = sorted(n.replace("base_model.model.", "") for n, p in pm.named_parameters() if not p.requires_grad)
    frozen_o = sorted(n.replace("model.", "", 1) for n, p in om.named_parameters() if not p.requires_grad)
    assert frozen_p == frozen_o


@pytest.mark.parametrize("kind", KINDS)
def test_forward_with_random_E(kind):
    pm, om = pair(kind, init_lora_weights=False)  # E = randn: a non-zero delta from the start
    pm.eval()
    om.eval()
    x = P.inputs(kind, 0)
    with torch.no_grad():
        a = pm.base_model.model(**x).logits
        b = om(**x).logits
        assert torch.equal(a, b)
        assert not torch.equal(b, base(kind)(**x).logits)


# ------------------------------------------------------------ 61-step trajectories


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("what", ["loss", "grads", "weights", "masks", "logits"])
def test_training_trajectory(kind, what):
    """Loss with the regulariser, every gradient, every weight after update_and_allocate, the rank pattern."""
    ref, got = trajectories(kind)
    a, b = ref[what], got[what]
    assert a.shape == b.shape
    differs = (a != b).reshape(a.shape[0], -1).any(axis=1)
    assert not differs.any(), f"{what} differs first at index {int(np.argmax(differs))}"


@pytest.mark.parametrize("kind", ["gpt2", "mlp"])
def test_trajectory_reaches_target_budget(kind):
    _, got = trajectories(kind)
    cfg = P.config_kwargs(kind)
    modules = got["masks"].shape[1] // cfg["init_r"]
    kept = got["masks"].sum(axis=1)
    assert kept[0] == modules * cfg["init_r"]
    assert kept[-1] == modules * cfg["target_r"]
    assert np.all(np.diff(kept[: cfg["total_step"] - cfg["tfinal"] + 1]) <= 0)


def test_dropout_parity():
    """lora_dropout > 0: the same dropout draws in the same order."""
    ref, got = trajectories("mlp", lora_dropout=0.25)
    for k in ref:
        assert np.array_equal(ref[k], got[k]), k


def test_orth_weight_zero_parity():
    ref, got = trajectories("llama", orth_reg_weight=0.0)
    for k in ref:
        assert np.array_equal(ref[k], got[k]), k


def test_orth_value_alone():
    """Our orth_loss() equals what PEFT's forward adds to the loss."""
    pm, om = pair("gpt2", init_lora_weights=False)
    x = P.inputs("gpt2", 3)
    torch.manual_seed(5)
    with_reg = pm.base_model(**x).loss
    torch.manual_seed(5)
    plain = pm.base_model.model(**x).loss
    torch.manual_seed(5)
    ours_plain = om(**x).loss
    assert torch.equal(plain, ours_plain)
    assert torch.equal(with_reg, ours_plain + om.orth_loss())


# ------------------------------------------------------------------ merge / unmerge


def _trained_pair(kind, steps=8, **overrides):
    pm, om = pair(kind, **overrides)
    P.trajectory(pm, kind, steps)
    P.trajectory(om, kind, steps)
    return pm, om


def _base_weights(model):
    prefix = "base_model.model." if isinstance(model, peft.PeftModel) else "model."
    return {n.removeprefix(prefix): p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}


@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge(kind):
    pm, om = _trained_pair(kind)
    pm.eval()
    om.eval()
    x = P.inputs(kind, 99)
    pm.base_model.merge_adapter()
    om.merge()
    wp, wo = _base_weights(pm), _base_weights(om)
    assert list(wp) == list(wo)
    for k in wp:
        assert torch.equal(wp[k], wo[k]), k
    with torch.no_grad():
        assert torch.equal(pm.base_model.model(**x).logits, om(**x).logits)
    pm.base_model.unmerge_adapter()
    om.unmerge()
    wp, wo = _base_weights(pm), _base_weights(om)
    for k in wp:
        assert torch.equal(wp[k], wo[k]), k
    with torch.no_grad():
        assert torch.equal(pm.base_model.model(**x).logits, om(**x).logits)


@pytest.mark.parametrize("kind", ["gpt2", "conv"])
def test_merge_and_unload(kind):
    pm, om = _trained_pair(kind)
    x = P.inputs(kind, 98)
    mp = pm.merge_and_unload().eval()
    mo = om.merge_and_unload().eval()
    assert type(mo) is type(base(kind))
    assert [n for n, _ in mp.named_parameters()] == [n for n, _ in mo.named_parameters()]
    for (n, a), (_, b) in zip(mp.named_parameters(), mo.named_parameters()):
        assert torch.equal(a, b), n
    with torch.no_grad():
        assert torch.equal(mp(**x).logits, mo(**x).logits)


# ------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_bf16_base_model(kind):
    """A bf16 base: adapters drawn in fp32, rounded through bf16, kept in fp32 (PEFT's autocast_adapter_dtype)."""
    pm, om = pair(kind, dtype="bfloat16", init_lora_weights=False)
    pp, op = peft_path_params(pm), our_path_params(om)
    for k in pp:
        assert pp[k].dtype == op[k].dtype == torch.float32, k
        assert torch.equal(pp[k], op[k]), k
    # the rounding really happened: the values are bf16-representable
    a = next(v for k, v in op.items() if k.endswith("lora_A.default"))
    assert torch.equal(a, a.to(torch.bfloat16).float())
    ref = P.trajectory(pm, kind, 6)
    got = P.trajectory(om, kind, 6)
    for k in ref:
        assert np.array_equal(ref[k], got[k]), k
    x = P.inputs(kind, 7)
    with torch.no_grad():
        out = om(**x).logits
    assert out.dtype == torch.bfloat16


# ------------------------------------------------------------------- several adapters


def _second_config(kind, **extra):
    cfg = P.config_kwargs(kind, init_r=3, lora_alpha=4, init_lora_weights=False, inference_mode=True, **extra)
    return cfg


@pytest.mark.parametrize("kind", ["gpt2", "mlp"])
def test_add_set_delete_adapter(kind):
    import adalora_core as ac

    pm, om = pair(kind, init_lora_weights=False)
    cfg = _second_config(kind)
    torch.manual_seed(7)
    pm.add_adapter("other", peft.AdaLoraConfig(**cfg))
    rp = torch.rand(2)
    torch.manual_seed(7)
    om.add_adapter("other", ac.AdaLoraConfig(**cfg))
    ro = torch.rand(2)
    assert torch.equal(rp, ro)
    pp, op = peft_path_params(pm), our_path_params(om)
    assert sorted(pp) == sorted(op)
    for k in pp:
        assert torch.equal(pp[k], op[k]), k
    assert not any(p.requires_grad for k, p in op.items() if k.endswith(".other"))
    pm.eval()
    om.eval()
    x = P.inputs(kind, 1)
    with torch.no_grad():
        for name in ["other", "default", "other"]:
            pm.set_adapter(name)
            om.set_adapter(name)
            assert torch.equal(pm.base_model.model(**x).logits, om(**x).logits), name
        pm.delete_adapter("other")
        om.delete_adapter("other")
        assert om.active_adapter == "default"
        assert torch.equal(pm.base_model.model(**x).logits, om(**x).logits)
    assert sorted(peft_path_params(pm)) == sorted(our_path_params(om))


def test_trainable_beside_inference_adapter():
    """Training the default adapter with an inference adapter loaded beside it (active: default)."""
    import adalora_core as ac

    kind = "mlp"
    pm, om = pair(kind)
    cfg = _second_config(kind)
    torch.manual_seed(7)
    pm.add_adapter("frozen", peft.AdaLoraConfig(**cfg))
    torch.manual_seed(7)
    om.add_adapter("frozen", ac.AdaLoraConfig(**cfg))
    # PEFT's allocator matches adapter names by substring; "frozen" shares none with "default"
    ref = P.trajectory(pm, kind, 20)
    got = P.trajectory(om, kind, 20)
    for k in ref:
        assert np.array_equal(ref[k], got[k]), k
    frozen_p = {k: v for k, v in peft_path_params(pm).items() if k.endswith(".frozen")}
    frozen_o = {k: v for k, v in our_path_params(om).items() if k.endswith(".frozen")}
    for k, v in frozen_p.items():
        assert torch.equal(v, frozen_o[k]), k


def test_load_adapter_beside(tmp_path):
    """A PEFT-saved adapter loaded as a second, inference adapter; outputs equal after set_adapter."""
    kind = "gpt2"
    pm, _ = _trained_pair(kind, steps=55)  # past the final allocation: pruned ranks
    pm.save_pretrained(tmp_path / "peft")
    pm2, om2 = pair(kind, init_lora_weights=False)
    pm2.load_adapter(str(tmp_path / "peft"), adapter_name="loaded")
    om2.load_adapter(tmp_path / "peft", adapter_name="loaded")
    assert not om2.training
    pm2.eval()
    x = P.inputs(kind, 2)
    with torch.no_grad():
        for name in ["loaded", "default"]:
            pm2.set_adapter(name)
            om2.set_adapter(name)
            assert torch.equal(pm2.base_model.model(**x).logits, om2(**x).logits), name
