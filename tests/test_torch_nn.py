"""The torch integration on its own: injection, the wrapper, merge, checkpoints, training state, bad input."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
from adalora_core.backends.torch_nn import (
    AdaLoraModel,
    SVDConv2d,
    SVDLayer,
    SVDLinear,
    get_adalora_model,
)
from adalora_core.backends.torch_nn import _parity as P
from adalora_core.backends.torch_nn.targets import find_targets
from torch import nn

import adalora_core as ac
from adalora_core.errors import CheckpointError

CFG = {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 4, "deltaT": 2, "total_step": 20, "lora_alpha": 8}


pytestmark = pytest.mark.usefixtures("torch_one_thread", "quiet")


def mlp():
    return P.build("mlp")


def wrap(model=None, **overrides):
    cfg = {**CFG, "target_modules": ["fc_in", "up", "down"], **overrides}
    torch.manual_seed(1)
    return get_adalora_model(model if model is not None else mlp(), ac.AdaLoraConfig(**cfg))


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def unchanged(module, snap):
    now = module.state_dict()
    return list(now) == list(snap) and all(torch.equal(now[k], snap[k]) for k in snap)


def x_mlp(seed=0):
    return P.inputs("mlp", seed)


# ------------------------------------------------------------------------ targets


def _targets(model, **cfg):
    return find_targets(model, ac.AdaLoraConfig(total_step=10, **cfg))


def test_names_match_exactly_or_by_dotted_suffix():
    m = mlp()
    assert _targets(m, target_modules=["up"]) == ["blocks.0.up", "blocks.1.up"]
    assert _targets(m, target_modules=["blocks.1.up"]) == ["blocks.1.up"]
    assert _targets(m, target_modules=r"blocks\.\d\.(up|down)") == [
        "blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]
    assert _targets(m, target_modules=["up", "down"], exclude_modules=["blocks.0.up"]) == [
        "blocks.0.down", "blocks.1.up", "blocks.1.down"]
    assert _targets(m, target_modules=["up", "down"], exclude_modules=r".*down") == ["blocks.0.up", "blocks.1.up"]
    assert _targets(m, target_modules=["up"], layers_to_transform=[1], layers_pattern=["blocks"]) == ["blocks.1.up"]
    with pytest.raises(ValueError, match="no module is left"):  # PEFT's default pattern wants 'x.layers.N.'
        _targets(m, target_modules=["up"], layers_to_transform=[1])
    assert _targets(m, target_modules=["up"], layers_to_transform=0, layers_pattern="blocks") == ["blocks.0.up"]


def test_a_name_is_never_a_substring_match():
    with pytest.raises(ValueError, match="do not exist") as exc:
        _targets(mlp(), target_modules=["fc"])  # 'fc' must not match 'fc_in'
    assert "fc_in" in str(exc.value)


def test_unknown_target_lists_close_matches():
    with pytest.raises(ValueError) as exc:
        _targets(P.build("llama"), target_modules=["q_prj", "v_proj"])
    msg = str(exc.value)
    assert "'q_prj'" in msg and "q_proj" in msg and "'v_proj'" not in msg.split("did you mean")[0][:-10]


def test_regex_that_matches_nothing():
    with pytest.raises(ValueError, match="matches no module"):
        _targets(mlp(), target_modules=r"encoder\..*")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        _targets(mlp(), target_modules=r"blocks\.(")


def test_default_targets_from_model_type():
    m = P.build("gpt2")
    assert _targets(m) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    with pytest.raises(ValueError, match="target_modules=None"):
        _targets(mlp())


@pytest.mark.parametrize("cfg", [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": r".*\.(q|k)_proj"},
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [0], "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "v_proj", "o_proj"], "exclude_modules": ["model.layers.0.self_attn.v_proj"]},
    {"target_modules": ["model.layers.1.mlp.up_proj", "q_proj"]},
])
def test_matching_agrees_with_peft(cfg):
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import check_target_module_exists

    model = P.build("llama")
    pcfg = peft.AdaLoraConfig(total_step=10, **cfg)
    expected = [k for k, _ in model.named_modules() if k and check_target_module_exists(pcfg, k)]
    assert _targets(model, **cfg) == expected


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("overrides, match", [
    ({"target_modules": ["blocks"]}, "ModuleList, which AdaLoRA cannot adapt"),
    ({"target_modules": ["fc_inn"]}, "did you mean"),
    ({"target_modules": ["up"], "modules_to_save": ["haed"]}, "modules_to_save"),
    ({"target_modules": ["up"], "rank_pattern": {"nope.lora_E": [True] * 4}}, "rank_pattern"),
])
def test_bad_injection_changes_nothing(overrides, match):
    m = mlp()
    snap = snapshot(m)
    grads = [p.requires_grad for p in m.parameters()]
    with pytest.raises(ValueError, match=match):
        wrap(m, **overrides)
    assert unchanged(m, snap)
    assert [p.requires_grad for p in m.parameters()] == grads
    assert not any(isinstance(x, SVDLayer) for x in m.modules())


def test_grouped_conv_is_refused():
    m = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=2"):
        get_adalora_model(m, ac.AdaLoraConfig(total_step=5, target_modules=["0"]))
    assert isinstance(m[0], nn.Conv2d)


def test_two_trainable_adapters_are_refused():
    om = wrap()
    snap = snapshot(om)
    with pytest.raises(ValueError, match="one adapter at a time"):
        om.add_adapter("second", ac.AdaLoraConfig(**CFG, target_modules=["up"]))
    assert unchanged(om, snap) and list(om.peft_config) == ["default"]
    with pytest.raises(ValueError, match="already exists"):
        om.add_adapter("default", ac.AdaLoraConfig(**CFG, target_modules=["up"], inference_mode=True))
    with pytest.raises(ValueError, match="does not exist"):
        om.set_adapter("nope")
    with pytest.raises(ValueError, match="does not exist"):
        om.delete_adapter("nope")
    with pytest.raises(TypeError, match="already an AdaLoraModel"):
        get_adalora_model(om, ac.AdaLoraConfig(**CFG, target_modules=["up"]))


def _one_step(om, step):
    out = om(**x_mlp(step))
    (out.loss + om.orth_loss()).backward()
    om.update_and_allocate(step)
    om.zero_grad()


def test_bad_steps_change_nothing():
    om = wrap(init_lora_weights=False)
    for s in range(5):
        _one_step(om, s)
    snap = snapshot(om)
    arrays, meta = om.allocator.state_dict()
    for bad in (3, CFG["total_step"] + 1, -1, 2.0):
        with pytest.raises(ValueError, match="step"):
            om.update_and_allocate(bad)
        assert unchanged(om, snap)
        a2, m2 = om.allocator.state_dict()
        assert m2 == meta and all(torch.equal(arrays[k], a2[k]) for k in arrays)


def test_no_trainable_adapter():
    om = wrap(inference_mode=True)
    assert om.trainable_parameters() == []
    with pytest.raises(ValueError, match="no trainable adapter"):
        om.update_and_allocate(0)
    with pytest.raises(ValueError, match="no trainable adapter"):
        om.orth_loss()


# ------------------------------------------------------------------------ wrapper


def test_wrapper_is_called_like_the_model():
    base = mlp()
    om = wrap(copy.deepcopy(base))
    x = x_mlp()
    a, b = base(**x), om(**x)
    assert type(a) is type(b)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)  # E = 0: the base model exactly
    assert om(x["x"]).loss is None  # positional arguments pass through
    gpt = P.build("gpt2")
    og = get_adalora_model(copy.deepcopy(gpt), ac.AdaLoraConfig(total_step=5))
    assert og.config is og.get_base_model().config  # attributes fall through to the wrapped model
    ids = P.inputs("gpt2", 0)["input_ids"]
    gpt.eval()
    og.eval()
    assert torch.equal(gpt(ids).logits, og(ids).logits)


def test_parameter_names_follow_peft():
    om = wrap()
    keys = [k for k in om.state_dict() if k.startswith("model.blocks.0.up.")]
    assert keys == ["model.blocks.0.up.base_layer.weight", "model.blocks.0.up.base_layer.bias",
                    "model.blocks.0.up.lora_A.default", "model.blocks.0.up.lora_B.default",
                    "model.blocks.0.up.lora_E.default", "model.blocks.0.up.ranknum.default"]
    trainable = [n for n, p in om.named_parameters() if p.requires_grad]
    assert len(trainable) == 3 * 5 and all(n.rsplit(".", 2)[-2] in ("lora_A", "lora_B", "lora_E") for n in trainable)
    assert [id(p) for p in om.trainable_parameters()] == [id(p) for n, p in om.named_parameters() if p.requires_grad]
    assert isinstance(om.model.fc_in, SVDLinear) and isinstance(om.model.fc_in.base_layer, nn.Linear)


def test_disable_adapter_runs_the_base_model():
    base = mlp()
    om = wrap(copy.deepcopy(base), init_lora_weights=False)
    x = x_mlp()
    adapted = om(**x).logits
    with om.disable_adapter():
        assert torch.equal(om(**x).logits, base(**x).logits)
    assert torch.equal(om(**x).logits, adapted)


def test_merge_unmerge_and_unload():
    base = mlp()
    om = wrap(copy.deepcopy(base), init_lora_weights=False)
    x = x_mlp()
    before = om(**x).logits.detach()
    weights = {k: v.clone() for k, v in om.state_dict().items() if "base_layer" in k}
    om.merge()
    assert all(layer.merged for layer in om.svd_layers().values())
    torch.testing.assert_close(om(**x).logits, before, rtol=1e-5, atol=1e-6)
    om.unmerge()
    for k, v in weights.items():
        torch.testing.assert_close(om.state_dict()[k], v, rtol=0, atol=1e-6)
    plain = om.merge_and_unload()
    assert type(plain) is P.TinyMLP and not any(isinstance(m, SVDLayer) for m in plain.modules())
    torch.testing.assert_close(plain(**x).logits, before, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="unloaded"):
        om(**x)


def test_merge_refuses_non_finite_and_rolls_back():
    om = wrap(init_lora_weights=False)
    with torch.no_grad():
        om.model.blocks[1].down.lora_E["default"][0] = float("inf")
    snap = snapshot(om)
    with pytest.raises(ValueError, match="non-finite"):
        om.merge()
    assert unchanged(om, snap)
    assert not any(layer.merged for layer in om.svd_layers().values())


def test_orth_loss_is_explicit_and_free_at_weight_zero(monkeypatch):
    om = wrap(orth_reg_weight=0.0)
    import adalora_core.backends.torch_nn.model as model_module

    monkeypatch.setattr(model_module, "orth_reg", lambda pairs: pytest.fail("orth_reg computed at weight 0"))
    z = om.orth_loss()
    assert z.shape == () and z.item() == 0.0
    om2 = wrap(orth_reg_weight=0.5)
    monkeypatch.undo()
    val = om2.orth_loss()
    assert val.requires_grad and val.item() > 0
    base_loss = mlp()(**x_mlp()).loss
    assert torch.equal(om2(**x_mlp()).loss, base_loss)  # never added by the forward


def test_fast_forward_error_is_small():
    """The default (folded) forward against PEFT's exact op order."""
    base = P.build("llama")
    cfg = ac.AdaLoraConfig(**{**CFG, "target_modules": P.TARGETS["llama"], "init_lora_weights": False})
    torch.manual_seed(1)
    exact = get_adalora_model(copy.deepcopy(base), cfg, exact_peft=True)
    torch.manual_seed(1)
    fast = get_adalora_model(copy.deepcopy(base), cfg)
    x = P.inputs("llama", 0)
    exact.eval()
    fast.eval()
    with torch.no_grad():
        a, b = exact(**x).logits, fast(**x).logits
    err = ((a - b).abs().max() / a.abs().max()).item()
    assert err < 1e-5  # measured up to 4e-6 on these models; docs/peft-differences.md


