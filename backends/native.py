"""The ``native`` backend: NumPy arrays, with C micro-kernels for the hot ops.

Everything is the ``numpy`` backend except the ops below, which run the C
kernels of ``adalora_core._native`` (native/: AVX2+FMA on x86-64, NEON on
AArch64, portable scalar C elsewhere; the path is chosen once, at load time).

Op names and their meaning (every array float32, NumPy, the usual NumPy
broadcasting rules do NOT apply: shapes must be exactly as stated)::

    lora_forward_add(x, A, B, scaling, out)
        out += scaling * (x @ A) @ B
    lora_accumulate(x, grad_out, A, B, scaling, reward, gA, gB)
        gA += scaling * reward * x.T @ (grad_out @ B.T)
        gB += scaling * reward * (x @ A).T @ grad_out
    lora_apply(param, grad, lr_over_count)
        param -= lr_over_count * grad; grad[...] = 0
    lora_apply_ewc(param, grad, inv_count, lr, lam, fisher, optimal, decay,
                   proximal, update_fisher)
        g = grad * inv_count
        if update_fisher: fisher[...] = decay * fisher + (1 - decay) * g**2
        proximal: param[...] = (param - lr*g + lr*lam*fisher*optimal) / (1 + lr*lam*fisher)
        explicit: param[...] = param - lr*g - lr*lam*fisher*(param - optimal)
        grad[...] = 0
    lora_forward_add_batched(x, A_stack, B_stack, scaling, idx, out)
        out[b] += s[idx[b]] * (x[b] @ A_stack[idx[b]]) @ B_stack[idx[b]]
    triplet_forward_add(x, A, E, B, scale, out)
        out += scale * ((x @ A.T) * E.ravel()) @ B.T   (x a vector: B @ (E * (A @ x)))

Layouts: LoRA ``A`` is ``(in, r)`` and ``B`` is ``(r, out)`` (the public
layout); ``A`` (and ``gA``) may be C-contiguous, or the transposed view of a
C-contiguous ``(r, in)`` array (rank-major, the kernel's preferred layout).
The triplet's ``A`` is ``(r, in)``, ``E`` is ``(r,)`` or ``(r, 1)`` and ``B``
is ``(out, r)`` (PEFT's AdaLoRA layout). ``x`` is one vector ``(in,)`` or a
batch ``(n, in)``; ``out`` / ``grad_out`` match it with ``out`` columns.
Outputs are updated in place and must not overlap any input. Wrong dtypes
raise TypeError; wrong shapes, ranks, layouts or overlaps raise ValueError,
always before anything is written.

Environment: ``ADALORA_NATIVE=0`` turns the backend off (the pure ``numpy``
backend is used); ``ADALORA_NATIVE=scalar|avx2|neon`` forces a path (an
error if this CPU or build lacks it); unset, ``1`` or ``auto``: the best path.

The C calls release the GIL. Per call, arrays are handed to C by object
address and validated there in one call (``adalora_native_py.h``); anything
unusual takes the fully checked Python path, which gives the errors above.
"""

from __future__ import annotations

import os
import platform
import struct
import sys
from typing import Any

import numpy as np

from .numpy import NumpyBackend

try:
    from adalora_core._native import ffi as _ffi
    from adalora_core._native import lib as _lib
except ImportError as _exc:  # not built (no compiler at install time) or broken
    _ffi = _lib = None
    _IMPORT_ERROR: str | None = f"{type(_exc).__name__}: {_exc}"
else:
    _IMPORT_ERROR = None

__all__ = [
    "OPS",
    "NativeBackend",
    "active_isa",
    "info",
    "is_available",
    "lora_accumulate",
    "lora_apply",
    "lora_apply_ewc",
    "lora_forward_add",
    "lora_forward_add_batched",
    "select_isa",
    "supported_isas",
    "triplet_forward_add",
]

ISAS = ("scalar", "avx2", "neon")
_F32 = np.dtype(np.float32)
_I64 = np.dtype(np.int64)
_ROW_MAJOR = 0
_RANK_MAJOR = 1

# ---------------------------------------------------------------------------
# configuration: ADALORA_NATIVE, chosen path, the object-address fast path
# ---------------------------------------------------------------------------

_state: dict[str, Any] = {"configured": False, "disabled": False, "error": None, "requested": None}


