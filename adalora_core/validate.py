"""Validate everything, then commit: the one rule every loader follows.

A loader (a checkpoint reader, a ``load_state_dict``) collects every problem
with its input into one :class:`Problems`, calls :meth:`Problems.raise_if_any`,
and only then assigns to its own state. A refused input therefore leaves the
object exactly as it was, and the error lists every problem at once, each
naming the field or array it is about.

The checks here are deliberately small and typed (``int_field``,
``bool_field``, ``mapping``, ``array``) so that a new state type gets them for
free instead of re-deriving ``isinstance`` rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ._xp import Array, namespace
from .errors import CheckpointError


class Problems:
    """Collects what is wrong with one input (``where`` names it in the error)."""

    def __init__(self, where: str, error: type[Exception] = CheckpointError) -> None:
        self.where = where
        self.error = error
        self.items: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.items)

    def add(self, message: str) -> None:
        self.items.append(message)

    def require(self, ok: bool, message: str) -> bool:
        """Record ``message`` unless ``ok``; return ``ok`` so callers can skip dependent checks."""
        if not ok:
            self.add(message)
        return ok

    def raise_if_any(self) -> None:
        """Raise ``error`` listing every problem; return quietly when there is none."""
        if self.items:
            raise self.error(f"{self.where}: " + "; ".join(self.items))

    # ---------------------------------------------------------------- fields

    def mapping(self, obj: Any, what: str) -> Mapping[str, Any]:
        """``obj`` if it is a mapping (a JSON object), else record a problem and return ``{}``."""
        if isinstance(obj, Mapping):
            return obj
        self.add(f"{what} must be a JSON object (a dict), got {type(obj).__name__}")
        return {}

    def field(self, data: Mapping[str, Any], key: str) -> Any:
        """``data[key]``; a missing field is a problem (returns None)."""
        if key not in data:
            self.add(f"missing field {key!r}")
            return None
        return data[key]

    def int_field(self, data: Mapping[str, Any], key: str, *, minimum: int | None = 0,
                  optional: bool = False) -> int | None:
        """An int (not a bool, not a string) ``>= minimum``; absent or None allowed when ``optional``."""
        if optional and data.get(key) is None:
            return None
        value = self.field(data, key)
        if key not in data:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(f"{key}={value!r} must be an int")
            return None
        if minimum is not None and value < minimum:
            self.add(f"{key}={value} must be >= {minimum}")
            return None
        return value

    def bool_field(self, data: Mapping[str, Any], key: str) -> bool | None:
        """A real bool: ``"False"`` or ``1`` are problems, not truthy values."""
        value = self.field(data, key)
        if key in data and not isinstance(value, bool):
            self.add(f"{key}={value!r} must be a bool (true or false)")
            return None
        return value

    def keys(self, found: Iterable[str], expected: Iterable[str], what: str) -> list[str]:
        """Record the ``expected`` keys missing from ``found`` and the ones not expected; return the rest."""
        found, expected = set(found), set(expected)
        if expected - found:
            self.add(f"missing {what} {sorted(expected - found)}")
        if found - expected:
            self.add(f"unexpected {what} {sorted(found - expected)}")
        return sorted(found & expected)

    # ---------------------------------------------------------------- arrays

    def array(self, name: str, a: Any, shape: tuple[int, ...] | None = None, *,
              dtype: Any = None, floating: bool = True, finite: bool = True) -> bool:
        """Check one array's shape, dtype and values; True when it passed every check.

        A wrong dtype is reported once: against ``dtype`` when given, else as
        not floating. Values are checked whenever they are floating.
        """
        ok = True
        got = tuple(getattr(a, "shape", ()))
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            self.add(f"{name!r} is not an array (got {type(a).__name__})")
            return False
        if shape is not None and got != tuple(shape):
            self.add(f"{name!r} has shape {got}, expected {tuple(shape)}")
            ok = False
        xp = namespace(a)
        is_float = xp.isdtype(a.dtype, "real floating")
        if dtype is not None and a.dtype != dtype:
            self.add(f"{name!r} has dtype {a.dtype}, expected {dtype}")
            ok = False
        elif floating and not is_float:
            self.add(f"{name!r} has dtype {a.dtype}, expected a floating dtype")
            ok = False
        if finite and floating and is_float and got and not bool(xp.all(xp.isfinite(a))):
            self.add(f"{name!r} has non-finite values")
            ok = False
        return ok


def check_arrays(problems: Problems, arrays: Mapping[str, Array], expect: Mapping[str, tuple[int, ...]],
                 **kw: Any) -> None:
    """Every key of ``expect`` present with its shape, no other key; each array checked by ``kw``."""
    for key in problems.keys(arrays, expect, "arrays"):
        problems.array(key, arrays[key], expect[key], **kw)
