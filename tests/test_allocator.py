from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adalora_core import AdaLoraConfig, AdaLoraWarning, Adam, RankAllocator, Triplet, load_arrays, save_arrays
from adalora_core.allocator import keep_mask, kth_threshold, triplet_scores
from adalora_core.conformance import reference as ref

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
    with pytest.raises(ValueError, match="wrong rank"):
        other.load_state_dict(bad, meta)
    after = other.state_dict()
    for k in before[0]:
        np.testing.assert_array_equal(before[0][k], after[0][k])


def test_no_pruning_before_any_importance_was_measured():
    alloc = RankAllocator(CFG, {n: 4 for n in SHAPES})
    params = make(0)
    nan = {n: g._replace(E=g.E * np.nan) for n, g in make(1).items()}
    with pytest.warns(AdaLoraWarning):
        for step in range(0, 10):  # step 6 and 9 are mask steps
            E = alloc.update_and_allocate(step, params, nan)
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
