"""PEFT's AdaLoRA defects (docs/peft-differences.md, 1-7; 9 is in test_torch_callback.py), each shown on PEFT and fixed here.

Every test runs the same scenario on PEFT and on us: the PEFT half asserts
the defect (so the test would fail if we behaved like PEFT), the other half
asserts the fix. docs/peft-differences.md describes each one.
"""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from adalora_core.backends.torch_nn import AdaLoraModel
from adalora_core.backends.torch_nn import _parity as P

import adalora_core as ac

CFG = {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 4, "deltaT": 1, "total_step": 20, "lora_alpha": 8}


pytestmark = pytest.mark.usefixtures("torch_one_thread", "quiet")


def pair(**overrides):
    cfg = P.config_kwargs("mlp", **{**CFG, **overrides})
    b = P.build("mlp")
    return P.peft(b, **cfg), P.ours(b, **cfg)


def backward(model, step):
    loss, _ = P.loss_and_out(model, P.inputs("mlp", step))
    loss.backward()


def step_both(pm, om, step, opt_p=None, opt_o=None):
    for model, opt in ((pm, opt_p), (om, opt_o)):
        backward(model, step)
        if opt is not None:
            opt.step()
        P.update(model, step)
        model.zero_grad()


# 1 ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, field", [({"target_r": 6}, "target_r"), ({"deltaT": 0}, "deltaT"),
                                        ({"tinit": -1}, "tinit"), ({"init_r": 0}, "init_r")])
def test_1_config_is_validated_up_front(bad, field):
    cfg = P.config_kwargs("mlp", **{**CFG, **bad})
    peft.AdaLoraConfig(**cfg)  # PEFT accepts it ...
    with pytest.raises(ValueError, match=field):  # ... we name the field at construction
        ac.AdaLoraConfig(**cfg)


@pytest.mark.parametrize("bad", [{"target_r": 6}, {"deltaT": 0}])
def test_1_peft_fails_late_inside_the_allocator(bad):
    pm = P.peft(P.build("mlp"), **P.config_kwargs("mlp", **{**CFG, **bad}))
    for step in range(CFG["tinit"] + 1):  # warm-up: no masking, no failure yet
        backward(pm, step)
        P.update(pm, step)
        pm.zero_grad()
    backward(pm, CFG["tinit"] + 1)
    with pytest.raises((RuntimeError, ZeroDivisionError, IndexError)):  # kthvalue / step % 0
        P.update(pm, CFG["tinit"] + 1)


# 2 ------------------------------------------------------------------------------


def test_2_non_finite_gradient_does_not_poison_the_emas():
    pm, om = pair()
    for step in range(6):
        for model in (pm, om):
            backward(model, step)
            if step == 3:  # a gradient scaler would skip this optimizer step; the allocator still runs
                P.adapter_params(model)[0][1].grad[0, 0] = float("nan")
            P.update(model, step)
            model.zero_grad()
    peft_ipt = pm.base_model.rankallocator.exp_avg_ipt
    assert any(torch.isnan(v).any() for v in peft_ipt.values())  # PEFT: NaN forever
    assert om.allocator.skipped_steps == 1
    assert all(torch.isfinite(s).all() for s in om.allocator.scores().values())


def test_2_skipped_step_warns_once():
    _, om = pair()
    for step in range(4):
        backward(om, step)
        P.adapter_params(om)[0][1].grad[0, 0] = float("inf")
        if step == 0:
            with pytest.warns(ac.AdaLoraWarning, match="non-finite"):
                om.update_and_allocate(step)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                om.update_and_allocate(step)
        om.zero_grad()
    assert om.allocator.skipped_steps == 4


# 3 ------------------------------------------------------------------------------


def test_3_final_allocation_happens_even_if_step_T_f_is_missed():
    pm, om = pair()
    final = CFG["total_step"] - CFG["tfinal"]
    for step in [*range(7), final + 2]:  # the caller never passes T_f itself
        step_both(pm, om, step)
    target = CFG["target_r"] * 5
    peft_kept = sum(sum(v) for v in P.rank_pattern(pm).values())
    assert peft_kept > target  # PEFT keeps replaying a stale, larger pattern
    assert sum(om.current_ranks().values()) == target
    assert om.allocator.finalized


# 4 ------------------------------------------------------------------------------


