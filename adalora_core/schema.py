"""One schema for this library's own state files: MicroLoRA, AdapterPool and the torch training state.

A state is named arrays plus a JSON object (one safetensors file on disk,
see :func:`~adalora_core.checkpoint.save_arrays`). Two metadata fields are
common to every kind: ``format`` (what wrote it) and ``version`` (of that
kind's layout). Each kind declares its layout as a function of its own
metadata, ``declare(meta, version, problems) -> Declared``: it checks the
fields it needs and returns the exact arrays (name -> shape, dtype name)
those fields imply, and groups of arrays present entirely or not at all.

One writer (:meth:`Schema.write`) and one validator serve every kind: the
format, the version, the declared arrays against the file's header (before a
byte of them is read, so a huge or lying file costs nothing) and their values
(finite), every problem listed in one
:class:`~adalora_core.errors.CheckpointError`; :meth:`Schema.check` applies
the same rules to a state held in memory. Older versions a kind still reads
come with an upgrade that brings their arrays to the current layout.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ._xp import Array, namespace
from .checkpoint import Spec, check_header, load_arrays, read_header, save_arrays
from .validate import Problems

__all__ = ["Declared", "Schema", "expected"]


class Declared(NamedTuple):
    """The arrays a state's metadata implies: all of ``arrays``, and each ``groups`` entry entirely or not at all."""

    arrays: Spec
    groups: tuple[Spec, ...] = ()


Declare = Callable[[Mapping[str, Any], int, Problems], Declared]
Upgrade = Callable[[dict[str, Any]], dict[str, Any]]


def dtype_name(a: Any) -> str:
    """``"float32"``, ``"bool"``, ... for an array of any library (torch spells them ``torch.float32``)."""
    return str(a.dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Schema:
    """A kind of state: the ``format`` and ``version`` it writes, the older versions it reads."""

    format: str
    version: int
    upgrades: Mapping[int, Upgrade] = field(default_factory=dict)  # version -> its host arrays, as now

    def write(self, path: str | os.PathLike[str], arrays: Mapping[str, Array], meta: Mapping[str, Any]) -> None:
        """``arrays`` and ``meta`` (with ``format`` and ``version``) to one file, atomically."""
        save_arrays(path, arrays, self.stamp(meta))

    def stamp(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        """``meta`` with this schema's ``format`` and ``version``."""
        return {**meta, "format": self.format, "version": self.version}

    def read(self, path: str | os.PathLike[str], declare: Declare) -> tuple[dict[str, Any], dict[str, Any], int]:
        """``(host arrays in the current layout, meta, the file's version)`` of a file :meth:`write` wrote.

        Everything is checked before the arrays are read; a bad file raises
        one ``CheckpointError`` listing every problem. Declared bfloat16 arrays
        come back as the float32 they were stored as.
        """
        found = read_header(path)
        p = Problems(str(path))
        version = self._version(found.meta, p)
        if version is not None:
            check_header(p, found.arrays, _stored(expected(declare(found.meta, version, p), found.arrays)))
        p.raise_if_any()
        assert version is not None
        host, meta = load_arrays(path, found.arrays, meta=found.meta)  # the file must still be the one checked
        upgrade = self.upgrades.get(version)
        return (upgrade(host) if upgrade else host), meta, version

    def check(self, arrays: Any, meta: Any, declare: Declare, where: str) -> tuple[Problems, int | None]:
        """The same checks for a state in memory; the problems (not raised: the caller adds its own) and version.

        Only states of the current version are taken from memory.
        """
        p = Problems(where)
        meta = p.mapping(meta, "its metadata")
        if not isinstance(arrays, Mapping):
            p.add(f"its arrays must be a mapping of name to array, got {type(arrays).__name__}")
            arrays = {}
        version = self._version(meta, p, current_only=True)
        if version is None:
            return p, None
        declared = declare(meta, version, p)
        header = {}
        for k, a in arrays.items():
            if p.require(hasattr(a, "shape") and hasattr(a, "dtype"), f"{k!r} is not an array ({type(a).__name__})"):
                header[k] = (tuple(a.shape), dtype_name(a))
        before = len(p.items)
        check_header(p, header, expected(declared, header))
        if len(p.items) == before:
            for k, a in arrays.items():
                xp = namespace(a)
                if xp.isdtype(a.dtype, "real floating") and not bool(xp.all(xp.isfinite(a))):
                    p.add(f"{k!r} has non-finite values")
        return p, version

    def _version(self, meta: Mapping[str, Any], p: Problems, current_only: bool = False) -> int | None:
        if not p.require(meta.get("format") == self.format,
                         f"not a state of kind {self.format!r} (format={meta.get('format')!r})"):
            return None
        version: Any = meta.get("version")
        readable = [self.version] if current_only else sorted({self.version, *self.upgrades})
        if p.require(type(version) is int and version in readable,
                     f"version={version!r} is not one this library reads ({', '.join(map(str, readable))})"):
            return version
        return None


def expected(declared: Declared, present: Iterable[str]) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """The arrays a state holding the keys ``present`` must have: all of ``declared.arrays``, and every group
    of which it holds a key (so a partial group is reported missing, an unknown key unexpected)."""
    present = set(present)
    out = dict(declared.arrays)
    for group in declared.groups:
        if present & set(group):
            out.update(group)
    return out


def _stored(spec: Mapping[str, tuple[tuple[int, ...], str | None]]) -> Spec:
    """``spec`` as :func:`~adalora_core.checkpoint.save_arrays` writes it: NumPy has no bfloat16, so those
    arrays are stored as float32 (which holds them exactly)."""
    return {k: (shape, "float32" if dtype == "bfloat16" else dtype) for k, (shape, dtype) in spec.items()}