def _configure() -> None:
    """Apply ``ADALORA_NATIVE`` once (first use)."""
    if _state["configured"]:
        return
    _state["configured"] = True
    raw = os.environ.get("ADALORA_NATIVE")
    req = (raw or "").strip().lower()
    _state["requested"] = raw
    if req in ("0", "off", "false", "no"):
        _state["disabled"] = True
        return
    if _lib is None:
        return
    if req in ("", "1", "on", "true", "yes", "auto"):
        _lib.adl_select_isa(b"auto")
        return
    if req not in ISAS:
        _state["error"] = (
            f"ADALORA_NATIVE={raw!r} is not understood; use 0 (off), 1 or auto (best path), "
            f"or one of {', '.join(ISAS)}"
        )
        return
    rc = _lib.adl_select_isa(req.encode())
    if rc != 0:
        _state["error"] = (
            f"ADALORA_NATIVE={req} asks for the {req} kernels, but this CPU or build lacks them; "
            f"paths here: {', '.join(supported_isas())} (unset ADALORA_NATIVE to pick the best)"
        )


def supported_isas() -> list[str]:
    """The kernel paths this machine and build can run (``[]`` when not built)."""
    if _lib is None:
        return []
    return [name for name in ISAS if _lib.adl_isa_supported(name.encode())]


def select_isa(name: str | None = None) -> str:
    """Switch the kernels to path ``name`` (``None``/``"auto"``: the best one)
    and return the path that runs now. For tests and benchmarks; not meant to
    be called while other threads run kernels. Raises ValueError for a path
    this machine lacks, RuntimeError when the extension is not built."""
    if _lib is None:
        raise RuntimeError(f"adalora_core._native is not built ({_IMPORT_ERROR})")
    _configure()
    rc = _lib.adl_select_isa(b"auto" if name in (None, "auto") else str(name).encode())
    if rc == -2:
        raise ValueError(f"unknown kernel path {name!r}; known: {', '.join(ISAS)}")
    if rc != 0:
        raise ValueError(
            f"kernel path {name!r} is not available here; available: {supported_isas()}"
        )
    return active_isa()


def active_isa() -> str | None:
    """The kernel path that runs now, or None when the extension is not built."""
    return None if _lib is None else _ffi.string(_lib.adl_active_isa()).decode()


def is_available() -> bool:
    """True when the extension is built and not turned off by ``ADALORA_NATIVE=0``.

    Raises RuntimeError when ``ADALORA_NATIVE`` forces a path this CPU lacks
    (or has a value that is not understood): asking for a path explicitly and
    silently getting another would hide the problem.
    """
    _configure()
    if _state["disabled"] or _lib is None:
        return False
    if _state["error"]:
        raise RuntimeError(_state["error"])
    return True


def _numpy_layout() -> tuple[Any, bool, str]:
    """The adl_pylayout for this interpreter and NumPy, and whether the
    object-address fast path checks out against NumPy's own view of probe
    arrays. Only CPython (``id`` is the object's address)."""
    if sys.implementation.name != "cpython":
        return None, False, f"not CPython ({sys.implementation.name})"
    P = struct.calcsize("P")
    head = object.__basicsize__  # PyObject_HEAD; ob_type is its last field
    lay = _ffi.new("adl_pylayout *")
    lay.off_type = head - P
    # PyArrayObject_fields: data, nd (int, padded), dimensions, strides, base, descr, flags
    lay.off_data = head
    lay.off_nd = head + P
    lay.off_dims = head + 2 * P
    lay.off_strides = head + 3 * P
    lay.off_descr = head + 5 * P
    lay.off_flags = head + 6 * P
    lay.flag_c_contiguous = 0x0001
    lay.flag_f_contiguous = 0x0002
    lay.flag_aligned = 0x0100
    lay.flag_writeable = 0x0400
    lay.ndarray_type = id(np.ndarray)
    lay.f32_descr = id(_F32)
    lay.i64_descr = id(_I64)
    lay.off_tuple_size = head  # PyVarObject.ob_size
    lay.off_tuple_items = tuple.__basicsize__  # ob_item follows the fixed part
    lay.off_float_value = head  # PyFloatObject.ob_fval
    lay.tuple_type = id(tuple)
    lay.float_type = id(float)
    lay.true_obj = id(True)
    lay.false_obj = id(False)
    _lib.adl_py_init(lay, 0)
    base = np.arange(24, dtype=np.float32)
    probes = [
        base,
        base.reshape(4, 6),
        base.reshape(6, 4).T,  # F-contiguous
        base.reshape(4, 6)[:, ::2],  # neither
        np.arange(5, dtype=np.int64),
        np.frombuffer(base.tobytes(), dtype=np.float32),  # read-only
    ]
    out = _ffi.new("int64_t[9]")
    for a in probes:
        _lib.adl_py_probe(id(a), out)
        want = [
            a.__array_interface__["data"][0],
            a.ndim,
            *(list(a.shape) + [0, 0])[:2],
            *(list(a.strides) + [0, 0])[:2],
            id(a.dtype),
            a.flags.num,
            id(type(a)),
        ]
        if list(out) != want:
            return lay, False, f"NumPy {np.__version__} array layout not as expected"
    item, value = _ffi.new("int64_t *"), _ffi.new("double *")
    probe_t = (probes[0], 0.625, True, 3)
    for i, obj in enumerate(probe_t):
        _lib.adl_py_probe_tuple(id(probe_t), i, item, value)
        if (
            item[0] != id(obj)
            or (type(obj) is float and value[0] != obj)
            or (type(obj) is not float and value[0] == value[0])
        ):
            return lay, False, "tuple or float layout not as expected"
    if np.zeros(1, np.float32).dtype is not _F32 or np.zeros(1, np.int64).dtype is not _I64:
        return lay, False, "NumPy dtypes are not singletons"
    return lay, True, ""


