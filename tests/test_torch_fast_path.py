"""The default torch path against PEFT's exact op order: the folded adapter forward and the grouped regulariser.

The default is not bit-identical to PEFT (``exact_peft=True`` is, see
tests/test_peft_parity.py); these tests bound its error and check its
gradients, in float32 and with a bfloat16 base model.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
from adalora_core.backends.torch_nn import _parity as P
from adalora_core.backends.torch_nn import get_adalora_model
from adalora_core.backends.torch_nn.layer import SVDDelta

import adalora_core as ac
from adalora_core.orth import orth_reg

pytestmark = pytest.mark.usefixtures("torch_one_thread", "quiet")

KINDS = ["gpt2", "llama", "mlp", "conv"]


def _pair(kind, dtype=torch.float32, **overrides):
    """(exact, fast) wrappers of one base model with the same adapter draws."""
    base = P.build(kind, dtype)
    cfg = P.config_kwargs(kind, init_lora_weights=False, **overrides)
    return P.ours(base, **cfg), P.ours(base, exact_peft=False, **cfg)


def _rel(a, b):
    """Largest difference relative to ``a``'s largest entry (0 where both are all zero)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-300)).item()


def _loss_and_grads(model, kind, dtype=torch.float32, seed=0):
    torch.manual_seed(10_000 + seed)
    loss, out = P.loss_and_out(model, P.inputs(kind, seed, dtype))
    loss.backward()
    grads = [p.grad.clone() for _, p in P.adapter_params(model)]
    model.zero_grad()
    return loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("kind", KINDS)
def test_fast_path_is_as_close_to_float64_as_the_exact_path(kind):
    """Loss, logits and every gradient in float32, both paths against a float64 run of the exact path.

    The fast path's error is float32 rounding, of the exact path's own size:
    rounding from the layers above reaches each gradient, so per tensor the
    two differ by a few times either way (errors relative to the tensor's
    largest entry; a wrong factor or transpose would be O(1)).
    """
    exact, fast = _pair(kind)
    assert fast.svd_layers() and not any(layer.exact_peft for layer in fast.svd_layers().values())
    cfg = P.config_kwargs(kind, init_lora_weights=False)
    ref = _loss_and_grads(P.ours(P.build(kind).double(), **cfg), kind, torch.float64)
    got = {"exact": _loss_and_grads(exact, kind), "fast": _loss_and_grads(fast, kind)}
    assert got["fast"][1].dtype == torch.float32
    err = {k: [_rel(a, b) for a, b in zip((ref[0], ref[1], *ref[2]), (v[0], v[1], *v[2]))] for k, v in got.items()}
    assert err["fast"][1] < 1e-5  # logits
    assert max(err["fast"]) <= 4 * max(err["exact"])
    for e, f in zip(err["exact"], err["fast"]):
        assert f <= max(10 * e, 1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mlp"])
def test_fast_path_with_a_bf16_base(kind):
    """bf16 base, fp32 adapters: outputs stay bf16, gradients fp32, and as accurate as PEFT's op order.

    Reference: the exact model cast to float64 (same weights). In bf16 both
    paths are far from it (bf16 activations; gradients summed in bf16, in
    an order set by the graph), and the fast path is no farther.
    """
    exact, fast = _pair(kind, torch.bfloat16)
    ref = _loss_and_grads(copy.deepcopy(exact).double(), kind, torch.float64)
    got = {"exact": _loss_and_grads(exact, kind, torch.bfloat16), "fast": _loss_and_grads(fast, kind, torch.bfloat16)}
    assert got["fast"][1].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got["fast"][2])
    assert _rel(got["exact"][1], got["fast"][1]) < 8e-3  # logits: two bf16 ulps (measured: equal)
    err = {k: [_rel(a, b) for a, b in zip(ref[2], v[2])] for k, v in got.items()}
    mean = {k: sum(v) / len(v) for k, v in err.items()}
    assert mean["fast"] <= 1.25 * mean["exact"], mean


def test_fast_path_with_dropout_uses_the_same_draws():
    exact, fast = _pair("mlp", lora_dropout=0.3)
    exact.train()
    fast.train()
    _, oe, ge = _loss_and_grads(exact, "mlp")
    _, of, gf = _loss_and_grads(fast, "mlp")
    assert _rel(oe, of) < 1e-5
    assert all(_rel(a, b) < 1e-4 for a, b in zip(ge, gf))


