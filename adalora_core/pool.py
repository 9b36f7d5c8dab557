"""Many adapters at once: one per session or tenant, served in one batched call.

An :class:`AdapterPool` keeps every adapter of one shape in one
:class:`~adalora_core.lora.LoraStack`: ``A`` as ``(m, r, in)`` and ``B`` as
``(m, r, out)``, so that a batch in which request ``b`` uses adapter ``idx[b]``::

    out[b] += scaling * (x[b] @ A[idx[b]].T) @ B[idx[b]]

is one call on the stacks as they are stored: a gather (``xp.take``) and two
batched matmuls on the Array API, one C call (``lora_forward_add_batched``)
on the native backend, at every rank. Feedback for a batch is accumulated
into each request's own adapter (:meth:`AdapterPool.adapt_batched`).

Each session's adapter is a :class:`~adalora_core.lora.LoraAdapter` on one
slot of the pool's stack, so single-adapter calls and batched calls read the
same arrays. Slots are stable: an index stays valid until its session is
evicted (a freed slot is zeroed, so it adds nothing, and is reused by the
next ``create``). The pool and all its adapters share one lock, which an
evicted adapter keeps: eviction detaches the adapter onto a copy of its
arrays, so a request on a handle that is evicted meanwhile completes on the
handle's own copy of the weights; a request by session id after the
eviction raises KeyError.
"""

from __future__ import annotations

import heapq
import math
import threading
import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

from ._xp import Array, host_np
from .config import check_float, check_int
from .errors import AdaLoraWarning, CheckpointError
from .lora import (
    FIELDS,
    LORA_INITS,
    LoraAdapter,
    LoraStack,
    a_side_from_v1,
    all_finite,
    check_rows,
    dtype_name,
    lora_forward_add_batched,
    state_shapes,
)
from .schema import Declared, Schema
from .validate import Problems

__all__ = ["POOL_FORMAT", "POOL_FORMAT_VERSION", "AdapterPool"]

POOL_FORMAT = "adalora_core.adapter_pool"
#: Version 2 stores ``lora_A`` and ``grad_A`` as ``(n, r, in)``; version 1 (``(n, in, r)``) is read too.
POOL_FORMAT_VERSION = 2
SCHEMA = Schema(POOL_FORMAT, POOL_FORMAT_VERSION, {1: a_side_from_v1})


