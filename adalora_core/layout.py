"""How the allocator packs every module's triplets into one flat buffer, grouped by shape.

The allocator's work is elementwise (importance, both EMAs) plus one
reduction per triplet (its score). Done module by module that is a dozen
small kernels per module: on a GPU the step is launch-bound. Packed into one
flat array, grouped so that modules of equal shape sit side by side, the
elementwise work is a few whole-buffer ops and each score reduction is one
batched ``mean`` per shape group, whatever the number of modules.

Order inside the flat buffer, group after group: every ``A`` of the group,
then every ``B``, then every ``E``; a group's ``A`` block is therefore a
``(G, r, in)`` array and its ``B`` block a ``(G, out, r)`` array.

A module may hold only part of its triplets (a shard under FSDP2, which
splits ``A`` and ``E`` by rows and ``B`` by output rows): :class:`Part` says
which rows it holds, and per-triplet score parts are laid out over the full
rank, zero where another process contributes, so that one sum across
processes completes them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from operator import itemgetter
from typing import Any

from ._xp import Array, device, namespace
from .triplet import Triplet


@dataclass(frozen=True)
class Part:
    """The rows of one module that this process holds.

    ``rank``: the module's full rank r; ``rows``: the range of triplets whose
    ``A`` rows and ``E`` entries are here; ``out_total``: ``B``'s full number
    of rows (the divisor of its mean). A whole module is
    ``Part(r, (0, r), out)``.
    """

    rank: int
    rows: tuple[int, int]
    out_total: int

    @property
    def local_rank(self) -> int:
        return self.rows[1] - self.rows[0]


@dataclass(frozen=True)
class Group:
    """Modules of one local shape: ``A (r_loc, in)``, ``B (out_loc, r)``, ``E (r_loc, 1)``."""

    names: tuple[str, ...]
    local_rank: int
    in_features: int
    out_local: int
    part: Part

    @property
    def size(self) -> int:
        return len(self.names)


class Layout:
    """The packing of a fixed set of modules (built once from their arrays' shapes)."""

    def __init__(self, shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]],
                 parts: Mapping[str, Part] | None = None) -> None:
        parts = dict(parts or {})
        keyed: dict[tuple[Any, ...], list[str]] = {}
        for name, (a, e, b) in shapes.items():
            part = parts.get(name) or Part(b[1], (0, b[1]), b[0])
            if a[0] != part.local_rank or e != (part.local_rank, 1) or b[1] != part.rank:
                raise ValueError(f"module {name!r}: shapes A {a}, E {e}, B {b} do not fit rows {part.rows} "
                                 f"of rank {part.rank}")
            keyed.setdefault((a[0], a[1], b[0], part), []).append(name)
        self.names = tuple(shapes)
        self.shapes = {n: tuple(tuple(s) for s in v) for n, v in shapes.items()}  # module -> (A, E, B) local shapes
        self.groups = tuple(Group(tuple(ns), r, i, o, p) for (r, i, o, p), ns in keyed.items())
        self.sharded = any(g.part.local_rank != g.part.rank or g.out_local != g.part.out_total
                           for g in self.groups)
        # offsets: per group, where its A, B, E blocks start in the flat buffer, and its triplets in the scores
        self._blocks: list[tuple[int, int, int, int]] = []
        flat = score = 0
        self._slot: dict[str, tuple[int, int]] = {}  # name -> (group index, index in group)
        for gi, g in enumerate(self.groups):
            a0 = flat
            b0 = a0 + g.size * g.local_rank * g.in_features
            e0 = b0 + g.size * g.out_local * g.part.rank
            flat = e0 + g.size * g.local_rank
            self._blocks.append((a0, b0, e0, score))
            score += g.size * g.part.rank
            for j, n in enumerate(g.names):
                self._slot[n] = (gi, j)
        self.numel = flat
        self.total_rank = score
        # per group, its A, B and E blocks as getters of their arrays from a flat list in `names` order
        # (module after module, A, E, B), and every part's (index in that list, size) in buffer order
        index = {n: i for i, n in enumerate(self.names)}
        self._getters = [tuple(_getter([3 * index[n] + k for n in g.names]) for k in (0, 2, 1)) for g in self.groups]
        self._sizes = [(3 * index[n] + k, size) for g in self.groups
                       for k, size in ((0, g.local_rank * g.in_features), (2, g.out_local * g.part.rank),
                                       (1, g.local_rank))
                       for n in g.names]
        # per module, the range of a (total_rank,) array that holds this process's rows of it
        self.local_slices = {n: (self._blocks[gi][3] + j * g.part.rank + g.part.rows[0],
                                 self._blocks[gi][3] + j * g.part.rank + g.part.rows[1])
                             for n, (gi, j) in self._slot.items() for g in (self.groups[gi],)}

    @classmethod
    def of(cls, params: Mapping[str, Triplet], parts: Mapping[str, Part] | None = None) -> Layout:
        return cls({n: (tuple(t.A.shape), tuple(t.E.shape), tuple(t.B.shape)) for n, t in params.items()},
                   parts)

    def rank(self, name: str) -> int:
        gi, _ = self._slot[name]
        return self.groups[gi].part.rank

    # ------------------------------------------------------------ flat buffers

    def flat(self, per_module: Mapping[str, Sequence[Any]]) -> list[Any]:
        """``per_module[name] = (A, E, B)`` as one list in :attr:`names` order (what :meth:`pack` takes)."""
        return [t for n in self.names for t in per_module[n]]

    def pack(self, items: Sequence[Array]) -> Array:
        """One flat array holding every module's ``A``, ``B``, ``E`` in layout order.

        ``items``: every module's ``(A, E, B)`` in :attr:`names` order, flat
        (see :meth:`flat`). A block of equal shapes is one ``concat`` along its
        rows, whatever the number of modules: a per-array flatten costs a call
        per array, which for hundreds of modules is most of an allocator step.
        """
        xp = namespace(items[0])
        blocks = [xp.reshape(xp.concat(get(items), axis=0), (-1,)) for gets in self._getters for get in gets]
        return xp.concat(blocks)

    def unpack(self, flat: Array) -> dict[str, Triplet]:
        """Per-module ``Triplet`` views into ``flat`` (no copies where the library allows views)."""
        xp = namespace(flat)
        out: dict[str, Triplet] = {}
        for g, (a0, b0, e0, _) in zip(self.groups, self._blocks):
            na, nb, ne = g.local_rank * g.in_features, g.out_local * g.part.rank, g.local_rank
            for j, n in enumerate(g.names):
                out[n] = Triplet(xp.reshape(flat[a0 + j * na: a0 + (j + 1) * na], (g.local_rank, g.in_features)),
                                 xp.reshape(flat[e0 + j * ne: e0 + (j + 1) * ne], (g.local_rank, 1)),
                                 xp.reshape(flat[b0 + j * nb: b0 + (j + 1) * nb], (g.out_local, g.part.rank)))
        return out

    def segment_mask(self, present: Sequence[bool], xp: Any, like: Array) -> Array:
        """A flat bool array: True over the parts marked present (``present`` as :meth:`pack`'s items).

        One ``full`` per run of equal values, so a few frozen modules cost a few ops, not one per part.
        """
        runs: list[list[Any]] = []
        for i, size in self._sizes:
            if runs and runs[-1][0] == bool(present[i]):
                runs[-1][1] += size
            else:
                runs.append([bool(present[i]), size])
        return xp.concat([xp.full((n,), v, dtype=xp.bool, device=device(like)) for v, n in runs])

    # ------------------------------------------------------------------ scores

    def score_parts(self, s: Array) -> Array:
        """``(3, total_rank)``: per triplet, the E score, the mean A-row score and the mean B-column score.

        Where this process holds only some rows, the others are zero and the B
        mean is a partial sum over the local rows divided by the full count,
        so summing the parts across processes completes them.
        """
        xp = namespace(s)
        rows: list[list[Array]] = [[], [], []]
        for g, (a0, b0, e0, _) in zip(self.groups, self._blocks):
            G, rl, r = g.size, g.local_rank, g.part.rank
            sA = xp.reshape(s[a0:b0], (G, rl, g.in_features))
            sB = xp.reshape(s[b0:e0], (G, g.out_local, r))
            sE = xp.reshape(s[e0:e0 + G * rl], (G, rl))
            mA = xp.mean(sA, axis=2)
            if g.out_local == g.part.out_total:
                mB = xp.mean(sB, axis=1)
            else:
                mB = xp.sum(sB, axis=1) / g.part.out_total
            lo, hi = g.part.rows
            if rl != r:
                sE, mA = (_pad_columns(xp, t, lo, r - hi) for t in (sE, mA))
            for k, t in enumerate((sE, mA, mB)):
                rows[k].append(xp.reshape(t, (-1,)))
        return xp.stack([xp.concat(r) for r in rows])

    def split_scores(self, flat: Any) -> dict[str, Any]:
        """Per-module ``(rank,)`` views of a ``(total_rank,)`` array (or host list) in layout order."""
        out = {}
        for g, (_, _, _, s0) in zip(self.groups, self._blocks):
            r = g.part.rank
            for j, n in enumerate(g.names):
                out[n] = flat[s0 + j * r: s0 + (j + 1) * r]
        return out

    def join_scores(self, per_module: Mapping[str, Array]) -> Array:
        """The inverse of :meth:`split_scores`."""
        items = [per_module[n] for g in self.groups for n in g.names]
        return namespace(*items).concat(items)


def _getter(idx: list[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """``items -> tuple(items[i] for i in idx)`` in one C call (``itemgetter`` of one index returns the item)."""
    return itemgetter(*idx) if len(idx) > 1 else partial(_one, idx[0])


def _one(i: int, items: Sequence[Any]) -> tuple[Any]:
    return (items[i],)


def _pad_columns(xp: Any, t: Array, left: int, right: int) -> Array:
    G = t.shape[0]
    z = [xp.zeros((G, n), dtype=t.dtype, device=device(t)) for n in (left, right)]
    return xp.concat([z[0], t, z[1]], axis=1)