@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 5)])
@pytest.mark.parametrize("r", [3, 0])
def test_svd_delta_gradients_are_exact_in_float64(shape, r):
    """gradcheck on every input, including a rank-0 triplet and a 1-d input."""
    g = torch.Generator().manual_seed(0)

    def rand(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)

    result, x, A, E, B = rand(*shape[:-1], 4), rand(*shape), rand(r, 5), rand(r, 1), rand(4, r)
    torch.autograd.gradcheck(lambda res, *t: SVDDelta.apply(res.clone(), *t, 0.7), (result, x, A, E, B))
    want = result + 0.7 * (x @ (A * E).T) @ B.T
    assert torch.allclose(SVDDelta.apply(result.detach().clone(), x, A, E, B, 0.7), want)


def test_svd_delta_under_autocast_computes_in_the_adapter_dtype():
    _, fast = _pair("llama")
    x = P.inputs("llama", 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast(**x).loss.backward()
    grads = [p.grad for _, p in P.adapter_params(fast)]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_a_written_ranknum_is_read_again():
    """The folded factor is cached from the value ranknum was created with; a write to ranknum is seen."""
    exact, fast = _pair("mlp")
    x = P.inputs("mlp", 0)
    for model in (exact, fast):
        with torch.no_grad():
            for layer in model.svd_layers().values():
                layer.ranknum["default"].fill_(2.0)
    with torch.no_grad():
        assert _rel(exact(**x).logits, fast(**x).logits) < 1e-5


def test_orth_grouped_value_and_gradient_match_peft_order_and_peft():
    """Grouped by shape: equal to the module-by-module sum (and PEFT's value) up to float32 rounding."""
    cfg = P.config_kwargs("llama", init_lora_weights=False)
    pm, om = P.peft(P.build("llama"), **cfg), P.ours(P.build("llama"), exact_peft=False, **cfg)
    pairs = [(layer.lora_A["default"], layer.lora_B["default"]) for layer in om.svd_layers().values()]
    assert len({tuple(A.shape) for A, _ in pairs}) < len(pairs)  # there are groups to batch
    grouped, ordered = orth_reg(pairs), orth_reg(pairs, peft_order=True)
    assert abs(grouped.item() - ordered.item()) <= 1e-6 * ordered.item()
    gg = torch.autograd.grad(grouped, [t for p in pairs for t in p])
    go = torch.autograd.grad(ordered, [t for p in pairs for t in p])
    assert all(_rel(a, b) < 1e-5 for a, b in zip(go, gg))
    x = P.inputs("llama", 3)
    peft_reg = pm.base_model(**x).loss - pm.base_model.model(**x).loss
    assert abs(om.orth_loss().item() - peft_reg.item()) <= 1e-5 * peft_reg.item()


def test_orth_rank_zero_matrices_count_in_the_mean():
    A1, B1 = torch.randn(3, 6), torch.randn(5, 3)
    empty = (torch.zeros(0, 6), torch.zeros(5, 0))
    one, two = orth_reg([(A1, B1)]), orth_reg([(A1, B1), empty])
    assert torch.allclose(two, one / 2)
    assert torch.allclose(orth_reg([(A1, B1), empty], peft_order=True), two)


def test_exact_peft_selects_peft_order_for_the_regulariser(monkeypatch):
    import adalora_core.backends.torch_nn.model as model_module

    seen = []
    monkeypatch.setattr(model_module, "orth_reg", lambda pairs, peft_order: seen.append(peft_order) or 0.0)
    exact, fast = _pair("mlp")
    exact.orth_loss()
    fast.orth_loss()
    assert seen == [True, False]


def test_default_model_is_the_fast_path():
    base = P.build("mlp")
    om = get_adalora_model(copy.deepcopy(base), ac.AdaLoraConfig(**P.config_kwargs("mlp")))
    assert not om.exact_peft
    out = om(**P.inputs("mlp", 0)).logits
    assert "SVDDelta" in type(out.grad_fn).__name__ or any(
        "SVDDelta" in type(n).__name__ for n in _graph(out.grad_fn))


def _graph(fn, seen=None):
    seen = set() if seen is None else seen
    if fn is None or fn in seen:
        return seen
    seen.add(fn)
    for nxt, _ in fn.next_functions:
        _graph(nxt, seen)
    return seen
