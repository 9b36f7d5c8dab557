"""EWC++: Fisher updates (EMA and windowed), normalisation, penalty, proximal and
explicit steps against the float64 reference; the Fisher is fed by apply_updates;
forgetting is reduced."""

from __future__ import annotations

import numpy as np
import pytest
from adalora_core.conformance import reference as R

from adalora_core.config import EwcConfig, MicroLoraConfig
from adalora_core.errors import AdaLoraWarning
from adalora_core.ewc import EwcState, minmax_normalise
from adalora_core.lora import LoraAdapter
from adalora_core.microlora import AdaptFeedback, MicroLoRA

D_IN, D_OUT, RANK = 20, 12, 2


def host(b, a):
    return np.asarray(b.to_numpy(a), dtype=np.float64)


def dev(b, a, dtype="float32"):
    return b.asarray(np.asarray(a, dtype=np.float64), dtype=dtype)


def f32(a):
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def make(backend, seed=0):
    rng = np.random.default_rng(seed)
    A, B = f32(rng.normal(0, 0.5, (RANK, D_IN))), f32(rng.normal(0, 0.5, (RANK, D_OUT)))
    ad = LoraAdapter(D_IN, D_OUT, RANK, 4.0, backend=backend)
    ad.set_weights(dev(backend, A), dev(backend, B))
    return ad, A, B


@pytest.mark.parametrize("bad", [{"decay": 1.0}, {"decay": -0.1}, {"mode": "online"}, {"window": 0},
                                 {"alpha": 0.0}, {"alpha": 1.5}, {"update": "implicit"}, {"lam": -1.0},
                                 {"lam": float("inf")}, {"update_fisher": "yes"},
                                 {"normalise_at_task_boundary": 1}])
def test_config_rules(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        EwcConfig(**bad)


def test_config_defaults_roundtrip():
    c = EwcConfig()
    assert (c.decay, c.mode, c.update, c.update_fisher) == (0.999, "ema", "proximal", True)
    assert EwcConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="no fields"):
        EwcConfig.from_dict({"decay": 0.9, "gamma": 1})


def test_from_adapter(backend):
    ad, A, B = make(backend)
    st = EwcState.from_adapter(ad)
    np.testing.assert_array_equal(host(backend, st.fisher_a), 0)
    np.testing.assert_array_equal(host(backend, st.fisher_b), 0)
    np.testing.assert_array_equal(host(backend, st.optimal_a), A)
    np.testing.assert_array_equal(host(backend, st.optimal_b), B)
    assert st.fisher_a.shape == (RANK, D_IN) and st.optimal_b.shape == (RANK, D_OUT)
    # the state owns copies: a later step does not move theta*
    ad.accumulate_gradient(dev(backend, np.ones(D_IN)), dev(backend, np.ones(D_OUT)))
    ad.apply_gradients(0.1)
    np.testing.assert_array_equal(host(backend, st.optimal_a), A)