class AdapterPool:
    """Adapters of one shape keyed by session/tenant id, stacked for batched serving.

    ``AdapterPool(in_features, out_features, rank=2, alpha=4.0, backend=None,
    dtype="float32", seed=0, init="kaiming", capacity=8)``. Adapters are
    created with B = 0 (identity) and A drawn from the pool's seeded
    generator in creation order (or the golden-ratio init). Any rank >= 1.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 2,
        alpha: float = 4.0,
        *,
        backend: Any = None,
        dtype: Any = "float32",
        seed: int | None = 0,
        init: str = "kaiming",
        capacity: int = 8,
    ) -> None:
        from .backends import get_backend

        check_int("in_features", in_features, 1)
        check_int("out_features", out_features, 1)
        check_int("rank", rank, 1)
        check_float("alpha", alpha, 0.0, low_open=True)
        check_int("capacity", capacity, 1)
        if init not in LORA_INITS:
            raise ValueError(f"init={init!r} is invalid: must be one of {list(LORA_INITS)}")
        be = get_backend(backend)
        self.backend = be
        self._xp = be.xp
        dt = be.dtype(dtype)
        self.dtype_name = dtype_name(self._xp, dt)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.alpha = float(alpha)
        self.scaling = float(alpha) / rank
        self.init = init
        self.seed = seed
        self._rng = be.rng(seed)
        self._lock = threading.RLock()
        self._stack = LoraStack(be, in_features, out_features, rank, self.dtype_name, capacity=capacity)
        self._slots: dict[Hashable, int] = {}
        self._adapters: list[LoraAdapter | None] = [None] * capacity
        self._free = list(range(capacity))  # a heap: the lowest free slot first
        self.forward_calls = 0
        self.skipped_requests = 0
        self.dtype = self._stack.B.dtype
        fast = dt == be.dtype("float32")
        self._bfwd = be.op("lora_forward_add_batched", lora_forward_add_batched) if fast else lora_forward_add_batched

    # -- storage ---------------------------------------------------------------

    def _grow(self, capacity: int) -> None:
        """``capacity`` slots (live adapters keep theirs and see the new stack)."""
        old = self.capacity
        self._stack.grow(capacity)
        self._adapters.extend([None] * (capacity - old))
        for s in range(old, capacity):
            heapq.heappush(self._free, s)

    def _stacks(self) -> tuple[Array, Array]:
        """``(A_stack (m, r, in), B_stack (m, r, out))`` as the batched op reads them: the storage itself."""
        return self._stack.A, self._stack.B

    @property
    def capacity(self) -> int:
        return self._stack.capacity

    # -- sessions ----------------------------------------------------------------

    def create(self, session_id: Hashable) -> LoraAdapter:
        """A new adapter for ``session_id`` (ValueError if it exists); returns it."""
        with self._lock:
            if session_id in self._slots:
                raise ValueError(f"session {session_id!r} already has an adapter; get() it or evict() it first")
            if not self._free:
                self._grow(2 * self.capacity)
            slot = heapq.heappop(self._free)
            ad = LoraAdapter(self.in_features, self.out_features, self.rank, self.alpha, backend=self.backend,
                             dtype=self.dtype_name, init=self.init, rng=self._rng, lock=self._lock,
                             storage=(self._stack, slot))
            self._slots[session_id] = slot
            self._adapters[slot] = ad
            return ad

    def get(self, session_id: Hashable) -> LoraAdapter:
        """The adapter of ``session_id`` (KeyError naming it if there is none)."""
        with self._lock:
            slot = self._slots.get(session_id)
            if slot is None:
                raise KeyError(f"no adapter for session {session_id!r} ({len(self._slots)} sessions in the pool)")
            return self._adapters[slot]  # type: ignore[return-value]

    def get_or_create(self, session_id: Hashable) -> LoraAdapter:
        with self._lock:
            return self.get(session_id) if session_id in self._slots else self.create(session_id)

    def evict(self, session_id: Hashable) -> None:
        """Drop the adapter of ``session_id``; its slot is zeroed and reused later."""
        with self._lock:
            slot = self._slots.pop(session_id, None)
            if slot is None:
                raise KeyError(f"no adapter for session {session_id!r}")
            ad = self._adapters[slot]
            if ad is not None:  # the evicted handle keeps working on its own copy, under the same lock
                ad.detach()
            self._stack.clear(slot)
            self._adapters[slot] = None
            heapq.heappush(self._free, slot)

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._slots

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._slots))

    def sessions(self) -> list[Hashable]:
        return list(self._slots)

    def slot(self, session_id: Hashable) -> int:
        """The stack index of ``session_id`` (valid until it is evicted)."""
        with self._lock:
            s = self._slots.get(session_id)
            if s is None:
                raise KeyError(f"no adapter for session {session_id!r}")
            return s

    def indices(self, session_ids: Sequence[Hashable]) -> Array:
        """The stack indices of ``session_ids``, an int64 array of this backend."""
        with self._lock:
            try:
                slots = [self._slots[s] for s in session_ids]
            except KeyError:
                missing = [s for s in session_ids if s not in self._slots]
                raise KeyError(f"no adapter for sessions {missing[:5]}{' ...' if len(missing) > 5 else ''}") \
                    from None
            return self.backend.asarray(slots, dtype="int64")

    def _index(self, sessions: Any, n: int) -> Array:
        """An index array as given (the op checks it), or the slots of n session ids."""
        if hasattr(sessions, "dtype") and hasattr(sessions, "shape"):
            return sessions
        ids = list(sessions)
        if len(ids) != n:
            raise ValueError(f"{len(ids)} session ids for {n} rows of x")
        return self.indices(ids)

    # -- serving -------------------------------------------------------------------

    def forward_add_batched(self, x: Array, sessions: Any, out: Array) -> Array:
        """``out[b] += scaling * (x[b] @ A[s_b].T) @ B[s_b]`` for ``x (n, in)``; one vectorised
        call (one C call on native). ``sessions``: n session ids, or an integer array of
        slots from :meth:`indices`. Returns ``out`` (a new array on immutable libraries)."""
        with self._lock:
            if getattr(x, "ndim", None) != 2:
                raise ValueError(f"x must be a batch (n, in), got shape {getattr(x, 'shape', None)}")
            idx = self._index(sessions, int(x.shape[0]))
            A, B = self._stacks()
            out = self._bfwd(x, A, B, self.scaling, idx, out)  # checks x, out and idx
            self.forward_calls += 1
        return out

    def forward_batched(self, x: Array, sessions: Any) -> Array:
        """A new ``(n, out)`` array: each request's adapter output."""
        if getattr(x, "ndim", None) != 2:
            raise ValueError(f"x must be a batch (n, in), got shape {getattr(x, 'shape', None)}")
        out = self.backend.zeros((int(x.shape[0]), self.out_features), dtype=self.dtype_name)
        return self.forward_add_batched(x, sessions, out)

    # -- learning ------------------------------------------------------------------

    def adapt_batched(self, x: Array, sessions: Sequence[Hashable], grad_out: Array, reward: Any = 1.0) -> int:
        """Accumulate each request's gradient into its own session's adapter.

        ``x (n, in)``, ``grad_out (n, out)`` (the gradient of each request's
        loss with respect to the adapter output), ``reward`` a number or ``n``
        numbers. Requests whose input, gradient or reward is not finite are
        skipped and counted in ``skipped_requests`` (AdaLoraWarning). Returns
        the number of requests accumulated.
        """
        xp = self._xp
        if getattr(x, "ndim", None) != 2:
            raise ValueError(f"x must be a batch (n, in), got shape {getattr(x, 'shape', None)}")
        n = int(x.shape[0])
        check_rows("x", x, self.in_features, "grad_out", grad_out, self.out_features, self.dtype)
        ids = list(sessions)
        if len(ids) != n:
            raise ValueError(f"{len(ids)} session ids for {n} rows of x")
        if isinstance(reward, (int, float)) and not isinstance(reward, bool):
            rewards = None
            check_float("reward", reward, low=None)
            if not all_finite(xp, x, grad_out):
                ok = [bool(v) for v in self.backend.to_numpy(
                    xp.all(xp.isfinite(x), axis=1) & xp.all(xp.isfinite(grad_out), axis=1))]
            else:
                ok = [True] * n
        else:
            rw = [float(v) for v in reward] if not hasattr(reward, "shape") else \
                [float(v) for v in self.backend.to_numpy(reward).reshape(-1)]
            if len(rw) != n:
                raise ValueError(f"reward must be a number or {n} numbers, got {len(rw)}")
            fin = self.backend.to_numpy(xp.all(xp.isfinite(x), axis=1) & xp.all(xp.isfinite(grad_out), axis=1))
            ok = [bool(f) and math.isfinite(v) for f, v in zip(fin, rw)]
            rewards = self.backend.asarray([v if k else 0.0 for v, k in zip(rw, ok)], dtype=self.dtype_name)
        with self._lock:
            missing = [s for s in ids if s not in self._slots]
            if missing:
                raise KeyError(f"no adapter for sessions {missing[:5]}")
            groups: dict[int, list[int]] = {}
            for b, (s, good) in enumerate(zip(ids, ok)):
                if good:
                    groups.setdefault(self._slots[s], []).append(b)
            skipped = n - sum(len(v) for v in groups.values())
            if skipped:
                self.skipped_requests += skipped
                warnings.warn(f"adapt_batched skipped {skipped} request(s) with a non-finite input, gradient "
                              "or reward", AdaLoraWarning, stacklevel=2)
            if not groups:
                return 0
            g = grad_out
            if rewards is not None:  # skipped rows are left out below
                g = g * rewards[:, None]
                scale = 1.0
            else:
                scale = float(reward)
            for slot, rows in groups.items():
                ad = self._adapters[slot]
                if len(rows) == n:
                    xs, gs = x, g
                else:
                    ridx = self.backend.asarray(rows, dtype="int64")
                    xs, gs = xp.take(x, ridx, axis=0), xp.take(g, ridx, axis=0)
                ad.accumulate_gradient(xs, gs, scale)  # type: ignore[union-attr]
            return n - skipped

    def apply_updates(self, lr: float) -> int:
        """An SGD step on every adapter with pending gradients; returns how many stepped."""
        check_float("lr", lr, 0.0)
        with self._lock:
            return sum(ad.apply_gradients(lr) for ad in self._adapters if ad is not None and ad.pending_updates)

    # -- checkpoints ---------------------------------------------------------------

    def save(self, path: Any) -> None:
        """Every session's weights, pending gradients and counters, in one file, atomically.
        Session ids must be str or int (they go into the JSON metadata)."""
        with self._lock:
            ids = list(self._slots)
            bad = [s for s in ids if isinstance(s, bool) or not isinstance(s, (str, int))]
            if bad:
                raise CheckpointError(f"cannot save session ids {bad[:5]}: only str and int ids are saved")
            slots = [self._slots[s] for s in ids]
            adapters = [self._adapters[j] for j in slots]
            pending = [ad.pending_updates for ad in adapters]  # type: ignore[union-attr]
            fwd = [ad.forward_calls for ad in adapters]  # type: ignore[union-attr]
            skipped = [ad.skipped_updates for ad in adapters]  # type: ignore[union-attr]
            stack = self._stack.arrays  # the sessions' arrays, stacked: one copy each (the pool holds no bias)
            arrays = {key: host_np.asarray(self.backend.to_numpy(stack[field]))[slots]
                      for key, field, _ in FIELDS if field in stack}
            r, i, o = self.rank, self.in_features, self.out_features
            meta = {
                "dtype": self.dtype_name,
                "in_features": i, "out_features": o, "rank": r, "alpha": self.alpha, "init": self.init,
                "seed": self.seed, "sessions": ids, "pending": pending, "forward_calls": fwd,
                "skipped_updates": skipped, "pool_forward_calls": self.forward_calls,
                "skipped_requests": self.skipped_requests,
            }
        SCHEMA.write(path, arrays, meta)

    @classmethod
    def load(cls, path: Any, backend: Any = None, *, dtype: Any = None) -> AdapterPool:
        """A pool from :meth:`save`'s file; everything is checked first (CheckpointError)."""
        def declare(meta: Mapping[str, Any], version: int, p: Problems) -> Declared:
            try:
                i, o, r = meta["in_features"], meta["out_features"], meta["rank"]
                for k, v in (("in_features", i), ("out_features", o), ("rank", r)):
                    check_int(k, v, 1)
                check_float("alpha", meta["alpha"], 0.0, low_open=True)
                if meta["init"] not in LORA_INITS or meta["dtype"] not in ("float32", "float64"):
                    raise ValueError(f"init {meta['init']!r} / dtype {meta['dtype']!r} not supported")
                ids = meta["sessions"]
                if not isinstance(ids, list) or len(set(ids)) != len(ids) or \
                        any(isinstance(s, bool) or not isinstance(s, (str, int)) for s in ids):
                    raise ValueError("sessions must be a list of distinct str/int ids")
                n = len(ids)
                for k in ("pending", "forward_calls", "skipped_updates"):
                    v = meta[k]
                    if not isinstance(v, list) or len(v) != n:
                        raise ValueError(f"{k} must have one entry per session")
                    for c in v:
                        check_int(k, c, 0)
                check_int("pool_forward_calls", meta["pool_forward_calls"], 0)
                check_int("skipped_requests", meta["skipped_requests"], 0)
            except (KeyError, TypeError, ValueError) as exc:
                p.add(f"invalid metadata: {exc}")
                return Declared({})
            return Declared({k: ((n, *shape), meta["dtype"]) for k, shape in state_shapes(i, o, r, version=version).items()})

        host, meta, _ = SCHEMA.read(path, declare)
        i, o, r, ids = meta["in_features"], meta["out_features"], meta["rank"], meta["sessions"]
        dt = meta["dtype"]
        pool = cls(i, o, r, meta["alpha"], backend=backend, dtype=dt if dtype is None else dtype,
                   seed=meta["seed"] if isinstance(meta.get("seed"), int) else 0, init=meta["init"],
                   capacity=max(len(ids), 1))
        be = pool.backend
        for j, s in enumerate(ids):
            ad = pool.create(s)
            ad.load_state_arrays({key: be.asarray(host[key][j], dtype=pool.dtype_name) for key in host},
                                 meta["pending"][j])
            ad.forward_calls = meta["forward_calls"][j]
            ad.skipped_updates = meta["skipped_updates"][j]
        pool.forward_calls = meta["pool_forward_calls"]
        pool.skipped_requests = meta["skipped_requests"]
        return pool

    def __repr__(self) -> str:
        return (f"AdapterPool({len(self)} sessions, capacity={self.capacity}, in={self.in_features}, "
                f"out={self.out_features}, r={self.rank}, backend={self.backend.name!r}, dtype={self.dtype_name})")