_fast = False
_fast_reason = "extension not built"
if _lib is not None:
    try:
        _layout, _fast, _fast_reason = _numpy_layout()
    except Exception as exc:  # noqa: BLE001 (never let the optimisation break the import)
        _layout, _fast, _fast_reason = None, False, f"{type(exc).__name__}: {exc}"
    if _layout is not None:
        _lib.adl_py_init(_layout, 1 if _fast else 0)


def _declined(*args: Any) -> int:
    return 1


# Each op first hands C one tuple of all its arguments (``t = (...)``, then
# ``_pyt_op(id(t))``; the local ``t`` keeps the tuple alive during the call):
# one argument to convert instead of up to ten. A declined call (a scalar
# that is not an exact float, a subclass, an odd layout, any error) retries
# with per-argument conversion, then falls to the checked path.


if _fast:
    _pyt_forward_add = _lib.adl_pyt_forward_add
    _pyt_accumulate = _lib.adl_pyt_accumulate
    _pyt_apply = _lib.adl_pyt_apply
    _pyt_apply_ewc = _lib.adl_pyt_apply_ewc
    _pyt_triplet = _lib.adl_pyt_triplet_forward_add
    _pyt_batched = _lib.adl_pyt_forward_add_batched
    _py_forward_add = _lib.adl_py_forward_add
    _py_accumulate = _lib.adl_py_accumulate
    _py_apply = _lib.adl_py_apply
    _py_apply_ewc = _lib.adl_py_apply_ewc
    _py_triplet = _lib.adl_py_triplet_forward_add
    _py_batched = _lib.adl_py_forward_add_batched
else:
    _py_forward_add = _py_accumulate = _py_apply = _py_apply_ewc = _py_triplet = _declined
    _pyt_forward_add = _pyt_accumulate = _pyt_apply = _pyt_apply_ewc = _pyt_triplet = _declined

    def _py_batched(*args: Any) -> int:
        return -2

    _pyt_batched = _py_batched


def info() -> dict[str, Any]:
    """What was built and what runs: ``adalora_core.native_info()``.

    Keys: ``built`` (the extension imports), ``available`` (the backend can be
    used), ``isa`` (the path that runs), ``supported_isas``, ``requested``
    (``$ADALORA_NATIVE``), ``build`` (compiler and flags), ``fast_path`` (the
    one-call object-address entry points are on), ``module`` (file),
    ``machine``, ``reason`` (why it is not built or not available, else None).
    """
    _configure()
    built = _lib is not None
    reason = None
    if not built:
        reason = (
            f"the C extension adalora_core._native is not built ({_IMPORT_ERROR}); "
            "it is compiled at install time when a C compiler is present: reinstall "
            "with one to enable the native backend"
        )
    elif _state["disabled"]:
        reason = "turned off by ADALORA_NATIVE=0"
    elif _state["error"]:
        reason = _state["error"]
    module = None
    if built:
        module = getattr(sys.modules.get("adalora_core._native"), "__file__", None)
    return {
        "built": built,
        "available": built and reason is None,
        "isa": active_isa(),
        "supported_isas": supported_isas(),
        "requested": _state["requested"],
        "build": _ffi.string(_lib.adl_build_info()).decode() if built else None,
        "fast_path": bool(_fast),
        "fast_path_note": None if _fast else _fast_reason,
        "module": module,
        "machine": platform.machine(),
        "reason": reason,
    }


# ---------------------------------------------------------------------------
# checked path: full validation with clear errors, then the pointer kernels
# ---------------------------------------------------------------------------


def _need_lib() -> None:
    if _lib is None:
        raise RuntimeError(f"adalora_core._native is not built ({_IMPORT_ERROR})")


def _real(name: str, v: Any) -> float:
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__} {v!r}") from None


