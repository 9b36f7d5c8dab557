from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
from adalora_core.conformance import reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st

from adalora_core import (
    AdaLoraConfig,
    AdaLoraWarning,
    Adam,
    RankAllocator,
    Triplet,
    load_arrays,
    save_arrays,
)
from adalora_core.allocator import keep_mask, kth_threshold, triplet_scores

CFG = AdaLoraConfig(total_step=40, init_r=4, target_r=2, tinit=5, tfinal=10, deltaT=3)
SHAPES = {"a": (6, 5), "b": (3, 7), "c": (8, 8)}  # module -> (in, out)


def make(seed, scale=1.0, r=4):
    rng = np.random.default_rng(seed)
    return {n: Triplet(rng.normal(size=(r, i)) * scale, rng.normal(size=(r, 1)) * scale,
                       rng.normal(size=(o, r)) * scale) for n, (i, o) in SHAPES.items()}


def test_matches_reference_through_every_phase(backend):
    alloc = RankAllocator(CFG, {n: 4 for n in SHAPES})
    refa = ref.ReferenceAllocator(4, 2, 5, 10, 40, 3, 0.85, 0.85, {n: 4 for n in SHAPES})
    params = make(0)
    for step in range(41):
        grads = make(100 + step, scale=0.1)
        got = alloc.update_and_allocate(step, {n: Triplet(*(backend.asarray(t) for t in p)) for n, p in params.items()},
                                        {n: Triplet(*(backend.asarray(t) for t in g)) for n, g in grads.items()})
        want = refa.update_and_allocate(step, {n: tuple(p) for n, p in params.items()},
                                        {n: tuple(g) for n, g in grads.items()})
        for n in SHAPES:
            np.testing.assert_array_equal(backend.to_numpy(got[n]), want[n])
            params[n] = params[n]._replace(E=want[n] + 0.05)  # the "optimizer" revives masked entries
        assert alloc.rank_pattern == (refa.rank_pattern or {})
    assert alloc.finalized and alloc.ema_ipt is None
    assert sum(alloc.current_ranks().values()) <= alloc.target_bgt


@settings(max_examples=30, deadline=None)
@given(scores=st.lists(st.floats(0, 1000, allow_nan=False), min_size=2, max_size=30, unique=True),
       data=st.data())
def test_distinct_scores_keep_exactly_budget(scores, data):
    budget = data.draw(st.integers(0, len(scores)))
    arr = np.asarray(scores)
    thr = kth_threshold([arr[:1], arr[1:]], len(scores) - budget)
    assert int(np.sum(keep_mask(arr, thr))) == budget


def test_ties_prune_every_tied_triplet():
    s = np.asarray([0.5, 0.25, 0.25, 1.0])
    assert keep_mask(s, kth_threshold([s], 1)).tolist() == [True, False, False, True]


def test_triplet_score_formula():
    sA, sE, sB = np.full((2, 3), 2.0), np.asarray([[1.0], [0.0]]), np.full((4, 2), 4.0)
    assert triplet_scores(sA, sE, sB).tolist() == [7.0, 6.0]


def _run(alloc, steps, params, grads_for):
    out = []
    for step in steps:
        E = alloc.update_and_allocate(step, params, grads_for(step))
        params = {n: p._replace(E=E[n]) for n, p in params.items()}
        out.append(params)
    return params


