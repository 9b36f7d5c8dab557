"""AdapterPool: sessions, one-call batched forward, batched adapt, growth, eviction, checkpoints."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import traceback

import numpy as np
import pytest
from adalora_core.backends import get_backend
from adalora_core.conformance import reference as R
from conftest import make_backend

from adalora_core.checkpoint import load_arrays, save_arrays
from adalora_core.errors import AdaLoraWarning, CheckpointError
from adalora_core.pool import POOL_FORMAT_VERSION, AdapterPool

IN, OUT = 20, 14


def host(b, a):
    return np.asarray(b.to_numpy(a), dtype=np.float64)


def dev(b, a, dtype="float32"):
    return b.asarray(np.asarray(a, dtype=np.float64), dtype=dtype)


def filled(backend, n=5, rank=2, capacity=2, seed=0):
    """A pool with ``n`` sessions of random (float32-exact) weights; returns (pool, {id: (A, B)})."""
    backend = get_backend(backend)
    rng = np.random.default_rng(seed)
    pool = AdapterPool(IN, OUT, rank, 4.0, backend=backend, capacity=capacity)
    W = {}
    for k in range(n):
        A = rng.normal(0, 0.5, (rank, IN)).astype(np.float32).astype(np.float64)
        B = rng.normal(0, 0.5, (rank, OUT)).astype(np.float32).astype(np.float64)
        pool.create(f"user-{k}").set_weights(dev(backend, A), dev(backend, B))
        W[f"user-{k}"] = (A, B)
    return pool, W


def test_sessions_create_get_evict(backend):
    pool = AdapterPool(IN, OUT, backend=backend, capacity=2)
    a = pool.create("alice")
    assert pool.get("alice") is a and "alice" in pool and len(pool) == 1
    with pytest.raises(ValueError, match="already has an adapter"):
        pool.create("alice")
    with pytest.raises(KeyError, match="bob"):
        pool.get("bob")
    with pytest.raises(KeyError):
        pool.evict("bob")
    pool.create("bob")
    pool.create(7)  # any hashable id; grows the stacks
    assert pool.capacity == 4 and sorted(map(str, pool)) == ["7", "alice", "bob"]
    pool.evict("bob")
    assert len(pool) == 2 and "bob" not in pool
    assert pool.get_or_create("carol") is pool.get("carol") and len(pool) == 3
    np.testing.assert_array_equal(host(backend, a.B), 0)  # B = 0: each starts as the identity


def test_batched_forward_matches_reference_and_single_adapters(backend):
    pool, W = filled(backend, n=6, capacity=2)  # grown twice: views re-pointed
    rng = np.random.default_rng(1)
    ids = [f"user-{k}" for k in rng.integers(0, 6, size=9)]
    x = rng.normal(size=(9, IN)).astype(np.float32)
    o = rng.normal(size=(9, OUT)).astype(np.float32)
    want = R.batched_forward(x, np.stack([W[i][0] for i in ids]), np.stack([W[i][1] for i in ids]), 2.0,
                             np.arange(9))
    out = dev(backend, o)
    got = pool.forward_add_batched(dev(backend, x), ids, out)
    np.testing.assert_allclose(host(backend, got), o + want, rtol=1e-5, atol=1e-5)
    if backend.name in ("numpy", "native", "torch"):
        assert got is out
    y = pool.forward_batched(dev(backend, x), pool.indices(ids))
    np.testing.assert_allclose(host(backend, y), want, rtol=1e-5, atol=1e-5)
    for b in range(9):
        single = pool.get(ids[b]).forward(dev(backend, x[b]))
        np.testing.assert_allclose(host(backend, single), want[b], rtol=1e-5, atol=1e-5)
    assert pool.forward_calls == 2


def test_native_batched_forward_is_one_c_call():
    native = pytest.importorskip("adalora_core.backends.native")
    if not native.is_available():
        pytest.skip("native backend not built")
    pool, _ = filled("native", n=4)
    assert pool._bfwd is native.lora_forward_add_batched
    calls = []
    inner = pool._bfwd
    pool._bfwd = lambda *a: (calls.append(1), inner(*a))[1]
    x = np.ones((64, IN), dtype=np.float32)
    pool.forward_batched(x, [f"user-{k % 4}" for k in range(64)])
    assert len(calls) == 1
    A_stack = pool._stacks()[0]  # (m, r, in): the storage itself, rank-major as the kernel loads it
    assert A_stack is pool._stack.arrays["A"] and A_stack.flags.c_contiguous


def _python_calls(fn):
    """(name, file) of every Python function that runs during ``fn()``."""
    seen = []

    def profile(frame, event, arg):
        if event == "call":
            seen.append((frame.f_code.co_name, frame.f_code.co_filename))

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_native_batched_forward_hands_the_stacks_to_c_as_stored(rank):
    """At every rank the C op takes the pool's rank-major stacks as they are: no Python checks,
    no conversions, nothing of the native backend's module runs (rank 2 used to fall back to it)."""
    native = pytest.importorskip("adalora_core.backends.native")
    if not native.is_available():
        pytest.skip("native backend not built")
    pool, W = filled("native", n=4, rank=rank)
    x = np.random.default_rng(2).normal(size=(5, IN)).astype(np.float32)
    ids = ["user-3", "user-0", "user-1", "user-3", "user-2"]
    idx, out = pool.indices(ids), np.zeros((5, OUT), np.float32)
    calls = _python_calls(lambda: pool.forward_add_batched(x, idx, out))
    assert [name for name, _ in calls] == ["<lambda>", "forward_add_batched", "_index", "_stacks", "A", "B"], calls
    want = R.batched_forward(x, np.stack([W[i][0] for i in ids]), np.stack([W[i][1] for i in ids]), 4.0 / rank,
                             np.arange(5))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_the_stacks_are_the_adapters_storage(backend):
    """One storage: what a handle writes is what the batched forward reads, and the other way round."""
    pool, W = filled(backend, n=3, capacity=2)  # grown once
    A_stack, B_stack = (host(backend, a) for a in pool._stacks())
    for k in range(3):
        np.testing.assert_array_equal(A_stack[pool.slot(f"user-{k}")], W[f"user-{k}"][0])
        np.testing.assert_array_equal(B_stack[pool.slot(f"user-{k}")], W[f"user-{k}"][1])
    ad = pool.get("user-1")
    ad.accumulate_gradient(dev(backend, np.ones(IN)), dev(backend, np.ones(OUT)))
    ad.apply_gradients(0.5)
    np.testing.assert_array_equal(host(backend, pool._stacks()[1])[pool.slot("user-1")], host(backend, ad.B))
    assert not np.array_equal(host(backend, ad.B), W["user-1"][1])


