"""The native backend's C ops against plain NumPy float64 formulas.

Every op runs on every kernel path this machine has (scalar, avx2, neon),
on awkward sizes and both A layouts; every bad input must raise a clear
error and write nothing. Skipped when the C extension is not built.
"""

from __future__ import annotations

import importlib.machinery
import inspect
import os
import pickle
import subprocess
import sys
import threading

import numpy as np
import pytest

native = pytest.importorskip("adalora_core.backends.native")
if not native.info()["built"]:
    pytest.skip(f"C extension not built: {native.info()['reason']}", allow_module_level=True)

EPS32 = float(np.finfo(np.float32).eps)
ISAS = native.supported_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    before = native.active_isa()
    native.select_isa(request.param)
    yield request.param
    native.select_isa(before)


@pytest.fixture
def ops():
    return native.OPS


def f32(rng, *shape):
    return rng.uniform(-1, 1, size=shape).astype(np.float32)


def as_arg(A, layout):
    """The (in, r) draw ``A`` as the ops take it, ``(r, in)``: C-contiguous ("rank", rank-major,
    the adapters' storage) or the transposed view of the C-contiguous draw ("row")."""
    return np.ascontiguousarray(A.T) if layout == "rank" else A.T


def assert_close(got, want, bound, terms):
    """|got - want| <= 2 eps32 * (terms * bound + |want|) elementwise: a
    rounding-error bound for float32 sums of `terms` products."""
    got = np.asarray(got, np.float64)
    tol = 2 * EPS32 * (terms * np.abs(bound) + np.abs(want)) + 1e-30
    err = np.abs(got - want)
    assert np.all(err <= tol), f"max err {err.max():.3g}, worst ratio {(err / tol).max():.3g}"


SHAPES = [(1, 1), (7, 15), (17, 16), (767, 5), (768, 768), (4097, 33)]
RANKS = [1, 2, 3, 5, 33]


# --------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------


@pytest.mark.parametrize("in_f,out_f", SHAPES)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("batch", [None, 3])
@pytest.mark.parametrize("layout", ["row", "rank"])
def test_forward_add(isa, ops, in_f, out_f, r, batch, layout):
    rng = np.random.default_rng(in_f * 100 + r)
    shape_x = (in_f,) if batch is None else (batch, in_f)
    x, A, B = f32(rng, *shape_x), f32(rng, in_f, r), f32(rng, r, out_f)
    out = f32(rng, *shape_x[:-1], out_f)
    s = 0.75
    x64, A64, B64 = (a.astype(np.float64) for a in (x, A, B))
    want = out + s * (x64 @ A64) @ B64
    bound = s * (np.abs(x64) @ np.abs(A64)) @ np.abs(B64)
    ops["lora_forward_add"](x, as_arg(A, layout), B, s, out)
    assert out.dtype == np.float32 and out.shape == want.shape
    assert_close(out, want, bound, in_f + r + 4)


@pytest.mark.parametrize("in_f,out_f", SHAPES)
@pytest.mark.parametrize("r", [1, 2, 3, 33])
@pytest.mark.parametrize("batch", [None, 4])
@pytest.mark.parametrize("layout", ["row", "rank"])
def test_accumulate(isa, ops, in_f, out_f, r, batch, layout):
    rng = np.random.default_rng(in_f * 7 + r)
    shape_x = (in_f,) if batch is None else (batch, in_f)
    x, g = f32(rng, *shape_x), f32(rng, *shape_x[:-1], out_f)
    A, B = f32(rng, in_f, r), f32(rng, r, out_f)
    gA, gB = f32(rng, in_f, r), f32(rng, r, out_f)
    s, reward = 0.5, -1.5
    c = s * reward
    x64, g64, A64, B64 = (
        np.atleast_2d(a).astype(np.float64) if a.ndim == 1 and k < 2 else a.astype(np.float64)
        for k, a in enumerate((x, g, A, B))
    )
    wantA = gA + c * x64.T @ (g64 @ B64.T)
    wantB = gB + c * (x64 @ A64).T @ g64
    boundA = abs(c) * np.abs(x64).T @ (np.abs(g64) @ np.abs(B64).T)
    boundB = abs(c) * (np.abs(x64) @ np.abs(A64)).T @ np.abs(g64)
    gA_arg = as_arg(gA, layout)
    ops["lora_accumulate"](x, g, as_arg(A, layout), B, s, reward, gA_arg, gB)
    n = 1 if batch is None else batch
    assert_close(gA_arg.T, wantA, boundA, in_f + out_f + n + 4)
    assert_close(gB, wantB, boundB, in_f + out_f + n + 4)


