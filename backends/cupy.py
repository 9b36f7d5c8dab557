"""CuPy arrays on a CUDA device. Imported only when asked for."""

from __future__ import annotations

import cupy as cp
from array_api_compat import cupy as xp_cupy

from .base import Backend


class CupyRng:
    def __init__(self, seed: int | None) -> None:
        self.gen = cp.random.default_rng(seed)

    def normal(self, shape, mean=0.0, std=1.0, dtype="float32"):
        return (self.gen.standard_normal(size=shape, dtype=cp.float64) * std + mean).astype(dtype)

    def uniform(self, shape, low=0.0, high=1.0, dtype="float32"):
        return self.gen.uniform(low, high, size=shape).astype(dtype)

    def bernoulli(self, shape, p, dtype="float32"):
        return (self.gen.random(size=shape) < p).astype(dtype)


class CupyBackend(Backend):
    def __init__(self, device: object = None) -> None:
        dev = cp.cuda.Device(0 if device is None else int(str(device).rsplit(":", 1)[-1]))
        super().__init__(name="cupy", xp=xp_cupy, device=dev)

    def asarray(self, obj, dtype=None):
        with self.device:
            return cp.asarray(obj, dtype=None if dtype is None else self.dtype(dtype))

    def zeros(self, shape, dtype="float32"):
        with self.device:
            return cp.zeros(shape, dtype=self.dtype(dtype))

    def rng(self, seed=None):
        return CupyRng(seed)

    def synchronize(self):
        self.device.synchronize()