def test_4_resume_reproduces_the_uninterrupted_run(tmp_path):
    """PEFT cannot save the importance EMAs: a resumed PEFT run diverges; ours is bit-identical."""
    cut, steps = 8, 14

    def run(model, start, stop, opt):
        for step in range(start, stop):
            backward(model, step)
            opt.step()
            P.update(model, step)
            opt.zero_grad()

    def fresh(impl):
        b = P.build("mlp")
        cfg = P.config_kwargs("mlp", **CFG)
        m = P.peft(b, **cfg) if impl == "peft" else P.ours(b, **cfg)
        return m, torch.optim.AdamW([p for _, p in P.adapter_params(m)], lr=2e-2)

    finals = {}
    for impl in ("peft", "ours"):
        full, opt = fresh(impl)
        run(full, 0, steps, opt)
        first, opt1 = fresh(impl)
        run(first, 0, cut, opt1)
        second, opt2 = fresh(impl)
        opt2.load_state_dict(opt1.state_dict())
        if impl == "ours":
            first.save_training_state(tmp_path / "state.safetensors")
            second.load_training_state(tmp_path / "state.safetensors")
        else:  # PEFT: the adapter weights (even unsliced) and the pattern; it has no way to save the EMAs
            with torch.no_grad():
                for (_, a), (_, b) in zip(P.adapter_params(first), P.adapter_params(second)):
                    b.copy_(a)
            second.peft_config["default"].rank_pattern = first.peft_config["default"].rank_pattern
        run(second, cut, steps, opt2)
        finals[impl] = all(torch.equal(a, b) for (_, a), (_, b) in
                           zip(P.adapter_params(full), P.adapter_params(second)))
    assert finals == {"peft": False, "ours": True}


def test_4_budget_comes_from_the_loaded_ranks(tmp_path):
    _, om = pair()
    opt = torch.optim.AdamW(om.trainable_parameters(), lr=3e-2)
    for step in range(CFG["total_step"] - CFG["tfinal"] + 1):
        backward(om, step)
        opt.step()
        om.update_and_allocate(step)
        opt.zero_grad()
    om.save_pretrained(tmp_path)
    kept = sum(om.current_ranks().values())
    n = len(om.current_ranks())
    ref = peft.PeftModel.from_pretrained(P.build("mlp"), str(tmp_path), is_trainable=True)
    assert ref.base_model.rankallocator.init_bgt == CFG["init_r"] * n != kept  # PEFT: stale
    back = AdaLoraModel.from_pretrained(P.build("mlp"), tmp_path, is_trainable=True)
    assert back.allocator.init_bgt == kept


# 5 ------------------------------------------------------------------------------


def test_5_adapter_names_match_exactly_not_by_substring():
    pm, om = pair(init_lora_weights=False)
    x = P.inputs("mlp", 0)
    loss_p, loss_o = pm.base_model(**x).loss, om(**x).loss + om.orth_loss()
    extra = P.config_kwargs("mlp", **{**CFG, "inference_mode": True, "init_lora_weights": False})
    pm.add_adapter("default2", peft.AdaLoraConfig(**extra))
    om.add_adapter("default2", ac.AdaLoraConfig(**extra))
    # PEFT's regulariser now includes "default2"'s matrices ("default" in "...lora_A.default2")
    assert not torch.equal(pm.base_model(**x).loss, loss_p)
    assert torch.equal(om(**x).loss + om.orth_loss(), loss_o)
    # and its allocator trips over default2's missing gradients; ours leaves default2 alone
    before = {k: v.clone() for k, v in om.state_dict().items() if k.endswith(".default2")}
    for model in (pm, om):
        loss, _ = P.loss_and_out(model, x)
        loss.backward()
    with pytest.raises(TypeError):
        P.update(pm, 0)
    om.update_and_allocate(0)
    after = om.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert set(om.allocator.names) == {k for k, _ in om.svd_layers().items()}


# 6 ------------------------------------------------------------------------------


def test_6_missing_gradient_is_skipped_not_a_crash():
    pm, om = pair()
    for model in (pm, om):
        inner = model.base_model.model if isinstance(model, peft.PeftModel) else model.model
        h = inner.fc_in(P.inputs("mlp", 0)["x"])  # the blocks' adapters get no gradient
        inner.head(h).sum().backward()
    with pytest.raises(TypeError):
        P.update(pm, 0)
    with pytest.warns(ac.AdaLoraWarning, match="no gradient"):
        om.update_and_allocate(0)
    assert om.allocator.missing_grads["blocks.1.down"] == 1


# 7 ------------------------------------------------------------------------------


def test_7_regulariser_never_added_in_eval_or_no_grad():
    pm, om = pair(init_lora_weights=False)
    x = P.inputs("mlp", 0)
    pm.eval()
    om.eval()
    with torch.no_grad():
        base_loss = pm.base_model.model(**x).loss  # PEFT's own layers, no regulariser
        assert not torch.equal(pm.base_model(**x).loss, base_loss)  # PEFT adds it in eval + no_grad
        assert torch.equal(om(**x).loss, base_loss)  # ours: the model's loss, as is


def test_7_weight_zero_costs_nothing(monkeypatch):
    pm, om = pair(orth_reg_weight=0.0)
    calls = {"n": 0}
    real_norm = torch.norm

    def counting_norm(*args, **kwargs):
        calls["n"] += 1
        return real_norm(*args, **kwargs)

    monkeypatch.setattr(torch, "norm", counting_norm)
    x = P.inputs("mlp", 0)
    pm.base_model(**x)
    assert calls["n"] > 0  # PEFT computes the regulariser to multiply it by 0
    import adalora_core.backends.torch_nn.model as model_module

    monkeypatch.setattr(model_module, "orth_reg", lambda pairs: pytest.fail("computed at weight 0"))
    om(**x)
    assert om.orth_loss().item() == 0.0
