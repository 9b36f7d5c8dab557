"""What every family of conformance cases shares: tolerances, seeded draws
rounded to the case's dtype, transfers to and from a backend (with the
"array type in equals array type out" check), and the cycle of backends in
which each reads what another wrote.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = ["DTYPES", "EXACT", "TOL", "Draw", "available_cycle", "dev", "host", "partner", "round_to", "same_device",
           "spec_name"]

#: Default tolerances of ``max|got - ref| / max(1, max|ref|)``.
TOL = {"float32": 1e-5, "float64": 1e-10}
#: Integer-valued results (schedules, patterns, counters): no difference allowed.
EXACT = {"float32": 0.0, "float64": 0.0}
DTYPES = ("float32", "float64")


def round_to(a: Any, dtype: str) -> np.ndarray:
    """``a`` rounded to ``dtype`` and held in float64 (what both sides start from)."""
    return np.asarray(a, dtype=np.dtype(dtype)).astype(np.float64)


class Draw:
    """Seeded draws, rounded to the case's dtype."""

    def __init__(self, seed: Any, dtype: str) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype

    def normal(self, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
        return round_to(self.rng.normal(0.0, scale, size=shape), self.dtype)

    def uniform(self, shape: tuple[int, ...], low: float, high: float) -> np.ndarray:
        return round_to(self.rng.uniform(low, high, size=shape), self.dtype)

    def signed(self, shape: tuple[int, ...], low: float = 0.5, high: float = 1.5) -> np.ndarray:
        """Magnitudes in ``[low, high)`` with random signs (never near zero)."""
        mag = self.rng.uniform(low, high, size=shape)
        sign = np.where(self.rng.random(size=shape) < 0.5, -1.0, 1.0)
        return round_to(mag * sign, self.dtype)

    def scalar(self, low: float, high: float) -> float:
        """A Python float exactly representable in ``dtype``."""
        return float(round_to(self.rng.uniform(low, high), self.dtype))


def dev(b: Any, a: Any, dtype: str) -> Any:
    """Host array ``a`` on backend ``b`` as ``dtype``."""
    return b.asarray(np.ascontiguousarray(np.asarray(a, dtype=np.float64)), dtype=dtype)


def same_device(a: Any, b: Any) -> bool:
    """Whether two device objects name one device: a torch ``cuda`` is ``cuda:<current index>``.

    (A backend asked for ``torch:cuda`` holds its tensors on ``cuda:0``.)
    Torch devices are normalised as the torch backend normalises them;
    other libraries' devices compare by name.
    """
    return _device_name(a) == _device_name(b)


def _device_name(dev: Any) -> str:
    torch = sys.modules.get("torch")  # a torch device exists only if torch is imported
    if torch is not None and isinstance(dev, torch.device):
        from adalora_core.backends.torch import normalise_device

        return str(normalise_device(dev))
    return str(dev)


def host(b: Any, x: Any, dtype: str | None, what: str = "output") -> np.ndarray:
    """A host copy of ``x`` after checking it is ``b``'s kind of array, on ``b``'s device, of ``dtype``.

    ("Array type in equals array type out": a result that silently moved to
    NumPy, to another device or to another precision is a failure.)
    """
    from adalora_core._xp import device, library_name, namespace

    lib, want = library_name(namespace(x)), library_name(b.xp)
    if lib != want:
        raise AssertionError(f"{what} is a {lib} array ({type(x).__name__}), expected {want}")
    if not same_device(device(x), b.device):
        raise AssertionError(f"{what} lives on device {device(x)!r}, expected {b.device!r}")
    if dtype is not None and x.dtype != b.dtype(dtype):
        raise AssertionError(f"{what} has dtype {x.dtype}, expected {dtype}")
    return np.array(b.to_numpy(x), copy=True)


_BACKEND_CYCLE = ("numpy", "native", "array_api_strict", "array_api_strict:device1", "torch", "cupy")
_cycle_cache: list[Any] | None = None


def available_cycle() -> list[Any]:
    """Every backend (and array-api-strict's second device) that can be created here."""
    global _cycle_cache
    if _cycle_cache is None:
        from adalora_core.backends import get_backend

        found = []
        for spec in _BACKEND_CYCLE:
            name, _, device = spec.partition(":")
            try:
                found.append(get_backend(name, device=device or None))
            except Exception:  # noqa: BLE001, S112 - missing library, unsupported CPU, no GPU
                continue
        _cycle_cache = found
    return _cycle_cache


def partner(b: Any) -> Any:
    """The backend that reads what ``b`` wrote: the next one in the cycle of available backends."""
    cycle = available_cycle()
    for i, other in enumerate(cycle):
        if other is b:
            return cycle[(i + 1) % len(cycle)]
    return cycle[0] if cycle else b


def spec_name(b: Any) -> str:
    """``b`` as a backend spec: ``numpy``, ``array_api_strict:device1``, ``torch:cuda:0``."""
    device = str(b.device)
    if b.name == "array_api_strict":  # Device('CPU_DEVICE') / Device('device1')
        device = device.split("(", 1)[-1].rstrip(")").strip("'\"")
    return b.name if device in ("cpu", "None", "CPU_DEVICE") else f"{b.name}:{device}"
