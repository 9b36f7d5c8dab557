"""The jax backend: registry, devices, seeded keys, float64 under x64, DLPack, and the core on JAX arrays.

JAX arrays are immutable, so every core algorithm takes its functional path
here; the whole conformance suite runs on jax in float32 and, with
``jax_enable_x64`` scoped to the run, in float64.
"""

from __future__ import annotations

import contextlib
import pickle

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from adalora_core.backends import available_backends, backend_of, get_backend
from adalora_core.conformance import cases as C
from adalora_core.conformance import runner

from adalora_core import triplet
from adalora_core._xp import library_name, to_numpy
from adalora_core.lora import is_mutable
from adalora_core.pool import AdapterPool

DTYPES = ("float32", "float64")


@pytest.fixture
def be():
    return get_backend("jax")


def test_registered_and_inferred_from_arrays(be) -> None:
    assert "jax" in available_backends()
    x = be.zeros((2, 3))
    assert isinstance(x, jax.Array) and x.dtype == jnp.float32
    assert library_name(be.xp) == "jax" and not is_mutable(be.xp)
    inferred = backend_of(x)
    assert inferred.name == "jax" and inferred.device == x.device
    np.testing.assert_array_equal(to_numpy(be.asarray([[1.0, 2.0]])), [[1.0, 2.0]])


def test_devices_by_name_and_clear_errors() -> None:
    cpu = jax.devices("cpu")
    assert get_backend("jax", "cpu").device == cpu[0]
    assert get_backend("jax", "cpu:0").device == cpu[0]
    assert get_backend("jax", cpu[0]).device == cpu[0]
    assert get_backend("jax", "cpu").zeros((2,)).device == cpu[0]
    assert pickle.loads(pickle.dumps(get_backend("jax", cpu[0]))).device == cpu[0]
    with pytest.raises(ValueError, match=r"'cpu:99'.*index below"):
        get_backend("jax", "cpu:99")
    with pytest.raises(ValueError, match="no 'nosuch' platform"):
        get_backend("jax", "nosuch")


def test_rng_keys_are_seeded_and_split_per_draw(be) -> None:
    a, b = be.rng(7), be.rng(7)
    first = a.normal((3, 4))
    np.testing.assert_array_equal(to_numpy(first), to_numpy(b.normal((3, 4))))
    assert not np.array_equal(to_numpy(first), to_numpy(a.normal((3, 4))))  # a new key per draw
    assert not np.array_equal(to_numpy(be.rng(8).normal((3, 4))), to_numpy(first))
    assert not np.array_equal(to_numpy(be.rng(None).normal((8,))), to_numpy(be.rng(None).normal((8,))))
    u = to_numpy(a.uniform((500,), low=2.0, high=3.0))
    assert u.dtype == np.float32 and u.min() >= 2.0 and u.max() < 3.0
    assert set(np.unique(to_numpy(a.bernoulli((500,), 0.5)))) == {0.0, 1.0}
    wide = to_numpy(be.rng(0).normal((20000,), mean=1.0, std=2.0))
    assert abs(wide.mean() - 1.0) < 0.1 and abs(wide.std() - 2.0) < 0.1


def test_float64_needs_x64_and_int64_falls_back_to_int32(be) -> None:
    assert not jax.config.jax_enable_x64
    with pytest.raises(ValueError, match="jax_enable_x64"):
        be.zeros((2,), dtype="float64")
    with pytest.raises(ValueError, match="jax_enable_x64"):
        be.rng(0).normal((2,), dtype="float64")
    assert be.asarray([1, 2], dtype="int64").dtype == jnp.int32
    with jax.enable_x64(True):
        assert be.zeros((2,), dtype="float64").dtype == jnp.float64
        assert be.rng(0).normal((2,), dtype="float64").dtype == jnp.float64
        assert be.asarray([1, 2], dtype="int64").dtype == jnp.int64


def test_dlpack_transfer_both_ways(be) -> None:
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    x = be.asarray(t)
    assert isinstance(x, jax.Array) and x.device == be.device
    np.testing.assert_array_equal(to_numpy(x), t.numpy())
    assert be.asarray(t, dtype="float16").dtype == jnp.float16
    back = torch.from_dlpack(x * 2)
    np.testing.assert_array_equal(back.numpy(), 2 * t.numpy())