def test_conv2d_and_bf16_outputs_keep_the_base_dtype(tmp_path):
    m = P.build("conv")
    om = get_adalora_model(m, ac.AdaLoraConfig(**CFG, target_modules=["conv1", "conv2"], init_lora_weights=False))
    assert isinstance(om.model.conv1, SVDConv2d)
    assert om.model.conv1.lora_A["default"].shape == (4, 3 * 3 * 3)
    x = P.inputs("conv", 0)
    om.eval()
    om.save_pretrained(tmp_path)
    back = AdaLoraModel.from_pretrained(P.build("conv"), tmp_path)
    assert torch.equal(om(**x).logits, back(**x).logits)
    b16 = get_adalora_model(P.build("mlp", torch.bfloat16), ac.AdaLoraConfig(**CFG, target_modules=["up"]))
    out = b16(**P.inputs("mlp", 0, torch.bfloat16))
    assert out.logits.dtype == torch.bfloat16
    assert b16.model.blocks[0].up.lora_A["default"].dtype == torch.float32


# ------------------------------------------------------------------ training state


def _run(om, opt, start, stop):
    for step in range(start, stop):
        out = om(**x_mlp(step))
        (out.loss + om.orth_loss()).backward()
        opt.step()
        om.update_and_allocate(step)
        opt.zero_grad()


