"""The ``native`` backend: NumPy arrays, with C micro-kernels for the hot ops.

Everything is the ``numpy`` backend except the ops below, which run the C
kernels of ``adalora_core._native`` (native/: AVX2+FMA on x86-64, NEON on
AArch64, portable scalar C elsewhere; the path is chosen once, at load time).
They have the meaning and the signature of the core's Array API defaults
(``adalora_core.lora``, ``adalora_core.ewc``): each updates its outputs in
place and returns them. Every array is float32 NumPy; shapes must be exactly
as stated (no broadcasting)::

    lora_forward_add(x, A, B, scaling, out) -> out
        out += scaling * (x @ A.T) @ B
    lora_accumulate(x, grad_out, A, B, scaling, reward, gA, gB) -> (gA, gB)
        gA += scaling * reward * (grad_out @ B.T).T @ x
        gB += scaling * reward * (x @ A.T).T @ grad_out
    lora_apply(param, grad, lr_over_count) -> (param, grad)
        param -= lr_over_count * grad; grad[...] = 0
    lora_apply_ewc(param, grad, inv_count, lr, lam, fisher, optimal, decay,
                   proximal, update_fisher) -> (param, grad, fisher)
        g = grad * inv_count
        if update_fisher: fisher[...] = decay * fisher + (1 - decay) * g**2
        proximal: param[...] = (param - lr*g + lr*lam*fisher*optimal) / (1 + lr*lam*fisher)
        explicit: param[...] = param - lr*g - lr*lam*fisher*(param - optimal)
        grad[...] = 0
    lora_forward_add_batched(x, A_stack, B_stack, scaling, idx, out) -> out
        out[b] += s[idx[b]] * (x[b] @ A_stack[idx[b]].T) @ B_stack[idx[b]]

Layouts: ``A`` is ``(r, in)`` and ``B`` is ``(r, out)``; ``A`` (and ``gA``)
may be C-contiguous (rank-major, the kernels' preferred layout, and the
adapters' storage), or the transposed view of a C-contiguous ``(in, r)``
array; likewise ``A_stack`` ``(m, r, in)`` may be C-contiguous or the
``.transpose(0, 2, 1)`` view of a C-contiguous ``(m, in, r)`` stack. ``x`` is one vector ``(in,)`` or a batch
``(n, in)`` (the batched op: a batch); ``out`` / ``grad_out`` match it with
``out`` columns. ``scaling`` of the batched op is a number or an ``(m,)``
array; ``idx`` holds integers in ``[0, m)``. The elementwise ops take any
shape; their arrays share one shape and memory order. Outputs must not
overlap any input. Wrong dtypes raise TypeError; wrong shapes, ranks,
layouts, indices or overlaps raise ValueError, before anything is written.

One call path per op: each op is a C function of ``adalora_core._native_ops``
(``native/src/pyops.c``, built into the same library as the cffi module)
that reads its arguments through NumPy's C API, checks them, releases the
GIL and runs the kernel. ``docs/ARCHITECTURE.md`` gives the measurements
behind this choice.

Environment: ``ADALORA_NATIVE=0`` turns the backend off (the pure ``numpy``
backend is used); ``ADALORA_NATIVE=scalar|avx2|neon`` forces a path (an
error if this CPU or build lacks it); unset, ``1`` or ``auto``: the best path.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

from .numpy import NumpyBackend

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
]

ISAS = ("scalar", "avx2", "neon")
OP_NAMES = ("lora_forward_add", "lora_accumulate", "lora_apply", "lora_apply_ewc", "lora_forward_add_batched")


def _load() -> tuple[Any, Any, Any]:
    """The cffi module (the kernels' C API) and the ops module from the same shared library."""
    from adalora_core import _native

    spec = importlib.util.spec_from_file_location("adalora_core._native_ops", _native.__file__)
    if spec is None or spec.loader is None:
        raise ImportError(f"{_native.__file__} cannot be loaded as adalora_core._native_ops")
    ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ops)
    sys.modules[spec.name] = ops  # so the ops pickle by name
    return _native.ffi, _native.lib, ops


try:
    _ffi, _lib, _ops = _load()
except ImportError as _exc:  # not built (no compiler at install time), or an older build
    _ffi = _lib = _ops = None
    _IMPORT_ERROR: str | None = f"{type(_exc).__name__}: {_exc}"
