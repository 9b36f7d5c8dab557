"""Thread safety on NumPy / native: 8 threads, 10^5 calls in all (forward, forward_add,
adapt, apply_updates), exact counters, final weights equal to a serial replay; and
no torn reads while another thread rewrites an adapter."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from adalora_core.backends import available_backends, get_backend

from adalora_core.config import KNOWN_MODULES, EwcConfig, MicroLoraConfig
from adalora_core.microlora import AdaptFeedback, MicroLoRA

N_THREADS = 8
CALLS_PER_THREAD = 12_500  # 10^5 calls in all
D = 128
OWN = KNOWN_MODULES[:N_THREADS]  # thread i adapts and steps module OWN[i] ...
SHARED = KNOWN_MODULES[N_THREADS]  # ... and every thread adapts this one, stepped once at the end
LR = 1e-3
# the CPU backends whose arrays are updated in place by many threads (nothing to skip)
BACKENDS = [name for name in ("numpy", "native") if name in available_backends()]


def _config():
    return MicroLoraConfig(rank=2, in_features=D, out_features=D, target_modules=KNOWN_MODULES)


def _build(backend):
    m = MicroLoRA(_config(), backend=backend, seed=11, ewc=EwcConfig(decay=0.9))
    # exactly representable weights and inputs for the shared module: every partial sum of
    # its gradient is exact in float32, so the sum does not depend on the threads' order
    rng = np.random.default_rng(12)
    A = (rng.integers(-1, 2, size=(2, D)) / 4).astype(np.float32)
    B = (rng.integers(-1, 2, size=(2, D)) / 4).astype(np.float32)
    m.adapter(SHARED).set_weights(A, B)
    m.start_new_task(SHARED)
    return m


def _plan(i):
    """Thread i's data and its list of calls: ("fwd_add"|"fwd", module), ("adapt", k), ("shared", k), ("apply",)."""
    rng = np.random.default_rng(1000 + i)
    own_x = rng.normal(size=(16, D)).astype(np.float32)
    own_g = (0.1 * rng.normal(size=(16, D))).astype(np.float32)
    sh_x = rng.integers(-1, 2, size=(16, D)).astype(np.float32)
    sh_g = rng.integers(-1, 2, size=(16, D)).astype(np.float32)
    calls = []
    for j in range(CALLS_PER_THREAD):
        r = j % 10
        if r in (5, 6):
            calls.append(("adapt", j % 16))
        elif r == 7:
            calls.append(("shared", j % 16))
        elif r == 9 and j % 50 == 49:
            calls.append(("apply",))
        elif r == 8:
            calls.append(("fwd", KNOWN_MODULES[j % 9]))
        else:
            calls.append(("fwd_add", KNOWN_MODULES[(i + j) % 9]))
    return own_x, own_g, sh_x, sh_g, calls


def _adapt(m, mod, x, g):
    return m.adapt(x, AdaptFeedback(1.0, gradient_estimate=g, reward=1.0, source_module=mod))


def _worker(m, i, plan, barrier, counts, errors):
    own_x, own_g, sh_x, sh_g, calls = plan
    mod = OWN[i]
    x0 = own_x[0]
    n_fwd = n_adapt = 0
    try:
        barrier.wait()
        for c in calls:
            kind = c[0]
            if kind == "fwd_add":
                out = np.zeros(D, dtype=np.float32)
                m.forward_add(x0, c[1], out)
                n_fwd += 1
            elif kind == "fwd":
                m.forward(x0, c[1])
                n_fwd += 1
            elif kind == "adapt":
                assert _adapt(m, mod, own_x[c[1]], own_g[c[1]])
                n_adapt += 1
            elif kind == "shared":
                assert _adapt(m, SHARED, sh_x[c[1]], sh_g[c[1]])
                n_adapt += 1
            else:
                m.apply_updates(LR, modules=mod)
    except BaseException as exc:  # noqa: BLE001 - reported by the main thread
        errors.append(exc)
    counts[i] = (n_fwd, n_adapt)


