"""array-api-strict: the portability referee. The whole core must run on it.

``device`` may be ``"CPU_DEVICE"`` (default) or ``"device1"``/``"device2"``,
array-api-strict's fake second devices: running the suite there catches device
bugs without a GPU.
"""

from __future__ import annotations

import array_api_strict as xps
import numpy as np

from .base import Backend, NumpyRng


def _device(device: object) -> object:
    if device is None or device == "CPU_DEVICE" or device == "cpu":
        return xps.Device("CPU_DEVICE")
    if isinstance(device, str):
        return xps.Device(device)
    return device


class StrictBackend(Backend):
    def __init__(self, device: object = None) -> None:
        super().__init__(name="array_api_strict", xp=xps, device=_device(device))

    def asarray(self, obj, dtype=None):
        if isinstance(obj, np.ndarray) and not obj.flags.writeable:
            obj = obj.copy()  # array-api-strict wraps NumPy and refuses read-only buffers
        return xps.asarray(obj, dtype=None if dtype is None else self.dtype(dtype), device=self.device)

    def rng(self, seed=None):
        return NumpyRng(seed, lambda a, dtype: self.asarray(a, dtype=dtype))
