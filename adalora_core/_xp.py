"""The one module that talks to array-api-compat (and, through it, to NumPy).

Everything else in the core gets its namespace from here: ``xp = namespace(x, a)``.
Keeping the compat layer behind one door means a new array library, or a new
compat release, touches a single file.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as _np
from array_api_compat import array_namespace, device

Array = Any  # any Array API array; the standard defines no nominal type

__all__ = [
    "Array",
    "array_namespace",
    "device",
    "host_np",
    "library_name",
    "namespace",
    "to_numpy",
]


def namespace(*arrays: Array) -> Any:
    """The Array API namespace shared by ``arrays`` (None entries are ignored).

    Raises a TypeError that names the offending types when arrays from
    different libraries are mixed.
    """
    present = [a for a in arrays if a is not None]
    try:
        return array_namespace(*present)
    except TypeError as exc:
        kinds = sorted({type(a).__module__ + "." + type(a).__name__ for a in present})
        raise TypeError(f"arrays from different array libraries cannot be mixed: {kinds}") from exc


def library_name(xp: Any) -> str:
    """Short name of the library behind ``xp``: numpy, torch, cupy, array_api_strict, jax, ..."""
    if array_api_compat.is_numpy_namespace(xp):
        return "numpy"
    if array_api_compat.is_torch_namespace(xp):
        return "torch"
    if array_api_compat.is_cupy_namespace(xp):
        return "cupy"
    if array_api_compat.is_array_api_strict_namespace(xp):
        return "array_api_strict"
    if array_api_compat.is_jax_namespace(xp):
        return "jax"
    return getattr(xp, "__name__", repr(xp))


def on_host(x: Array) -> bool:
    """Whether reading ``x`` on the host is free: it lives in host memory and is computed eagerly.

    False for GPU arrays (a read waits for the device) and for JAX (arrays may
    be traced under ``jit``), where code must defer its reads.
    """
    if isinstance(x, _np.ndarray):
        return True
    if array_api_compat.is_torch_array(x):  # before the namespace lookup: this runs every torch step
        return bool(x.device.type == "cpu")
    return array_api_compat.is_array_api_strict_namespace(array_namespace(x))


def to_numpy(x: Array) -> Any:
    """A host NumPy copy (or view) of ``x``, whatever library it lives in."""
    if isinstance(x, _np.ndarray):
        return x
    if array_api_compat.is_torch_array(x):
        t = x.detach()
        if str(t.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
            t = t.float()
        return t.cpu().numpy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_array_api_strict_namespace(array_namespace(x)):
        x = x.to_device(type(x.device)("CPU_DEVICE"))  # its fake devices refuse NumPy conversion
    return _np.asarray(x)


# Host-side NumPy for I/O (safetensors speaks NumPy); algorithms never use it.
host_np = _np