def test_non_finite_gradient_skips_the_step_warns_once_and_counts():
    alloc = RankAllocator(CFG, {n: 4 for n in SHAPES})
    params = make(0)
    _run(alloc, range(3), params, lambda s: make(10 + s))
    before = {n: tuple(t.copy() for t in alloc.ema_ipt[n]) for n in SHAPES}
    bad = make(99)
    bad["b"] = bad["b"]._replace(A=bad["b"].A * np.nan)
    with pytest.warns(AdaLoraWarning, match="non-finite"):
        alloc.update_and_allocate(3, params, bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alloc.update_and_allocate(4, params, bad)  # warned once only
    assert alloc.skipped_steps == 2
    for n in SHAPES:
        for t0, t1 in zip(before[n], alloc.ema_ipt[n]):
            np.testing.assert_array_equal(t0, t1)
            assert np.all(np.isfinite(t1))


def test_missing_gradient_skips_that_module_with_a_warning():
    alloc = RankAllocator(CFG, {n: 4 for n in SHAPES})
    params = make(0)
    grads = make(1)
    grads["c"] = None
    with pytest.warns(AdaLoraWarning, match="'c' has no gradient"):
        alloc.update_and_allocate(0, params, grads)
    assert alloc.missing_grads["c"] == 1
    assert not np.any(alloc.ema_ipt["c"].A) and np.any(alloc.ema_ipt["a"].A)


def test_final_allocation_happens_even_if_T_f_is_skipped():
    alloc = RankAllocator(CFG, {n: 4 for n in SHAPES})
    params = make(0)
    params = _run(alloc, range(0, 28, 2), params, lambda s: make(50 + s))  # even steps; T_f = 30
    alloc.update_and_allocate(31, params, None)
    assert alloc.finalized and sum(alloc.current_ranks().values()) == alloc.target_bgt
    revived = {n: p._replace(E=p.E + 1.0) for n, p in params.items()}
    E2 = alloc.update_and_allocate(35, revived, None)
    for n in SHAPES:
        keep = np.asarray(alloc.rank_pattern[f"{n}.lora_E"])
        assert np.all((E2[n][:, 0] == 0) == ~keep)


def test_target_equal_init_prunes_nothing():
    cfg = CFG.replace(target_r=4)
    alloc = RankAllocator(cfg, {n: 4 for n in SHAPES})
    params = make(0)
    final = _run(alloc, range(41), params, lambda s: make(s))
    assert alloc.current_ranks() == {n: 4 for n in SHAPES}
    for n in SHAPES:
        np.testing.assert_array_equal(final[n].E, params[n].E)


def test_budgets_come_from_current_shapes():
    alloc = RankAllocator(CFG, {"a": 4, "b": 1, "c": 0})
    assert (alloc.init_bgt, alloc.target_bgt) == (5, 6 // 3 * 3)


@pytest.mark.parametrize("case", ["backwards", "beyond", "negative", "unknown_module", "missing_module",
                                  "wrong_rank", "wrong_grad_shape"])
def test_bad_calls_raise_before_any_state_change(case):
    alloc = RankAllocator(CFG, {n: 4 for n in SHAPES})
    params, grads = make(0), make(1)
    alloc.update_and_allocate(10, params, grads)
    arrays0, meta0 = alloc.state_dict()
    step = 11
    if case == "backwards":
        step = 9
    elif case == "beyond":
        step = 41
    elif case == "negative":
        step = -1
    elif case == "unknown_module":
        params = {**params, "zz": params["a"]}
    elif case == "missing_module":
        params = {k: v for k, v in params.items() if k != "a"}
    elif case == "wrong_rank":
        params = {**params, "a": Triplet(params["a"].A[:3], params["a"].E[:3], params["a"].B[:, :3])}
    else:
        grads = {**grads, "b": grads["b"]._replace(B=grads["b"].B[:, :2])}
    with pytest.raises(ValueError):
        alloc.update_and_allocate(step, params, grads)
    arrays1, meta1 = alloc.state_dict()
    assert meta0 == meta1 and arrays0.keys() == arrays1.keys()
    for k in arrays0:
        np.testing.assert_array_equal(arrays0[k], arrays1[k])


def _train(steps, params, opt_state, alloc, opt):
    """A deterministic loop: gradients depend on the step and the weights only."""
    names = list(SHAPES)
    for step in steps:
        rng = np.random.default_rng(1000 + step)
        grads = {f"{n}.{p}": 0.1 * params[f"{n}.{p}"] + rng.normal(size=params[f"{n}.{p}"].shape)
                 for n in names for p in "AEB"}
        params, opt_state = opt.step(params, grads, opt_state)
        E = alloc.update_and_allocate(step, {n: Triplet(*(params[f"{n}.{p}"] for p in "AEB")) for n in names},
                                      {n: Triplet(*(grads[f"{n}.{p}"] for p in "AEB")) for n in names})
        params = {**params, **{f"{n}.E": E[n] for n in names}}
    return params, opt_state


def test_resume_20_plus_20_equals_40_bitwise(tmp_path):
    opt = Adam(lr=1e-2)
    start = {f"{n}.{p}": t for n, trip in make(7).items() for p, t in zip("AEB", trip)}
    full_alloc = RankAllocator(CFG, {n: 4 for n in SHAPES})
    full, _ = _train(range(40), start, opt.init(start), full_alloc, opt)

    alloc = RankAllocator(CFG, {n: 4 for n in SHAPES})
    half, st = _train(range(20), start, opt.init(start), alloc, opt)
    a_arrays, a_meta = alloc.state_dict()
    arrays = {**{f"param.{k}": v for k, v in half.items()},
              **{f"opt.{k}": v for k, v in st.items() if k != "step"},
              **{f"alloc.{k}": v for k, v in a_arrays.items()}}
    save_arrays(tmp_path / "state.safetensors", arrays, {"alloc": a_meta, "opt_step": st["step"]})
    del alloc, half, st

    loaded, meta = load_arrays(tmp_path / "state.safetensors")
    alloc2 = RankAllocator(CFG, {n: 4 for n in SHAPES})
    alloc2.load_state_dict({k[6:]: v for k, v in loaded.items() if k.startswith("alloc.")}, meta["alloc"])
    params2 = {k[6:]: v for k, v in loaded.items() if k.startswith("param.")}
    st2 = {"step": meta["opt_step"], **{k[4:]: v for k, v in loaded.items() if k.startswith("opt.")}}
    resumed, _ = _train(range(20, 40), params2, st2, alloc2, opt)
    for k in full:
        np.testing.assert_array_equal(resumed[k], full[k])
    assert alloc2.rank_pattern == full_alloc.rank_pattern


def test_load_state_dict_validates_before_changing_anything():
    alloc = RankAllocator(CFG, {n: 4 for n in SHAPES})
    alloc.update_and_allocate(0, make(0), make(1))
    arrays, meta = alloc.state_dict()
    other = RankAllocator(CFG, {n: 4 for n in SHAPES})
    other.update_and_allocate(0, make(2), make(3))
    before = other.state_dict()
    with pytest.raises(ValueError, match="modules/ranks"):
        other.load_state_dict(arrays, {**meta, "ranks": {"a": 4}})
    bad = dict(arrays)
    bad["ema_ipt.a.E"] = bad["ema_ipt.a.E"][:2]
    with pytest.raises(ValueError, match=r"'ema_ipt.a.E' has shape \(2, 1\), expected \(4, 1\)"):
        other.load_state_dict(bad, meta)
    after = other.state_dict()
    for k in before[0]:
        np.testing.assert_array_equal(before[0][k], after[0][k])


def test_no_pruning_before_any_importance_was_measured():
    alloc = RankAllocator(CFG, {n: 4 for n in SHAPES})
    params = make(0)
    nan = {n: g._replace(E=g.E * np.nan) for n, g in make(1).items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(10):  # step 6 and 9 are mask steps
            E = alloc.update_and_allocate(step, params, nan)
    assert any(issubclass(w.category, AdaLoraWarning) for w in caught)
    assert alloc.skipped_steps == 10 and alloc.rank_pattern == {}
    for n in SHAPES:
        np.testing.assert_array_equal(E[n], params[n].E)


def test_a_missing_tensor_gradient_skips_only_that_tensor():
    alloc = RankAllocator(CFG, {n: 4 for n in SHAPES})
    grads = make(1)
    grads["a"] = grads["a"]._replace(E=None)
    with pytest.warns(AdaLoraWarning, match=r"'a' has no gradient for \['E'\]"):
        alloc.update_and_allocate(0, make(0), grads)
    assert np.any(alloc.ema_ipt["a"].A) and not np.any(alloc.ema_ipt["a"].E)


def test_weights_on_two_devices_are_refused():
    from conftest import make_backend

    cpu, dev1 = make_backend("array_api_strict"), make_backend("array_api_strict:device1")
    alloc = RankAllocator(CFG, {n: 4 for n in SHAPES})
    params = {n: Triplet(*(cpu.asarray(t) for t in p)) for n, p in make(0).items()}
    params["b"] = Triplet(*(dev1.asarray(t) for t in make(0)["b"]))
    with pytest.raises(ValueError, match="one device"):
        alloc.update_and_allocate(0, params, None)
    assert alloc.last_step is None


# ------------------------------------------------------------ loading a state: every hole refused


def snapshot(alloc):
    """Everything the allocator holds, copied: all state arrays (with dtypes) and the metadata."""
    arrays, meta = alloc.state_dict()
    return {k: np.array(v, copy=True) for k, v in arrays.items()}, copy.deepcopy(meta)


def assert_unchanged(alloc, snap):
    arrays, meta = snapshot(alloc)
    assert meta == snap[1]
    assert arrays.keys() == snap[0].keys()
    for k, v in snap[0].items():
        assert arrays[k].dtype == v.dtype and np.array_equal(arrays[k], v, equal_nan=True), k


def trained(seed, steps, shapes=SHAPES):
    """An allocator past a mask step, with a skipped step and a missing gradient on record."""
    def make_s(s):
        rng = np.random.default_rng(s)
        return {n: Triplet(rng.normal(size=(4, i)), rng.normal(size=(4, 1)), rng.normal(size=(o, 4)))
                for n, (i, o) in shapes.items()}

    alloc = RankAllocator(CFG, {n: 4 for n in shapes})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdaLoraWarning)
        for step in range(steps):
            grads = make_s(seed + step)
            if step == 1:
                grads["a"] = grads["a"]._replace(A=grads["a"].A * np.nan)
            if step == 2:
                grads["b"] = None
            alloc.update_and_allocate(step, make_s(seed), grads)
    return alloc


def _mutate(case, arrays, meta):
    arrays, meta = dict(arrays), {**meta}
    if case == "A_shape":
        arrays["ema_ipt.a.A"] = arrays["ema_ipt.a.A"][:, :3]
    elif case == "B_shape":
        arrays["ema_unc.b.B"] = arrays["ema_unc.b.B"][:1]  # (1, r) broadcasts against (out, r)
    elif case == "nan":
        arrays["ema_ipt.c.E"] = np.where(np.arange(4)[:, None] == 0, np.nan, arrays["ema_ipt.c.E"])
    elif case == "inf":
        arrays["ema_unc.a.B"] = arrays["ema_unc.a.B"] + np.inf
    elif case == "int_ema":
        arrays["ema_ipt.b.A"] = arrays["ema_ipt.b.A"].astype(np.int64)
    elif case == "float32_ema":  # the weights are float64
        arrays["ema_unc.b.E"] = arrays["ema_unc.b.E"].astype(np.float32)
    elif case == "missing_module":
        arrays = {k: v for k, v in arrays.items() if ".c." not in k and k != "mask.c"}
    elif case == "missing_part":
        del arrays["ema_unc.a.B"]
    elif case == "missing_mask":
        del arrays["mask.b"]
    elif case == "mask_dtype":
        arrays["mask.a"] = arrays["mask.a"].astype(np.float64)
    elif case == "mask_shape":
        arrays["mask.a"] = arrays["mask.a"][:3]
    elif case == "unknown_array":
        arrays["ema_ipt.zz.A"] = arrays["ema_ipt.a.A"]
    elif case.startswith("no_"):
        del meta[case[3:]]
    else:
        field, value = META_JUNK[case]
        meta[field] = value(meta) if callable(value) else value
    return arrays, meta


META_JUNK = {
    "last_step='7'": ("last_step", "7"), "last_step=-5": ("last_step", -5), "last_step=41": ("last_step", 41),
    "last_step=7.0": ("last_step", 7.0), "budget='x'": ("budget", "x"), "budget=-1": ("budget", -1),
    "budget=13": ("budget", 13), "budget=True": ("budget", True), "skipped_steps=1.5": ("skipped_steps", 1.5),
    "skipped_steps=-1": ("skipped_steps", -1), "finalized='False'": ("finalized", "False"),
    "finalized=1": ("finalized", 1), "missing_grads={'zz': 1}": ("missing_grads", {"zz": 1}),
    "missing_grads={'a': -1}": ("missing_grads", {"a": -1}), "missing_grads=[1]": ("missing_grads", [1]),
    "ranks={'a': 4}": ("ranks", {"a": 4}), "config='x'": ("config", "x"),
    "config.tinit=6": ("config", lambda meta: {**meta["config"], "tinit": 6}),
    "shapes=one_module": ("shapes", {"a": [6, 5]}),
    "shapes=other_a": ("shapes", {"a": [7, 5], "b": [3, 7], "c": [8, 8]}), "shapes='x'": ("shapes", "x"),
}
HOLES = ["A_shape", "B_shape", "nan", "inf", "int_ema", "float32_ema", "missing_module", "missing_part",
         "missing_mask", "mask_dtype", "mask_shape", "unknown_array", "no_budget", "no_last_step",
         "no_skipped_steps", "no_finalized", "no_missing_grads", "no_config", "no_ranks", *META_JUNK]


@pytest.mark.parametrize("case", HOLES)
def test_a_bad_state_is_refused_and_changes_nothing(case):
    arrays, meta = trained(0, 8).state_dict()
    assert meta["last_step"] == 7 and meta["skipped_steps"] == 1 and "mask.a" in arrays  # a rich state
    target = trained(100, 4)
    snap = snapshot(target)
    bad_arrays, bad_meta = _mutate(case, arrays, meta)
    with pytest.raises(ValueError, match="allocator state"):
        target.load_state_dict(bad_arrays, bad_meta)
    assert_unchanged(target, snap)
    target.update_and_allocate(4, make(0), make(1))  # the run goes on from where it was


def test_every_problem_is_listed_at_once():
    arrays, meta = trained(0, 8).state_dict()
    arrays, meta = _mutate("nan", *_mutate("last_step='7'", *_mutate("no_budget", arrays, meta)))
    with pytest.raises(ValueError) as info:
        RankAllocator(CFG, {n: 4 for n in SHAPES}).load_state_dict(arrays, meta)
    for part in ("'ema_ipt.c.E' has non-finite values", "last_step='7' must be an int", "missing field 'budget'"):
        assert part in str(info.value)


@pytest.mark.parametrize("steps", [0, 3, 8, 40])
def test_a_valid_state_round_trips_exactly(steps):
    source = trained(0, steps)
    fresh = RankAllocator(CFG, {n: 4 for n in SHAPES})
    fresh.load_state_dict(*source.state_dict())
    assert_unchanged(fresh, snapshot(source))


def test_a_state_for_other_weights_is_refused():
    other = {**SHAPES, "a": (7, 5)}
    arrays, meta = trained(0, 8, other).state_dict()
    assert meta["shapes"]["a"] == [7, 5]
    target = trained(100, 4)  # knows its weights' shapes from its updates
    snap = snapshot(target)
    with pytest.raises(ValueError, match=r"\(7, 5\)"):
        target.load_state_dict(arrays, meta)
    assert_unchanged(target, snap)
    fresh = RankAllocator(CFG, {n: 4 for n in SHAPES})
    with pytest.raises(ValueError, match="weights"):  # given the weights, a fresh allocator refuses it too
        fresh.load_state_dict(arrays, meta, params=make(0))
    fresh.load_state_dict(arrays, meta)  # without them it takes the state's shapes ...
    with pytest.raises(ValueError, match=r"module 'a'.*\(7, 5\)"):  # ... and refuses the wrong weights
        fresh.update_and_allocate(8, make(0), make(1))
    assert fresh.last_step == 7


def test_a_state_for_other_dtypes_is_refused():
    arrays, meta = trained(0, 8).state_dict()
    params32 = {n: Triplet(*(t.astype(np.float32) for t in p)) for n, p in make(0).items()}
    fresh = RankAllocator(CFG, {n: 4 for n in SHAPES})
    with pytest.raises(ValueError, match="expected float32"):
        fresh.load_state_dict(arrays, meta, params=params32)
    fresh.load_state_dict(arrays, meta)
    snap = snapshot(fresh)
    grads32 = {n: Triplet(*(t.astype(np.float32) for t in g)) for n, g in make(1).items()}
    with pytest.raises(ValueError, match="dtype float32.*EMA.*float64"):
        fresh.update_and_allocate(8, params32, grads32)
    assert_unchanged(fresh, snap)


# ------------------------------------------------------------------ the shape of grads entries


@pytest.mark.parametrize("case", ["pair", "single_array", "four", "string", "not_an_array", "float32_grad",
                                  "params_pair"])
def test_bad_grads_entries_are_refused_naming_the_module(case):
    alloc = trained(0, 3)
    snap = snapshot(alloc)
    params, grads = make(0), make(1)
    g = grads["b"]
    grads["b"] = {"pair": (g.A, g.E), "single_array": g.A, "four": (*g, g.A), "string": "AEB",
                  "not_an_array": (g.A, 3.0, g.B), "float32_grad": g._replace(A=g.A.astype(np.float32)),
                  "params_pair": g}[case]
    if case == "params_pair":
        params["b"] = tuple(params["b"])[:2]
    with pytest.raises(ValueError, match="'b'"):
        alloc.update_and_allocate(3, params, grads)
    assert_unchanged(alloc, snap)


def test_grads_as_plain_sequences_equal_triplets():
    a, b = trained(0, 3), trained(0, 3)
    grads = make(1)
    ea = a.update_and_allocate(6, make(0), grads)
    eb = b.update_and_allocate(6, make(0), {n: list(g) for n, g in grads.items()})
    assert_unchanged(b, snapshot(a))
    for n in SHAPES:
        np.testing.assert_array_equal(ea[n], eb[n])


@pytest.mark.parametrize("case", ["grad_dtype", "weight_dtype", "grad_shape", "weight_shape", "grad_missing",
                                  "library_mix"])
def test_inputs_changed_after_good_steps_are_checked_again(case):
    """Inputs of a known structure skip the per-module checks; any change of structure runs them again."""
    alloc = RankAllocator(CFG, {n: 4 for n in SHAPES})
    params, grads = make(0), make(1)
    for step in (1, 2):
        alloc.update_and_allocate(step, params, grads)
    arrays0, meta0 = alloc.state_dict()
    b = grads["b"]
    if case == "grad_dtype":
        grads = {**grads, "b": b._replace(A=b.A.astype(np.float32))}
    elif case == "weight_dtype":
        params = {n: Triplet(*(t.astype(np.float32) for t in p)) for n, p in params.items()}
    elif case == "grad_shape":
        grads = {**grads, "b": b._replace(A=b.A.T.copy().reshape(b.A.shape[::-1]))}
    elif case == "weight_shape":
        p = params["c"]
        params = {**params, "c": p._replace(A=np.zeros((4, 9)))}
    elif case == "grad_missing":
        grads = {**grads, "b": b._replace(E=None)}
    else:
        pytest.importorskip("torch")
        import torch

        grads = {**grads, "b": b._replace(A=torch.from_numpy(b.A))}
    if case == "grad_missing":  # allowed, but seen: counted and warned
        with pytest.warns(AdaLoraWarning, match="no gradient"):
            alloc.update_and_allocate(3, params, grads)
        assert alloc.missing_grads["b"] == 1
        return
    with pytest.raises((ValueError, TypeError)):
        alloc.update_and_allocate(3, params, grads)
    arrays1, meta1 = alloc.state_dict()
    assert meta0 == meta1 and arrays0.keys() == arrays1.keys()
    for k in arrays0:
        np.testing.assert_array_equal(arrays0[k], arrays1[k])


def test_flat_inputs_equal_mappings():
    """advance() on flat lists (names order, A, E, B) is advance() on mappings, mask for mask."""
    by_map, flat = (RankAllocator(CFG, {n: 4 for n in SHAPES}) for _ in range(2))
    for step in range(CFG.total_step + 1):
        params, grads = make(step), make(100 + step)
        if step == 7:
            grads = {**grads, "c": None}
        a = by_map.advance(step, params, grads)
        none = (None, None, None)
        b = flat.advance(step, [t for n in flat.names for t in params[n]],
                         [t for n in flat.names for t in (grads[n] or none)])
        assert (a is None) == (b is None)
        if a is not None:
            assert list(a) == flat.names and all(np.array_equal(a[n], m) for n, m in zip(flat.names, b))
    assert by_map.rank_pattern == flat.rank_pattern and by_map.missing_grads == flat.missing_grads


def test_flat_inputs_of_the_wrong_length_are_refused():
    alloc = RankAllocator(CFG, {n: 4 for n in SHAPES})
    params = [t for p in make(0).values() for t in p]
    with pytest.raises(ValueError, match="sequences of 9"):
        alloc.advance(1, params[:-1], params[:-1])
    with pytest.raises(ValueError, match="sequences of 9"):
        alloc.advance(1, params)  # flat params need flat grads
    assert alloc.last_step is None