@pytest.mark.parametrize("shape", [(1,), (7,), (17, 2), (2, 4097), (768, 2)])
@pytest.mark.parametrize("order", ["C", "F"])
def test_apply(isa, ops, shape, order):
    rng = np.random.default_rng(len(shape))
    p, g = np.asarray(f32(rng, *shape), order=order), np.asarray(f32(rng, *shape), order=order)
    lr = 0.0123
    want = p.astype(np.float64) - lr * g.astype(np.float64)
    bound = lr * np.abs(g.astype(np.float64))
    ops["lora_apply"](p, g, lr)
    assert_close(p, want, bound, 2)
    assert not g.any()


@pytest.mark.parametrize("shape", [(1,), (15,), (17, 2), (2, 4097)])
@pytest.mark.parametrize("proximal", [True, False])
@pytest.mark.parametrize("update_fisher", [True, False])
def test_apply_ewc(isa, ops, shape, proximal, update_fisher):
    rng = np.random.default_rng(sum(shape))
    p, g, opt = f32(rng, *shape), f32(rng, *shape), f32(rng, *shape)
    F = (np.abs(f32(rng, *shape)) * 40).astype(np.float32)  # lr*lam*F up to 2
    inv, lr, lam, decay = 1 / 3, 0.05, 1.0, 0.9
    g64, F64, p64, o64 = (a.astype(np.float64) for a in (g, F, p, opt))
    gm = g64 * np.float32(inv)
    if update_fisher:
        F64 = decay * F64 + (1 - decay) * gm * gm
    a = lr * lam * F64
    if proximal:
        want = (p64 - lr * gm + a * o64) / (1 + a)
    else:
        want = p64 - lr * gm - a * (p64 - o64)
    bound = np.abs(p64) + np.abs(lr * gm) + a * (np.abs(o64) + np.abs(p64))
    ops["lora_apply_ewc"](p, g, inv, lr, lam, F, opt, decay, proximal, update_fisher)
    assert_close(p, want, bound, 8)
    assert_close(F, F64, F64, 4)
    assert not g.any()


@pytest.mark.parametrize("in_f,out_f", [(1, 1), (17, 767), (768, 16), (4097, 7)])
@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("per_adapter_scale", [False, True])
@pytest.mark.parametrize("layout", ["row", "rank"])
def test_forward_add_batched(isa, ops, in_f, out_f, r, per_adapter_scale, layout):
    rng = np.random.default_rng(in_f + out_f + r)
    n, m = 9, 4
    x, out = f32(rng, n, in_f), f32(rng, n, out_f)
    A_stack, B_stack = f32(rng, m, in_f, r), f32(rng, m, r, out_f)
    A_arg = A_stack.transpose(0, 2, 1)  # (m, r, in): a view of the (m, in, r) draw ("row")
    if layout == "rank":
        A_arg = np.ascontiguousarray(A_arg)
    idx = rng.integers(0, m, size=n).astype(np.int64)
    scaling = np.float32([0.5, -1.0, 2.0, 0.25]) if per_adapter_scale else 0.75
    s = scaling[idx] if per_adapter_scale else np.full(n, scaling)
    want = out.astype(np.float64).copy()
    bound = np.zeros_like(want)
    for b in range(n):
        A64, B64, x64 = (
            A_stack[idx[b]].astype(np.float64),
            B_stack[idx[b]].astype(np.float64),
            x[b].astype(np.float64),
        )
        want[b] += s[b] * (x64 @ A64) @ B64
        bound[b] = abs(s[b]) * (np.abs(x64) @ np.abs(A64)) @ np.abs(B64)
    ops["lora_forward_add_batched"](x, A_arg, B_stack, scaling, idx, out)
    assert_close(out, want, bound, in_f + r + 4)


@pytest.mark.parametrize("special", [np.nan, np.inf, -np.inf])
def test_non_finite_propagates(isa, special):
    rng = np.random.default_rng(1)
    x, A, B = f32(rng, 33), f32(rng, 2, 33), f32(rng, 2, 9)
    x[5] = special
    out = np.zeros(9, np.float32)
    native.lora_forward_add(x, A, B, 1.0, out)
    with np.errstate(invalid="ignore", over="ignore"):
        want = (x.astype(np.float64) @ A.T) @ B
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(out), np.isinf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(out[finite], want[finite], rtol=1e-5)