def test_adapter_storage_must_fit():
    from adalora_core.lora import LoraAdapter, LoraStack

    stack = LoraStack(get_backend("numpy"), IN, OUT, 2, "float32", capacity=2)
    with pytest.raises(ValueError, match="another shape"):
        LoraAdapter(IN, OUT + 1, 2, backend="numpy", storage=(stack, 0))
    with pytest.raises(ValueError, match="another shape, dtype or bias"):
        LoraAdapter(IN, OUT, 2, backend="numpy", use_bias=True, storage=(stack, 1))
    a = LoraAdapter(IN, OUT, 2, backend="numpy", storage=(stack, 1))
    np.testing.assert_array_equal(stack.A[1], a.A)
    a.detach()  # its own copy from now on; the slot is the stack owner's
    a.set_weights(np.ones((2, IN), np.float32), np.ones((2, OUT), np.float32))
    np.testing.assert_array_equal(stack.B[1], 0)


def test_batched_forward_bad_input(backend):
    pool, _ = filled(backend, n=2)
    x = dev(backend, np.ones((3, IN)))
    out = dev(backend, np.zeros((3, OUT)))
    with pytest.raises(KeyError, match="nobody"):
        pool.forward_add_batched(x, ["user-0", "nobody", "user-1"], out)
    with pytest.raises(ValueError, match="session ids for 3 rows"):
        pool.forward_add_batched(x, ["user-0"], out)
    with pytest.raises(ValueError, match="outside"):
        pool.forward_add_batched(x, backend.asarray([0, 1, 99], dtype="int64"), out)
    with pytest.raises(ValueError, match="features"):
        pool.forward_add_batched(dev(backend, np.ones((3, IN + 1))), ["user-0"] * 3, out)
    with pytest.raises(TypeError):
        pool.forward_add_batched(dev(backend, np.ones((3, IN)), "float64"), ["user-0"] * 3, out)
    with pytest.raises(ValueError, match="batch"):
        pool.forward_add_batched(dev(backend, np.ones(IN)), ["user-0"], out)
    np.testing.assert_array_equal(host(backend, out), 0)
    assert pool.forward_calls == 0