def test_exact_resume_from_training_state(tmp_path):
    def fresh():
        om = wrap()
        return om, torch.optim.AdamW(om.trainable_parameters(), lr=2e-2)

    full, opt = fresh()
    _run(full, opt, 0, CFG["total_step"] + 1)
    for cut in (0, 7, CFG["total_step"] - CFG["tfinal"] + 1):  # before any step, mid-budgeting, after the final mask
        first, opt1 = fresh()
        _run(first, opt1, 0, cut)
        first.save_training_state(tmp_path / f"s{cut}.safetensors")
        torch.save(opt1.state_dict(), tmp_path / f"o{cut}.pt")
        second, opt2 = fresh()
        second.load_training_state(tmp_path / f"s{cut}.safetensors")
        opt2.load_state_dict(torch.load(tmp_path / f"o{cut}.pt"))
        _run(second, opt2, cut, CFG["total_step"] + 1)
        for a, b in zip(full.trainable_parameters(), second.trainable_parameters()):
            assert torch.equal(a, b), cut
        assert full.rank_pattern == second.rank_pattern


def test_training_state_for_another_model_changes_nothing(tmp_path):
    om = wrap()
    _run(om, torch.optim.SGD(om.trainable_parameters(), lr=0.1), 0, 4)
    om.save_training_state(tmp_path / "s.safetensors")
    other = wrap(target_modules=["up", "down"])
    snap = snapshot(other)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        other.load_training_state(tmp_path / "s.safetensors")
    assert unchanged(other, snap) and other.allocator.last_step is None
    bigger = wrap(init_r=5)
    snap = snapshot(bigger)
    with pytest.raises(CheckpointError, match="shape"):
        bigger.load_training_state(tmp_path / "s.safetensors")
    assert unchanged(bigger, snap)