else:
    _IMPORT_ERROR = None

_state: dict[str, Any] = {"disabled": False, "error": None, "requested": None}


def _configure() -> None:
    """Apply ``ADALORA_NATIVE`` (once, at import)."""
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
        _state["error"] = (f"ADALORA_NATIVE={raw!r} is not understood; use 0 (off), 1 or auto (best path), "
                           f"or one of {', '.join(ISAS)}")
        return
    if _lib.adl_select_isa(req.encode()) != 0:
        _state["error"] = (f"ADALORA_NATIVE={req} asks for the {req} kernels, but this CPU or build lacks them; "
                           f"paths here: {', '.join(supported_isas())} (unset ADALORA_NATIVE to pick the best)")


def _not_built() -> RuntimeError:
    return RuntimeError(f"adalora_core._native is not built ({_IMPORT_ERROR})")


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
        raise _not_built()
    rc = _lib.adl_select_isa(b"auto" if name in (None, "auto") else str(name).encode())
    if rc == -2:
        raise ValueError(f"unknown kernel path {name!r}; known: {', '.join(ISAS)}")
    if rc != 0:
        raise ValueError(f"kernel path {name!r} is not available here; available: {supported_isas()}")
    return active_isa()  # type: ignore[return-value]


def active_isa() -> str | None:
    """The kernel path that runs now, or None when the extension is not built."""
    return None if _lib is None else _ffi.string(_lib.adl_active_isa()).decode()


def is_available() -> bool:
    """True when the extension is built and not turned off by ``ADALORA_NATIVE=0``.

    Raises RuntimeError when ``ADALORA_NATIVE`` forces a path this CPU lacks
    (or has a value that is not understood): asking for a path explicitly and
    silently getting another would hide the problem.
    """
    if _state["disabled"] or _lib is None:
        return False
    if _state["error"]:
        raise RuntimeError(_state["error"])
    return True


def info() -> dict[str, Any]:
    """What was built and what runs: ``adalora_core.native_info()``.

    Keys: ``built`` (the extension imports), ``available`` (the backend can be
    used), ``isa`` (the path that runs), ``supported_isas``, ``requested``
    (``$ADALORA_NATIVE``), ``build`` (compiler and flags), ``module`` (file),
    ``machine``, ``reason`` (why it is not built or not available, else None).
    """
    built = _lib is not None
    reason = None
    if not built:
        reason = (f"the C extension adalora_core._native is not built ({_IMPORT_ERROR}); it is compiled at "
                  "install time when a C compiler is present: reinstall with one to enable the native backend")
    elif _state["disabled"]:
        reason = "turned off by ADALORA_NATIVE=0"
    elif _state["error"]:
        reason = _state["error"]
    return {
        "built": built,
        "available": built and reason is None,
        "isa": active_isa(),
        "supported_isas": supported_isas(),
        "requested": _state["requested"],
        "build": _ffi.string(_lib.adl_build_info()).decode() if built else None,
        "module": getattr(sys.modules.get("adalora_core._native"), "__file__", None) if built else None,
        "machine": platform.machine(),
        "reason": reason,
    }


def _op(name: str) -> Callable[..., Any]:
    if _ops is not None:
        return getattr(_ops, name)  # type: ignore[no-any-return]

    def missing(*args: Any) -> Any:
        raise _not_built()

    missing.__name__ = name
    return missing


OPS: dict[str, Callable[..., Any]] = {name: _op(name) for name in OP_NAMES}
lora_forward_add = OPS["lora_forward_add"]
lora_accumulate = OPS["lora_accumulate"]
lora_apply = OPS["lora_apply"]
lora_apply_ewc = OPS["lora_apply_ewc"]
lora_forward_add_batched = OPS["lora_forward_add_batched"]

_configure()  # apply ADALORA_NATIVE now (an error is reported by is_available/info)


class NativeBackend(NumpyBackend):
    """NumPy arrays with the C kernels registered as ``ops`` overrides."""

    def __init__(self, device: object = None) -> None:
        if not is_available():  # raises for a forced path this CPU lacks
            raise RuntimeError(f"the native backend is not available: {info()['reason']}")
        super().__init__(device, name="native", ops=dict(OPS))
