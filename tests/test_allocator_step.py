"""The pure allocator step: the same arithmetic as ``RankAllocator``, from a Python or an array step.

``RankAllocator`` runs ``allocator_step``'s code with Python steps; a step
given as an integer array (what ``jax.jit`` traces, or a ``torch.compile`` /
CUDA-graph user would pass) takes the branch-free path: every phase
computed, selected with ``where``, the schedule read from a table. Both
must give the same bits on every backend.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from adalora_core import AdaLoraConfig, AdaLoraWarning, RankAllocator, Triplet
from adalora_core.allocator import (
    allocator_step,
    current_ranks,
    init_state,
    kth_threshold,
    rank_pattern,
    step_config,
)

CFG = AdaLoraConfig(total_step=30, init_r=4, target_r=2, tinit=4, tfinal=7, deltaT=3)  # T_f = 23, not a mask step
SHAPES = {"a": (6, 5), "b": (3, 7), "c": (6, 5)}  # module -> (in, out); a and c share a shape group
NAN_STEP = 8  # a non-finite gradient: the update is skipped and counted
MISSING = {10: ("c", 2)}  # step -> (module, part) whose gradient is None


def make(seed: int, scale: float = 1.0) -> dict[str, Triplet]:
    rng = np.random.default_rng(seed)
    return {n: Triplet(*(rng.normal(size=s).astype(np.float32) * scale for s in ((4, i), (4, 1), (o, 4))))
            for n, (i, o) in SHAPES.items()}


def grads_at(step: int) -> dict[str, Triplet]:
    g = make(100 + step, scale=0.1)
    if step == NAN_STEP:
        g["b"] = g["b"]._replace(A=g["b"].A * np.nan)
    if step in MISSING:
        name, part = MISSING[step]
        g[name] = Triplet(*(None if i == part else t for i, t in enumerate(g[name])))
    return g


def on(backend, trips):
    return {n: None if t is None else Triplet(*(None if a is None else backend.asarray(a) for a in t))
            for n, t in trips.items()}


def wrapper_run(backend, steps=range(31)):
    """What the stateful allocator returns: E, ranks and budget at every step."""
    alloc = RankAllocator(CFG, {n: 4 for n in SHAPES}, backend=backend)
    params, out = make(0), []
    with warnings.catch_warnings():  # the non-finite step and the missing gradient warn (tested elsewhere)
        warnings.simplefilter("ignore", AdaLoraWarning)
        for step in steps:
            E = alloc.update_and_allocate(step, on(backend, params), on(backend, grads_at(step)))
            out.append(({n: backend.to_numpy(E[n]) for n in SHAPES}, alloc.current_ranks(), alloc.budget))
            params = {n: p._replace(E=backend.to_numpy(E[n]) + 0.05) for n, p in params.items()}  # revive
    assert alloc.skipped_steps == 1
    return out


def pure_run(backend, as_array: bool, steps=range(31)):
    params = make(0)
    sc = step_config(CFG, on(backend, params))
    state = init_state(sc, backend.asarray(params["a"].A))
    out = []
    for step in steps:
        s = backend.asarray(step, dtype="int32") if as_array else step
        state, E = allocator_step(state, on(backend, params), on(backend, grads_at(step)), s, sc)
        out.append(({n: backend.to_numpy(E[n]) for n in SHAPES}, current_ranks(state, sc),
                    int(backend.to_numpy(state.budget))))
        params = {n: p._replace(E=backend.to_numpy(E[n]) + 0.05) for n, p in params.items()}
    assert int(backend.to_numpy(state.skips)) == 1
    assert bool(backend.to_numpy(state.finalized))
    return out


def assert_same(got, want) -> None:
    for step, ((E, ranks, budget), (E0, ranks0, budget0)) in enumerate(zip(got, want, strict=True)):
        assert (ranks, budget) == (ranks0, budget0), f"step {step}"
        for n in SHAPES:
            np.testing.assert_array_equal(E[n], E0[n], err_msg=f"step {step}, module {n}")


@pytest.mark.parametrize("as_array", [False, True], ids=["python_step", "array_step"])
def test_pure_step_gives_the_wrappers_bits_on_every_backend(backend, as_array):
    want = wrapper_run(backend)
    assert want[-1][1] != {n: 4 for n in SHAPES} and sum(want[-1][1].values()) <= 6  # it did prune
    assert_same(pure_run(backend, as_array), want)


def test_array_step_with_a_fresh_wrapper_state_passes_through_every_phase():
    """From the wrapper's own start (Python flags, no arrays yet) an array step still works: flags become arrays."""
    from adalora_core.backends import get_backend

    be = get_backend("numpy")
    params = make(0)
    alloc = RankAllocator(CFG, {n: 4 for n in SHAPES})
    sc = step_config(CFG, params)
    state = alloc._state  # the eager start: m, u and keep None, Python flags
    for step in range(31):
        state, _ = allocator_step(state, params, make(100 + step, 0.1), be.asarray(step, dtype="int32"), sc)
    assert bool(state.finalized) and int(state.budget) == sc.target_bgt
    assert sum(current_ranks(state, sc).values()) <= sc.target_bgt


