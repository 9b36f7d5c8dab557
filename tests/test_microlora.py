"""MicroLoRA and LoraAdapter: config, feedback, math against the float64 reference,
bad input (clear errors, no state change), counters, merge, reset, checkpoints."""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import pytest
from adalora_core.backends import get_backend
from adalora_core.conformance import reference as R

from adalora_core.checkpoint import load_arrays, save_arrays
from adalora_core.config import KNOWN_MODULES, EwcConfig, MicroLoraConfig
from adalora_core.errors import AdaLoraWarning, CheckpointError
from adalora_core.lora import LoraAdapter
from adalora_core.microlora import FORMAT_VERSION, AdaptFeedback, MicroLoRA

D_IN, D_OUT = 32, 24


def host(b, a):
    return np.asarray(b.to_numpy(a), dtype=np.float64)


def dev(b, a, dtype="float32"):
    return b.asarray(np.asarray(a, dtype=np.float64), dtype=dtype)


def small(rank=2, **kw):
    kw.setdefault("in_features", D_IN)
    kw.setdefault("out_features", D_OUT)
    return MicroLoraConfig(rank=rank, **kw)


def weights(seed, n_in=D_IN, n_out=D_OUT, r=2):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 0.5, (r, n_in)), rng.normal(0, 0.5, (r, n_out))


def state(m):
    """Every array and counter of a MicroLoRA, on the host (to check that nothing changed)."""
    out = {"counters": (m.adaptation_count, m.forward_count, m.skipped_updates)}
    for name, ad in m.adapters.items():
        for k, a in ad.state_arrays().items():
            out[f"{name}.{k}"] = host(m.backend, a).copy()
        out[f"{name}.pending"] = ad.pending_updates
    return out


def assert_same(s1, s2):
    assert s1.keys() == s2.keys()
    for k in s1:
        if isinstance(s1[k], np.ndarray):
            np.testing.assert_array_equal(s1[k], s2[k], err_msg=k)
        else:
            assert s1[k] == s2[k], k


# ---------------------------------------------------------------------------
# config and feedback
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 3, 4, -1, 2.0, True])
def test_rank_outside_1_2_is_an_error_not_clamped(rank):
    with pytest.raises(ValueError, match="rank"):
        MicroLoraConfig(rank=rank)


def test_config_defaults_and_memory():
    c = MicroLoraConfig()
    assert (c.rank, c.alpha, c.dropout, c.target_modules, c.in_features, c.out_features, c.use_bias) == (
        2, 4.0, 0.0, ("q_proj", "v_proj"), 768, 768, False)
    assert c.memory_bytes() == 2 * (768 * 2 + 2 * 768) * 4
    c2 = MicroLoraConfig(rank=1, target_modules=["q_proj", "down_proj"], module_dims={"down_proj": (3072, 768)},
                         use_bias=True)
    assert c2.dims("down_proj") == (3072, 768) and c2.dims("q_proj") == (768, 768)
    assert c2.memory_bytes() == ((768 + 768 + 768) + (3072 + 768 + 768)) * 4
    assert MicroLoraConfig.from_dict(c2.to_dict()) == c2
    assert MicroLoRA(c2, backend="numpy").memory_bytes() == c2.memory_bytes()


@pytest.mark.parametrize("bad", [
    {"alpha": 0.0}, {"alpha": float("nan")}, {"dropout": 1.0}, {"dropout": -0.1},
    {"target_modules": []}, {"target_modules": ["q_proj", "q_proj"]}, {"in_features": 0},
    {"module_dims": {"q_proj": (0, 5)}}, {"module_dims": {"nope": (1, 2)}}, {"init": "xavier"},
    {"use_bias": 1},
])
def test_config_rules(bad):
    with pytest.raises(ValueError):
        MicroLoraConfig(**bad)


def test_unknown_target_module_lists_known_ones():
    with pytest.raises(ValueError) as exc:
        MicroLoraConfig(target_modules=["q_proj", "attn"])
    for name in KNOWN_MODULES:
        assert name in str(exc.value)


@pytest.mark.parametrize("quality", [float("nan"), -0.1, 1.5, float("inf")])
def test_feedback_quality_must_be_finite_in_0_1(quality):
    with pytest.raises(ValueError, match="quality"):
        AdaptFeedback(quality)


