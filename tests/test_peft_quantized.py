"""AdaLoRA on bitsandbytes 8-bit and 4-bit bases (CPU), beside PEFT's SVDLinear8bitLt / SVDLinear4bit.

A small net whose two hidden layers are ``bnb.nn.Linear8bitLt`` (int8
weights) or ``bnb.nn.Linear4bit`` (NF4, packed uint8 weights), built the
same way twice; PEFT's quantized AdaLoRA layers and ours train in lock step
bit for bit (``exact_peft=True``), checkpoints move both ways, and merging
into a quantized weight is refused, as PEFT refuses it.
"""

from __future__ import annotations

import types

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
from torch import nn

import adalora_core as ac

pytestmark = pytest.mark.usefixtures("torch_one_thread", "quiet")

D = 64  # bitsandbytes' CPU 4-bit inference kernel packs in blocks: 16 is too small
CFG = {"target_modules": ["a", "b"], "init_r": 4, "target_r": 2, "total_step": 6, "tinit": 1, "tfinal": 2,
       "init_lora_weights": False}


class QuantNet(nn.Module):
    """Two quantized hidden layers and a float head; ``is_loaded_in_{8,4}bit`` as transformers sets it."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers = []
        for dense in (nn.Linear(D, D), nn.Linear(D, D)):
            q = bnb.nn.Linear8bitLt(D, D, has_fp16_weights=False) if bits == 8 else \
                bnb.nn.Linear4bit(D, D, compute_dtype=torch.float32, quant_type="nf4")
            q.load_state_dict(dense.state_dict())
            layers.append(q.to("cpu"))  # quantizes
        self.a, self.b = layers
        self.head = nn.Linear(D, 3)
        setattr(self, f"is_loaded_in_{bits}bit", True)

    def forward(self, x, labels=None):
        logits = self.head(torch.relu(self.b(torch.relu(self.a(x)))))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return types.SimpleNamespace(loss=loss, logits=logits)


def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(5, D, generator=g), torch.randint(0, 3, (5,), generator=g)


def pair(bits, **kw):
    try:
        QuantNet(bits)(batch(0)[0])
    except Exception as exc:  # noqa: BLE001 (any backend failure means: not runnable on this machine)
        pytest.skip(f"bitsandbytes {bits}-bit layers do not run on this CPU: {exc}")
    torch.manual_seed(1)
    pm = peft.get_peft_model(QuantNet(bits), peft.AdaLoraConfig(**CFG))
    torch.manual_seed(1)
    om = ac.get_peft_model(QuantNet(bits), ac.AdaLoraConfig(**CFG), **kw)
    return pm, om


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_bases_train_as_peft(bits):
    pm, om = pair(bits, exact_peft=True)
    assert type(pm.base_model.model.a).__name__ == f"SVDLinear{'8bitLt' if bits == 8 else '4bit'}"
    assert om.svd_layers()["a"].in_features == D  # not the packed 4-bit weight's shape
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in (pm, om)]
    for step in range(6):
        x, y = batch(step)
        theirs = pm.base_model(x, labels=y).loss  # PEFT's tuner adds the regulariser
        ours = om(x, labels=y).loss + om.orth_loss()
        assert torch.equal(theirs, ours), step
        for loss, opt in zip((theirs, ours), opts):
            loss.backward()
            opt.step()
        pm.base_model.update_and_allocate(step)
        om.update_and_allocate(step)
        for opt in opts:
            opt.zero_grad()
    for name, layer in om.svd_layers().items():
        other = pm.base_model.model.get_submodule(name)
        for part in ("lora_A", "lora_E", "lora_B"):
            assert torch.equal(getattr(layer, part)["default"], getattr(other, part)["default"])


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_checkpoints_move_both_ways(bits, tmp_path):
    pm, om = pair(bits)
    x = batch(9)[0]
    om.save_pretrained(tmp_path / "ours")
    pm.save_pretrained(tmp_path / "peft")
    for src, want in (("ours", om), ("peft", pm)):
        want.eval()
        with torch.no_grad():
            expected = want(x).logits
            a = ac.AdaLoraModel.from_pretrained(QuantNet(bits), tmp_path / src, exact_peft=True)(x).logits
            b = peft.PeftModel.from_pretrained(QuantNet(bits), str(tmp_path / src))(x).logits
        assert torch.allclose(a, expected, atol=1e-5) and torch.allclose(b, expected, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_prepared_kbit_model_and_merge_refused(bits):
    model = peft.prepare_model_for_kbit_training(QuantNet(bits), use_gradient_checkpointing=False)
    om = ac.get_peft_model(model, ac.AdaLoraConfig(**CFG))
    x, y = batch(0)
    om(x, labels=y).loss.backward()
    assert all(p.grad is not None for p in om.trainable_parameters())
    before = {k: v.clone() for k, v in om.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(TypeError, match="must be real floating"):  # PEFT: NotImplementedError
        om.merge_and_unload()
    assert all(torch.equal(v, before[k]) for k, v in om.state_dict().items() if k in before)
