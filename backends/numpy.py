"""NumPy through array-api-compat: the default CPU backend."""

from __future__ import annotations

import numpy as np
from array_api_compat import numpy as xp_numpy

from .base import Backend, NumpyRng


class NumpyBackend(Backend):
    def __init__(self, device: object = None, *, name: str = "numpy", ops: dict | None = None) -> None:
        if device not in (None, "cpu"):
            raise ValueError(f"the numpy backend runs on 'cpu' only, not {device!r}")
        super().__init__(name=name, xp=xp_numpy, device="cpu", ops=ops or {})

    def asarray(self, obj, dtype=None):
        return np.asarray(obj, dtype=None if dtype is None else self.dtype(dtype))

    def zeros(self, shape, dtype="float32"):
        return np.zeros(shape, dtype=self.dtype(dtype))

    def describe(self):
        return f"numpy {np.__version__}, device cpu"

    def rng(self, seed=None):
        return NumpyRng(seed, lambda a, dtype: np.asarray(a, dtype=self.dtype(dtype)))
