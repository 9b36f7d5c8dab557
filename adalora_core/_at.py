"""One way to update an array in place or as a copy: ``x = at(x, idx).set(v)``.

NumPy, PyTorch and CuPy arrays are written in place and returned; arrays of
other libraries come back as new arrays: JAX's are immutable, and the core
treats array-api-strict's as immutable too, so the portability referee runs
the functional path. Callers always use the result. (Modelled on
array-api-extra's ``at``; only what the core needs: a whole array or one
index along the first axis.)
"""

from __future__ import annotations

from typing import Any

from ._xp import Array, device, library_name, namespace

__all__ = ["at", "is_mutable", "kept", "owned_copy"]

# Libraries whose arrays the core may update in place.
_MUTABLE = frozenset({"numpy", "torch", "cupy"})
_mutable_types: dict[type, bool] = {}


def is_mutable(xp: Any) -> bool:
    """True when arrays of namespace ``xp`` may be updated in place (NumPy, PyTorch, CuPy)."""
    return library_name(xp) in _MUTABLE


def _in_place(x: Array) -> bool:
    t = type(x)
    m = _mutable_types.get(t)
    if m is None:  # once per array type: namespace lookup costs more than the updates it guards
        m = _mutable_types[t] = is_mutable(namespace(x))
    return m


class at:
    """``at(x).set(v)``: ``x[...] = v``; ``at(x, i).set(v)``: ``x[i] = v`` (``i`` an int,
    an index along the first axis); ``.add(v)``: ``+= v``. Returns the updated array:
    ``x`` itself where the library updates in place, else a new array (``v`` broadcast
    and cast to ``x``'s dtype; ``x`` unchanged)."""

    __slots__ = ("idx", "x")

    def __init__(self, x: Array, idx: Any = Ellipsis) -> None:
        self.x, self.idx = x, idx

    def set(self, v: Any) -> Array:
        x, idx = self.x, self.idx
        if _in_place(x):
            x[idx] = v
            return x
        xp = namespace(x)
        part = x if idx is Ellipsis else x[idx, ...]
        new = xp.full_like(part, v) if isinstance(v, (int, float)) else \
            xp.astype(xp.broadcast_to(v, part.shape), x.dtype)
        if idx is Ellipsis:
            return new
        return xp.concat([x[:idx, ...], xp.expand_dims(new, axis=0), x[idx + 1:, ...]], axis=0)

    def add(self, v: Any) -> Array:
        x, idx = self.x, self.idx
        if _in_place(x):
            if idx is Ellipsis:
                x += v
            else:
                x[idx] += v
            return x
        return self.set((x if idx is Ellipsis else x[idx, ...]) + v)


def owned_copy(src: Array) -> Array:
    """A copy of ``src`` that nothing else references: C-contiguous where arrays are
    updated in place (so the copy of a transposed view is rank-major memory)."""
    xp = namespace(src)
    return at(xp.zeros(src.shape, dtype=src.dtype, device=device(src))).set(src)


def kept(x: Array) -> Array:
    """``x`` as it is now, to put back later: a copy where updates happen in place, else ``x``
    itself (an update of an immutable array makes a new one and leaves ``x`` as it was)."""
    return owned_copy(x) if _in_place(x) else x