def test_empty_sizes_are_no_ops(ops):
    out = np.ones((0, 4), np.float32)
    ops["lora_forward_add"](
        np.ones((0, 3), np.float32),
        np.ones((2, 3), np.float32),
        np.ones((2, 4), np.float32),
        1.0,
        out,
    )
    out = np.ones(4, np.float32)
    ops["lora_forward_add"](
        np.ones(0, np.float32), np.ones((2, 0), np.float32), np.ones((2, 4), np.float32), 1.0, out
    )
    assert (out == 1).all()
    p = np.ones(0, np.float32)
    ops["lora_apply"](p, np.ones(0, np.float32), 0.1)


def test_read_only_inputs_are_fine(ops):
    rng = np.random.default_rng(2)
    x, A, B = f32(rng, 16), f32(rng, 2, 16), f32(rng, 2, 8)
    for a in (x, A, B):
        a.flags.writeable = False
    out = np.zeros(8, np.float32)
    ops["lora_forward_add"](x, A, B, 1.0, out)
    np.testing.assert_allclose(out, (x.astype(np.float64) @ A.T) @ B, rtol=1e-5, atol=1e-6)


def test_numpy_scalars_and_ints_as_numbers():
    rng = np.random.default_rng(3)
    x, A, B = f32(rng, 16), f32(rng, 2, 16), f32(rng, 2, 8)
    for s in (np.float32(0.5), np.float64(0.5), 1, True):
        out = np.zeros(8, np.float32)
        native.lora_forward_add(x, A, B, s, out)
        np.testing.assert_allclose(
            out, float(s) * (x.astype(np.float64) @ A.T) @ B, rtol=1e-5, atol=1e-6
        )
    p, g = f32(rng, 4), f32(rng, 4)
    F, o = np.abs(f32(rng, 4)), f32(rng, 4)
    native.lora_apply_ewc(p, g, 1, 0.1, 0.5, F, o, 0.9, np.bool_(True), np.bool_(False))
    assert not g.any()