def test_missing_gradient_is_skipped_with_a_warning():
    om = wrap()
    out = om.model.head(om.model.fc_in(x_mlp()["x"]))  # the blocks get no gradient
    out.sum().backward()
    with pytest.warns(ac.AdaLoraWarning, match="no gradient"):
        om.update_and_allocate(0)
    assert om.allocator.missing_grads["blocks.0.up"] == 1


def test_lazy_public_names():
    assert ac.get_adalora_model is get_adalora_model
    assert ac.AdaLoraModel is AdaLoraModel
    pytest.importorskip("transformers")
    from transformers import TrainerCallback

    assert issubclass(ac.AdaLoraCallback, TrainerCallback)


def test_foreach_ema_override_is_bit_identical_to_the_core():
    from adalora_core.backends.torch import foreach_ema_update

    from adalora_core.allocator import ema_update

    g = torch.Generator().manual_seed(0)
    shapes = [(4, 16), (4, 1), (32, 4), (0, 8), (3, 3)]
    ms, us, ipts = ([torch.rand(s, generator=g) * 10 ** torch.randint(-8, 3, (1,), generator=g).item()
                     for s in shapes] for _ in range(3))
    for b1, b2 in ((0.85, 0.85), (0.5, 0.999), (1e-3, 0.3)):
        ref_m, ref_u = ema_update(ms, us, ipts, b1, b2)
        got_m, got_u = foreach_ema_update(ms, us, ipts, b1, b2)
        assert all(torch.equal(a, b) for a, b in zip(ref_m + ref_u, got_m + got_u))
    assert foreach_ema_update([], [], [], 0.85, 0.85) == ([], [])