def test_adapt_batched_against_reference(backend):
    pool, W = filled(backend, n=4)
    rng = np.random.default_rng(2)
    n = 10
    ids = [f"user-{k}" for k in rng.integers(0, 3, size=n)]  # user-3 gets nothing
    x = rng.normal(size=(n, IN)).astype(np.float32)
    g = rng.normal(size=(n, OUT)).astype(np.float32)
    rw = rng.uniform(-1, 1, size=n).astype(np.float32).astype(np.float64)
    assert pool.adapt_batched(dev(backend, x), ids, dev(backend, g), rw.tolist()) == n
    for sid, (A, B) in W.items():
        rows = [i for i in range(n) if ids[i] == sid]
        ad = pool.get(sid)
        assert ad.pending_updates == len(rows)
        gA, gB = np.zeros_like(A), np.zeros_like(B)
        for i in rows:
            dA, dB = R.lora_accumulate(x[i], g[i], A, B, 2.0, rw[i])
            gA, gB = gA + dA, gB + dB
        np.testing.assert_allclose(host(backend, ad.grad_A), gA, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(host(backend, ad.grad_B), gB, rtol=1e-5, atol=1e-5)
    assert pool.apply_updates(0.1) == 3
    # the batched forward sees the stepped weights (stacks and adapters agree)
    y = host(backend, pool.forward_batched(dev(backend, x), ids))
    for b in range(n):
        np.testing.assert_allclose(y[b], host(backend, pool.get(ids[b]).forward(dev(backend, x[b]))), rtol=1e-5,
                                   atol=1e-6)


def test_adapt_batched_skips_non_finite_requests(backend):
    pool, _ = filled(backend, n=2)
    x = np.ones((4, IN), dtype=np.float32)
    x[1, 0] = np.nan
    g = np.ones((4, OUT), dtype=np.float32)
    ids = ["user-0", "user-0", "user-1", "user-1"]
    with pytest.warns(AdaLoraWarning, match="skipped 1"):
        assert pool.adapt_batched(dev(backend, x), ids, dev(backend, g), 0.5) == 3
    with pytest.warns(AdaLoraWarning, match="skipped 1"):
        assert pool.adapt_batched(dev(backend, np.ones((2, IN))), ["user-0", "user-1"],
                                  dev(backend, np.ones((2, OUT))), [1.0, float("inf")]) == 1
    assert pool.skipped_requests == 2
    assert pool.get("user-0").pending_updates == 2 and pool.get("user-1").pending_updates == 2
    for sid in ids:
        assert np.all(np.isfinite(host(backend, pool.get(sid).grad_A)))
    with pytest.raises(ValueError, match="reward"):
        pool.adapt_batched(dev(backend, np.ones((2, IN))), ["user-0", "user-1"], dev(backend, np.ones((2, OUT))),
                           [1.0])
    with pytest.raises(ValueError, match="grad_out"):
        pool.adapt_batched(dev(backend, np.ones((2, IN))), ["user-0", "user-1"], dev(backend, np.ones((2, OUT + 1))))


def test_evict_zeroes_the_slot_and_reuses_it(backend):
    pool, W = filled(backend, n=3, capacity=4)
    s1 = pool.slot("user-1")
    handle = pool.get("user-1")
    pool.evict("user-1")
    x = dev(backend, np.ones((1, IN)))
    np.testing.assert_array_equal(host(backend, pool.forward_batched(x, backend.asarray([s1], dtype="int64"))), 0)
    # the evicted handle still works, on its own copy
    np.testing.assert_allclose(host(backend, handle.A), W["user-1"][0])
    new = pool.create("dave")
    assert pool.slot("dave") == s1 and new is not handle
    np.testing.assert_array_equal(host(backend, new.B), 0)
    np.testing.assert_allclose(host(backend, handle.B), W["user-1"][1])


def test_general_rank_pool(backend):
    pool, W = filled(backend, n=3, rank=5)
    x = np.random.default_rng(3).normal(size=(3, IN)).astype(np.float32)
    ids = ["user-2", "user-0", "user-2"]
    want = R.batched_forward(x, np.stack([W[i][0] for i in ids]), np.stack([W[i][1] for i in ids]), 4.0 / 5,
                             np.arange(3))
    np.testing.assert_allclose(host(backend, pool.forward_batched(dev(backend, x), ids)), want, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("reader", ["numpy", "native", "array_api_strict", "torch"])
def test_save_load(backend, reader, tmp_path):
    try:
        rb = get_backend(reader)
    except ValueError as exc:
        pytest.skip(str(exc))
    pool, _ = filled(backend, n=3)
    pool.create(42)
    pool.evict("user-1")
    pool.adapt_batched(dev(backend, np.ones((2, IN))), ["user-0", 42], dev(backend, np.ones((2, OUT))))
    pool.forward_batched(dev(backend, np.ones((1, IN))), ["user-2"])
    pool.save(tmp_path / "pool")
    q = AdapterPool.load(tmp_path / "pool", backend=rb)
    assert sorted(map(str, q)) == sorted(map(str, pool)) and q.backend is rb
    assert q.forward_calls == pool.forward_calls
    for sid in pool:
        a, b = pool.get(sid), q.get(sid)
        assert a.pending_updates == b.pending_updates
        for k, v in a.state_arrays().items():
            np.testing.assert_array_equal(host(rb, b.state_arrays()[k]), host(backend, v))
    x = np.random.default_rng(4).normal(size=(3, IN))
    ids = ["user-0", 42, "user-2"]
    np.testing.assert_allclose(host(rb, q.forward_batched(dev(rb, x), ids)),
                               host(backend, pool.forward_batched(dev(backend, x), ids)), rtol=1e-6, atol=1e-6)


def test_save_load_errors(tmp_path):
    pool, _ = filled("numpy", n=2)
    pool.create(("tuple", "id"))
    with pytest.raises(CheckpointError, match="only str and int"):
        pool.save(tmp_path / "p")
    assert not (tmp_path / "p").exists()
    pool.evict(("tuple", "id"))
    path = tmp_path / "p"
    pool.save(path)

    def rewrite(edit_arrays=None, edit_meta=None):
        rewrite.n = getattr(rewrite, "n", 0) + 1
        arrays, meta = load_arrays(path)
        arrays = {k: np.array(v) for k, v in arrays.items()}
        if edit_arrays:
            edit_arrays(arrays)
        if edit_meta:
            edit_meta(meta)
        save_arrays(tmp_path / f"bad{rewrite.n}", arrays, meta)
        return tmp_path / f"bad{rewrite.n}"

    for bad, match in [
        (rewrite(edit_meta=lambda m: m.__setitem__("version", POOL_FORMAT_VERSION + 1)), "version"),
        (rewrite(edit_arrays=lambda a: a.__setitem__("lora_A", a["lora_A"][:1])), "shape"),
        (rewrite(edit_meta=lambda m: m.__setitem__("sessions", ["a", "a"])), "distinct"),
        (rewrite(edit_meta=lambda m: m.__setitem__("pending", [0])), "one entry per session"),
        (rewrite(edit_meta=lambda m: m.__setitem__("format", "adalora_core.microlora")), "not a state of kind"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            AdapterPool.load(bad)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        AdapterPool.load(path)


def test_loads_format_version_1(tmp_path):
    """Version 1 stored lora_A and grad_A as (n, in, r): read and transposed to (n, r, in)."""
    pool, _ = filled("numpy", n=3)
    pool.adapt_batched(np.ones((2, IN), np.float32), ["user-0", "user-2"], np.ones((2, OUT), np.float32))
    pool.save(tmp_path / "v2")
    arrays, meta = load_arrays(tmp_path / "v2")
    assert meta["version"] == POOL_FORMAT_VERSION == 2 and arrays["lora_A"].shape == (3, 2, IN)
    v1 = {k: np.ascontiguousarray(a.transpose(0, 2, 1)) if k in ("lora_A", "grad_A") else a for k, a in arrays.items()}
    save_arrays(tmp_path / "v1", v1, {**meta, "version": 1})
    q = AdapterPool.load(tmp_path / "v1")
    for sid in pool:
        for k, v in pool.get(sid).state_arrays().items():
            np.testing.assert_array_equal(q.get(sid).state_arrays()[k], v, err_msg=k)
    assert q.get("user-0").pending_updates == 1
    save_arrays(tmp_path / "v1_as_v2", v1, meta)  # (n, in, r) arrays in a version-2 file are refused
    with pytest.raises(CheckpointError, match="shape"):
        AdapterPool.load(tmp_path / "v1_as_v2")


def test_constructor_rules():
    for kw, match in [({"rank": 0}, "rank"), ({"alpha": -1.0}, "alpha"), ({"capacity": 0}, "capacity"),
                      ({"init": "zeros"}, "init")]:
        with pytest.raises(ValueError, match=match):
            AdapterPool(IN, OUT, **kw)


def _run_all(targets, seconds, join_s=10.0):
    """Run ``targets`` in daemon threads for ``seconds``; return (errors, names of threads still alive).

    Each target gets ``stop`` (an Event) and loops until it is set. A thread that is
    stuck (a leaked lock) is reported, not waited for: the test fails instead of hanging.
    """
    stop, errors = threading.Event(), []

    def guard(fn):
        try:
            fn(stop)
        except BaseException:  # noqa: BLE001 (every failure of a worker is reported)
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=guard, args=(fn,), name=fn.__name__, daemon=True) for fn in targets]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    deadline = time.monotonic() + join_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return errors, [t.name for t in threads if t.is_alive()]


def test_request_waiting_on_a_handle_while_it_is_evicted(backend):
    """A handle's request blocked on the pool's lock while the session is evicted completes
    on the old weights and releases the lock it took: the pool serves other threads after it."""
    pool, W = filled(backend, n=2)
    handle = pool.get("user-1")
    x = np.ones((1, IN))
    got = []

    def request():
        got.append(host(backend, handle.forward(dev(backend, x))))

    with pool.get("user-0").lock:  # the pool's lock: the request waits for it
        t = threading.Thread(target=request, daemon=True)
        t.start()
        time.sleep(0.05)
        pool.evict("user-1")
    t.join(10)
    assert not t.is_alive() and len(got) == 1
    np.testing.assert_allclose(got[0], 2.0 * (x @ W["user-1"][0].T) @ W["user-1"][1], rtol=1e-5, atol=1e-5)

    def serve(stop):
        pool.create("user-1")
        pool.forward_batched(dev(backend, x), ["user-1"])

    errors, stuck = _run_all([serve], seconds=0.0)
    assert not stuck and not errors, f"the pool's lock was left held: {stuck} {errors}"


@pytest.mark.parametrize("name", ["numpy", "native", "torch"])
def test_evict_and_recreate_under_load_never_hangs(name):
    """Handles and batched calls served while other threads evict and recreate the same sessions:
    every request completes (on the old weights) or gets a KeyError naming the session; no thread
    is left blocked and the pool still serves afterwards."""
    backend = make_backend(name)
    pool = AdapterPool(IN, OUT, 2, 4.0, backend=backend, capacity=2)
    ids = [f"s{k}" for k in range(3)]
    for s in ids:
        pool.create(s)
    x1, g1 = dev(backend, np.ones((2, IN))), dev(backend, np.full((2, OUT), 0.01))
    x3 = dev(backend, np.ones((3, IN)))

    def handle_server(stop):
        rng = np.random.default_rng(threading.get_ident() % 2**32)
        while not stop.is_set():
            try:
                h = pool.get(ids[rng.integers(3)])
            except KeyError:
                continue
            h.forward_add(x1, dev(backend, np.zeros((2, OUT))))  # may run on an evicted handle: its own copy
            h.accumulate_gradient(x1, g1)
            h.apply_gradients(1e-3)

    def batch_server(stop):
        while not stop.is_set():
            try:
                pool.forward_add_batched(x3, ids, dev(backend, np.zeros((3, OUT))))
                pool.adapt_batched(x3, ids, dev(backend, np.full((3, OUT), 0.01)))
            except KeyError as exc:
                assert "no adapter for session" in str(exc)

    def churn(stop):
        rng = np.random.default_rng(threading.get_ident() % 2**32)
        while not stop.is_set():
            s = ids[rng.integers(3)]
            with contextlib.suppress(KeyError):
                pool.evict(s)
            with contextlib.suppress(ValueError):
                pool.create(s)

    errors, stuck = _run_all([handle_server, handle_server, batch_server, churn, churn], seconds=1.0)
    assert not stuck, f"threads blocked after the run: {stuck}; errors: {errors}"
    assert not errors, errors[0]

    def serve_every_session(stop):
        for s in ids:
            pool.get_or_create(s)
        pool.forward_batched(x3, ids)

    errors, stuck = _run_all([serve_every_session], seconds=0.0)
    assert not stuck and not errors, f"the pool no longer serves: {stuck} {errors}"
    y = host(backend, pool.forward_batched(x3, ids))
    for b, s in enumerate(ids):  # the stacks and the live handles agree
        np.testing.assert_allclose(y[b], host(backend, pool.get(s).forward(x3[b])), rtol=1e-5, atol=1e-6)