def test_threads_share_read_only_adapter():
    """Kernels release the GIL; concurrent calls with separate outputs agree."""
    rng = np.random.default_rng(4)
    x, A, B = f32(rng, 8, 512), f32(rng, 2, 512), f32(rng, 2, 512)
    want = (x.astype(np.float64) @ A.T) @ B
    outs = [np.zeros((8, 512), np.float32) for _ in range(4)]

    def work(out):
        for _ in range(200):
            out[...] = 0
            native.lora_forward_add(x, A, B, 1.0, out)

    threads = [threading.Thread(target=work, args=(o,)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for o in outs:
        np.testing.assert_allclose(o, want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------
# bad inputs: a clear error, nothing written
# --------------------------------------------------------------------------


def _fwd_args(rng, in_f=16, r=2, out_f=8):
    return f32(rng, in_f), f32(rng, r, in_f), f32(rng, r, out_f), 0.5, np.zeros(out_f, np.float32)


def _untouched(op, args, out_index, exc, match):
    out = args[out_index]
    before = out.copy() if isinstance(out, np.ndarray) else None
    with pytest.raises(exc, match=match):
        op(*args)
    if before is not None:
        np.testing.assert_array_equal(out, before)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (
            lambda a: a.__setitem__(0, a[0].astype(np.float64)),
            TypeError,
            "x must have dtype float32",
        ),
        (lambda a: a.__setitem__(0, a[0].tolist()), TypeError, "x must be a NumPy array"),
        (
            lambda a: a.__setitem__(1, a[1].astype(np.float16)),
            TypeError,
            "A must have dtype float32",
        ),
        (lambda a: a.__setitem__(1, a[1].astype(">f4")), TypeError, "native byte order"),
        (
            lambda a: a.__setitem__(4, a[4].astype(np.float64)),
            TypeError,
            "out must have dtype float32",
        ),
        (lambda a: a.__setitem__(0, np.repeat(a[0], 2)[::2]), ValueError, "x must be C-contiguous"),
        (
            lambda a: a.__setitem__(2, np.asfortranarray(np.repeat(a[2], 2, axis=0))[::2]),
            ValueError,
            "B must be C-contiguous",
        ),
        (
            lambda a: a.__setitem__(1, np.repeat(a[1], 2, axis=0)[::2]),
            ValueError,
            r"A must be C- or F-contiguous",
        ),
        (lambda a: a.__setitem__(0, a[0][None, None]), ValueError, r"x must be 1-D or 2-D"),
        (lambda a: a.__setitem__(0, a[0][:-1]), ValueError, "x has 15 features"),
        (
            lambda a: a.__setitem__(2, np.zeros((3, 8), np.float32)),
            ValueError,
            r"A is \(r, in\) = \(2, 16\) but B is \(3, 8\); B must be \(r, out\)",
        ),
        (lambda a: a.__setitem__(4, np.zeros(9, np.float32)), ValueError, "out has 9 columns"),
        (
            lambda a: a.__setitem__(4, np.zeros((1, 8), np.float32)),
            ValueError,
            r"out must be \(out,\)",
        ),
        (
            lambda a: (
                a.__setitem__(1, np.zeros((0, 16), np.float32)),
                a.__setitem__(2, np.zeros((0, 8), np.float32)),
            ),
            ValueError,
            "unsupported rank 0",
        ),
        (lambda a: a.__setitem__(3, "half"), TypeError, "scaling must be a real number"),
        (lambda a: a[4].setflags(write=False), ValueError, "out is read-only"),
    ],
)
def test_forward_add_rejects(change, exc, match):
    args = list(_fwd_args(np.random.default_rng(5)))
    change(args)
    _untouched(native.lora_forward_add, args, 4, exc, match)


def test_forward_add_rejects_batch_row_mismatch():
    rng = np.random.default_rng(6)
    x, A, B = f32(rng, 3, 16), f32(rng, 2, 16), f32(rng, 2, 8)
    _untouched(
        native.lora_forward_add,
        [x, A, B, 1.0, np.zeros((4, 8), np.float32)],
        4,
        ValueError,
        "x has 3 rows but out has 4",
    )


def test_forward_add_rejects_overlap():
    rng = np.random.default_rng(7)
    buf = f32(rng, 32)
    A, B = f32(rng, 2, 16), f32(rng, 2, 16)
    _untouched(
        native.lora_forward_add, [buf[:16], A, B, 1.0, buf[8:24]], 4, ValueError, "out overlaps x"
    )


def test_unaligned_input_rejected():
    raw = np.zeros(16 * 4 + 1, np.uint8)
    x = raw[1:].view(np.float32)
    assert not x.flags.aligned
    rng = np.random.default_rng(8)
    _untouched(
        native.lora_forward_add,
        [x, f32(rng, 2, 16), f32(rng, 2, 8), 1.0, np.zeros(8, np.float32)],
        4,
        ValueError,
        "not aligned",
    )


def test_accumulate_rejects():
    rng = np.random.default_rng(9)
    x, g, A, B = f32(rng, 16), f32(rng, 8), f32(rng, 2, 16), f32(rng, 2, 8)
    gA, gB = np.zeros((2, 16), np.float32), np.zeros((2, 8), np.float32)
    op = native.lora_accumulate
    _untouched(
        op,
        [x, g, A, B, 1.0, 1.0, np.zeros((3, 16), np.float32), gB],
        7,
        ValueError,
        "gA must have A's shape",
    )
    _untouched(
        op,
        [x, g, A, B, 1.0, 1.0, gA, np.zeros((2, 9), np.float32)],
        6,
        ValueError,
        "gB must have B's shape",
    )
    _untouched(
        op, [x, f32(rng, 9), A, B, 1.0, 1.0, gA, gB], 6, ValueError, "grad_out has 9 columns"
    )
    _untouched(
        op,
        [x, g.astype(np.float64), A, B, 1.0, 1.0, gA, gB],
        6,
        TypeError,
        "grad_out must have dtype float32",
    )
    _untouched(op, [x, g, A, B, 1.0, None, gA, gB], 6, TypeError, "reward must be a real number")
    _untouched(op, [x, g, A, B, 1.0, 1.0, gA, B], 6, ValueError, "gB overlaps B")
    _untouched(
        op,
        [f32(rng, 2, 16), g, A, B, 1.0, 1.0, gA, gB],
        6,
        ValueError,
        r"grad_out must be \(n, out\)",
    )


def test_apply_rejects():
    rng = np.random.default_rng(10)
    p = f32(rng, 4, 3)
    _untouched(
        native.lora_apply, [p, f32(rng, 3, 4), 0.1], 0, ValueError, "grad must have param's shape"
    )
    _untouched(
        native.lora_apply,
        [p, np.asfortranarray(f32(rng, 4, 3)), 0.1],
        0,
        ValueError,
        "must both be C-contiguous",
    )
    _untouched(
        native.lora_apply,
        [p, f32(rng, 4, 3).astype(np.float64), 0.1],
        0,
        TypeError,
        "grad must have dtype",
    )
    _untouched(native.lora_apply, [p, p, 0.1], 0, ValueError, "param overlaps grad")
    ro = f32(rng, 4, 3)
    ro.flags.writeable = False
    _untouched(native.lora_apply, [p, ro, 0.1], 0, ValueError, "grad is read-only")


def test_apply_ewc_rejects():
    rng = np.random.default_rng(11)
    p, g, F, o = (f32(rng, 6) for _ in range(4))
    op = native.lora_apply_ewc
    _untouched(
        op,
        [p, g, 1.0, 0.1, 1.0, f32(rng, 5), o, 0.9, True, True],
        0,
        ValueError,
        "fisher must have param's shape",
    )
    _untouched(
        op,
        [p, g, 1.0, 0.1, 1.0, F, o.astype(np.float64), 0.9, True, True],
        0,
        TypeError,
        "optimal must have dtype float32",
    )
    _untouched(
        op, [p, g, 1.0, 0.1, 1.0, F, F, 0.9, True, True], 0, ValueError, "fisher overlaps optimal"
    )
    _untouched(
        op, [p, g, 1.0, "x", 1.0, F, o, 0.9, True, True], 0, TypeError, "lr must be a real number"
    )


def _batched_args(rng, n=5, m=3, in_f=16, r=2, out_f=8):
    return [
        f32(rng, n, in_f),
        f32(rng, m, r, in_f),
        f32(rng, m, r, out_f),
        0.5,
        np.array([0, 2, 1, 2, 0], np.int64),
        np.zeros((n, out_f), np.float32),
    ]


@pytest.mark.parametrize("bad,pos", [(3, 2), (-1, 0), (10**12, 4)])
def test_batched_index_out_of_range(bad, pos):
    args = _batched_args(np.random.default_rng(12))
    args[4][pos] = bad
    _untouched(
        native.lora_forward_add_batched,
        args,
        5,
        ValueError,
        rf"idx\[{pos}\] = {bad} is out of range for 3 adapters",
    )


def test_batched_rejects():
    rng = np.random.default_rng(13)
    op = native.lora_forward_add_batched
    a = _batched_args(rng)
    a[4] = a[4].astype(np.float32)
    _untouched(op, a, 5, TypeError, "idx must be an integer array")
    a = _batched_args(rng)
    a[4] = a[4][:4]
    _untouched(op, a, 5, ValueError, "idx must have one entry per row of x")
    a = _batched_args(rng)
    a[2] = f32(rng, 3, 3, 8)
    _untouched(op, a, 5, ValueError, r"B_stack must be \(m, r, out\)")
    a = _batched_args(rng)
    a[3] = np.float32([1.0, 2.0])
    _untouched(op, a, 5, ValueError, r"scaling must be a float or an \(m,\)")
    a = _batched_args(rng)
    a[1] = np.asfortranarray(a[1])
    _untouched(op, a, 5, ValueError, "A_stack must be a C-contiguous")
    a = _batched_args(rng)
    a[1] = a[1].astype(np.float64)
    _untouched(op, a, 5, TypeError, "A_stack must have dtype float32")
    a = _batched_args(rng)
    a[1] = np.zeros((3, 0, 16), np.float32)
    a[2] = np.zeros((3, 0, 8), np.float32)
    _untouched(op, a, 5, ValueError, "unsupported rank 0")


def test_batched_accepts_int32_idx():
    rng = np.random.default_rng(14)
    a = _batched_args(rng)
    want = np.zeros_like(a[5])
    native.lora_forward_add_batched(*a[:5], want)
    a[4] = a[4].astype(np.int32)
    native.lora_forward_add_batched(*a)
    np.testing.assert_array_equal(a[5], want)


def test_subclasses_are_accepted():
    class Sub(np.ndarray):
        pass

    rng = np.random.default_rng(16)
    x, A, B = f32(rng, 16), f32(rng, 2, 16), f32(rng, 2, 8)
    out = np.zeros(8, np.float32).view(Sub)
    native.lora_forward_add(x.view(Sub), A, B, 1.0, out)
    np.testing.assert_allclose(out, (x.astype(np.float64) @ A.T) @ B, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# backend, info, environment
# --------------------------------------------------------------------------


def test_backend_registers_ops():
    from adalora_core.backends import get_backend
    from adalora_core.backends.numpy import NumpyBackend

    be = get_backend("native")
    assert be.name == "native" and isinstance(be, NumpyBackend)
    assert set(be.ops) == {
        "lora_forward_add",
        "lora_accumulate",
        "lora_apply",
        "lora_apply_ewc",
        "lora_forward_add_batched",
    }
    assert be.op("lora_forward_add", None) is native.lora_forward_add
    assert isinstance(be.zeros((2,)), np.ndarray)


def test_info():
    i = native.info()
    assert i["built"] and i["available"] and i["reason"] is None
    assert i["isa"] in ISAS and i["isa"] in i["supported_isas"]
    assert "scalar" in i["supported_isas"]
    assert isinstance(i["build"], str) and i["build"]
    assert i["module"].endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def test_ops_return_their_outputs():
    """Like the core's Array API defaults: the updated outputs, here the arrays passed in."""
    rng = np.random.default_rng(17)
    x, A, B, out = f32(rng, 3, 64), f32(rng, 2, 64), f32(rng, 2, 32), np.zeros((3, 32), np.float32)
    assert native.lora_forward_add(x, A, B, 0.5, out) is out
    g, gA, gB = f32(rng, 3, 32), np.zeros_like(A), np.zeros_like(B)
    got = native.lora_accumulate(x, g, A, B, 1.0, 1.0, gA, gB)
    assert type(got) is tuple and got[0] is gA and got[1] is gB
    got = native.lora_apply(A, gA, 0.1)
    assert got[0] is A and got[1] is gA
    F, opt = np.zeros_like(A), A.copy()
    got = native.lora_apply_ewc(A, gA, 1.0, 0.1, 1.0, F, opt, 0.9, True, False)
    assert got[0] is A and got[1] is gA and got[2] is F
    As, Bs, idx = f32(rng, 4, 2, 64), f32(rng, 4, 2, 32), np.array([3, 0, 1], np.int64)
    assert native.lora_forward_add_batched(x, As, Bs, 0.5, idx, out) is out


def test_ops_are_one_c_function_each():
    for name, op in native.OPS.items():
        assert type(op).__name__ == "builtin_function_or_method" and op.__name__ == name
        assert op.__module__ == "adalora_core._native_ops"
        assert inspect.signature(op).parameters  # the documented positional signature
    with pytest.raises(TypeError, match=r"lora_forward_add\(x, A, B, scaling, out\) takes 5 arguments, got 4"):
        native.lora_forward_add(*_fwd_args(np.random.default_rng(18))[:4])
    assert pickle.loads(pickle.dumps(native.lora_apply)) is native.lora_apply


def test_select_isa_errors():
    with pytest.raises(ValueError, match="unknown kernel path"):
        native.select_isa("sse9")
    missing = [p for p in native.ISAS if p not in ISAS]
    for p in missing:
        with pytest.raises(ValueError, match="not available here"):
            native.select_isa(p)


def _run(env_value, code):
    env = dict(os.environ)
    env.pop("ADALORA_BACKEND", None)
    env["ADALORA_NATIVE"] = env_value
    return subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_env_off():
    r = _run(
        "0",
        "from adalora_core.backends import native, get_backend;"
        "print(native.is_available(), native.info()['reason'], get_backend().name)",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "False" and "ADALORA_NATIVE=0" in r.stdout
    assert r.stdout.split()[-1] == "numpy"


def test_env_force_scalar():
    r = _run("scalar", "from adalora_core.backends import native; print(native.info()['isa'])")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "scalar"


def test_env_force_missing_path_is_an_error():
    missing = [p for p in native.ISAS if p not in ISAS]
    if not missing:
        pytest.skip("every path is available here")
    r = _run(missing[0], "from adalora_core.backends import native; native.is_available()")
    assert r.returncode != 0
    assert f"ADALORA_NATIVE={missing[0]}" in r.stderr and "lacks" in r.stderr
    r = _run(
        missing[0],
        "from adalora_core.backends import native; i = native.info();"
        "print(i['available'], i['reason'])",
    )
    assert r.returncode == 0 and r.stdout.startswith("False")


def test_env_unknown_value_is_an_error():
    r = _run("fast", "from adalora_core.backends import native; native.is_available()")
    assert r.returncode != 0 and "not understood" in r.stderr
