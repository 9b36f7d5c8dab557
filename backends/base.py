"""The Backend protocol: a small object per array library (einops-style)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

Array = Any


class Rng(Protocol):
    """A seeded generator owned by the backend (the Array API has no random numbers)."""

    def normal(self, shape: tuple[int, ...], mean: float = 0.0, std: float = 1.0, dtype: Any = "float32") -> Array: ...

    def uniform(self, shape: tuple[int, ...], low: float = 0.0, high: float = 1.0, dtype: Any = "float32") -> Array: ...

    def bernoulli(self, shape: tuple[int, ...], p: float, dtype: Any = "float32") -> Array: ...


@dataclass(frozen=True, eq=False)
class Backend:
    """An array library as the core sees it.

    ``ops`` maps an op name to a faster implementation of a core default with the
    same meaning (say ``"lora_forward_add"`` -> a C kernel). Core objects look an
    override up once, at construction, with :meth:`op`; conformance runs every
    override against the default it replaces.
    """

    name: str
    xp: Any
    device: Any = None
    ops: Mapping[str, Callable[..., Any]] = field(default_factory=dict)

    def dtype(self, dtype: Any) -> Any:
        """``"float32"`` (or a dtype of this library) as this library's dtype."""
        if isinstance(dtype, str):
            try:
                return getattr(self.xp, dtype)
            except AttributeError:
                raise ValueError(f"backend {self.name!r} has no dtype {dtype!r}") from None
        return dtype

    def asarray(self, obj: Any, dtype: Any = None) -> Array:
        """``obj`` (a list, scalar, NumPy array or array of this library) on this backend's device."""
        return self.xp.asarray(obj, dtype=None if dtype is None else self.dtype(dtype), device=self.device)

    def zeros(self, shape: tuple[int, ...], dtype: Any = "float32") -> Array:
        return self.xp.zeros(shape, dtype=self.dtype(dtype), device=self.device)

    def to_numpy(self, x: Array) -> Any:
        from adalora_core._xp import to_numpy

        return to_numpy(x)

    def rng(self, seed: int | None = None) -> Rng:
        raise NotImplementedError

    def describe(self) -> str:
        """One line for ``python -m adalora_core info``: library version and devices."""
        version = getattr(self.xp, "__version__", None) or getattr(self.xp, "__array_api_version__", "?")
        return f"{self.name} (array API {version}), device {self.device}"

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on CPU libraries); used by benchmarks."""

    def op(self, name: str, default: Callable[..., Any]) -> Callable[..., Any]:
        """The override registered for ``name``, else ``default``."""
        return self.ops.get(name, default)

    def __deepcopy__(self, memo: dict[int, Any]) -> Backend:
        return self  # immutable; a copied model shares its backend

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        from . import get_backend

        return get_backend, (self.name, self.device)

    def __repr__(self) -> str:
        dev = "" if self.device is None else f", device={self.device!r}"
        return f"Backend({self.name!r}{dev})"


class NumpyRng:
    """Draws with NumPy's PCG64 and hands the result to ``convert``."""

    def __init__(self, seed: int | None, convert: Callable[[Any, Any], Array]) -> None:
        import numpy as np

        self._gen = np.random.default_rng(seed)
        self._convert = convert

    def normal(self, shape, mean=0.0, std=1.0, dtype="float32"):
        return self._convert(self._gen.normal(mean, std, size=shape), dtype)

    def uniform(self, shape, low=0.0, high=1.0, dtype="float32"):
        return self._convert(self._gen.uniform(low, high, size=shape), dtype)

    def bernoulli(self, shape, p, dtype="float32"):
        return self._convert((self._gen.random(size=shape) < p).astype("float64"), dtype)
