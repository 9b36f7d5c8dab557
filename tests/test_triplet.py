from __future__ import annotations

import numpy as np
import pytest
from adalora_core.conformance import reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st

from adalora_core import orth, triplet
from adalora_core._xp import device, namespace


def _inputs(seed=0, r=3, n_in=5, n_out=4, batch=(2,)):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(*batch, n_in)), rng.normal(size=(r, n_in)), rng.normal(size=(r, 1)),
            rng.normal(size=(n_out, r)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_forward_backward_match_reference_and_keep_namespace_device_dtype(backend, dtype):
    host = _inputs(batch=(2, 3))
    x, A, E, B = (backend.asarray(a, dtype=dtype) for a in host)
    y = triplet.forward(x, A, E, B, 8.0, 3.0)
    g = backend.asarray(np.ones((2, 3, 4)), dtype=dtype)
    grads = triplet.backward(g, x, A, E, B, 8.0, 3.0)
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(backend.to_numpy(y), ref.triplet_forward(*host, 8.0, 3.0), rtol=tol, atol=tol)
    for got, want in zip(grads, ref.triplet_backward(np.ones((2, 3, 4)), *host, 8.0, 3.0)):
        np.testing.assert_allclose(backend.to_numpy(got), want, rtol=tol, atol=tol)
    for out in (y, *grads):
        assert namespace(out) is namespace(x)
        assert device(out) == device(x)
        assert out.dtype == x.dtype


def test_forward_reads_like_peft_bitwise_on_torch():
    torch = pytest.importorskip("torch")
    x, A, E, B = (torch.tensor(a, dtype=torch.float32) for a in _inputs())
    ranknum = torch.tensor([3.0])
    peft_style = (x @ (A * E).T @ B.T) * 8.0 / (ranknum + 1e-5)
    assert torch.equal(triplet.forward(x, A, E, B, 8.0, ranknum), peft_style)
    assert torch.equal(triplet.forward(x, A, E, B, 8.0, 3.0), peft_style)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), r=st.integers(1, 4), n_in=st.integers(1, 6), n_out=st.integers(1, 6))
def test_backward_matches_float64_finite_differences(seed, r, n_in, n_out):
    x, A, E, B = _inputs(seed, r, n_in, n_out)
    g = np.random.default_rng(seed + 1).normal(size=(2, n_out))
    grads = triplet.backward(g, x, A, E, B, 2.0, float(r))

    def loss(x_, A_, E_, B_):
        return float(np.sum(g * triplet.forward(x_, A_, E_, B_, 2.0, float(r))))

    args = [x, A, E, B]
    for k, analytic in enumerate(grads):
        num = np.zeros_like(args[k])
        for idx in np.ndindex(args[k].shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[k][idx] += 1e-6
            minus[k][idx] -= 1e-6
            num[idx] = (loss(*plus) - loss(*minus)) / 2e-6
        np.testing.assert_allclose(analytic, num, rtol=1e-5, atol=1e-7)


def test_backward_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    ts = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in _inputs(batch=(3, 2))]
    y = triplet.forward(*ts, 4.0, 3.0)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    ours = triplet.backward(g, *(t.detach() for t in ts), 4.0, 3.0)
    for t, got in zip(ts, ours):
        torch.testing.assert_close(got, t.grad, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), fan=st.booleans())