def test_grad_and_jit_of_the_core_match_its_explicit_vjp(be) -> None:
    """A JAX user can differentiate and compile the core's forward; autodiff agrees with ``backward``."""
    rng = be.rng(3)
    x, A, E, B = rng.normal((5, 6)), rng.normal((4, 6)), rng.normal((4, 1)), rng.normal((3, 4))
    g = rng.normal((5, 3))

    def loss(x, A, E, B):
        return jnp.sum(g * triplet.forward(x, A, E, B, 2.0, 4.0))

    auto = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, A, E, B)
    explicit = triplet.backward(g, x, A, E, B, 2.0, 4.0)
    for got, want in zip(auto, explicit):
        np.testing.assert_allclose(to_numpy(got), to_numpy(want), rtol=1e-5, atol=1e-6)


def test_pool_updates_reach_the_batched_forward_and_out_is_left_alone(be) -> None:
    pool = AdapterPool(6, 3, 2, backend=be, capacity=2, seed=0)
    for s in ("a", "b", "c"):  # the third grows the stacks
        pool.create(s)
    sessions = ["a", "b", "c"]
    xs, ones = be.rng(5).normal((3, 6)), be.asarray(np.ones((3, 3), dtype=np.float32))
    before = to_numpy(pool.forward_batched(xs, sessions))
    pool.adapt_batched(xs, sessions, be.rng(6).normal((3, 3)))
    assert pool.apply_updates(0.5) == 3
    added = pool.forward_add_batched(xs, sessions, ones)
    np.testing.assert_array_equal(to_numpy(ones), 1.0)  # a new array came back; the input is unchanged
    after = to_numpy(added) - 1.0
    assert not np.allclose(before, after)  # the update reached the stacks the batched forward reads
    for i, s in enumerate(sessions):
        np.testing.assert_allclose(after[i], to_numpy(pool.get(s).forward(xs[i])), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# the conformance suite on jax
# ---------------------------------------------------------------------------

_results: dict[str, dict[str, runner.Result]] = {}


def _result(case: str, dtype: str) -> runner.Result:
    if dtype not in _results:
        _results[dtype] = {r.case: r for r in runner.run(backends=["jax"], dtypes=[dtype])}
        assert not jax.config.jax_enable_x64  # the float64 run scoped x64 to itself
    return _results[dtype][case]


def test_the_runner_turns_x64_on_for_float64_runs_only() -> None:
    (r,) = runner.run(backends=["jax"], dtypes=["float64"], cases=["triplet.forward.n"])
    assert r.verdict == runner.PASS and r.error is not None and r.error < 1e-12, r.message
    assert not jax.config.jax_enable_x64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [c.name for c in C.all_cases()])
def test_conformance_on_jax(case: str, dtype: str) -> None:
    r = _result(case, dtype)
    if r.verdict == runner.SKIP:
        pytest.skip(r.message)
    assert r.verdict == runner.PASS, f"{case} [jax/{dtype}]: {r.message}\n{r.traceback}"


def test_demo_cli_on_jax(capsys: pytest.CaptureFixture[str]) -> None:
    from adalora_core.__main__ import main

    assert main(["demo", "--backend", "jax", "--steps", "10"]) == 0
    out = capsys.readouterr().out
    assert "backend jax" in out and "final" in out and "Spearman" in out


# ---------------------------------------------------------------------------
# the pure allocator step, Adam and the training example under jax.jit
# ---------------------------------------------------------------------------


def _triplets(seed: int, shapes: dict[str, tuple[int, int]], scale: float = 1.0) -> dict[str, triplet.Triplet]:
    rng = np.random.default_rng(seed)
    return {n: triplet.Triplet(*(rng.normal(size=s).astype(np.float32) * scale for s in ((4, i), (4, 1), (o, 4))))
            for n, (i, o) in shapes.items()}


