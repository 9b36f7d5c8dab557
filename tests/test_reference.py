"""Tests of the conformance referee itself (``conformance/reference.py``).

The reference is what the library is checked against, so it is checked here
against first principles: finite differences, hand-computed values, brute-force
loops, and (when installed) torch.optim.Adam.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import pathlib
import sys
import time

import numpy as np
import pytest

try:  # editable or wheel install: adalora_core.conformance maps to conformance/
    from adalora_core.conformance import reference as R
except ImportError:
    try:  # repo root on sys.path (python -m pytest from the root)
        from conformance import reference as R
    except ImportError:  # load the file directly
        _path = pathlib.Path(__file__).resolve().parents[1] / "conformance" / "reference.py"
        _spec = importlib.util.spec_from_file_location("_adalora_reference", _path)
        R = importlib.util.module_from_spec(_spec)
        sys.modules[_spec.name] = R
        _spec.loader.exec_module(R)


REF_PATH = pathlib.Path(R.__file__)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _central_diff(f, x, h=1e-6):
    """Central finite-difference gradient of the scalar function f at array x."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        idx = it.multi_index
        old = x[idx]
        x[idx] = old + h
        fp = f(x)
        x[idx] = old - h
        fm = f(x)
        x[idx] = old
        grad[idx] = (fp - fm) / (2 * h)
    return grad


# ---------------------------------------------------------------------------
# independence
# ---------------------------------------------------------------------------