def test_feedback_other_fields():
    with pytest.raises(ValueError, match="reward"):
        AdaptFeedback(0.5, reward=float("nan"))
    with pytest.raises(ValueError, match="latency_us"):
        AdaptFeedback(0.5, latency_us=-1)
    with pytest.raises(ValueError, match="known modules"):
        AdaptFeedback(0.5, source_module="qproj")
    fb = AdaptFeedback(0.25, reward=0.0)
    assert fb.effective_reward == 0.0  # an explicit 0 reward is not replaced by quality
    assert AdaptFeedback(0.25).effective_reward == 0.25


# ---------------------------------------------------------------------------
# init and math against the reference, on every backend
# ---------------------------------------------------------------------------


def test_init_kaiming_b_zero_and_seeded(backend):
    m = MicroLoRA(small(), backend=backend, seed=7)
    m2 = MicroLoRA(small(), backend=backend, seed=7)
    m3 = MicroLoRA(small(), backend=backend, seed=8)
    bound = math.sqrt(2.0 / D_IN)
    for mod in ("q_proj", "v_proj"):
        A = host(backend, m.adapter(mod).A)
        assert A.shape == (2, D_IN) and np.all(np.abs(A) <= bound) and A.std() > bound / 4
        np.testing.assert_array_equal(host(backend, m.adapter(mod).B), 0)
        np.testing.assert_array_equal(A, host(backend, m2.adapter(mod).A))
        assert not np.array_equal(A, host(backend, m3.adapter(mod).A))
    assert not np.array_equal(host(backend, m.adapter("q_proj").A), host(backend, m.adapter("v_proj").A))
    x = dev(backend, np.ones(D_IN))
    np.testing.assert_array_equal(host(backend, m.forward(x, "q_proj")), 0)  # identity at init


def test_init_deterministic_is_golden(backend):
    m = MicroLoRA(small(init="deterministic"), backend=backend)
    np.testing.assert_allclose(host(backend, m.adapter("q_proj").A), R.golden_init(D_IN, 2), rtol=1e-6, atol=0)


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("batch", [(), (5,)])
def test_forward_and_forward_add(backend, rank, batch):
    m = MicroLoRA(small(rank=rank), backend=backend)
    A, B = weights(1, r=rank)
    m.adapter("q_proj").set_weights(dev(backend, A), dev(backend, B))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(*batch, D_IN)).astype(np.float32)
    o = rng.normal(size=(*batch, D_OUT)).astype(np.float32)
    y = m.forward(dev(backend, x), "q_proj")
    want = R.lora_forward(x, A.astype(np.float32), B.astype(np.float32), 4.0 / rank)
    np.testing.assert_allclose(host(backend, y), want, rtol=1e-5, atol=1e-5)
    out = dev(backend, o)
    got = m.forward_add(dev(backend, x), "q_proj", out)
    np.testing.assert_allclose(host(backend, got), o + want, rtol=1e-5, atol=1e-5)
    if backend.name in ("numpy", "native", "torch"):
        assert got is out  # in place on mutable libraries
    assert m.forward_count == 2
    assert y.dtype == backend.dtype("float32")


def test_native_hot_path_uses_the_c_kernels():
    native = pytest.importorskip("adalora_core.backends.native")
    if not native.is_available():
        pytest.skip("native backend not built")
    m = MicroLoRA(small(), backend="native")
    ad = m.adapter("q_proj")
    assert all(ad.uses_override.values())
    assert ad._fwd is native.lora_forward_add
    assert ad.A.flags.c_contiguous  # the rank-major storage, handed to C as it is
    m64 = MicroLoRA(small(), backend="native", dtype="float64")  # C kernels are float32: defaults
    assert not any(m64.adapter("q_proj").uses_override.values())