def test_allocator_step_under_jit_compiles_once_and_matches_the_wrapper() -> None:
    """The step is traced once (a host read of a traced value would fail the trace) and gives the wrapper's masks."""
    from adalora_core import AdaLoraConfig, RankAllocator
    from adalora_core.allocator import allocator_step, current_ranks, init_state, step_config

    cfg = AdaLoraConfig(total_step=30, init_r=4, target_r=2, tinit=4, tfinal=7, deltaT=3)
    shapes = {"a": (6, 5), "b": (3, 7), "c": (6, 5)}
    on_jax = lambda ts: jax.tree.map(jnp.asarray, ts)
    alloc = RankAllocator(cfg, {n: 4 for n in shapes})
    params = _triplets(0, shapes)
    sc = step_config(cfg, on_jax(params))
    state = jax.device_put(init_state(sc, jnp.asarray(params["a"].A)), jax.devices()[0])
    step_fn = jax.jit(lambda st, p, g, s: allocator_step(st, p, g, s, sc))
    for step in range(31):
        grads = _triplets(100 + step, shapes, 0.1)
        if step == 8:  # non-finite: skipped and counted on the device
            grads["b"] = grads["b"]._replace(A=grads["b"].A * np.nan)
        with pytest.warns(Warning) if step == 8 else contextlib.nullcontext():
            want = alloc.update_and_allocate(step, params, grads)
        state, got = step_fn(state, on_jax(params), on_jax(grads), jnp.asarray(step))
        assert current_ranks(state, sc) == alloc.current_ranks() and int(state.budget) == alloc.budget, step
        for n in shapes:  # E is passed through or zeroed, so equal masks give equal bits
            np.testing.assert_array_equal(np.asarray(got[n]), want[n])
        params = {n: p._replace(E=want[n] + 0.05) for n, p in params.items()}
    assert alloc.finalized and bool(state.finalized) and int(state.skips) == 1 == alloc.skipped_steps
    assert step_fn._cache_size() == 1


def test_adam_runs_under_jit_with_a_traced_step_count() -> None:
    from adalora_core import Adam

    opt = Adam(lr=0.1, weight_decay=0.01)
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), dtype=jnp.float32)}
    grads = [{"w": jnp.asarray(np.random.default_rng(s).normal(size=(3, 4)), dtype=jnp.float32)} for s in range(1, 4)]
    eager, state = params, opt.init(params)
    jitted, jstate = params, opt.init(params)
    step = jax.jit(opt.step)
    for g in grads:
        eager, state = opt.step(eager, g, state)
        jitted, jstate = step(jitted, g, jstate)
    np.testing.assert_allclose(np.asarray(jitted["w"]), np.asarray(eager["w"]), rtol=1e-5, atol=1e-6)
    assert int(jstate["step"]["w"]) == state["step"]["w"] == 3


def test_train_jax_example_recovers_the_planted_ranks_in_one_compilation() -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "train_jax.py"
    spec = importlib.util.spec_from_file_location("train_jax", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    lines: list[str] = []
    res = example.run(log=lines.append)
    assert res["spearman"] >= 0.8, (res["planted"], res["final"])
    assert sum(res["final"]) == 4 * len(res["planted"])  # the target budget
    assert res["loss_end"] < res["loss_start"] / 10 and res["skipped_steps"] == 0
    assert res["compilations"] == 1
    assert any("ranks [8, 8, 8, 8, 8, 8, 8, 8]" in line for line in lines) and "found ranks" in lines[-2]


@pytest.mark.parametrize("agree", [True, False])
def test_reduce_makes_replicas_with_different_gradients_compute_one_mask(agree: bool) -> None:
    """Two replicas as a vmapped axis: a ``psum`` over it as ``reduce`` gives both the same mask; none, not."""
    from adalora_core import AdaLoraConfig
    from adalora_core.allocator import allocator_step, init_state, step_config

    cfg = AdaLoraConfig(total_step=20, init_r=4, target_r=2, tinit=2, tfinal=5, deltaT=2)
    shapes = {"a": (6, 5), "b": (3, 7)}
    params = jax.tree.map(jnp.asarray, _triplets(0, shapes))
    reduce = (lambda parts: jax.lax.psum(parts, "replica") / 2) if agree else None
    sc = step_config(cfg, params, reduce=reduce)
    both = lambda t: jax.tree.map(lambda a: jnp.stack([a, a]), t)
    state, params2 = both(init_state(sc, params["a"].A)), both(params)
    step_fn = jax.jit(jax.vmap(lambda st, p, g, s: allocator_step(st, p, g, s, sc), in_axes=(0, 0, 0, None),
                               axis_name="replica"))
    differ = False
    for step in range(cfg.total_step):
        grads = jax.tree.map(lambda a, b: jnp.stack([jnp.asarray(a), jnp.asarray(b)]),
                             _triplets(100 + step, shapes, 0.1), _triplets(200 + step, shapes, 0.1))
        state, _ = step_fn(state, params2, grads, jnp.asarray(step))
        differ |= not np.array_equal(np.asarray(state.keep[0]), np.asarray(state.keep[1]))
    assert differ != agree
    assert not bool(np.asarray(state.keep).all())  # it pruned