def _serial_replay(backend, plans):
    m = _build(backend)
    for i, (own_x, own_g, sh_x, sh_g, calls) in enumerate(plans):
        for c in calls:
            if c[0] == "adapt":
                _adapt(m, OWN[i], own_x[c[1]], own_g[c[1]])
            elif c[0] == "shared":
                _adapt(m, SHARED, sh_x[c[1]], sh_g[c[1]])
            elif c[0] == "apply":
                m.apply_updates(LR, modules=OWN[i])
    m.apply_updates(LR, modules=SHARED)
    return m


@pytest.mark.parametrize("name", BACKENDS)
def test_eight_threads_1e5_calls(name):
    backend = get_backend(name)
    m = _build(backend)
    plans = [_plan(i) for i in range(N_THREADS)]
    assert sum(len(p[4]) for p in plans) == 100_000
    barrier = threading.Barrier(N_THREADS)
    counts: list[tuple[int, int] | None] = [None] * N_THREADS
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_worker, args=(m, i, plans[i], barrier, counts, errors))
               for i in range(N_THREADS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    assert not errors, errors[:3]
    n_fwd = sum(c[0] for c in counts)
    n_adapt = sum(c[1] for c in counts)
    n_apply = sum(1 for p in plans for c in p[4] if c[0] == "apply")
    assert n_fwd + n_adapt + n_apply == 100_000
    # not a single count lost
    assert m.forward_count == n_fwd
    assert m.adaptation_count == n_adapt
    assert m.skipped_updates == 0
    for i, mod in enumerate(OWN):
        calls = plans[i][4]
        last_apply = max(k for k, c in enumerate(calls) if c[0] == "apply")
        assert m.pending_updates(mod) == sum(1 for c in calls[last_apply:] if c[0] == "adapt")
    assert m.pending_updates(SHARED) == sum(1 for p in plans for c in p[4] if c[0] == "shared")
    m.apply_updates(LR, modules=SHARED)  # the barrier step of the commutative sums
    ref = _serial_replay(backend, plans)
    for mod in KNOWN_MODULES:
        got, want = m.adapter(mod), ref.adapter(mod)
        np.testing.assert_array_equal(got.A, want.A, err_msg=mod)
        np.testing.assert_array_equal(got.B, want.B, err_msg=mod)
        np.testing.assert_array_equal(m.ewc_state(mod).fisher_b, ref.ewc_state(mod).fisher_b, err_msg=mod)
        assert got.pending_updates == want.pending_updates
    assert np.abs(m.adapter(OWN[0]).B).max() > 0  # the adapters did learn
    print(f"\n{name}: {N_THREADS} threads, 100000 calls ({n_fwd} forward, {n_adapt} adapt, {n_apply} apply) "
          f"in {elapsed:.2f} s")


@pytest.mark.parametrize("name", BACKENDS)
def test_no_torn_reads(name):
    """A writer swaps the adapter between two weight sets; readers must see one or the other, never a mix."""
    backend = get_backend(name)
    m = MicroLoRA(MicroLoraConfig(rank=2, in_features=256, out_features=256), backend=backend, ewc=None)
    rng = np.random.default_rng(5)
    sets = [tuple(rng.normal(size=s).astype(np.float32) for s in ((2, 256), (2, 256))) for _ in range(2)]
    x = rng.normal(size=256).astype(np.float32)
    ys = []
    for A, B in sets:
        m.adapter("q_proj").set_weights(A, B)
        ys.append(m.forward(x, "q_proj"))
    assert not np.array_equal(ys[0], ys[1])
    stop = threading.Event()
    bad: list[np.ndarray] = []
    reads = [0, 0, 0]

    def writer():
        k = 0
        while not stop.is_set() and k < 20_000:
            A, B = sets[k % 2]
            m.adapter("q_proj").set_weights(A, B)
            k += 1

    def reader(j):
        for _ in range(3000):
            out = m.forward_add(x, "q_proj", np.zeros(256, dtype=np.float32))
            if not (np.array_equal(out, ys[0]) or np.array_equal(out, ys[1])):
                bad.append(out)
            reads[j] += 1

    w = threading.Thread(target=writer)
    rs = [threading.Thread(target=reader, args=(j,)) for j in range(3)]
    w.start()
    for r in rs:
        r.start()
    for r in rs:
        r.join()
    stop.set()
    w.join()
    assert reads == [3000] * 3
    assert not bad, f"{len(bad)} torn reads"
    assert m.forward_count == 2 + 9000