def test_merge_then_unmerge_restores_the_weight(seed, fan):
    _, A, E, B = _inputs(seed)
    W = np.random.default_rng(seed).normal(size=(5, 4) if fan else (4, 5))
    merged = triplet.merge(W, A, E, B, 8.0, 3.0, fan_in_fan_out=fan)
    np.testing.assert_allclose(merged - W, ref.delta_weight(A, E, B, 8.0, 3.0, fan), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(triplet.unmerge(merged, A, E, B, 8.0, 3.0, fan_in_fan_out=fan), W, atol=1e-12)


def test_merge_refuses_non_finite_and_wrong_layout():
    _, A, E, B = _inputs()
    W = np.zeros((4, 5))
    with pytest.raises(ValueError, match="non-finite"), np.errstate(invalid="ignore"):
        triplet.merge(W, A, E * np.inf, B, 8.0, 3.0)
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        triplet.merge(W.T, A, E, B, 8.0, 3.0)


@pytest.mark.parametrize("bad", ["x", "E", "rank", "dtype"])
def test_bad_shapes_and_dtypes_are_named(bad):
    x, A, E, B = _inputs()
    if bad == "x":
        x = x[:, :3]
    elif bad == "E":
        E = E[:, 0]
    elif bad == "rank":
        B = B[:, :2]
    else:
        x = x.astype(np.float32)
    with pytest.raises(ValueError, match="dimension|expected|mismatch|dtypes"):
        triplet.forward(x, A, E, B, 8.0, 3.0)


def test_mixed_libraries_are_refused():
    torch = pytest.importorskip("torch")
    x, A, E, B = _inputs()
    with pytest.raises(TypeError, match="mixed"):
        triplet.forward(torch.tensor(x), A, E, B, 8.0, 3.0)


def test_orth_value_and_gradient(backend):
    rng = np.random.default_rng(3)
    pairs_h = [(rng.normal(size=(3, 5)), rng.normal(size=(4, 3))) for _ in range(2)]
    pairs = [tuple(backend.asarray(t, dtype="float64") for t in p) for p in pairs_h]
    val = orth.orth_reg(pairs)
    assert abs(float(backend.to_numpy(val)) - ref.orth_reg(pairs_h)) < 1e-12
    for (ga, gb), (ra, rb) in zip(orth.orth_reg_grad(pairs), ref.orth_reg_grad(pairs_h)):
        np.testing.assert_allclose(backend.to_numpy(ga), ra, atol=1e-12)
        np.testing.assert_allclose(backend.to_numpy(gb), rb, atol=1e-12)
    with pytest.raises(ValueError, match="at least one"):
        orth.orth_reg([])


def _call(fn, x, A, E, B, scaling, ranknum, W=None):
    """Call the triplet function ``fn`` with the arguments it takes."""
    if fn == "forward":
        return triplet.forward(x, A, E, B, scaling, ranknum)
    if fn == "backward":  # any grad_out of the output's shape and dtype
        return triplet.backward((x @ A.T) @ B.T, x, A, E, B, scaling, ranknum)
    if fn == "delta_weight":
        return triplet.delta_weight(A, E, B, scaling, ranknum)
    return getattr(triplet, fn)(B @ A if W is None else W, A, E, B, scaling, ranknum)


FNS = ["forward", "backward", "delta_weight", "merge", "unmerge"]


@pytest.mark.parametrize("fn", FNS)
def test_integer_arrays_are_refused(backend, fn):
    """Integer arrays would truncate the result (ranknum 0.5 into 0: a 5e4x wrong output)."""
    x, A, E, B = (backend.asarray(np.round(a * 3), dtype="int64") for a in _inputs())
    with pytest.raises(TypeError, match="int64: they must be real floating"):
        _call(fn, x, A, E, B, 8.0, 0.5)


@pytest.mark.parametrize("fn", ["merge", "unmerge"])
def test_integer_weight_is_refused(backend, fn):
    _, A, E, B = (backend.asarray(a, dtype="float32") for a in _inputs())
    W = backend.asarray(np.zeros((4, 5)), dtype="int32")
    with pytest.raises(TypeError, match="weight W has dtype .*int32"):
        _call(fn, None, A, E, B, 8.0, 3.0, W)


def test_integer_input_with_float_weights_is_named():
    x, A, E, B = _inputs()
    with pytest.raises(ValueError, match="x int64"):
        triplet.forward(np.round(x).astype(np.int64), A, E, B, 8.0, 3.0)
    with pytest.raises(ValueError, match="grad_out has dtype int64"):
        triplet.backward(np.ones((2, 4), dtype=np.int64), x, A, E, B, 8.0, 3.0)


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize(("name", "scaling", "ranknum"), [
    ("ranknum", 8.0, 0), ("ranknum", 8.0, -3.0), ("ranknum", 8.0, float("nan")), ("ranknum", 8.0, float("inf")),
    ("ranknum", 8.0, True), ("ranknum", 8.0, "3"), ("scaling", float("nan"), 3.0), ("scaling", float("inf"), 3.0),
    ("scaling", True, 3.0), ("scaling", None, 3.0),
])
def test_bad_scaling_and_ranknum_are_refused(fn, name, scaling, ranknum):
    x, A, E, B = _inputs()
    with pytest.raises(ValueError, match=f"^{name}="):
        _call(fn, x, A, E, B, scaling, ranknum)


@pytest.mark.parametrize("fn", FNS)
def test_bad_ranknum_arrays_are_refused(backend, fn):
    x, A, E, B = (backend.asarray(a, dtype="float32") for a in _inputs())
    for bad in (backend.asarray([3], dtype="int64"), backend.asarray([3.0, 3.0], dtype="float32")):
        with pytest.raises(TypeError, match="ranknum must be"):
            _call(fn, x, A, E, B, 8.0, bad)


def test_fractional_ranknum_is_used_as_given(backend):
    host = _inputs()
    x, A, E, B = (backend.asarray(a, dtype="float64") for a in host)
    got = backend.to_numpy(triplet.forward(x, A, E, B, 8.0, 0.5))
    np.testing.assert_allclose(got, ref.triplet_forward(*host, 8.0, 0.5), rtol=1e-12, atol=1e-12)