def test_deepcopy_and_device_move():
    om = wrap(init_lora_weights=False)
    twin = copy.deepcopy(om)
    x = x_mlp()
    assert torch.equal(om(**x).logits, twin(**x).logits)
    assert twin.to(torch.float64).model.fc_in.lora_A["default"].dtype == torch.float64


def test_pickle_round_trip(tmp_path):
    om = wrap()
    _run(om, torch.optim.AdamW(om.trainable_parameters(), lr=1e-2), 0, 5)
    torch.save(om, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    x = x_mlp()
    assert torch.equal(om(**x).logits, back(**x).logits)
    assert back.rank_pattern == om.rank_pattern
    _run(back, torch.optim.AdamW(back.trainable_parameters(), lr=1e-2), 5, 7)  # the allocator still works
    assert back.allocator.last_step == 6


# ----------------------------------------------- refused loads and re-wrapping change nothing


def test_wrapping_the_same_base_again_is_refused():
    base = mlp()
    om = wrap(base)
    opt = torch.optim.SGD(om.trainable_parameters(), lr=0.1)
    _run(om, opt, 0, 3)
    snap, grads = snapshot(base), [p.requires_grad for p in base.parameters()]
    with pytest.raises(ValueError, match='already holds adapter "default".*add_adapter'):
        wrap(base)  # a notebook cell run twice
    with pytest.raises(ValueError, match='already holds adapter "default"'):
        get_adalora_model(base, ac.AdaLoraConfig(**CFG, target_modules=["fc_in"]))  # other targets, same name
    assert unchanged(base, snap) and [p.requires_grad for p in base.parameters()] == grads
    _run(om, opt, 3, 4)  # the first wrapper trains on
    assert om.allocator.last_step == 3


def model_snapshot(om):
    """The module's tensors, the allocator's full state and the kept indices, copied."""
    arrays, meta = om.allocator.state_dict()
    return (snapshot(om), {k: v.clone() for k, v in arrays.items()}, copy.deepcopy(meta),
            copy.deepcopy(om._kept_index))


def model_unchanged(om, snap):
    arrays, meta = om.allocator.state_dict()
    return (unchanged(om, snap[0]) and arrays.keys() == snap[1].keys()
            and all(arrays[k].dtype == v.dtype and torch.equal(arrays[k], v) for k, v in snap[1].items())
            and meta == snap[2] and om._kept_index == snap[3])


def _bad_training_state(case, tensors, meta):
    tensors, meta = dict(tensors), copy.deepcopy(meta)
    alloc, up = meta["allocator"], "blocks.0.up"
    if case == "last_step='7'":
        alloc["last_step"] = "7"
    elif case == "last_step=-5":
        alloc["last_step"] = -5
    elif case == "no_budget":
        del alloc["budget"]
    elif case == "budget='x'":  # with a valid last_step=7: the old code moved to step 7, then failed
        alloc["budget"] = "x"
    elif case == "skipped_steps=None":
        alloc["skipped_steps"] = None
    elif case == "nan_ema":
        tensors[f"allocator.ema_unc.{up}.E"] = tensors[f"allocator.ema_unc.{up}.E"] * float("nan")
    elif case == "A_ema_shape":
        tensors[f"allocator.ema_ipt.{up}.A"] = tensors[f"allocator.ema_ipt.{up}.A"][:, :1]
    elif case == "ema_float64":
        tensors[f"allocator.ema_ipt.{up}.B"] = tensors[f"allocator.ema_ipt.{up}.B"].double()
    elif case == "missing_module":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("allocator.") or f".{up}." not in k}
    elif case == "weights_float64":
        tensors[f"weights.{up}.lora_A"] = tensors[f"weights.{up}.lora_A"].double()
    elif case == "weights_not_a_tensor":
        tensors[f"weights.{up}.lora_A"] = tensors[f"weights.{up}.lora_A"].numpy()
    elif case == "kept_index_junk":
        meta["kept_index"] = {up: "x"}
    elif case == "kept_index_out_of_range":
        meta["kept_index"] = {up: [0, 1, 2, 9]}
    elif case == "version=2":
        meta["version"] = 2
    elif case == "adapter_name=3":
        meta["adapter_name"] = 3
    elif case == "meta_is_a_list":
        meta = [meta]
    elif case == "allocator_is_a_list":
        meta["allocator"] = [alloc]
    return tensors, meta


