"""Array libraries the core runs on, chosen by name or inferred from arrays.

No global "current backend": a backend is picked from the input arrays wherever
arrays come in, and passed explicitly (``backend=``) where arrays are created.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from .base import Backend, Rng

__all__ = ["Backend", "Rng", "available_backends", "backend_of", "get_backend", "resolve"]

# name -> (module, class); modules import their library, so they load lazily.
_REGISTRY: dict[str, tuple[str, str]] = {
    "numpy": ("numpy", "NumpyBackend"),
    "native": ("native", "NativeBackend"),
    "array_api_strict": ("strict", "StrictBackend"),
    "torch": ("torch", "TorchBackend"),
    "cupy": ("cupy", "CupyBackend"),
    "jax": ("jax", "JaxBackend"),
}
_ALIASES = {"strict": "array_api_strict", "np": "numpy", "pytorch": "torch"}
_cache: dict[tuple[str, str], Backend] = {}
_missing: dict[str, str] = {}  # backend -> why its library failed to import


def _default_numpy_name() -> str:
    """``native`` when the C extension is built and enabled, else ``numpy``."""
    if os.environ.get("ADALORA_NATIVE", "").strip() == "0":
        return "numpy"
    try:
        from . import native
    except ImportError:
        return "numpy"
    return "native" if native.is_available() else "numpy"


def get_backend(name: str | Backend | None = None, device: Any = None) -> Backend:
    """The backend called ``name`` (``numpy``, ``native``, ``array_api_strict``, ``torch``, ``cupy``, ``jax``).

    ``None`` means ``$ADALORA_BACKEND`` if set, else the default for NumPy arrays.
    A ``Backend`` passes through unchanged. Unknown names and missing libraries
    raise a ValueError that says what is available.
    """
    if isinstance(name, Backend):
        return name
    if name is None:
        name = os.environ.get("ADALORA_BACKEND") or _default_numpy_name()
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known: {sorted(_REGISTRY)}")
    if key in _missing:  # a failed import is not retried (retrying torch's can abort the process)
        raise ValueError(f"backend {key!r} is not available here ({_missing[key]})")
    module, cls = _REGISTRY[key]
    try:
        mod = importlib.import_module(f"{__name__}.{module}")
    except ImportError as exc:
        _missing[key] = str(exc)
        raise ValueError(f"backend {key!r} is not available here ({exc}); "
                         "see adalora_core.available_backends()") from exc
    # A module's normalise_device keys the cache by the device a name means now (torch's "cuda": the current one).
    normalise = getattr(mod, "normalise_device", None)
    dev = device if normalise is None else normalise(device)
    cache_key = (key, str(dev))
    if cache_key not in _cache:
        _cache[cache_key] = getattr(mod, cls)(dev)
    return _cache[cache_key]


def available_backends() -> list[str]:
    """Names of the backends that can be created on this machine."""
    names = []
    for key in _REGISTRY:
        try:
            get_backend(key)
        except (ValueError, ImportError, RuntimeError):
            continue
        names.append(key)
    return names


def backend_of(*arrays: Any) -> Backend:
    """The backend for ``arrays``, inferred from their library and device."""
    from adalora_core._xp import device, library_name, namespace

    present = [a for a in arrays if a is not None]
    if not present:
        raise ValueError("cannot infer a backend without arrays; pass backend=")
    xp = namespace(*present)
    lib = library_name(xp)
    if lib == "numpy":
        forced = os.environ.get("ADALORA_BACKEND")
        return get_backend(forced if forced in ("numpy", "native") else _default_numpy_name())
    if lib in ("array_api_strict", "torch", "cupy", "jax"):
        return get_backend(lib, device=device(present[0]))
    raise ValueError(f"no backend for arrays of {lib!r}")


def resolve(backend: str | Backend | None, *arrays: Any) -> Backend:
    """``backend`` if given, else inferred from ``arrays``, else the default."""
    if backend is not None:
        return get_backend(backend)
    present = [a for a in arrays if a is not None]
    return backend_of(*present) if present else get_backend(None)