def test_update_fisher_ema_and_observe(backend):
    ad, _, _ = make(backend)
    st = EwcState.from_adapter(ad, EwcConfig(decay=0.9))
    rng = np.random.default_rng(1)
    Fa, Fb = np.zeros((RANK, D_IN)), np.zeros((RANK, D_OUT))
    for decay in (0.9, 0.5, None):
        ga, gb = f32(rng.normal(size=(RANK, D_IN))), f32(rng.normal(size=(RANK, D_OUT)))
        if decay is None:
            st.observe(dev(backend, ga), dev(backend, gb))
            decay = 0.9
        else:
            st.update_fisher(dev(backend, ga), dev(backend, gb), decay)
        Fa, Fb = R.ewc_fisher_ema(Fa, ga, decay), R.ewc_fisher_ema(Fb, gb, decay)
    np.testing.assert_allclose(host(backend, st.fisher_a), Fa, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(host(backend, st.fisher_b), Fb, rtol=1e-5, atol=1e-7)


def test_windowed_fisher_and_normalisation(backend):
    K, alpha = 3, 0.4
    ad, A, B = make(backend)
    st = EwcState.from_adapter(ad, EwcConfig(mode="window", window=K, alpha=alpha, normalise_at_task_boundary=True))
    rng = np.random.default_rng(2)
    F = [np.zeros((RANK, D_IN)), np.zeros((RANK, D_OUT))]
    S = [np.zeros_like(F[0]), np.zeros_like(F[1])]
    for t in range(8):
        g = [f32(rng.normal(size=f.shape)) for f in F]
        st.observe(*(dev(backend, x) for x in g))
        S = [s + x**2 for s, x in zip(S, g)]
        if (t + 1) % K == 0:
            F = [R.ewc_fisher_window(f, s, K, alpha) for f, s in zip(F, S)]
            S = [np.zeros_like(s) for s in S]
            np.testing.assert_array_equal(host(backend, st.window_a), 0)
        np.testing.assert_allclose(host(backend, st.fisher_b), F[1], rtol=1e-5, atol=1e-7)
    assert st.window_steps == 2
    st.start_new_task(ad)  # folds the partial window (k = 2), then normalises
    F = [R.minmax_normalise(R.ewc_fisher_window(f, s, 2, alpha)) for f, s in zip(F, S)]
    np.testing.assert_allclose(host(backend, st.fisher_a), F[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(host(backend, st.fisher_b), F[1], rtol=1e-5, atol=1e-6)
    assert host(backend, st.fisher_a).max() == pytest.approx(1.0) and host(backend, st.fisher_a).min() == 0.0
    assert st.window_steps == 0
    np.testing.assert_array_equal(host(backend, st.optimal_a), A)
    np.testing.assert_array_equal(host(backend, st.optimal_b), B)


def test_minmax_constant_is_zero(backend):
    F = dev(backend, np.full((3, 4), 2.5))
    np.testing.assert_array_equal(host(backend, minmax_normalise(F)), 0)


def test_penalty_and_grad(backend):
    ad, A, B = make(backend)
    rng = np.random.default_rng(3)
    Fa, Fb = f32(rng.uniform(0, 2, (RANK, D_IN))), f32(rng.uniform(0, 2, (RANK, D_OUT)))
    Oa, Ob = f32(A + rng.normal(0, 0.1, A.shape)), f32(B + rng.normal(0, 0.1, B.shape))
    st = EwcState(*(dev(backend, a) for a in (Fa, Fb, Oa, Ob)), config=EwcConfig(lam=0.3))
    want = R.ewc_penalty(A, Oa, Fa, 0.3) + R.ewc_penalty(B, Ob, Fb, 0.3)
    assert float(host(backend, st.penalty(ad))) == pytest.approx(want, rel=1e-5)
    assert float(host(backend, st.penalty(ad, lam=0.6))) == pytest.approx(2 * want, rel=1e-5)
    ga, gb = st.penalty_grad(ad)
    np.testing.assert_allclose(host(backend, ga), R.ewc_penalty_grad(A, Oa, Fa, 0.3), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(host(backend, gb), R.ewc_penalty_grad(B, Ob, Fb, 0.3), rtol=1e-5, atol=1e-7)
    st.update_optimal(ad)
    assert float(host(backend, st.penalty(ad))) == 0.0


@pytest.mark.parametrize("update", ["proximal", "explicit"])
@pytest.mark.parametrize("feed", [True, False])
def test_apply_with_ewc_against_reference(backend, update, feed):
    lr, lam, decay = 0.2, 1.5, 0.7
    ad, A, B = make(backend, 4)
    rng = np.random.default_rng(5)
    Fa, Fb = f32(rng.uniform(0, 1, (RANK, D_IN))), f32(rng.uniform(0, 1, (RANK, D_OUT)))
    Oa, Ob = f32(A + rng.normal(0, 0.2, A.shape)), f32(B + rng.normal(0, 0.2, B.shape))
    st = EwcState(*(dev(backend, a) for a in (Fa, Fb, Oa, Ob)),
                  config=EwcConfig(decay=decay, update=update, update_fisher=feed, lam=lam))
    gA, gB = np.zeros_like(A), np.zeros_like(B)
    for _ in range(2):
        x, g = f32(rng.normal(size=D_IN)), f32(rng.normal(size=D_OUT))
        ad.accumulate_gradient(dev(backend, x), dev(backend, g), 0.5)
        dA, dB = R.lora_accumulate(x, g, A, B, 2.0, 0.5)
        gA, gB = gA + dA, gB + dB
    assert ad.apply_gradients_with_ewc(lr, st)
    step = R.ewc_apply_proximal if update == "proximal" else R.ewc_apply_explicit
    for theta, g, F, O, got, gotF in ((A, gA, Fa, Oa, ad.A, st.fisher_a), (B, gB, Fb, Ob, ad.B, st.fisher_b)):
        F2 = R.ewc_fisher_ema(F, g / 2, decay) if feed else F
        np.testing.assert_allclose(host(backend, gotF), F2, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(host(backend, got), step(theta, g / 2, lr, lam, F2, O), rtol=1e-5, atol=1e-6)
    assert ad.pending_updates == 0


def test_proximal_is_stable_where_explicit_diverges(backend):
    """lr * lam * F = 3 > 2: the explicit step oscillates with growing amplitude, the proximal one contracts."""
    results = {}
    for update in ("proximal", "explicit"):
        ad, _, _ = make(backend, 6)
        st = EwcState(dev(backend, np.full((RANK, D_IN), 3.0)), dev(backend, np.full((RANK, D_OUT), 3.0)),
                      dev(backend, np.zeros((RANK, D_IN))), dev(backend, np.zeros((RANK, D_OUT))),
                      config=EwcConfig(update=update, update_fisher=False))
        x, g = dev(backend, np.zeros(D_IN)), dev(backend, np.zeros(D_OUT))
        for _ in range(10):
            ad.accumulate_gradient(x, g)  # a zero gradient: only the penalty acts
            ad.apply_gradients_with_ewc(1.0, st, lam=1.0)
        results[update] = np.abs(host(backend, ad.A)).max()
    a0 = np.abs(make(backend, 6)[1]).max()
    assert results["proximal"] == pytest.approx(a0 / 4**10, rel=1e-4)  # (theta + 3*0) / (1 + 3)
    assert results["explicit"] == pytest.approx(a0 * 2**10, rel=1e-4)  # theta - 3*theta = -2 theta


def test_apply_updates_feeds_the_fisher(backend):
    """The original never fed the Fisher (its EWC was a no-op); here every apply_updates does."""
    cfg = MicroLoraConfig(rank=2, in_features=D_IN, out_features=D_OUT, target_modules=("q_proj",))
    fed = MicroLoRA(cfg, backend=backend, ewc=EwcConfig(decay=0.5))
    off = MicroLoRA(cfg, backend=backend, ewc=EwcConfig(update_fisher=False))
    rng = np.random.default_rng(7)
    x, g = rng.normal(size=D_IN), rng.normal(size=D_OUT)
    for m in (fed, off):
        m.adapt(dev(backend, x), AdaptFeedback(1.0, gradient_estimate=g))
        m.apply_updates(0.0 if m is off else 0.1)
    A0 = host(backend, fed.ewc_state("q_proj").optimal_a)  # the init, F from the mean gradient
    _, dB = R.lora_accumulate(f32(x), f32(g), A0, np.zeros((2, D_OUT)), 2.0, 1.0)
    np.testing.assert_allclose(host(backend, fed.ewc_state("q_proj").fisher_b), 0.5 * dB**2, rtol=1e-5)
    assert host(backend, fed.ewc_state("q_proj").fisher_b).max() > 0
    np.testing.assert_array_equal(host(backend, off.ewc_state("q_proj").fisher_b), 0)
    # and per call: update_fisher=False leaves it alone
    fed.adapt(dev(backend, x), AdaptFeedback(1.0, gradient_estimate=g))
    F = host(backend, fed.ewc_state("q_proj").fisher_b)
    fed.apply_updates(0.1, update_fisher=False)
    np.testing.assert_array_equal(host(backend, fed.ewc_state("q_proj").fisher_b), F)


def test_ewc_off_and_mismatched_state(backend):
    m = MicroLoRA(MicroLoraConfig(rank=2, in_features=D_IN, out_features=D_OUT), backend=backend, ewc=None)
    with pytest.raises(ValueError, match="ewc=EwcConfig"):
        m.apply_updates_with_ewc(0.1)
    with pytest.raises(ValueError, match="EWC"):
        m.start_new_task()
    ad, _, _ = make(backend)
    other = LoraAdapter(D_IN + 1, D_OUT, RANK, backend=backend)
    st = EwcState.from_adapter(other)
    ad.accumulate_gradient(dev(backend, np.ones(D_IN)), dev(backend, np.ones(D_OUT)))
    with pytest.raises(ValueError, match="EWC state is for"):
        ad.apply_gradients_with_ewc(0.1, st)
    assert ad.pending_updates == 1
    with pytest.raises(ValueError, match="shape"):
        EwcState(dev(backend, np.zeros((2, D_IN))), dev(backend, np.zeros((3, D_OUT))),
                 dev(backend, np.zeros((2, D_IN))), dev(backend, np.zeros((2, D_OUT))))


# ---------------------------------------------------------------------------
# forgetting: task A, then task B; the loss on A grows less with EWC
# ---------------------------------------------------------------------------

D = 32


def _task(seed, lo, hi):
    r = np.random.default_rng(seed)
    u = np.zeros(D)
    u[lo:hi] = r.normal(size=hi - lo)
    v = r.normal(size=D)
    return 2.0 * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v)), lo, hi


def _batch(rng, task, n):
    W, lo, hi = task
    x = np.zeros((n, D))
    x[:, lo:hi] = rng.normal(size=(n, hi - lo))
    return x.astype(np.float32), (x @ W).astype(np.float32)


def _loss(m, task):
    x, y = _batch(np.random.default_rng(99), task, 256)
    return float(np.mean(np.sum((m.forward(x, "q_proj") - y) ** 2, axis=1)) / 2)


def _two_tasks(backend, lam, seed, steps=400):
    # requests of task A use the first half of the features, task B the second half:
    # a rank-2 adapter can hold both maps, if learning B does not overwrite A
    TA, TB = _task(1 + seed, 0, 16), _task(50 + seed, 16, 32)
    m = MicroLoRA(MicroLoraConfig(rank=2, in_features=D, out_features=D, target_modules=("q_proj",)),
                  backend=backend, seed=seed, ewc=EwcConfig(normalise_at_task_boundary=True))
    rng = np.random.default_rng(100 + seed)
    for phase, task in enumerate((TA, TB)):
        for _ in range(steps):
            x, y = _batch(rng, task, 8)
            grad = m.forward(x, "q_proj") - y  # d/dy of the squared error, per request
            m.adapt(x, AdaptFeedback(0.5, gradient_estimate=grad, reward=1.0))
            if phase == 1 and lam:
                m.apply_updates_with_ewc(0.05, lam)
            else:
                m.apply_updates(0.05)  # feeds the Fisher (EMA of the mean gradients squared)
        if phase == 0:
            m.start_new_task()  # theta* = weights after A; F min-max normalised
            after_a = _loss(m, TA)
    return after_a, _loss(m, TA), _loss(m, TB)


@pytest.mark.parametrize("name", ["numpy", "native"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ewc_reduces_forgetting(name, seed):
    from adalora_core.backends import get_backend

    try:
        b = get_backend(name)
    except ValueError as exc:
        pytest.skip(str(exc))
    a0, a_plain, b_plain = _two_tasks(b, 0.0, seed)
    a0e, a_ewc, b_ewc = _two_tasks(b, 5.0, seed)
    assert a0 == a0e < 0.01  # task A learned, identically, before the penalty matters
    assert a_plain > 0.5  # without EWC, learning B overwrites A
    assert a_ewc < 0.5 * a_plain  # EWC cuts the forgetting at least in half
    assert b_plain < 0.01 and b_ewc < 0.05  # and B is still learned


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("mode", ["ema", "window"])
def test_explicit_step_that_overflows_is_skipped_and_counted(backend, mode):
    """lr * lam * F = 1e40 overflows float32 in the explicit step: the step is undone (weights,
    Fisher, window sums), counted in skipped_updates with a warning; nothing non-finite is written."""
    ad, _, _ = make(backend, 8)
    st = EwcState(dev(backend, np.full((RANK, D_IN), 1e36)), dev(backend, np.full((RANK, D_OUT), 1e36)),
                  dev(backend, np.zeros((RANK, D_IN))), dev(backend, np.zeros((RANK, D_OUT))),
                  config=EwcConfig(update="explicit", mode=mode, window=3, decay=0.5))
    rng = np.random.default_rng(9)
    x, g = dev(backend, rng.normal(size=D_IN)), dev(backend, rng.normal(size=D_OUT))
    ad.accumulate_gradient(x, g)
    assert ad.apply_gradients_with_ewc(0.1, st, lam=0.0)  # a = 0: a finite step (and window sums to keep)

    def snapshot():
        arrays = {"A": ad.A, "B": ad.B, **st.state_arrays()}
        return {k: host(backend, a).copy() for k, a in arrays.items()}, st.window_steps

    before = snapshot()
    ad.accumulate_gradient(x, g)
    with pytest.warns(AdaLoraWarning, match="not finite"):
        assert ad.apply_gradients_with_ewc(1.0, st, lam=1e4) is False
    after = snapshot()
    assert after[1] == before[1]
    for k, a in before[0].items():
        np.testing.assert_array_equal(after[0][k], a, err_msg=k)
    assert ad.skipped_updates == 1 and ad.pending_updates == 0
    np.testing.assert_array_equal(host(backend, ad.grad_A), 0)
    ad.accumulate_gradient(x, g)
    assert ad.apply_gradients_with_ewc(0.1, st, lam=1e-3)  # training goes on
    assert np.all(np.isfinite(host(backend, ad.A))) and ad.skipped_updates == 1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_fisher_overflow_is_skipped_and_counted(backend):
    """A finite gradient whose square overflows the Fisher (proximal step, EWC fed): skipped, counted."""
    m = MicroLoRA(MicroLoraConfig(rank=2, in_features=D_IN, out_features=D_OUT, target_modules=("q_proj",)),
                  backend=backend, ewc=EwcConfig(decay=0.5))
    m.adapter("q_proj").set_weights(dev(backend, np.full((RANK, D_IN), 0.5)), dev(backend, np.full((RANK, D_OUT), 1.0)))
    m.adapt(dev(backend, np.full(D_IN, 1e10)), AdaptFeedback(1.0, gradient_estimate=[1e10] * D_OUT))
    with pytest.warns(AdaLoraWarning, match="not finite"):
        assert m.apply_updates(1e-30) == 0
    assert m.skipped_updates == 1
    np.testing.assert_array_equal(host(backend, m.ewc_state("q_proj").fisher_b), 0)
    np.testing.assert_array_equal(host(backend, m.adapter("q_proj").B), 1.0)


def test_step_is_the_ewc_op_on_the_adapter_arrays(backend):
    """EwcState.step: the Fisher EMA fed first, then the proximal step; gradients cleared; the
    state's Fisher is what the op returned (in place on mutable libraries)."""
    ad, A, B = make(backend)
    st = EwcState.from_adapter(ad, EwcConfig(decay=0.9))
    rng = np.random.default_rng(3)
    gA, gB = f32(rng.normal(size=(RANK, D_IN))), f32(rng.normal(size=(RANK, D_OUT)))
    got = st.step(dev(backend, A), dev(backend, gA), dev(backend, B), dev(backend, gB), 0.5, 0.1, 2.0, update_fisher=True, proximal=True)
    for theta, g, new, newg, F in ((A, gA, got[0], got[1], st.fisher_a), (B, gB, got[2], got[3], st.fisher_b)):
        Fw = R.ewc_fisher_ema(np.zeros_like(theta), g * 0.5, 0.9)
        np.testing.assert_allclose(host(backend, F), Fw, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(host(backend, new), R.ewc_apply_proximal(theta, g * 0.5, 0.1, 2.0, Fw, theta),
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(host(backend, newg), 0)


def test_snapshot_restore(backend):
    ad, _, _ = make(backend)
    st = EwcState.from_adapter(ad, EwcConfig(mode="window", window=3))
    st.observe(dev(backend, np.ones((RANK, D_IN))), dev(backend, np.ones((RANK, D_OUT))))
    snap = st.snapshot()
    before = {k: host(backend, a).copy() for k, a in st.state_arrays().items()}
    st.observe(dev(backend, np.ones((RANK, D_IN))), dev(backend, np.ones((RANK, D_OUT))))
    st.observe(dev(backend, np.ones((RANK, D_IN))), dev(backend, np.ones((RANK, D_OUT))))  # folds
    assert st.window_steps == 0 and host(backend, st.fisher_a).any()
    st.restore(snap)
    assert st.window_steps == 1
    for k, a in st.state_arrays().items():
        np.testing.assert_array_equal(host(backend, a), before[k], err_msg=k)


def test_ewc_and_lora_do_not_import_each_other():
    """lora.py uses ewc.py (the EWC op and step); ewc.py needs nothing of lora.py."""
    import ast
    import inspect

    import adalora_core.ewc as ewc_module

    tree = ast.parse(inspect.getsource(ewc_module))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "lora" not in imported and "adalora_core.lora" not in imported, imported