@pytest.mark.parametrize("k", range(-2, 9))
def test_kth_threshold_with_an_array_k_equals_the_int_k(k):
    scores = [np.asarray([3.0, 1.0, 4.0], np.float32), np.asarray([1.0, 5.0, 9.0, 2.0], np.float32)]
    got = float(kth_threshold(scores, np.asarray(k)))
    if k <= 0:
        assert got == -math.inf and kth_threshold(scores, k) is None  # -inf prunes nothing, as None does
    else:
        assert got == float(kth_threshold(scores, min(k, 7)))  # past the count: clipped (a traced k cannot raise)


def test_rank_pattern_of_a_state_reads_peft_format():
    params = make(0)
    sc = step_config(CFG, params)
    state = init_state(sc, params["a"].A)
    assert rank_pattern(state, sc) == {f"{n}.lora_E": [True] * 4 for n in SHAPES}  # nothing pruned yet
    state = state._replace(keep=np.asarray([True, False, True, True] * 3))
    assert current_ranks(state, sc) == {n: 3 for n in SHAPES}
    assert rank_pattern(state, sc)["b.lora_E"] == [True, False, True, True]


def test_step_inputs_are_checked_naming_the_module():
    params = make(0)
    sc = step_config(CFG, params)
    state = init_state(sc, params["a"].A)
    with pytest.raises(ValueError, match="params must name exactly"):
        allocator_step(state, {"a": params["a"]}, {}, 0, sc)
    with pytest.raises(ValueError, match="grads only those"):
        allocator_step(state, params, {"zz": params["a"]}, 0, sc)
    wide = dict(params, b=params["b"]._replace(A=np.zeros((4, 8), np.float32)))
    with pytest.raises(ValueError, match=r"params\['b'\] has shapes"):
        allocator_step(state, wide, {}, 0, sc)
    bad = dict(params, c=params["c"]._replace(B=np.zeros((2, 2), np.float32)))
    with pytest.raises(ValueError, match=r"grads\['c'\]\.B has shape"):
        allocator_step(state, params, bad, 0, sc)
    with pytest.raises(ValueError, match="at least one module"):
        step_config(CFG, {})


def test_the_wrapper_and_the_pure_step_share_one_state_type():
    """The wrapper holds a StepState: one implementation, not two."""
    alloc = RankAllocator(CFG, {n: 4 for n in SHAPES})
    params = make(0)
    alloc.update_and_allocate(0, params, make(100))
    sc = step_config(CFG, params)
    state, _ = allocator_step(alloc._state, params, make(101), 1, sc)
    alloc.update_and_allocate(1, params, make(101))
    for got, want in zip(state, alloc._state):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