def _arr(
    name: str,
    a: Any,
    ndims: tuple[int, ...],
    *,
    writeable: bool = False,
    orders: str = "C",
    dtype: np.dtype = _F32,
) -> np.ndarray:
    """``a`` checked: NumPy array of ``dtype``, ``ndim`` in ``ndims``, aligned,
    C-contiguous (``orders="CF"``: or F-contiguous), writeable if asked."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array of {dtype}, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(
            f"{name} must have dtype {dtype} (native byte order), got {a.dtype.str} ({a.dtype}); "
            f"convert it once with {name}.astype(np.{dtype})"
        )
    if a.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {want}, got shape {a.shape}")
    f = a.flags
    if not f.aligned:
        raise ValueError(f"{name} is not aligned to its itemsize; copy it with np.array({name})")
    if not (f.c_contiguous or ("F" in orders and f.f_contiguous)):
        what = (
            "C-contiguous"
            if orders == "C"
            else "C- or F-contiguous (the transpose of a C-contiguous array)"
        )
        raise ValueError(
            f"{name} must be {what}, got strides {a.strides} for shape {a.shape}; "
            f"use np.ascontiguousarray({name})"
        )
    if writeable and not f.writeable:
        raise ValueError(f"{name} is read-only, but it is updated in place")
    return a


def _no_overlap(outs: dict[str, np.ndarray], ins: dict[str, np.ndarray]) -> None:
    names = list(outs)
    for i, o in enumerate(names):
        for other, b in list(ins.items()) + [(n, outs[n]) for n in names[i + 1 :]]:
            if outs[o].size and b.size and np.may_share_memory(outs[o], b):
                raise ValueError(f"{o} overlaps {other}; the output must be a separate buffer")


def _fp(a: np.ndarray) -> Any:
    """cffi float pointer to a C- or F-contiguous float32 array (row-major or
    rank-major memory: for F order, the memory of a.T)."""
    return _ffi.from_buffer("float[]", a if a.flags.c_contiguous else a.T)


def _lp(A: np.ndarray) -> int:
    """ADL_ROW_MAJOR for C order, else ADL_RANK_MAJOR (A.T is C-contiguous)."""
    return _ROW_MAJOR if A.flags.c_contiguous else _RANK_MAJOR


def _rank(name: str, r: int) -> None:
    if r < 1:
        raise ValueError(
            f"unsupported rank {r} ({name} has {r} rank columns); the kernels need r >= 1"
        )


def _rows(
    xname: str, x: np.ndarray, in_: int, oname: str, o: np.ndarray, out_f: int, aname: str
) -> int:
    """Number of rows of x / o, checking (in,)/(out,) or (n,in)/(n,out)."""
    if x.shape[-1] != in_:
        raise ValueError(
            f"{xname} has {x.shape[-1]} features (shape {x.shape}) but {aname} expects {in_}"
        )
    if o.ndim != x.ndim:
        raise ValueError(
            f"{oname} must be {'(out,)' if x.ndim == 1 else '(n, out)'} like {xname} {x.shape}, got {o.shape}"
        )
    if o.shape[-1] != out_f:
        raise ValueError(
            f"{oname} has {o.shape[-1]} columns (shape {o.shape}) but the adapter gives {out_f}"
        )
    if x.ndim == 2 and o.shape[0] != x.shape[0]:
        raise ValueError(f"{xname} has {x.shape[0]} rows but {oname} has {o.shape[0]}")
    return 1 if x.ndim == 1 else x.shape[0]


def _checked_forward_add(x, A, B, scaling, out) -> None:
    _need_lib()
    s = _real("scaling", scaling)
    x = _arr("x", x, (1, 2))
    A = _arr("A", A, (2,), orders="CF")
    B = _arr("B", B, (2,))
    out = _arr("out", out, (1, 2), writeable=True)
    in_, r = A.shape
    _rank("A (in, r)", r)
    if B.shape[0] != r:
        raise ValueError(
            f"A is (in, r) = {A.shape} but B is {B.shape}; B must be (r, out) with r = {r}"
        )
    out_f = B.shape[1]
    n = _rows("x", x, in_, "out", out, out_f, "A (in, r)")
    _no_overlap({"out": out}, {"x": x, "A": A, "B": B})
    if x.size == 0 or out.size == 0:
        return
    _lib.adl_lora_forward_add(_fp(x), n, in_, _fp(A), _lp(A), r, _fp(B), out_f, s, _fp(out))


def _checked_accumulate(x, grad_out, A, B, scaling, reward, gA, gB) -> None:
    _need_lib()
    c = _real("scaling", scaling) * _real("reward", reward)
    x = _arr("x", x, (1, 2))
    g = _arr("grad_out", grad_out, (1, 2))
    A = _arr("A", A, (2,), orders="CF")
    B = _arr("B", B, (2,))
    gA = _arr("gA", gA, (2,), writeable=True, orders="CF")
    gB = _arr("gB", gB, (2,), writeable=True)
    in_, r = A.shape
    _rank("A (in, r)", r)
    if B.shape[0] != r:
        raise ValueError(
            f"A is (in, r) = {A.shape} but B is {B.shape}; B must be (r, out) with r = {r}"
        )
    out_f = B.shape[1]
    if gA.shape != A.shape:
        raise ValueError(f"gA must have A's shape {A.shape}, got {gA.shape}")
    if gB.shape != B.shape:
        raise ValueError(f"gB must have B's shape {B.shape}, got {gB.shape}")
    n = _rows("x", x, in_, "grad_out", g, out_f, "A (in, r)")
    _no_overlap({"gA": gA, "gB": gB}, {"x": x, "grad_out": g, "A": A, "B": B})
    if x.size == 0 or g.size == 0:
        return
    _lib.adl_lora_accumulate(
        _fp(x),
        _fp(g),
        n,
        in_,
        out_f,
        _fp(A),
        _lp(A),
        r,
        _fp(B),
        c,
        _fp(gA),
        _lp(gA),
        _fp(gB),
    )


def _same(name: str, a: np.ndarray, pname: str, p: np.ndarray) -> None:
    if a.shape != p.shape:
        raise ValueError(f"{name} must have {pname}'s shape {p.shape}, got {a.shape}")
    if a.ndim > 1 and a.size > 1 and a.flags.c_contiguous != p.flags.c_contiguous:
        raise ValueError(f"{name} and {pname} must both be C-contiguous (or both F-contiguous)")


def _checked_apply(param, grad, lr_over_count) -> None:
    _need_lib()
    lr = _real("lr_over_count", lr_over_count)
    nd = tuple(range(33))
    p = _arr("param", param, nd, writeable=True, orders="CF")
    g = _arr("grad", grad, nd, writeable=True, orders="CF")
    _same("grad", g, "param", p)
    _no_overlap({"param": p, "grad": g}, {})
    if p.size == 0:
        return
    _lib.adl_apply(_fp(p), _fp(g), p.size, lr)


def _checked_apply_ewc(
    param, grad, inv_count, lr, lam, fisher, optimal, decay, proximal, update_fisher
) -> None:
    _need_lib()
    ic, lr_, lam_, dec = (
        _real(n, v)
        for n, v in (("inv_count", inv_count), ("lr", lr), ("lam", lam), ("decay", decay))
    )
    nd = tuple(range(33))
    p = _arr("param", param, nd, writeable=True, orders="CF")
    g = _arr("grad", grad, nd, writeable=True, orders="CF")
    F = _arr("fisher", fisher, nd, writeable=True, orders="CF")
    o = _arr("optimal", optimal, nd, orders="CF")
    for name, a in (("grad", g), ("fisher", F), ("optimal", o)):
        _same(name, a, "param", p)
    _no_overlap({"param": p, "grad": g, "fisher": F}, {"optimal": o})
    if p.size == 0:
        return
    _lib.adl_apply_ewc(
        _fp(p),
        _fp(g),
        p.size,
        ic,
        lr_,
        lam_,
        _fp(F),
        _fp(o),
        dec,
        1 if proximal else 0,
        1 if update_fisher else 0,
    )


def _stack_layout(name: str, A: np.ndarray) -> int:
    """Layout of an adapter stack (m, in, r): C-contiguous, or the (0, 2, 1)
    transpose of a C-contiguous (m, r, in) stack (rank-major per adapter)."""
    if A.flags.c_contiguous:
        return _ROW_MAJOR
    if A.transpose(0, 2, 1).flags.c_contiguous:
        return _RANK_MAJOR
    raise ValueError(
        f"{name} must be a C-contiguous (m, in, r) stack, or the .transpose(0, 2, 1) view of a "
        f"C-contiguous (m, r, in) stack; got strides {A.strides} for shape {A.shape}"
    )


def _bad_index(idx: np.ndarray, pos: int, m: int) -> ValueError:
    return ValueError(
        f"idx[{pos}] = {int(idx[pos])} is out of range for {m} adapters (valid: 0 <= idx < {m})"
    )


def _checked_forward_add_batched(x, A_stack, B_stack, scaling, idx, out) -> None:
    _need_lib()
    x = _arr("x", x, (2,))
    if (not isinstance(A_stack, np.ndarray) or A_stack.dtype != _F32 or A_stack.ndim != 3
            or not A_stack.flags.aligned):  # fmt: skip
        _arr("A_stack", A_stack, (3,), orders="CF")  # raises the type/dtype/ndim/alignment error
    layout = _stack_layout("A_stack", A_stack)
    B_stack = _arr("B_stack", B_stack, (3,))
    out = _arr("out", out, (2,), writeable=True)
    if not isinstance(idx, np.ndarray):
        raise TypeError(f"idx must be a NumPy array of int64, got {type(idx).__name__}")
    if idx.dtype.kind not in "iu":
        raise TypeError(f"idx must be an integer array (int64), got dtype {idx.dtype}")
    if idx.dtype != _I64 or not idx.flags.c_contiguous:
        idx = np.ascontiguousarray(idx, dtype=_I64)
    idx = _arr("idx", idx, (1,), dtype=_I64)
    m, in_, r = A_stack.shape
    _rank("A_stack (m, in, r)", r)
    if B_stack.shape[:2] != (m, r):
        raise ValueError(
            f"A_stack is (m, in, r) = {A_stack.shape} but B_stack is {B_stack.shape}; "
            f"B_stack must be (m, r, out) = ({m}, {r}, out)"
        )
    out_f = B_stack.shape[2]
    n = _rows("x", x, in_, "out", out, out_f, "A_stack (m, in, r)")
    if idx.shape[0] != n:
        raise ValueError(f"idx must have one entry per row of x ({n}), got shape {idx.shape}")
    s, scales = 0.0, _ffi.NULL
    sc = None
    if isinstance(scaling, np.ndarray):
        sc = _arr("scaling", scaling, (1,))
        if sc.shape[0] != m:
            raise ValueError(
                f"scaling must be a float or an (m,) = ({m},) array, got shape {sc.shape}"
            )
        scales = _fp(sc)
    else:
        s = _real("scaling", scaling)
    ins = {"x": x, "A_stack": A_stack, "B_stack": B_stack, "idx": idx}
    if sc is not None:
        ins["scaling"] = sc
    _no_overlap({"out": out}, ins)
    if n == 0:
        return
    bad = (idx < 0) | (idx >= m)
    if bad.any():
        raise _bad_index(idx, int(np.argmax(bad)), m)
    if x.size == 0 or out.size == 0:
        return
    A_mem = A_stack if layout == _ROW_MAJOR else A_stack.transpose(0, 2, 1)
    rc = _lib.adl_lora_forward_add_batched(
        _fp(x),
        n,
        in_,
        _ffi.from_buffer("float[]", A_mem),
        layout,
        r,
        _fp(B_stack),
        out_f,
        m,
        _ffi.from_buffer("int64_t[]", idx),
        scales,
        s,
        _fp(out),
    )
    if rc >= 0:  # cannot happen after the check above; never ignore it anyway
        raise _bad_index(idx, int(rc), m)


def _checked_triplet(x, A, E, B, scale, out) -> None:
    _need_lib()
    s = _real("scale", scale)
    x = _arr("x", x, (1, 2))
    A = _arr("A", A, (2,))
    E = _arr("E", E, (1, 2))
    B = _arr("B", B, (2,))
    out = _arr("out", out, (1, 2), writeable=True)
    r, in_ = A.shape
    _rank("A (r, in)", r)
    if E.shape not in ((r,), (r, 1)):
        raise ValueError(
            f"E must be (r,) or (r, 1) with r = {r} (A is (r, in) = {A.shape}), got {E.shape}"
        )
    if B.shape[1] != r:
        raise ValueError(
            f"B must be (out, r) with r = {r} (A is (r, in) = {A.shape}), got {B.shape}"
        )
    out_f = B.shape[0]
    n = _rows("x", x, in_, "out", out, out_f, "A (r, in)")
    _no_overlap({"out": out}, {"x": x, "A": A, "E": E, "B": B})
    if x.size == 0 or out.size == 0:
        return
    _lib.adl_triplet_forward_add(_fp(x), n, in_, _fp(A), _fp(E), r, _fp(B), out_f, s, _fp(out))


# ---------------------------------------------------------------------------
# the ops (fast path first; anything it declines goes through the checks)
# ---------------------------------------------------------------------------


def lora_forward_add(x, A, B, scaling, out) -> None:
    """``out += scaling * (x @ A) @ B`` in place (LoRA forward, rank-1/2 specialised).

    x (in,) or (n, in); A (in, r) C-contiguous or rank-major (A.T contiguous);
    B (r, out); out (out,) or (n, out). All float32. Reference::

        out += np.float32(scaling) * (x @ A) @ B
    """
    t = (x, A, B, scaling, out)
    if _pyt_forward_add(id(t)):
        _lora_forward_add_declined(x, A, B, scaling, out)


def _lora_forward_add_declined(x, A, B, scaling, out) -> None:
    try:
        if not _py_forward_add(id(x), id(A), id(B), scaling, id(out)):
            return
    except TypeError:  # a scalar that is not a number: the checked path says so
        pass
    _checked_forward_add(x, A, B, scaling, out)


def lora_accumulate(x, grad_out, A, B, scaling, reward, gA, gB) -> None:
    """Reward-scaled LoRA gradients, accumulated in place (summed over a batch).

    x (in,) or (n, in); grad_out (out,) or (n, out); gA like A (in, r);
    gB like B (r, out). With c = scaling * reward, reference::

        gA += c * np.outer(x, grad_out @ B.T)      # batch: c * x.T @ (grad_out @ B.T)
        gB += c * np.outer(x @ A, grad_out)        # batch: c * (x @ A).T @ grad_out
    """
    t = (x, grad_out, A, B, scaling, reward, gA, gB)
    if _pyt_accumulate(id(t)):
        _lora_accumulate_declined(x, grad_out, A, B, scaling, reward, gA, gB)


def _lora_accumulate_declined(x, grad_out, A, B, scaling, reward, gA, gB) -> None:
    try:
        if not _py_accumulate(id(x), id(grad_out), id(A), id(B), scaling, reward, id(gA), id(gB)):
            return
    except TypeError:  # a scalar that is not a number: the checked path says so
        pass
    _checked_accumulate(x, grad_out, A, B, scaling, reward, gA, gB)


def lora_apply(param, grad, lr_over_count) -> None:
    """SGD step on the accumulated gradient, then clear it. Reference::

    param -= lr_over_count * grad
    grad[...] = 0
    """
    t = (param, grad, lr_over_count)
    if _pyt_apply(id(t)):
        _lora_apply_declined(param, grad, lr_over_count)


def _lora_apply_declined(param, grad, lr_over_count) -> None:
    try:
        if not _py_apply(id(param), id(grad), lr_over_count):
            return
    except TypeError:  # a scalar that is not a number: the checked path says so
        pass
    _checked_apply(param, grad, lr_over_count)


def lora_apply_ewc(
    param, grad, inv_count, lr, lam, fisher, optimal, decay, proximal, update_fisher
) -> None:
    """EWC++ step with the Fisher EMA updated in the same pass. Order per
    element: the Fisher first, then the step uses the updated Fisher.
    Reference::

        g = grad * inv_count                       # mean gradient
        if update_fisher:
            fisher[...] = decay * fisher + (1 - decay) * g * g
        a = lr * lam * fisher
        if proximal:   # stable for any a >= 0
            param[...] = (param - lr * g + a * optimal) / (1 + a)
        else:          # explicit (seed) form, unstable when a >= 2
            param[...] = param - lr * g - a * (param - optimal)
        grad[...] = 0

    param, grad, fisher (written) and optimal (read) share one shape and memory order.
    """
    t = (param, grad, inv_count, lr, lam, fisher, optimal, decay, proximal, update_fisher)
    if _pyt_apply_ewc(id(t)):
        _lora_apply_ewc_declined(
            param, grad, inv_count, lr, lam, fisher, optimal, decay, proximal, update_fisher
        )


def _lora_apply_ewc_declined(
    param, grad, inv_count, lr, lam, fisher, optimal, decay, proximal, update_fisher
) -> None:
    try:
        if not _py_apply_ewc(
            id(param),
            id(grad),
            inv_count,
            lr,
            lam,
            id(fisher),
            id(optimal),
            decay,
            proximal,
            update_fisher,
        ):
            return
    except TypeError:  # a scalar that is not a number: the checked path says so
        pass
    _checked_apply_ewc(
        param, grad, inv_count, lr, lam, fisher, optimal, decay, proximal, update_fisher
    )


def lora_forward_add_batched(x, A_stack, B_stack, scaling, idx, out) -> None:
    """Many adapters in one call: request ``b`` uses adapter ``idx[b]``.

    x (n, in); A_stack (m, in, r); B_stack (m, r, out); scaling a float or an
    (m,) float32 array; idx (n,) int64 with 0 <= idx < m (checked first:
    ValueError naming the bad position, nothing written); out (n, out).
    Reference::

        s = scaling[idx] if np.ndim(scaling) else np.full(len(idx), scaling)
        for b in range(len(idx)):
            out[b] += s[b] * (x[b] @ A_stack[idx[b]]) @ B_stack[idx[b]]
    """
    t = (x, A_stack, B_stack, scaling, idx, out)
    rc = _pyt_batched(id(t))
    if rc == -1:
        return
    if rc >= 0:
        raise _bad_index(idx, int(rc), A_stack.shape[0])
    _lora_forward_add_batched_declined(x, A_stack, B_stack, scaling, idx, out)


def _lora_forward_add_batched_declined(x, A_stack, B_stack, scaling, idx, out) -> None:
    if isinstance(scaling, np.ndarray):
        s, sid = 0.0, id(scaling)
    else:
        s, sid = scaling, 0
    try:
        rc = _py_batched(id(x), id(A_stack), id(B_stack), s, sid, id(idx), id(out))
    except TypeError:
        rc = -2
    if rc == -1:
        return
    if rc >= 0:
        raise _bad_index(idx, int(rc), A_stack.shape[0])
    _checked_forward_add_batched(x, A_stack, B_stack, scaling, idx, out)


def triplet_forward_add(x, A, E, B, scale, out) -> None:
    """AdaLoRA SVD-triplet forward (inference), in place.

    x (in,) or (n, in); A (r, in); E (r,) or (r, 1); B (out, r); out (out,)
    or (n, out). Reference::

        out += scale * B @ (E.ravel() * (A @ x))               # one vector
        out += scale * ((x @ A.T) * E.ravel()) @ B.T           # a batch
    """
    t = (x, A, E, B, scale, out)
    if _pyt_triplet(id(t)):
        _triplet_forward_add_declined(x, A, E, B, scale, out)


def _triplet_forward_add_declined(x, A, E, B, scale, out) -> None:
    try:
        if not _py_triplet(id(x), id(A), id(E), id(B), scale, id(out)):
            return
    except TypeError:  # a scalar that is not a number: the checked path says so
        pass
    _checked_triplet(x, A, E, B, scale, out)


OPS = {
    "lora_forward_add": lora_forward_add,
    "lora_accumulate": lora_accumulate,
    "lora_apply": lora_apply,
    "lora_apply_ewc": lora_apply_ewc,
    "lora_forward_add_batched": lora_forward_add_batched,
    "triplet_forward_add": triplet_forward_add,
}


_configure()  # apply ADALORA_NATIVE now (an error is reported by is_available/info)


class NativeBackend(NumpyBackend):
    """NumPy arrays with the C kernels registered as ``ops`` overrides."""

    def __init__(self, device: object = None) -> None:
        if not is_available():  # raises for a forced path this CPU lacks
            raise RuntimeError(f"the native backend is not available: {info()['reason']}")
        super().__init__(device, name="native", ops=dict(OPS))


# ---------------------------------------------------------------------------
# benchmark helpers: the active kernel timed in a C loop (no Python per call)
# ---------------------------------------------------------------------------


def kernel_ns_forward_add(x, A, B, scaling, out, iters: int = 10000) -> float:
    """Nanoseconds per call of the forward kernel alone (x one vector)."""
    _checked_forward_add(x, A, B, scaling, out)
    x = _arr("x", x, (1,))
    in_, r = A.shape
    return _lib.adl_bench_forward_add(
        _fp(x), in_, _fp(A), _lp(A), r, _fp(B), B.shape[1], float(scaling), _fp(out), iters
    )


def kernel_ns_accumulate(x, grad_out, A, B, c, gA, gB, iters: int = 10000) -> float:
    """Nanoseconds per call of the accumulate kernel alone (one vector; gA in A's layout)."""
    _checked_accumulate(x, grad_out, A, B, c, 1.0, gA, gB)
    if _lp(A) != _lp(gA):
        raise ValueError("kernel_ns_accumulate needs gA in A's layout")
    in_, r = A.shape
    return _lib.adl_bench_accumulate(
        _fp(x),
        _fp(grad_out),
        in_,
        B.shape[1],
        _fp(A),
        _lp(A),
        r,
        _fp(B),
        float(c),
        _fp(gA),
        _fp(gB),
        iters,
    )


def kernel_ns_apply_ewc(param, grad, fisher, optimal, iters: int = 10000) -> float:
    """Nanoseconds per call of the EWC kernel alone (proximal, Fisher update)."""
    _checked_apply_ewc(param, grad, 1.0, 1e-3, 0.1, fisher, optimal, 0.999, True, True)
    return _lib.adl_bench_apply_ewc(
        _fp(param), _fp(grad), param.size, _fp(fisher), _fp(optimal), iters
    )


def kernel_ns_forward_add_batched(
    x, A_stack, B_stack, scaling: float, idx, out, iters: int = 1000
) -> float:
    """Nanoseconds per call of the batched kernel alone (all n requests)."""
    _checked_forward_add_batched(x, A_stack, B_stack, scaling, idx, out)
    if not A_stack.flags.c_contiguous:
        raise ValueError("kernel_ns_forward_add_batched needs a C-contiguous A_stack")
    m, in_, r = A_stack.shape
    return _lib.adl_bench_forward_add_batched(
        _fp(x),
        x.shape[0],
        in_,
        _fp(A_stack),
        r,
        _fp(B_stack),
        B_stack.shape[2],
        m,
        _ffi.from_buffer("int64_t[]", idx),
        float(scaling),
        _fp(out),
        iters,
    )


def read_ns(buf, iters: int = 1000) -> float:
    """Nanoseconds per read-only sweep over ``buf`` (float32, C-contiguous):
    the load bandwidth at that footprint, for the benchmark's floors."""
    _need_lib()
    buf = _arr("buf", buf, tuple(range(1, 33)))
    return _lib.adl_bench_read(_fp(buf), buf.size, iters)