def test_native_forward_add_is_the_adapters_and_then_c():
    """MicroLoRA.forward_add is a lookup and the adapter's forward_add, which calls the C op:
    no other Python runs (it used to reach into the adapter's private members instead)."""
    native = pytest.importorskip("adalora_core.backends.native")
    if not native.is_available():
        pytest.skip("native backend not built")
    m = MicroLoRA(small(), backend="native")
    x, out = np.ones(D_IN, np.float32), np.zeros(D_OUT, np.float32)
    seen = []

    def profile(frame, event, arg):
        if event == "call":
            seen.append(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        m.forward_add(x, "q_proj", out)
    finally:
        sys.setprofile(None)
    assert seen == ["microlora.py:forward_add", "lora.py:forward_add"]


def test_delta_weight_and_merge_default_to_out_in(backend):
    """One default layout across the library: (out, in), like triplet.delta_weight and nn.Linear."""
    m = MicroLoRA(small(), backend=backend)
    A, B = weights(5)
    ad = m.adapter("q_proj")
    ad.set_weights(dev(backend, A), dev(backend, B))
    want = 2.0 * (A.T @ B).T
    np.testing.assert_allclose(host(backend, ad.delta_weight()), want, rtol=1e-5, atol=1e-6)
    W = np.random.default_rng(6).normal(size=(D_OUT, D_IN))
    np.testing.assert_allclose(host(backend, m.merge_into_base("q_proj", dev(backend, W))), W + want, rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ValueError, match=rf"expected \({D_OUT}, {D_IN}\)"):
        ad.merge_into(dev(backend, W.T))


def test_float64_adapters(backend):
    m = MicroLoRA(small(), backend=backend, dtype="float64")
    A, B = weights(3)
    m.adapter("v_proj").set_weights(dev(backend, A, "float64"), dev(backend, B, "float64"))
    x = np.random.default_rng(4).normal(size=(3, D_IN))
    np.testing.assert_allclose(host(backend, m.forward(dev(backend, x, "float64"), "v_proj")),
                               R.lora_forward(x, A, B, 2.0), rtol=1e-12)


def test_accumulate_apply_against_reference(backend):
    A, B = weights(5)
    ad = LoraAdapter(D_IN, D_OUT, 2, 4.0, backend=backend)
    ad.set_weights(dev(backend, A), dev(backend, B))
    A32, B32 = A.astype(np.float32), B.astype(np.float32)
    rng = np.random.default_rng(6)
    gA, gB = np.zeros_like(A32, dtype=np.float64), np.zeros_like(B32, dtype=np.float64)
    n = 0
    for k, shape in enumerate([(), (4,), ()]):
        x = rng.normal(size=(*shape, D_IN)).astype(np.float32)
        g = rng.normal(size=(*shape, D_OUT)).astype(np.float32)
        rw = [0.5, -1.0, 2.0][k]
        assert ad.accumulate_gradient(dev(backend, x), dev(backend, g), rw) == (shape[0] if shape else 1)
        dA, dB = R.lora_accumulate(x, g, A32, B32, 2.0, rw)
        gA, gB, n = gA + dA, gB + dB, n + (shape[0] if shape else 1)
    assert ad.pending_updates == n == 6
    np.testing.assert_allclose(host(backend, ad.grad_A), gA, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(host(backend, ad.grad_B), gB, rtol=1e-5, atol=1e-5)
    assert ad.apply_gradients(0.1)
    np.testing.assert_allclose(host(backend, ad.A), R.lora_apply(A32, gA, n, 0.1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(host(backend, ad.B), R.lora_apply(B32, gB, n, 0.1), rtol=1e-5, atol=1e-6)
    assert ad.pending_updates == 0
    np.testing.assert_array_equal(host(backend, ad.grad_A), 0)
    assert not ad.apply_gradients(0.1)  # nothing pending: a no-op


def test_general_rank_adapter(backend):
    r = 6
    A, B = weights(8, r=r)
    ad = LoraAdapter(D_IN, D_OUT, r, 12.0, backend=backend, init="deterministic")
    np.testing.assert_allclose(host(backend, ad.A), R.golden_init(D_IN, r), rtol=1e-6)
    ad.set_weights(dev(backend, A), dev(backend, B))
    x = np.random.default_rng(9).normal(size=(3, D_IN)).astype(np.float32)
    np.testing.assert_allclose(host(backend, ad.forward(dev(backend, x))),
                               R.lora_forward(x, A.astype(np.float32), B.astype(np.float32), 2.0), rtol=1e-5,
                               atol=1e-5)
    assert ad.rank == r and ad.param_count() == r * (D_IN + D_OUT) and ad.memory_bytes() == 4 * ad.param_count()


def test_adapt_reward_and_source_module(backend):
    m = MicroLoRA(small(), backend=backend, ewc=None)
    for mod, seed in (("q_proj", 10), ("v_proj", 11)):
        A, B = weights(seed)
        m.adapter(mod).set_weights(dev(backend, A), dev(backend, B))
    x = np.random.default_rng(12).normal(size=D_IN).astype(np.float32)
    g = np.random.default_rng(13).normal(size=D_OUT).astype(np.float32)
    assert m.adapt(dev(backend, x), AdaptFeedback(0.8, gradient_estimate=g.tolist(), source_module="v_proj"))
    assert m.adapt(dev(backend, x), AdaptFeedback(0.3, gradient_estimate=dev(backend, g), reward=-2.0))
    assert m.adaptation_count == 2
    assert m.pending_updates("q_proj") == 1 and m.pending_updates("v_proj") == 2
    A, B = (a.astype(np.float32) for a in weights(11))
    dA1, _ = R.lora_accumulate(x, g, A, B, 2.0, 0.8)
    dA2, _ = R.lora_accumulate(x, g, A, B, 2.0, -2.0)
    np.testing.assert_allclose(host(backend, m.adapter("v_proj").grad_A), dA1 + dA2, rtol=1e-5, atol=1e-5)


def test_batched_adapt_counts_examples(backend):
    m = MicroLoRA(small(), backend=backend)
    rng = np.random.default_rng(14)
    x = dev(backend, rng.normal(size=(6, D_IN)))
    assert m.adapt(x, AdaptFeedback(0.5, gradient_estimate=rng.normal(size=(6, D_OUT)), source_module="q_proj"))
    assert m.pending_updates("q_proj") == 6 and m.adaptation_count == 1


def test_dropout_applies_to_adapt_only(backend):
    cfg = small(dropout=0.5)
    a, b2, plain = (MicroLoRA(c, backend=backend, seed=3, ewc=None) for c in (cfg, cfg, small()))
    for m in (a, b2, plain):
        A, B = weights(15)
        m.adapter("q_proj").set_weights(dev(backend, A), dev(backend, B))
    x = dev(backend, np.ones(D_IN))
    fb = AdaptFeedback(1.0, gradient_estimate=np.ones(D_OUT), source_module="q_proj")
    for m in (a, b2, plain):
        m.adapt(x, fb)
    ga = host(backend, a.adapter("q_proj").grad_A)
    np.testing.assert_array_equal(ga, host(backend, b2.adapter("q_proj").grad_A))  # seeded
    gp = host(backend, plain.adapter("q_proj").grad_A)
    dropped = np.all(ga == 0, axis=0)  # an input dropped: its column of grad_A (r, in) is zero
    assert 0 < dropped.sum() < D_IN  # some inputs dropped
    np.testing.assert_allclose(ga[:, ~dropped], 2 * gp[:, ~dropped], rtol=1e-5)  # inverted dropout
    np.testing.assert_array_equal(host(backend, a.forward(x, "q_proj")), host(backend, plain.forward(x, "q_proj")))


# ---------------------------------------------------------------------------
# bad input: clear errors, no state change
# ---------------------------------------------------------------------------


@pytest.fixture
def primed(backend):
    """A MicroLoRA with non-trivial weights and one pending gradient."""
    m = MicroLoRA(small(), backend=backend)
    A, B = weights(20)
    m.adapter("q_proj").set_weights(dev(backend, A), dev(backend, B))
    m.adapt(dev(backend, np.ones(D_IN)), AdaptFeedback(0.5, gradient_estimate=np.ones(D_OUT), source_module="q_proj"))
    return m


def test_gradient_of_wrong_length(primed):
    b, before = primed.backend, state(primed)
    with pytest.raises(ValueError, match="out_features=24"):
        primed.adapt(dev(b, np.ones(D_IN)), AdaptFeedback(0.5, gradient_estimate=np.ones(D_OUT + 1)))
    with pytest.raises(ValueError, match="gradient_estimate has shape"):
        primed.adapt(dev(b, np.ones((2, D_IN))), AdaptFeedback(0.5, gradient_estimate=np.ones(D_OUT)))
    with pytest.raises(TypeError, match="real floating"):
        primed.adapt(dev(b, np.ones(D_IN)), AdaptFeedback(0.5, gradient_estimate=np.ones(D_OUT, dtype=np.int64)))
    assert_same(before, state(primed))


def test_inputs_of_wrong_dimension_or_dtype(primed):
    b, before = primed.backend, state(primed)
    fb = AdaptFeedback(0.5, gradient_estimate=np.ones(D_OUT), source_module="q_proj")
    with pytest.raises(ValueError, match="features"):
        primed.adapt(dev(b, np.ones(D_IN + 1)), fb)
    with pytest.raises(ValueError, match=r"\(in,\) or \(n, in\)"):
        primed.adapt(dev(b, np.ones((2, 2, D_IN))), fb)
    with pytest.raises(TypeError, match="dtype"):
        primed.adapt(dev(b, np.ones(D_IN), "float64"), fb)
    out = dev(b, np.full(D_OUT, 3.0))
    with pytest.raises(ValueError):
        primed.forward_add(dev(b, np.ones(D_IN + 1)), "q_proj", out)
    with pytest.raises(ValueError):
        primed.forward_add(dev(b, np.ones(D_IN)), "q_proj", dev(b, np.zeros((2, D_OUT))))
    with pytest.raises(TypeError):
        primed.forward_add(dev(b, np.ones(D_IN), "float64"), "q_proj", out)
    with pytest.raises(TypeError):
        primed.forward_add(dev(b, np.ones(D_IN)), "q_proj", dev(b, np.zeros(D_OUT), "float64"))
    with pytest.raises(ValueError):
        primed.forward(dev(b, np.ones(D_IN - 1)), "q_proj")
    np.testing.assert_array_equal(host(b, out), 3.0)
    assert_same(before, state(primed))


@pytest.mark.parametrize("lib", ["array_api_strict", "torch"])
def test_arrays_of_another_library_are_refused(lib):
    pytest.importorskip(lib)
    m = MicroLoRA(small(), backend=lib)
    x = np.ones(D_IN, dtype=np.float32)
    with pytest.raises(TypeError):
        m.forward(x, "q_proj")
    with pytest.raises(TypeError):
        m.adapt(x, AdaptFeedback(0.5, gradient_estimate=np.ones(D_OUT)))
    assert m.adaptation_count == m.forward_count == 0


@pytest.mark.parametrize("module", ["k_proj", "attn", None, 3])
def test_unknown_module(primed, module):
    b, before = primed.backend, state(primed)
    x, out = dev(b, np.ones(D_IN)), dev(b, np.zeros(D_OUT))
    for call in (lambda: primed.forward(x, module), lambda: primed.forward_add(x, module, out),
                 lambda: primed.merge_into_base(module, dev(b, np.zeros((D_IN, D_OUT)))),
                 lambda: primed.apply_updates(0.1, modules=[module])):
        with pytest.raises(ValueError, match="known modules|adapts") as exc:
            call()
        assert "q_proj" in str(exc.value)
    if module == "attn":
        assert "lm_head" in str(exc.value)  # the known names are listed
    assert_same(before, state(primed))


@pytest.mark.parametrize("lr", [-0.1, float("nan"), float("inf"), "0.1", None])
def test_bad_learning_rate(primed, lr):
    before = state(primed)
    with pytest.raises(ValueError, match="lr"):
        primed.apply_updates(lr)
    with pytest.raises(ValueError, match="lr"):
        primed.apply_updates_with_ewc(lr)
    with pytest.raises(ValueError, match="lr"):
        primed.adapter("q_proj").apply_gradients(lr)
    assert_same(before, state(primed))


@pytest.mark.parametrize("lam", [-1.0, float("nan")])
def test_bad_lambda(primed, lam):
    before = state(primed)
    with pytest.raises(ValueError, match="lam"):
        primed.apply_updates_with_ewc(0.1, lam)
    assert_same(before, state(primed))


def test_non_finite_gradient_is_skipped_and_counted(primed):
    b, before = primed.backend, state(primed)
    g = np.ones(D_OUT)
    g[3] = np.nan
    with pytest.warns(AdaLoraWarning, match="not finite"):
        assert primed.adapt(dev(b, np.ones(D_IN)), AdaptFeedback(0.5, gradient_estimate=g)) is False
    x = np.ones(D_IN)
    x[0] = np.inf
    with pytest.warns(AdaLoraWarning):
        assert primed.adapt(dev(b, x), AdaptFeedback(0.5, gradient_estimate=np.ones(D_OUT))) is False
    after = state(primed)
    assert after.pop("counters") == (before["counters"][0], before["counters"][1], 2)
    before.pop("counters")
    assert_same(before, after)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_overflowing_gradient_never_reaches_the_weights(backend):
    ad = LoraAdapter(D_IN, D_OUT, 2, 4.0, backend=backend)
    A, B = weights(21)
    ad.set_weights(dev(backend, A), dev(backend, B))
    big = dev(backend, np.full(D_IN, 3e38))
    ad.accumulate_gradient(big, dev(backend, np.full(D_OUT, 3e38)), 1.0)  # overflows to inf
    with pytest.warns(AdaLoraWarning, match="skipped"):
        assert ad.apply_gradients(0.1) is False
    np.testing.assert_array_equal(host(backend, ad.A), A.astype(np.float32))
    np.testing.assert_array_equal(host(backend, ad.B), B.astype(np.float32))
    assert ad.skipped_updates == 1 and ad.pending_updates == 0
    np.testing.assert_array_equal(host(backend, ad.grad_A), 0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_step_that_overflows_never_reaches_the_weights(backend):
    """A finite gradient and a finite lr whose SGD step overflows float32: undone, counted."""
    ad = LoraAdapter(D_IN, D_OUT, 2, 4.0, backend=backend, use_bias=True)
    A, B = weights(22)
    ad.set_weights(dev(backend, A), dev(backend, B))
    ad.accumulate_gradient(dev(backend, np.full(D_IN, 10.0)), dev(backend, np.full(D_OUT, 10.0)), 1.0)
    with pytest.warns(AdaLoraWarning, match="step over 1 examples is not finite"):
        assert ad.apply_gradients(3e38) is False
    np.testing.assert_array_equal(host(backend, ad.A), A.astype(np.float32))
    np.testing.assert_array_equal(host(backend, ad.B), B.astype(np.float32))
    np.testing.assert_array_equal(host(backend, ad.bias), 0)
    assert ad.skipped_updates == 1 and ad.pending_updates == 0
    np.testing.assert_array_equal(host(backend, ad.grad_B), 0)


def test_missing_gradient_estimate(primed):
    b, before = primed.backend, state(primed)
    with pytest.raises(ValueError, match="gradient_estimate is required"):
        primed.adapt(dev(b, np.ones(D_IN)), AdaptFeedback(0.5))
    assert_same(before, state(primed))
    m = MicroLoRA(small(allow_heuristic_gradient=True), backend=b, ewc=None)
    A, B = weights(22)
    m.adapter("q_proj").set_weights(dev(b, A), dev(b, B))
    with pytest.warns(AdaLoraWarning, match="no direction"):
        assert m.adapt(dev(b, np.ones(D_IN)), AdaptFeedback(0.5, source_module="q_proj"))
    _, dB = R.lora_accumulate(np.ones(D_IN), np.full(D_OUT, 0.005), A.astype(np.float32), B.astype(np.float32),
                              2.0, 0.5)
    np.testing.assert_allclose(host(b, m.adapter("q_proj").grad_B), dB, rtol=1e-5)


def test_feedback_type(primed):
    with pytest.raises(TypeError, match="AdaptFeedback"):
        primed.adapt(dev(primed.backend, np.ones(D_IN)), {"quality": 0.5})


# ---------------------------------------------------------------------------
# switches, counters, merge, reset
# ---------------------------------------------------------------------------


def test_enable_disable(primed):
    b = primed.backend
    x = dev(b, np.ones(D_IN))
    y_on = host(b, primed.forward(x, "q_proj"))
    primed.disable()
    before = state(primed)
    assert not primed.enabled
    np.testing.assert_array_equal(host(b, primed.forward(x, "q_proj")), 0)
    out = primed.forward_add(x, "q_proj", dev(b, np.ones(D_OUT)))
    np.testing.assert_array_equal(host(b, out), 1.0)
    assert primed.adapt(x, AdaptFeedback(0.5, gradient_estimate=np.ones(D_OUT))) is False
    assert_same(before, state(primed))
    primed.enable()
    np.testing.assert_array_equal(host(b, primed.forward(x, "q_proj")), y_on)


def test_merge_into_both_layouts(backend):
    ad = LoraAdapter(D_IN, D_OUT, 2, 4.0, backend=backend)
    A, B = weights(23)
    ad.set_weights(dev(backend, A), dev(backend, B))
    W = np.random.default_rng(24).normal(size=(D_IN, D_OUT))
    delta = 2.0 * A.astype(np.float32).astype(np.float64).T @ B.astype(np.float32).astype(np.float64)
    w1 = ad.merge_into(dev(backend, W), "in_out")
    np.testing.assert_allclose(host(backend, w1), W.astype(np.float32) + delta, rtol=1e-5, atol=1e-5)
    w2 = ad.merge_into(dev(backend, W.T), "out_in")
    np.testing.assert_allclose(host(backend, w2), W.T.astype(np.float32) + delta.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        ad.merge_into(dev(backend, W), "out_in")
    with pytest.raises(ValueError, match="layout"):
        ad.merge_into(dev(backend, W), "fan_in")


def test_merge_into_torch_linear():
    torch = pytest.importorskip("torch")
    m = MicroLoRA(small(), backend="torch")
    A, B = weights(25)
    m.adapter("q_proj").set_weights(torch.tensor(A, dtype=torch.float32), torch.tensor(B, dtype=torch.float32))
    lin = torch.nn.Linear(D_IN, D_OUT)
    x = torch.randn(4, D_IN)
    with torch.no_grad():
        want = lin(x) + m.forward(x, "q_proj")
        m.merge_into_base("q_proj", lin.weight.data, layout="out_in")
        got = lin(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reset(primed):
    b = primed.backend
    A = host(b, primed.adapter("q_proj").A)
    primed.forward(dev(b, np.ones(D_IN)), "q_proj")
    primed.reset()
    assert primed.adaptation_count == primed.forward_count == primed.skipped_updates == 0
    assert primed.pending_updates("q_proj") == 0
    np.testing.assert_array_equal(host(b, primed.adapter("q_proj").B), 0)
    np.testing.assert_array_equal(host(b, primed.adapter("q_proj").A), A)
    np.testing.assert_array_equal(host(b, primed.ewc_state("q_proj").fisher_a), 0)


def test_param_count_and_repr():
    m = MicroLoRA(MicroLoraConfig(rank=1, target_modules=["q_proj", "lm_head"],
                                  module_dims={"lm_head": (768, 32000)}), backend="numpy")
    assert m.param_count() == (768 + 768) + (768 + 32000)
    assert m.memory_bytes() == 4 * m.param_count()
    assert "lm_head" in repr(m) and m.adapter("lm_head").rank == 1


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------


def _trained(backend, ewc=EwcConfig(mode="window", window=2)):  # noqa: B008
    backend = get_backend(backend)
    m = MicroLoRA(small(use_bias=True, target_modules=("q_proj", "up_proj"), module_dims={"up_proj": (D_IN, 40)}),
                  backend=backend, seed=4, ewc=ewc)
    rng = np.random.default_rng(30)
    for t in range(7):
        mod = ("q_proj", "up_proj")[t % 2]
        out_f = 40 if mod == "up_proj" else D_OUT
        m.adapt(dev(backend, rng.normal(size=D_IN)), AdaptFeedback(0.7, gradient_estimate=rng.normal(size=out_f),
                                                                    source_module=mod))
        if t in (2, 4):
            m.apply_updates(0.1)
    m.forward(dev(backend, np.ones(D_IN)), "q_proj")
    return m


def _continue(m):
    rng = np.random.default_rng(31)
    for _ in range(3):
        m.adapt(m.backend.asarray(rng.normal(size=D_IN), dtype=m.dtype_name),
                AdaptFeedback(0.9, gradient_estimate=rng.normal(size=D_OUT), source_module="q_proj"))
    m.apply_updates_with_ewc(0.1, 2.0)
    return {k: host(m.backend, a) for k, a in m.adapter("q_proj").state_arrays().items()}


@pytest.mark.parametrize("reader", ["numpy", "native", "array_api_strict", "torch"])
def test_save_load_roundtrip_across_backends(backend, reader, tmp_path):
    try:
        rb = get_backend(reader)
    except ValueError as exc:
        pytest.skip(str(exc))
    m = _trained(backend)
    path = tmp_path / "m.safetensors"
    m.save(path)
    m2 = MicroLoRA.load(path, backend=rb)
    assert m2.backend is rb and m2.config == m.config and m2.ewc_config == m.ewc_config
    assert (m2.adaptation_count, m2.forward_count, m2.skipped_updates) == (
        m.adaptation_count, m.forward_count, m.skipped_updates)
    for mod in m.modules:
        assert m2.pending_updates(mod) == m.pending_updates(mod)
        for k, a in m.adapter(mod).state_arrays().items():
            np.testing.assert_array_equal(host(rb, m2.adapter(mod).state_arrays()[k]), host(backend, a))
        e1, e2 = m.ewc_state(mod), m2.ewc_state(mod)
        assert e1.window_steps == e2.window_steps
        for k, a in e1.state_arrays().items():
            np.testing.assert_array_equal(host(rb, e2.state_arrays()[k]), host(backend, a))
    s1, s2 = _continue(m), _continue(m2)  # the loaded copy carries on as the original would
    for k in s1:
        np.testing.assert_allclose(s2[k], s1[k], rtol=1e-5, atol=1e-6)


def test_load_in_another_dtype(tmp_path):
    m = _trained("numpy", ewc=None)
    m.save(tmp_path / "m")
    m2 = MicroLoRA.load(tmp_path / "m", backend="numpy", dtype="float64")
    assert m2.dtype_name == "float64" and m2.ewc_config is None
    np.testing.assert_array_equal(m2.adapter("q_proj").A, m.adapter("q_proj").A.astype(np.float64))


def test_loads_format_version_1(tmp_path):
    """Version 1 stored the A-side arrays (lora_A, grad_A, ewc.*_a) as (in, r): read and transposed."""
    m = _trained("numpy")
    m.save(tmp_path / "v2")
    arrays, meta = load_arrays(tmp_path / "v2")
    assert meta["version"] == FORMAT_VERSION == 2 and arrays["q_proj.ewc.window_a"].shape == (2, D_IN)
    a_side = ("lora_A", "grad_A", "fisher_a", "optimal_a", "window_a")
    v1 = {k: np.ascontiguousarray(a.T) if k.endswith(a_side) else a for k, a in arrays.items()}
    save_arrays(tmp_path / "v1", v1, {**meta, "version": 1})
    m1 = MicroLoRA.load(tmp_path / "v1", backend="numpy")
    for mod in m.modules:
        for k, a in m.adapter(mod).state_arrays().items():
            np.testing.assert_array_equal(m1.adapter(mod).state_arrays()[k], a, err_msg=k)
        for k, a in m.ewc_state(mod).state_arrays().items():
            np.testing.assert_array_equal(m1.ewc_state(mod).state_arrays()[k], a, err_msg=k)
    assert m1.pending_updates("q_proj") == m.pending_updates("q_proj") > 0
    save_arrays(tmp_path / "v1_as_v2", v1, meta)  # (in, r) arrays in a version-2 file are refused
    with pytest.raises(CheckpointError, match="shape"):
        MicroLoRA.load(tmp_path / "v1_as_v2")


def _rewrite(path, edit_arrays=None, edit_meta=None):
    arrays, meta = load_arrays(path)
    arrays = {k: np.array(v) for k, v in arrays.items()}
    if edit_arrays:
        edit_arrays(arrays)
    if edit_meta:
        edit_meta(meta)
    save_arrays(path, arrays, meta)


@pytest.mark.parametrize("corruption, match", [
    ("truncate", "truncated or corrupt"),
    ("shape", "shape"),
    ("dtype", "dtype"),
    ("missing", "missing keys"),
    ("version", "version"),
    ("format", "not a state of kind"),
    ("config", "invalid metadata"),
    ("counter", "invalid metadata"),
    ("fisher", "negative"),
    ("nan", "non-finite"),
])
def test_corrupt_saves(tmp_path, corruption, match):
    path = tmp_path / "m.safetensors"
    _trained("numpy").save(path)
    if corruption == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif corruption == "shape":
        _rewrite(path, lambda a: a.__setitem__("q_proj.lora_A", np.zeros((3, D_IN), np.float32)))
    elif corruption == "dtype":
        _rewrite(path, lambda a: a.__setitem__("q_proj.lora_B", a["q_proj.lora_B"].astype(np.float64)))
    elif corruption == "missing":
        _rewrite(path, lambda a: a.pop("up_proj.grad_A"))
    elif corruption == "version":
        _rewrite(path, edit_meta=lambda m: m.__setitem__("version", FORMAT_VERSION + 1))
    elif corruption == "format":
        _rewrite(path, edit_meta=lambda m: m.__setitem__("format", "something.else"))
    elif corruption == "config":
        _rewrite(path, edit_meta=lambda m: m["config"].__setitem__("rank", 5))
    elif corruption == "counter":
        _rewrite(path, edit_meta=lambda m: m.__setitem__("adaptation_count", -3))
    elif corruption == "fisher":
        _rewrite(path, lambda a: a.__setitem__("q_proj.ewc.fisher_a", -np.ones((2, D_IN), np.float32)))
    elif corruption == "nan":
        def poison(a):
            a["q_proj.lora_A"][0, 0] = np.nan
        arrays, meta = load_arrays(path)
        arrays = {k: np.array(v) for k, v in arrays.items()}
        poison(arrays)
        from safetensors.numpy import save
        path.write_bytes(save(arrays, metadata={"adalora_core": __import__("json").dumps(meta)}))
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=match):
        MicroLoRA.load(path, backend="numpy")
    assert path.read_bytes() == before  # a failed load touches nothing


def test_save_is_atomic(tmp_path):
    path = tmp_path / "m.safetensors"
    m = _trained("numpy")
    m.save(path)
    good = path.read_bytes()
    bad = _trained("numpy")
    bad.adapter("q_proj")._B[0, 0] = np.nan  # (no public way to do this: a broken adapter)
    with pytest.raises(CheckpointError):
        bad.save(path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_counters_and_warnings_free_normal_path(backend):
    m = MicroLoRA(small(), backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = dev(backend, np.ones(D_IN))
        for _ in range(3):
            m.adapt(x, AdaptFeedback(0.5, gradient_estimate=np.ones(D_OUT)))
            m.forward_add(x, "v_proj", dev(backend, np.zeros(D_OUT)))
        assert m.apply_updates(0.01) == 2
    assert (m.adaptation_count, m.forward_count, m.skipped_updates) == (3, 3, 0)
