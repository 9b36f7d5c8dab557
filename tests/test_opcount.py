"""Op counts on CPU: the per-step work must not grow with the number of adapted modules.

On a GPU an AdaLoRA step is launch-bound: every small op is a kernel launch,
so an op per module is what makes AdaLoRA cost more than LoRA. These tests
count, with the torch profiler, the aten ops that do work (views, empty
allocations and casts that copy nothing are left out; an op's inner ops are
counted once, as the op) issued inside a ``record_function`` scope, on
models of a few repeated shapes with ``n`` and ``2n`` blocks:

* grouped parts (:data:`GROUPED`) issue as many ops at ``2n`` blocks as at
  ``n``: their work is per shape group, not per module;
* the adapter forward + backward issues no more ops per added module than
  PEFT's LoRA at the same rank.

Counts are deterministic (no timing), so the thresholds are exact.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import pytest

torch = pytest.importorskip("torch")
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

import adalora_core as ac

pytestmark = pytest.mark.usefixtures("torch_one_thread", "quiet")

SCOPE = "opcount"
# ops that launch no kernel: views, metadata, allocation without initialisation
NO_WORK = frozenset(f"aten::{n}" for n in (
    "empty", "empty_strided", "empty_like", "as_strided", "view", "_reshape_alias", "_unsafe_view", "t",
    "transpose", "permute", "numpy_T", "mT", "matrix_H", "expand", "expand_as", "unsqueeze", "squeeze",
    "select", "slice", "narrow", "unbind", "split", "split_with_sizes", "chunk", "diagonal", "alias",
    "detach", "lift_fresh", "resolve_conj", "resolve_neg", "result_type", "view_as"))
# ops that do work only when they copy (a cast to the same dtype, a reshape of a contiguous tensor)
IF_COPYING = frozenset(f"aten::{n}" for n in ("to", "contiguous", "reshape", "reshape_as", "flatten"))


def count_ops(fn: Callable[[], object]) -> collections.Counter[str]:
    """Top-level working aten ops that ``fn()`` issues (its backward included, which runs on this thread)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof, record_function(SCOPE):
        fn()
    events = prof.events()
    children = collections.defaultdict(list)
    for e in events:
        if e.cpu_parent is not None:
            children[e.cpu_parent.id].append(e)

    def copies(e) -> bool:
        return any(k.name == "aten::copy_" or copies(k) for k in children[e.id])

    def placement(e) -> tuple[bool, bool]:  # (inside SCOPE, inside another aten op)
        inside = nested = False
        p = e.cpu_parent
        while p is not None:
            nested |= p.name.startswith("aten::")
            inside |= p.name == SCOPE
            p = p.cpu_parent
        return inside, nested

    out: collections.Counter[str] = collections.Counter()
    for e in events:
        if not e.name.startswith("aten::") or e.name in NO_WORK or (e.name in IF_COPYING and not copies(e)):
            continue
        inside, nested = placement(e)
        if inside and not nested:
            out[e.name] += 1
    return out


# ------------------------------------------------------------------ models


D, FFN, R = 16, 24, 4
TARGETS = ["q", "k", "v", "o", "up", "down"]


class Blocks(nn.Module):
    """Transformer-shaped linears: q, k, v, o (D x D), up (D -> FFN), down (FFN -> D) per block."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"q": nn.Linear(D, D), "k": nn.Linear(D, D), "v": nn.Linear(D, D), "o": nn.Linear(D, D),
                           "up": nn.Linear(D, FFN), "down": nn.Linear(FFN, D)}) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b["o"](b["q"](x) + b["k"](x) + b["v"](x))
            x = x + b["down"](torch.relu(b["up"](x)))
        return x


def base(n: int) -> Blocks:
    torch.manual_seed(0)
    return Blocks(n)


def adalora(n: int, **kwargs) -> ac.AdaLoraModel:
    cfg = ac.AdaLoraConfig(target_modules=TARGETS, init_r=R, target_r=R // 2, tinit=0, tfinal=0, deltaT=1,
                           total_step=100, init_lora_weights=False)
    return ac.get_adalora_model(base(n), cfg, **kwargs)


def lora(n: int) -> nn.Module:
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(base(n), peft.LoraConfig(target_modules=TARGETS, r=R, lora_alpha=8))


def _input() -> torch.Tensor:
    return torch.randn(2, 3, D, generator=torch.Generator().manual_seed(1))


def forward_backward(model: nn.Module) -> Callable[[], object]:
    x = _input()
    model.zero_grad(set_to_none=True)
    return lambda: model(x).square().mean().backward()


def orth_forward_backward(model: ac.AdaLoraModel) -> Callable[[], object]:
    model.zero_grad(set_to_none=True)
    return lambda: model.orth_loss().backward()


def allocator_step(model: ac.AdaLoraModel) -> Callable[[], object]:
    """A masking step (importance, both EMAs, scores, threshold, masks applied), after a first step."""
    forward_backward(model)()
    model.update_and_allocate(0)  # creates the EMAs
    return lambda: model.update_and_allocate(1)


# Parts whose op count must not depend on the number of modules: name -> (model builder, set-up
# returning the call to count). The set-up runs outside the profiler (a part that needs gradients
# or a step counter prepares them there).
GROUPED: dict[str, tuple[Callable[[int], nn.Module], Callable]] = {
    "orth_loss forward+backward": (adalora, orth_forward_backward),
    "update_and_allocate (a masking step)": (adalora, allocator_step),
}


def per_module(build: Callable[[int], nn.Module], setup: Callable, n: int = 2) -> tuple[int, int, float]:
    """Op counts at ``n`` and ``2n`` blocks and the growth per added adapted module."""
    counts = [sum(count_ops(setup(build(k))).values()) for k in (n, 2 * n)]
    return counts[0], counts[1], (counts[1] - counts[0]) / (n * len(TARGETS))


# ------------------------------------------------------------------- tests


@pytest.mark.parametrize("part", sorted(GROUPED))
def test_grouped_part_op_count_is_flat_in_modules(part):
    build, setup = GROUPED[part]
    small, large, growth = per_module(build, setup)
    assert small == large, f"{part}: {small} ops at 12 modules, {large} at 24 ({growth:.1f} per module)"


def test_the_count_sees_per_module_work():
    """PEFT's op order (exact_peft=True) sums the regulariser module by module: its count grows."""
    _, _, growth = per_module(lambda n: adalora(n, exact_peft=True), orth_forward_backward)
    assert growth >= 5


def test_adapter_forward_backward_costs_no_more_ops_than_lora():
    _, _, ours = per_module(adalora, forward_backward)
    _, _, peft_lora = per_module(lora, forward_backward)
    assert ours <= peft_lora, f"adapter forward+backward: {ours:.1f} ops per module, PEFT LoRA {peft_lora:.1f}"


def test_exact_path_is_the_costlier_one():
    """The count separates the two forwards (else the LoRA comparison above could not fail)."""
    _, _, fast = per_module(adalora, forward_backward)
    _, _, exact = per_module(lambda n: adalora(n, exact_peft=True), forward_backward)
    assert exact > fast


def test_count_ops_counts_work_not_views():
    x = torch.randn(4, 4)
    counts = count_ops(lambda: (x.T.T.reshape(16).view(4, 4) + 1).sum())
    assert counts == collections.Counter({"aten::add": 1, "aten::sum": 1})
    assert count_ops(lambda: x.to(torch.float32)) == collections.Counter()  # a cast to its own dtype: no work
    assert count_ops(lambda: x.to(torch.float64)) == collections.Counter({"aten::to": 1})