@pytest.mark.parametrize("case", ["last_step='7'", "last_step=-5", "no_budget", "budget='x'", "skipped_steps=None",
                                  "nan_ema", "A_ema_shape", "ema_float64", "missing_module", "weights_float64",
                                  "weights_not_a_tensor", "kept_index_junk", "kept_index_out_of_range",
                                  "version=2", "adapter_name=3", "meta_is_a_list", "allocator_is_a_list"])
def test_a_refused_training_state_changes_nothing(case):
    src = wrap()
    _run(src, torch.optim.SGD(src.trainable_parameters(), lr=0.1), 0, 8)
    tensors, meta = src.training_state_dict()
    om = wrap()
    opt = torch.optim.SGD(om.trainable_parameters(), lr=0.1)
    _run(om, opt, 0, 3)
    snap = model_snapshot(om)
    with pytest.raises(CheckpointError, match="training state"):
        om.load_training_state_dict(*_bad_training_state(case, tensors, meta))
    assert model_unchanged(om, snap)
    _run(om, opt, 3, 4)  # not moved to another step: step 3 still follows step 2


def test_bf16_base_trains_with_float32_adapter_gradients():
    om = get_adalora_model(P.build("mlp", torch.bfloat16),
                           ac.AdaLoraConfig(**CFG, target_modules=["up"], init_lora_weights=False))
    out = om(**P.inputs("mlp", 0, torch.bfloat16))
    out.loss.float().backward()
    om.update_and_allocate(0)
    ema = om.allocator.ema_ipt["blocks.0.up"]
    assert all(t.dtype == torch.float32 and bool(t.abs().sum() > 0) for t in ema)


def test_a_parameter_replaced_after_the_first_steps_is_the_one_used():
    """The per-step parameter cache notices an assignment into lora_A/lora_E of any module, not just the first."""
    om = wrap(init_lora_weights=False)
    for s in range(3):
        _one_step(om, s)
    layer = om.svd_layers()["blocks.1.down"]
    old_A, old_E = layer.lora_A["default"], layer.lora_E["default"]
    new_A, new_E = (nn.Parameter(t.detach().clone()) for t in (old_A, old_E))
    old_values = old_E.detach().clone()
    layer.lora_A["default"], layer.lora_E["default"] = new_A, new_E
    om.orth_loss().backward()
    assert new_A.grad is not None and old_A.grad is None
    om.zero_grad()
    for s in range(3, 7):  # into the budgeting phase: masks are written into E
        _one_step(om, s)
    pattern = om.allocator.rank_pattern["blocks.1.down.lora_E"]
    assert not all(pattern)
    assert all(bool(new_E[i, 0] == 0) for i, kept in enumerate(pattern) if not kept)
    assert torch.equal(old_E.detach(), old_values)  # the old one is no longer written


@pytest.mark.parametrize("change", ["cast", "replaced_by_another_shape"])
def test_a_parameter_changed_after_the_first_steps_is_refused(change):
    """A parameter cast in place (``.data`` keeps the object) or replaced by one of another shape is
    caught by the allocator's checks after steps that ran with the per-module checks skipped."""
    om = wrap(init_lora_weights=False)
    for s in range(3):
        _one_step(om, s)
    out = om(**x_mlp(3))
    (out.loss + om.orth_loss()).backward()
    layer = om.svd_layers()["blocks.1.down"]
    A = layer.lora_A["default"]
    if change == "cast":
        A.data = A.data.double()
    else:
        layer.lora_A["default"] = nn.Parameter(torch.zeros(A.shape[0], A.shape[1] + 1))
        layer.lora_A["default"].grad = torch.zeros_like(layer.lora_A["default"])
    snap = snapshot(om)
    arrays, meta = om.allocator.state_dict()
    with pytest.raises(ValueError, match="blocks.1.down|dtype"):
        om.update_and_allocate(3)
    a2, m2 = om.allocator.state_dict()
    assert m2 == meta and all(torch.equal(arrays[k], a2[k]) for k in arrays)
    assert unchanged(om, snap)