def test_reference_imports_only_numpy_and_stdlib():
    tree = ast.parse(REF_PATH.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports would reach into the package"
            roots.add(node.module.split(".")[0])
    assert "adalora_core" not in roots
    stdlib = set(getattr(sys, "stdlib_module_names", ())) or {"math", "collections", "typing"}
    outside = roots - stdlib - {"numpy", "__future__"}
    assert not outside, outside


# ---------------------------------------------------------------------------
# AdaLoRA: schedule
# ---------------------------------------------------------------------------


def test_budget_schedule_worked_example():
    expected = {
        0: (8, False),
        1: (8, False),
        2: (8, False),
        3: (6, False),
        4: (5, True),
        5: (4, False),
        6: (4, True),
        7: (4, False),
        8: (4, True),
        9: (4, False),
    }
    for step in range(20):
        got = R.budget_schedule(step, 8, 4, 2, 3, 12, 2)
        want = expected.get(step, (4, True))
        assert got == want, (step, got, want)
        assert type(got[0]) is int and type(got[1]) is bool


def test_budget_schedule_truncates_python_float_math():
    # step 4 of the worked example: mul = 1 - 2/7, 4 * mul**3 + 4 = 5.457... -> 5
    mul = 1 - (4 - 2) / (12 - 3 - 2)
    assert int((8 - 4) * mul**3 + 4) == 5
    # deltaT uses the absolute step
    assert R.budget_schedule(5, 100, 10, 0, 0, 10, 5)[1] is True
    assert R.budget_schedule(6, 100, 10, 0, 0, 10, 5)[1] is False


# ---------------------------------------------------------------------------
# AdaLoRA: triplet layer
# ---------------------------------------------------------------------------


def _triplet(seed=0, r=3, n_in=5, n_out=4):
    rng = _rng(seed)
    return rng.normal(size=(r, n_in)), rng.normal(size=(r, 1)), rng.normal(size=(n_out, r))


def test_triplet_forward_vs_brute_force_delta():
    A, E, B = _triplet()
    scaling, ranknum = 8.0, 3.0
    x = _rng(1).normal(size=(2, 3, 5))
    c = scaling / (ranknum + 1e-5)
    delta = np.zeros((4, 5))
    for o in range(4):
        for j in range(5):
            delta[o, j] = sum(B[o, i] * E[i, 0] * A[i, j] for i in range(3)) * c
    np.testing.assert_allclose(
        R.delta_weight(A, E, B, scaling, ranknum), delta, rtol=1e-13, atol=1e-15
    )
    y = R.triplet_forward(x, A, E, B, scaling, ranknum)
    assert y.shape == (2, 3, 4)
    np.testing.assert_allclose(y, x @ delta.T, rtol=1e-12, atol=1e-14)
    # ranknum as PEFT's (1,) tensor is accepted
    np.testing.assert_allclose(R.triplet_forward(x, A, E, B, scaling, np.array([ranknum])), y)


def test_triplet_forward_zero_E_is_zero():
    A, E, B = _triplet()
    x = _rng(2).normal(size=(7, 5))
    assert np.all(R.triplet_forward(x, A, np.zeros_like(E), B, 8.0, 3.0) == 0.0)


@pytest.mark.parametrize("xshape", [(5,), (6, 5), (2, 3, 5)])
def test_triplet_backward_vs_finite_differences(xshape):
    A, E, B = _triplet(seed=3)
    rng = _rng(4)
    x = rng.normal(size=xshape)
    g = rng.normal(size=xshape[:-1] + (4,))
    scaling, ranknum = 6.0, 3.0

    def loss(x_=x, A_=A, E_=E, B_=B):
        return float(np.sum(g * R.triplet_forward(x_, A_, E_, B_, scaling, ranknum)))

    dx, dA, dE, dB = R.triplet_backward(g, x, A, E, B, scaling, ranknum)
    assert (
        dx.shape == x.shape and dA.shape == A.shape and dE.shape == (3, 1) and dB.shape == B.shape
    )
    kw = {"rtol": 1e-6, "atol": 1e-8}
    np.testing.assert_allclose(dx, _central_diff(lambda v: loss(x_=v), x), **kw)
    np.testing.assert_allclose(dA, _central_diff(lambda v: loss(A_=v), A), **kw)
    np.testing.assert_allclose(dE, _central_diff(lambda v: loss(E_=v), E), **kw)
    np.testing.assert_allclose(dB, _central_diff(lambda v: loss(B_=v), B), **kw)


def test_merge_unmerge_round_trip():
    A, E, B = _triplet(seed=5)
    W = _rng(6).normal(size=(4, 5))
    merged = R.merge(W, A, E, B, 8.0, 3.0)
    delta = R.delta_weight(A, E, B, 8.0, 3.0)
    assert np.abs(delta).max() > 0.1
    np.testing.assert_allclose(merged - W, delta, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(R.unmerge(merged, A, E, B, 8.0, 3.0), W, rtol=1e-12, atol=1e-14)
    # fan_in_fan_out: weights stored (in, out)
    Wt = W.T.copy()
    merged_t = R.merge(Wt, A, E, B, 8.0, 3.0, fan_in_fan_out=True)
    assert merged_t.shape == (5, 4)
    np.testing.assert_allclose(merged_t, merged.T, rtol=1e-14)
    np.testing.assert_allclose(
        R.unmerge(merged_t, A, E, B, 8.0, 3.0, True), Wt, rtol=1e-12, atol=1e-14
    )
    # inputs are not modified
    np.testing.assert_array_equal(W, Wt.T)


# ---------------------------------------------------------------------------
# AdaLoRA: orthogonal regulariser
# ---------------------------------------------------------------------------


def test_orth_reg_value_by_hand():
    A = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # A A^T - I = diag(3, 0) -> 3
    B = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # B^T B - I = diag(1, 0) -> 1
    assert R.orth_reg([(A, B)]) == pytest.approx((3.0 + 1.0) / 2)
    B2 = np.array([[1.0, 1.0], [0.0, 0.0]])  # B^T B = [[1,1],[1,1]] -> ||[[0,1],[1,0]]|| = sqrt 2
    assert R.orth_reg([(A, B), (A, B2)]) == pytest.approx((3 + 1 + 3 + math.sqrt(2)) / 4)
    assert R.orth_reg([]) == 0.0


def test_orth_reg_grad_vs_finite_differences():
    rng = _rng(7)
    pairs = [
        (rng.normal(size=(3, 5)), rng.normal(size=(4, 3))),
        (rng.normal(size=(2, 6)), rng.normal(size=(3, 2))),
    ]
    grads = R.orth_reg_grad(pairs)
    for m, (A, B) in enumerate(pairs):

        def fA(v, m=m):
            p = list(pairs)
            p[m] = (v, p[m][1])
            return R.orth_reg(p)

        def fB(v, m=m):
            p = list(pairs)
            p[m] = (p[m][0], v)
            return R.orth_reg(p)

        np.testing.assert_allclose(grads[m][0], _central_diff(fA, A), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(grads[m][1], _central_diff(fB, B), rtol=1e-6, atol=1e-9)


def test_orth_reg_grad_zero_at_zero_norm():
    A = np.eye(2, 4)  # orthonormal rows: A A^T = I
    B = np.eye(3, 2)  # orthonormal columns: B^T B = I
    rng = _rng(8)
    pairs = [(A, B), (rng.normal(size=(2, 4)), rng.normal(size=(3, 2)))]
    (gA, gB), (gA2, _gB2) = R.orth_reg_grad(pairs)
    assert np.all(gA == 0.0) and np.all(gB == 0.0)
    assert np.all(np.isfinite(gA2)) and np.abs(gA2).max() > 0
    assert np.all(np.isfinite(_gB2)) and np.abs(_gB2).max() > 0


# ---------------------------------------------------------------------------
# AdaLoRA: importance, scores, threshold
# ---------------------------------------------------------------------------


def test_ema_update_by_hand():
    m = np.array([1.0, 0.0])
    u = np.array([0.5, 0.0])
    p = np.array([2.0, -1.0])
    g = np.array([-3.0, 4.0])  # ipt = [6, 4]
    m1, u1 = R.ema_update(m, u, p, g, 0.5, 0.25)
    np.testing.assert_allclose(m1, [0.5 * 1 + 0.5 * 6, 0.5 * 4])  # [3.5, 2]
    np.testing.assert_allclose(u1, [0.25 * 0.5 + 0.75 * 2.5, 0.75 * 2.0])  # uses updated m
    np.testing.assert_array_equal(m, [1.0, 0.0])  # input untouched


def test_triplet_scores_by_hand():
    sA = np.array([[1.0, 3.0], [0.0, 0.0]])  # means 2, 0
    sE = np.array([[10.0], [1.0]])
    sB = np.array([[4.0, 1.0], [0.0, 2.0], [2.0, 3.0]])  # column means 2, 2
    np.testing.assert_allclose(R.triplet_scores(sA, sE, sB), [14.0, 3.0])


def test_kth_threshold():
    assert R.kth_threshold([np.array([3.0, 1.0]), np.array([2.0, 1.0])], 2) == 1.0
    assert R.kth_threshold([np.array([3.0, 1.0]), np.array([2.0, 1.0])], 3) == 2.0
    assert R.kth_threshold(np.array([5.0, 4.0]), 2) == 5.0
    assert R.kth_threshold([np.array([1.0])], 0) == -math.inf
    with pytest.raises(ValueError):
        R.kth_threshold([np.array([1.0])], 2)


# ---------------------------------------------------------------------------
# AdaLoRA: allocator
# ---------------------------------------------------------------------------


def _hand_case():
    """2 modules, r = 2, all params ones (so ipt = |g|), the same gradients every step.

    With beta1 = beta2 = 0.5 and two identical updates from zero EMAs:
    m = 0.75 * ipt, u = 0.25 * ipt, s = 3/16 * g**2 (all exact in binary).
    m1: score0 = 3/16 * (1 + 1 + 1) = 9/16, score1 = 3/16 * (0 + 2 + 1) = 9/16
    m2: score0 = 3/16 * (1 + 2 + 0) = 9/16, score1 = 3/16 * (4 + 9 + 0) = 39/16
    """
    ones = (np.ones((2, 2)), np.ones((2, 1)), np.ones((2, 2)))
    params = {"m1": ones, "m2": ones}
    grads = {
        "m1": (np.array([[1.0, 1.0], [2.0, 0.0]]), np.array([[1.0], [0.0]]), np.ones((2, 2))),
        "m2": (np.array([[0.0, 2.0], [3.0, 3.0]]), np.array([[1.0], [2.0]]), np.zeros((2, 2))),
    }
    # init_bgt 4, target_bgt 2; T = 2, tinit = tfinal = 0, deltaT = 1:
    # step 0 -> (4, False); step 1 -> (int(2 * 0.5**3 + 2) = 2, True); T_f = 2
    alloc = R.ReferenceAllocator(2, 1, 0, 0, 2, 1, 0.5, 0.5, {"m1": 2, "m2": 2})
    return alloc, params, grads


def test_allocator_hand_case_ties_prune_all_tied():
    alloc, params, grads = _hand_case()
    assert (alloc.init_bgt, alloc.target_bgt) == (4, 2)
    assert alloc.rank_pattern is None

    out0 = alloc.update_and_allocate(0, params, grads)
    assert all(np.all(E == 1.0) for E in out0.values())  # warm-up: no mask
    assert alloc.rank_pattern is None

    out1 = alloc.update_and_allocate(1, params, grads)
    s = alloc.scores()
    np.testing.assert_array_equal(s["m1"], [9 / 16, 9 / 16])
    np.testing.assert_array_equal(s["m2"], [9 / 16, 39 / 16])
    # k = 4 - 2 = 2, threshold 9/16: three entries tie at it and all three are pruned
    assert alloc.rank_pattern == {"m1.lora_E": [False, False], "m2.lora_E": [False, True]}
    np.testing.assert_array_equal(out1["m1"], [[0.0], [0.0]])
    np.testing.assert_array_equal(out1["m2"], [[0.0], [1.0]])
    np.testing.assert_array_equal(params["m1"][1], np.ones((2, 1)))  # inputs untouched

    # step 2 == T_f: final allocation from the scores as they stand (no update)
    bad = {k: tuple(np.full_like(t, 100.0) for t in v) for k, v in grads.items()}
    out2 = alloc.update_and_allocate(2, params, bad)
    assert alloc.finalized and alloc.exp_avg_ipt is None and alloc.exp_avg_unc is None
    assert alloc.rank_pattern == {"m1.lora_E": [False, False], "m2.lora_E": [False, True]}
    np.testing.assert_array_equal(out2["m2"], [[0.0], [1.0]])

    # later: the stored final mask is re-applied (to revived E values too)
    revived = {k: (v[0], np.full((2, 1), 7.0), v[2]) for k, v in params.items()}
    out3 = alloc.update_and_allocate(3, revived, None)
    np.testing.assert_array_equal(out3["m1"], [[0.0], [0.0]])
    np.testing.assert_array_equal(out3["m2"], [[0.0], [7.0]])
    assert alloc.skipped_steps == 0


def test_allocator_final_on_first_step_past_T_f():
    alloc, params, grads = _hand_case()
    alloc.update_and_allocate(0, params, grads)
    alloc.update_and_allocate(1, params, grads)
    out = alloc.update_and_allocate(5, params, grads)  # T_f = 2 was skipped by the caller
    assert alloc.finalized
    np.testing.assert_array_equal(out["m2"], [[0.0], [1.0]])


def test_allocator_skips_nonfinite_step_and_missing_grads():
    alloc, params, grads = _hand_case()
    alloc.update_and_allocate(0, params, grads)
    m_before = [t.copy() for t in alloc.exp_avg_ipt["m1"]]
    poisoned = dict(grads)
    poisoned["m2"] = (grads["m2"][0], np.array([[np.nan], [1.0]]), grads["m2"][2])
    # a mask step with a NaN gradient: no module's EMA moves, the step is counted,
    # masking still uses the (finite) scores as they stand
    alloc.update_and_allocate(1, params, poisoned)
    assert alloc.skipped_steps == 1
    for a, b in zip(m_before, alloc.exp_avg_ipt["m1"]):
        np.testing.assert_array_equal(a, b)
    assert all(np.all(np.isfinite(v)) for v in alloc.scores().values())

    alloc2, params, grads = _hand_case()
    alloc2.update_and_allocate(0, params, {"m1": grads["m1"], "m2": None})
    assert np.all(alloc2.exp_avg_ipt["m2"][0] == 0.0)  # missing gradient: module skipped
    assert np.any(alloc2.exp_avg_ipt["m1"][0] != 0.0)
    assert alloc2.skipped_steps == 0


def test_allocator_target_equal_init_masks_nothing():
    rng = _rng(9)
    names = ["a", "b"]
    alloc = R.ReferenceAllocator(3, 3, 0, 1, 6, 1, 0.85, 0.85, {n: 3 for n in names})
    for step in range(8):
        params = {
            n: (rng.normal(size=(3, 4)), rng.normal(size=(3, 1)), rng.normal(size=(5, 3)))
            for n in names
        }
        grads = {n: tuple(rng.normal(size=t.shape) for t in params[n]) for n in names}
        out = alloc.update_and_allocate(step, params, grads)
        for n in names:
            np.testing.assert_array_equal(out[n], params[n][1])
    assert alloc.rank_pattern == {"a.lora_E": [True] * 3, "b.lora_E": [True] * 3}


def test_allocator_budget_respected_and_fast():
    rng = _rng(10)
    names = [f"layer{i}.q" for i in range(6)]
    r, dims = 8, 32
    alloc = R.ReferenceAllocator(r, 2, 3, 5, 40, 2, 0.85, 0.85, {n: r for n in names})
    params = {
        n: (rng.normal(size=(r, dims)), rng.normal(size=(r, 1)), rng.normal(size=(dims, r)))
        for n in names
    }
    t0 = time.perf_counter()
    for step in range(40):
        grads = {n: tuple(rng.normal(size=t.shape) for t in params[n]) for n in names}
        out = alloc.update_and_allocate(step, params, grads)
        budget, mask_ind = alloc.budget_schedule(step)
        if step < alloc.T_f and mask_ind:
            kept = sum(sum(v) for v in alloc.rank_pattern.values())
            assert kept == budget  # continuous random scores: no ties
            for n in names:
                keep = np.array(alloc.rank_pattern[n + ".lora_E"])
                assert np.all(out[n][~keep] == 0.0)
                np.testing.assert_array_equal(out[n][keep], params[n][1][keep])
        # A, B unchanged by the allocator; a simulated optimizer step revives E
        params = {
            n: (params[n][0], out[n] + 0.01 * rng.normal(size=(r, 1)), params[n][2]) for n in names
        }
    elapsed = time.perf_counter() - t0
    assert alloc.finalized
    assert sum(sum(v) for v in alloc.rank_pattern.values()) == 2 * 6
    assert elapsed < 0.5, elapsed


# ---------------------------------------------------------------------------
# MicroLoRA
# ---------------------------------------------------------------------------


def test_lora_forward_shapes_and_bias():
    rng = _rng(11)
    A, B = rng.normal(size=(2, 6)), rng.normal(size=(2, 3))
    bias = rng.normal(size=3)
    x = rng.normal(size=(4, 6))
    y = R.lora_forward(x, A, B, 0.5, bias)
    assert y.shape == (4, 3)
    for n in range(4):
        want = [
            0.5 * sum(x[n, i] * A[k, i] * B[k, o] for i in range(6) for k in range(2)) + bias[o]
            for o in range(3)
        ]
        np.testing.assert_allclose(y[n], want, rtol=1e-12)
        np.testing.assert_allclose(R.lora_forward(x[n], A, B, 0.5, bias), y[n], rtol=1e-14)


@pytest.mark.parametrize("batched", [False, True])
def test_lora_accumulate_vs_finite_differences(batched):
    rng = _rng(12)
    A, B = rng.normal(size=(2, 5)), rng.normal(size=(2, 3))
    x = rng.normal(size=(4, 5) if batched else (5,))
    t = rng.normal(size=(4, 3) if batched else (3,))
    s, reward = 2.0, 0.7

    def loss(A_=A, B_=B):  # reward * 0.5 * ||y - t||^2, summed over the batch
        return reward * 0.5 * float(np.sum((R.lora_forward(x, A_, B_, s) - t) ** 2))

    grad_out = R.lora_forward(x, A, B, s) - t  # dL/dy without the reward
    dA, dB = R.lora_accumulate(x, grad_out, A, B, s, reward)
    assert dA.shape == A.shape and dB.shape == B.shape
    np.testing.assert_allclose(dA, _central_diff(lambda v: loss(A_=v), A), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(dB, _central_diff(lambda v: loss(B_=v), B), rtol=1e-6, atol=1e-9)


def test_lora_apply():
    theta = np.array([1.0, 2.0])
    g = np.array([4.0, -2.0])
    np.testing.assert_allclose(R.lora_apply(theta, g, 4, 0.5), [0.5, 2.25])
    np.testing.assert_array_equal(R.lora_apply(theta, g, 0, 0.5), theta)


def test_golden_init_3x2_by_hand():
    # k = i*2 + j; frac(k * 0.618033988749895) for k = 0..5:
    # 0, 0.618033988749895, 0.23606797749979, 0.854101966249685, 0.47213595499958, 0.090169943749475
    frac_minus_half = np.array(
        [
            [-0.5, 0.118033988749895],
            [-0.26393202250021, 0.354101966249685],
            [-0.02786404500042, -0.409830056250525],
        ]
    )
    want = (frac_minus_half * 2 * math.sqrt(2 / 3) * 0.01).T  # A is (r, in): A[j, i]
    got = R.golden_init(3, 2)
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-17)
    assert got[0, 0] == pytest.approx(-0.00816496580927726, rel=1e-14)


def test_batched_forward_matches_per_request():
    rng = _rng(13)
    As, Bs = rng.normal(size=(3, 2, 5)), rng.normal(size=(3, 2, 4))
    x = rng.normal(size=(6, 5))
    idx = np.array([2, 0, 0, 1, 2, 1])
    out = R.batched_forward(x, As, Bs, 1.5, idx)
    for b in range(6):
        np.testing.assert_allclose(
            out[b], R.lora_forward(x[b], As[idx[b]], Bs[idx[b]], 1.5), rtol=1e-14
        )
    s = np.array([1.0, 2.0, 3.0])
    out2 = R.batched_forward(x, As, Bs, s, idx)
    np.testing.assert_allclose(out2[0], 3.0 * (x[0] @ As[2].T) @ Bs[2], rtol=1e-14)


# ---------------------------------------------------------------------------
# EWC++
# ---------------------------------------------------------------------------


def test_fisher_updates_and_normalise():
    F = np.array([1.0, 2.0])
    g = np.array([3.0, -1.0])
    np.testing.assert_allclose(R.ewc_fisher_ema(F, g, 0.9), [0.9 + 0.1 * 9, 1.8 + 0.1])
    np.testing.assert_allclose(
        R.ewc_fisher_window(F, np.array([8.0, 4.0]), 4, 0.25),
        [0.25 * 2 + 0.75 * 1, 0.25 * 1 + 0.75 * 2],
    )
    np.testing.assert_allclose(R.minmax_normalise(np.array([2.0, 4.0, 3.0])), [0.0, 1.0, 0.5])
    np.testing.assert_array_equal(R.minmax_normalise(np.full(3, 5.0)), np.zeros(3))


def test_ewc_penalty_grad_vs_finite_differences():
    rng = _rng(14)
    theta, star = rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
    F = rng.uniform(0, 2, size=(4, 2))
    lam = 3.0
    assert R.ewc_penalty(theta, star, F, lam) == pytest.approx(
        lam / 2 * np.sum(F * (theta - star) ** 2)
    )
    np.testing.assert_allclose(
        R.ewc_penalty_grad(theta, star, F, lam),
        _central_diff(lambda v: R.ewc_penalty(v, star, F, lam), theta),
        rtol=1e-6,
        atol=1e-9,
    )


def test_ewc_proximal_matches_explicit_to_first_order():
    rng = _rng(15)
    theta, star, g = rng.normal(size=5), rng.normal(size=5), rng.normal(size=5)
    F = rng.uniform(0.5, 2.0, size=5)
    lam = 4.0
    diffs = []
    for lr in (1e-3, 1e-4):
        expl = R.ewc_apply_explicit(theta, g, lr, lam, F, star)
        prox = R.ewc_apply_proximal(theta, g, lr, lam, F, star)
        step = np.abs(expl - theta).max()
        diff = np.abs(prox - expl).max()
        assert step > 10 * lr * 1e-2  # the update itself is first order
        a = lam * F  # prox - expl = lr^2 a (a (theta - star) + g) + O(lr^3)
        assert diff < 2 * lr**2 * np.abs(a * (a * (theta - star) + g)).max()
        diffs.append(diff)
    assert diffs[0] / diffs[1] == pytest.approx(100.0, rel=0.05)  # O(lr^2)
    # the proximal form stays bounded where the explicit one diverges (lr*lam*F >= 2)
    prox = R.ewc_apply_proximal(theta, np.zeros(5), 10.0, 1.0, np.ones(5), star)
    assert np.all(np.abs(prox - star) <= np.abs(theta - star))


# ---------------------------------------------------------------------------
# Optimisers
# ---------------------------------------------------------------------------


def test_sgd_step():
    np.testing.assert_allclose(
        R.sgd_step(np.array([1.0, 2.0]), np.array([0.5, -1.0]), 0.1), [0.95, 2.1]
    )


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_step_matches_torch(weight_decay):
    torch = pytest.importorskip("torch")
    rng = _rng(16)
    p0 = rng.normal(size=(3, 4))
    grads = [rng.normal(size=(3, 4)) for _ in range(5)]
    tp = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = torch.optim.Adam([tp], lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for step, g in enumerate(grads, start=1):
        tp.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        p, m, v = R.adam_step(p, g, m, v, step, 0.01, 0.8, 0.95, 1e-6, weight_decay)
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-12, atol=1e-14)
        st = opt.state[tp]
        np.testing.assert_allclose(m, st["exp_avg"].numpy(), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(v, st["exp_avg_sq"].numpy(), rtol=1e-12, atol=1e-15)
    assert np.abs(p - p0).max() > 0.01
