"""JAX arrays (CPU, GPU or TPU). Imported only when a jax backend is asked for.

JAX arrays are immutable, so the core takes its functional path here: every
update returns a new array (``adalora_core.lora.is_mutable`` is False for JAX).

float64 needs JAX's ``jax_enable_x64`` (``jax.config.update("jax_enable_x64",
True)`` or ``JAX_ENABLE_X64=1``, or the scoped ``jax.enable_x64(True)``);
without it asking this backend for float64 raises instead of JAX's silent
truncation to float32.
"""

from __future__ import annotations

import secrets
from typing import Any

import jax
import jax.numpy as jnp

from .base import Backend

_PLATFORMS = {"cuda": "gpu", "rocm": "gpu"}  # torch-style names for JAX's "gpu" platform


def _device(device: object) -> Any:
    """A JAX device from ``None`` (JAX's default), a JAX device, or ``"cpu"``, ``"gpu:1"``, ``"cuda:0"``."""
    if device is None:
        return jax.devices()[0]
    if isinstance(device, jax.Device):
        return device
    platform, _, index = str(device).strip().lower().partition(":")
    platform = _PLATFORMS.get(platform, platform)
    try:
        devices = jax.devices(platform)
    except RuntimeError as exc:
        raise ValueError(f"jax device {device!r} requested but JAX has no {platform!r} platform here: {exc}") from None
    if not index.isdigit() or int(index) >= len(devices):
        if index:
            raise ValueError(f"jax device {device!r}: expected an index below {len(devices)} after the colon")
        index = "0"
    return devices[int(index)]


def x64_enabled() -> bool:
    """Whether JAX computes in 64 bits here (``jax_enable_x64``, global or scoped)."""
    return bool(jax.config.read("jax_enable_x64"))


class JaxRng:
    """``jax.random`` draws from a key that is split once per draw, so draws are reproducible per seed.

    ``seed=None`` takes a fresh seed from the OS (JAX has no global generator).
    """

    def __init__(self, seed: int | None, backend: JaxBackend) -> None:
        self._backend = backend
        self._key = jax.device_put(jax.random.key(secrets.randbits(32) if seed is None else seed), backend.device)

    def _next(self) -> Any:
        self._key, sub = jax.random.split(self._key)
        return sub

    def normal(self, shape, mean=0.0, std=1.0, dtype="float32"):
        dt = self._backend.dtype(dtype)
        return jax.random.normal(self._next(), tuple(shape), dtype=dt) * std + mean

    def uniform(self, shape, low=0.0, high=1.0, dtype="float32"):
        return jax.random.uniform(self._next(), tuple(shape), dtype=self._backend.dtype(dtype), minval=low, maxval=high)

    def bernoulli(self, shape, p, dtype="float32"):
        return jax.random.bernoulli(self._next(), p, tuple(shape)).astype(self._backend.dtype(dtype))


class JaxBackend(Backend):
    def __init__(self, device: object = None) -> None:
        super().__init__(name="jax", xp=jnp, device=_device(device))

    def dtype(self, dtype: Any) -> Any:
        """Without x64, float64 raises (precision would be lost) and int64 becomes int32 (indices fit)."""
        dt = super().dtype(dtype)
        if x64_enabled() or jnp.dtype(dt).itemsize < 8:
            return dt
        if jnp.dtype(dt).kind in "iu":
            return jax.dtypes.canonicalize_dtype(dt)
        raise ValueError(f"{jnp.dtype(dt).name} on the jax backend needs jax_enable_x64: call "
                         "jax.config.update('jax_enable_x64', True) at startup, set JAX_ENABLE_X64=1, "
                         "or work inside `with jax.enable_x64(True):`")

    def asarray(self, obj, dtype=None):
        """``obj`` on this device; arrays of other libraries that speak DLPack (torch, CuPy) come without a host copy."""
        dt = None if dtype is None else self.dtype(dtype)
        if hasattr(obj, "__dlpack__") and not isinstance(obj, jax.Array) and type(obj).__module__ != "numpy":
            x = jnp.from_dlpack(obj, device=self.device)
            return x if dt is None else x.astype(dt)
        return jnp.asarray(obj, dtype=dt, device=self.device)

    def zeros(self, shape, dtype="float32"):
        return jnp.zeros(shape, dtype=self.dtype(dtype), device=self.device)

    def rng(self, seed=None):
        return JaxRng(seed, self)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        from . import get_backend

        d = self.device  # JAX devices do not pickle: name it "platform:index"
        return get_backend, (self.name, f"{d.platform}:{jax.devices(d.platform).index(d)}")

    def describe(self):
        x64 = "on" if x64_enabled() else "off (float32 only)"
        return f"jax {jax.__version__}, device {self.device}; devices: {jax.devices()}; x64 {x64}"

    def synchronize(self):
        """JAX has no device-wide barrier; a device runs its computations in order, so wait for a new one."""
        (jnp.zeros((), device=self.device) + 1).block_until_ready()
