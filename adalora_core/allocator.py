"""AdaLoRA's RankAllocator on plain arrays: importance EMAs, triplet scores, masks.

The allocator holds the EMA state and the rank pattern; the weights stay the
caller's. Each call returns new ``E`` arrays (masked where a triplet is
pruned) and never mutates its inputs, so it runs on any Array API library and
the torch integration simply copies the results into its parameters.

The arithmetic is one pure function, :func:`allocator_step` (state and
inputs in, new state and ``E`` out), which runs under ``jax.jit`` with a
traced step; :class:`RankAllocator` is the stateful wrapper that checks
inputs, warns, counts, and saves and loads (see docs/embedding.md).

Semantics follow PEFT's ``RankAllocator`` bit for bit on torch in float32, with
its failure paths fixed (see docs/peft-differences.md): budgets come from the
current shapes, the final allocation happens at the first step at or past
``T_f``, non-finite or missing gradients are skipped instead of poisoning the
EMAs, and ``state_dict`` captures everything needed to resume exactly.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from itertools import chain
from operator import attrgetter, is_, is_not
from typing import Any, NamedTuple

from ._xp import Array, device, namespace, on_host
from .config import AdaLoraConfig
from .errors import AdaLoraWarning
from .layout import Layout, Part
from .schedule import budget_schedule
from .triplet import Triplet
from .validate import Problems

PARTS = ("A", "E", "B")
KINDS = ("ema_ipt", "ema_unc")
MASK = "mask."  # the prefix of the masks' keys in a state_dict


def ema_key(kind: str, module: str, part: str) -> str:
    """The key of one EMA array in :meth:`RankAllocator.state_dict`: ``ema_ipt.<module>.A``, ..."""
    return f"{kind}.{module}.{part}"
# the config fields the allocator's arithmetic reads: a state computed under others cannot resume here
SCHEDULE_FIELDS = ("total_step", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2")
_SHAPE, _DTYPE, _DEVICE = attrgetter("shape"), attrgetter("dtype"), attrgetter("device")
_is_none, _is_not_none = partial(is_, None), partial(is_not, None)


def importance(p: Array, g: Array) -> Array:
    """Sensitivity of each weight, ``|p * g|`` (first-order loss change if it were zeroed)."""
    xp = namespace(p, g)
    return xp.abs(p * g)


def ema_update(
    ms: Sequence[Array], us: Sequence[Array], ipts: Sequence[Array], beta1: float, beta2: float
) -> tuple[list[Array], list[Array]]:
    """One EMA step for lists of arrays (one override point for fused implementations).

    ``m = beta1 m + (1 - beta1) ipt`` (smoothed sensitivity) and
    ``u = beta2 u + (1 - beta2) |ipt - m|`` with the *updated* m (uncertainty).
    Written as two multiplies and an add, not a lerp, to round as PEFT does.
    """
    new_m, new_u = [], []
    for m, u, ipt in zip(ms, us, ipts):
        xp = namespace(m, u, ipt)
        m = beta1 * m + (1 - beta1) * ipt
        u = beta2 * u + (1 - beta2) * xp.abs(ipt - m)
        new_m.append(m)
        new_u.append(u)
    return new_m, new_u


def triplet_scores(sA: Array, sE: Array, sB: Array) -> Array:
    """Score of each triplet ``i``: ``sE[i] + (mean_j sA[i, j] + mean_o sB[o, i])``."""
    xp = namespace(sA, sE, sB)
    return xp.reshape(sE, (-1,)) + (xp.mean(sA, axis=1) + xp.mean(sB, axis=0))


def kth_threshold(scores: Sequence[Array], k: int | Array) -> Array | None:
    """The ``k``-th smallest (1-based, as ``torch.kthvalue``) of all scores; None when ``k <= 0``.

    ``k`` may be an integer array (a budget traced under ``jax.jit``): the
    value is then read at a computed index, ``-inf`` (which prunes nothing)
    when ``k <= 0``, and ``k`` is clipped to the number of scores, since a
    traced value cannot raise.
    """
    xp = namespace(*scores)
    flat = xp.concat([xp.reshape(s, (-1,)) for s in scores])
    n = flat.shape[0]
    if isinstance(k, numbers.Integral):
        if k <= 0:
            return None
        if k > n:
            raise ValueError(f"cannot prune {k} triplets out of {n}")
        return xp.sort(flat)[int(k) - 1]
    at = xp.reshape(xp.clip(k - 1, 0, n - 1), (1,))
    value = xp.reshape(xp.take(xp.sort(flat), at, axis=0), ())
    return xp.where(k > 0, value, xp.asarray(-math.inf, dtype=flat.dtype, device=device(flat)))


def keep_mask(score: Array, threshold: Array | None) -> Array:
    """True where a triplet survives: ``not (score <= threshold)``; ties are all pruned, as PEFT."""
    xp = namespace(score)
    if threshold is None:
        return xp.ones(score.shape, dtype=xp.bool, device=device(score))
    return xp.logical_not(score <= threshold)


def apply_mask(E: Array, keep: Array) -> Array:
    """``E`` with pruned entries set to exactly 0.0 (PEFT's ``masked_fill``)."""
    xp = namespace(E, keep)
    return xp.where(xp.reshape(keep, (-1, 1)), E, xp.zeros_like(E))


def scheduled_budget(config: AdaLoraConfig, init_bgt: int, target_bgt: int, step: int) -> tuple[int, bool]:
    """``(budget, mask_now)`` at ``step`` under ``config``'s schedule."""
    c = config
    assert c.total_step is not None
    return budget_schedule(step, init_bgt=init_bgt, target_bgt=target_bgt, tinit=c.tinit, tfinal=c.tfinal,
                           total_step=c.total_step, deltaT=c.deltaT)


# --------------------------------------------------------------- the pure step


class StepState(NamedTuple):
    """The allocator's per-step state. A NamedTuple, so JAX takes it as a pytree as it is.

    ``m``, ``u``: the sensitivity and uncertainty EMAs, flat in layout order
    (None before the first update, and on the eager path once finalized);
    ``keep``: the last mask of every triplet, flat bool (None before any
    mask); ``measured``: whether any update was applied (until then a mask
    step prunes nothing); ``skips``: non-finite steps not yet counted;
    ``finalized``: the final allocation is done; ``budget``: the current
    budget. The flags are Python values on the eager path and arrays once a
    step computed them on the device.
    """

    m: Array | None
    u: Array | None
    keep: Array | None
    measured: Any
    skips: Any
    finalized: Any
    budget: Any


@dataclass(frozen=True, eq=False)
class StepConfig:
    """What a step reads besides its state and inputs: fixed for a run, hashed by identity.

    Build it once (:func:`step_config`) and close over it, or pass it as a
    static argument: under ``jax.jit`` it is part of the compiled function.
    ``ema_update`` is the backend's version of :func:`ema_update`.
    """

    config: AdaLoraConfig
    layout: Layout
    init_bgt: int
    target_bgt: int
    reduce: Callable[[Array], Array] | None
    ema_update: Callable[..., tuple[list[Array], list[Array]]]

    def budget_at(self, step: int) -> tuple[int, bool]:
        return scheduled_budget(self.config, self.init_bgt, self.target_bgt, step)

    @cached_property
    def plan_table(self) -> list[int]:
        """``2 * budget + mask_now`` at every step up to ``total_step``: the schedule, exactly, for traced steps.

        The cubic schedule is defined in float64 with truncation; a table
        computed here is exact on every library, where recomputing it in a
        traced float32 could move a budget by one.
        """
        assert self.config.total_step is not None
        return [2 * b + int(m) for b, m in map(self.budget_at, range(self.config.total_step + 1))]


def step_config(config: AdaLoraConfig, params: Mapping[str, Any], *, parts: Mapping[str, Part] | None = None,
                reduce: Callable[[Array], Array] | None = None, backend: Any = None) -> StepConfig:
    """The :class:`StepConfig` of a run over ``params`` (module -> ``(A, E, B)`` at their initial ranks).

    ``parts`` and ``reduce`` as in :class:`RankAllocator`; ``backend``: the
    one whose fused ops to use (default: the arrays' own).
    """
    from adalora_core.backends import resolve

    if not params:
        raise ValueError("step_config needs at least one module")
    trips = {n: _triplet(t, f"params[{n!r}]", parts_may_be_none=False) for n, t in params.items()}
    layout = Layout.of(trips, parts)
    be = resolve(backend, next(iter(trips.values())).A)
    return StepConfig(config, layout, layout.total_rank, config.target_r * len(trips), reduce,
                      be.op("ema_update", ema_update))


def init_state(config: StepConfig, like: Array) -> StepState:
    """A fresh state of arrays only, on ``like``'s device and in its dtype.

    Every field is an array from the start (EMAs of zeros, every triplet
    kept, flags false), so the state keeps one structure from step to step:
    what ``jax.jit`` needs to compile the step once. Equivalent to the
    eager start (the EMAs start at zero; nothing is pruned before an update).
    """
    xp, dev = namespace(like), device(like)
    m = xp.zeros((config.layout.numel,), dtype=like.dtype, device=dev)
    return StepState(m, xp.zeros_like(m), xp.ones((config.layout.total_rank,), dtype=xp.bool, device=dev),
                     xp.asarray(False, device=dev), xp.asarray(0, dtype=xp.int32, device=dev),
                     xp.asarray(False, device=dev), xp.asarray(config.init_bgt, dtype=xp.int32, device=dev))


def allocator_step(state: StepState, params: Mapping[str, Any], grads: Mapping[str, Any], step: int | Array,
                   config: StepConfig) -> tuple[StepState, dict[str, Array]]:
    """One allocator step as a pure function: the new state and every module's new ``E``.

    The arithmetic of :meth:`RankAllocator.update_and_allocate` (which runs
    this same code), without its host-side work: step order, finiteness
    warnings and missing-gradient counts are the wrapper's. ``params`` and
    ``grads`` map each module to ``(A, E, B)``; a gradient entry or part may
    be None (not updated). ``step`` is either

    * a Python int: the schedule is evaluated here and only the work that
      step needs runs (a jitted function recompiles for each value);
    * an integer array, e.g. traced under ``jax.jit``: every branch is
      computed and the right one selected with ``where``; the schedule is
      read from :attr:`StepConfig.plan_table`. Nothing is read back to the
      host; a non-finite step is skipped and counted in ``state.skips``.

    Arguments are checked against ``config``'s layout (at trace time under jit).
    """
    ps, gs = _step_inputs(params, grads, config.layout)
    none = (None, None, None)
    pf, gf = config.layout.flat(ps), config.layout.flat({n: g or none for n, g in gs.items()})
    state, apply = _advance(state, pf, gf, step, config)
    return state, _masked_E(state.keep, apply, pf, config.layout)


def rank_pattern(state: StepState, config: StepConfig) -> dict[str, list[bool]]:
    """``{"<module>.lora_E": [kept?] * r}`` (PEFT's format) of ``state``: reads the device once (not under jit)."""
    layout = config.layout
    keep = layout.split_scores(_host_list(state.keep) if state.keep is not None else [True] * layout.total_rank)
    return {f"{n}.lora_E": keep[n] for n in layout.names}


def current_ranks(state: StepState, config: StepConfig) -> dict[str, int]:
    """Triplets kept per module by ``state``'s mask (every triplet before any mask); reads the device once."""
    return {name[: -len(".lora_E")]: sum(k) for name, k in rank_pattern(state, config).items()}


class _Plan(NamedTuple):
    update: Any  # update the EMAs
    mask: Any  # compute a new mask, to ``budget``
    final: Any  # this is the final allocation
    apply: Any  # ``E`` is masked this step
    budget: Any


def _plan(step: int | Array, state: StepState, sc: StepConfig) -> _Plan:
    """What ``step`` does: Python bools from a Python step (so only the work needed runs), arrays from an array."""
    c = sc.config
    before: Any
    if isinstance(step, numbers.Integral):
        before = int(step) < c.final_step
        budget, mask = sc.budget_at(int(step)) if before else (sc.target_bgt, True)
    else:
        xp, dev = namespace(step), device(step)
        table = xp.asarray(sc.plan_table, dtype=xp.int32, device=dev)
        entry = xp.reshape(xp.take(table, xp.reshape(xp.clip(step, 0, c.total_step), (1,)), axis=0), ())
        before = step < c.final_step
        budget = xp.where(before, entry // 2, xp.asarray(sc.target_bgt, dtype=entry.dtype, device=dev))
        mask = xp.logical_or(xp.logical_not(before), entry % 2 == 1)
    live = _not(state.finalized)
    new = _and(mask, live)
    return _Plan(_and(before, live), new, _and(_not(before), live), _or(new, state.finalized),
                 _where(state.finalized, state.budget, budget))


def _advance(state: StepState, params: Sequence[Array], grads: Sequence[Array | None], step: int | Array,
             sc: StepConfig) -> tuple[StepState, Any]:
    """The next state and whether ``E`` is masked this step (a Python bool on the eager path).

    ``params`` and ``grads``: flat, as :meth:`Layout.pack <adalora_core.layout.Layout.pack>` takes them.
    """
    p = _plan(step, state, sc)
    m, u, measured, skips = state.m, state.u, state.measured, state.skips
    if p.update is not False:
        m, u, measured, skips = _update_importance(state, params, grads, sc, p.update)
    keep = state.keep
    if p.mask is not False:
        keep = _remask(m, u, keep, measured, sc, p.budget, p.mask)
    if p.final is True:  # the eager path drops the EMAs; a traced one keeps its structure, no longer updated
        m = u = None
    return StepState(m, u, keep, measured, skips, _or(state.finalized, p.final), p.budget), p.apply


def _update_importance(state: StepState, params: Sequence[Array], grads: Sequence[Array | None], sc: StepConfig,
                       when: Any) -> tuple[Array, Array, Any, Any]:
    """One EMA step over the flat buffers, applied where ``when`` and every value is finite: no wait for the device."""
    layout = sc.layout
    present = list(map(_is_not_none, grads))
    if not any(present):
        return state.m, state.u, state.measured, state.skips
    xp = namespace(params[0])
    filled = grads if all(present) else [g if g is not None else xp.zeros_like(p) for p, g in zip(params, grads)]
    ipt = importance(layout.pack(params), layout.pack(filled))
    finite = xp.all(xp.isfinite(ipt))
    m0, u0 = (state.m, state.u) if state.m is not None else (xp.zeros_like(ipt), xp.zeros_like(ipt))
    (m,), (u,) = sc.ema_update([m0], [u0], [ipt], sc.config.beta1, sc.config.beta2)
    ok = finite
    if not all(present):
        ok = xp.logical_and(finite, layout.segment_mask(present, xp, ipt))
    ok = _and(ok, when)
    measured = xp.logical_or(xp.asarray(state.measured, device=device(ipt)), _and(finite, when))
    skips = state.skips + xp.astype(_and(xp.logical_not(finite), when), xp.int32)
    return xp.where(ok, m, m0), xp.where(ok, u, u0), measured, skips


def _score(m: Array | None, u: Array | None, layout: Layout, reduce: Callable[[Array], Array] | None
           ) -> Array | None:
    """Every triplet's score in layout order, agreed across processes by ``reduce``."""
    if m is None or u is None:
        return None
    parts = layout.score_parts(m * u)
    if reduce is not None:
        parts = reduce(parts)
    return parts[0, ...] + (parts[1, ...] + parts[2, ...])


def _remask(m: Array | None, u: Array | None, keep: Array | None, measured: Any, sc: StepConfig, budget: Any,
            when: Any) -> Array | None:
    """The mask to ``budget`` where ``when`` and some update was applied, else ``keep`` as it was."""
    score = _score(m, u, sc.layout, sc.reduce)
    if score is None:  # no importance update yet: nothing to rank by, so prune nothing
        return keep
    xp = namespace(score)
    new = keep_mask(score, kth_threshold([score], sc.init_bgt - budget))
    old = keep if keep is not None else xp.ones(new.shape, dtype=xp.bool, device=device(new))
    return xp.where(xp.asarray(_and(when, measured), device=device(new)), new, old)


def _masked_E(keep: Array | None, apply: Any, params: Sequence[Array], layout: Layout) -> dict[str, Array]:
    """Every module's ``E`` (``params`` flat, as :meth:`Layout.pack` takes them), masked by ``keep`` where ``apply``."""
    Es = dict(zip(layout.names, params[1::3]))
    if keep is None or apply is False:
        return Es
    xp = namespace(keep)
    if apply is not True:
        keep = xp.logical_or(keep, xp.logical_not(apply))
    column = xp.reshape(keep, (-1, 1))
    return {n: apply_mask(E, column[slice(*layout.local_slices[n]), ...]) for n, E in Es.items()}


def _step_inputs(params: Mapping[str, Any], grads: Mapping[str, Any], layout: Layout
                 ) -> tuple[dict[str, Triplet], dict[str, Triplet | None]]:
    """``params`` and ``grads`` as Triplets, checked against the layout's modules and shapes."""
    if set(params) != set(layout.names) or not set(grads) <= set(layout.names):
        raise ValueError(f"params must name exactly the modules {list(layout.names)} and grads only those; "
                         f"got params {sorted(params)}, grads {sorted(grads)}")
    ps = {n: _triplet(params[n], f"params[{n!r}]", parts_may_be_none=False) for n in layout.names}
    gs = {n: None if grads.get(n) is None else _triplet(grads[n], f"grads[{n!r}]") for n in layout.names}
    for n in layout.names:
        got = tuple(tuple(t.shape) for t in ps[n])
        if got != layout.shapes[n]:
            raise ValueError(f"params[{n!r}] has shapes (A, E, B) {got}, the step config {layout.shapes[n]}")
        for part, t, g in zip(PARTS, ps[n], gs[n] or ()):
            if g is not None and tuple(g.shape) != tuple(t.shape):
                raise ValueError(f"grads[{n!r}].{part} has shape {tuple(g.shape)}, expected {tuple(t.shape)}")
    return ps, gs


def _and(a: Any, b: Any) -> Any:
    """``a and b`` of Python bools or bool arrays; a Python bool issues no array op."""
    if isinstance(a, bool):
        return b if a else False
    if isinstance(b, bool):
        return a if b else False
    return namespace(a, b).logical_and(a, b)


def _or(a: Any, b: Any) -> Any:
    if isinstance(a, bool):
        return True if a else b
    if isinstance(b, bool):
        return True if b else a
    return namespace(a, b).logical_or(a, b)


def _not(a: Any) -> Any:
    return (not a) if isinstance(a, bool) else namespace(a).logical_not(a)


def _where(cond: Any, a: Any, b: Any) -> Any:
    if isinstance(cond, bool):
        return a if cond else b
    xp, dev = namespace(cond), device(cond)
    dtype = next((t.dtype for t in (a, b) if hasattr(t, "dtype")), None)  # a Python int takes the array's
    return xp.where(cond, xp.asarray(a, dtype=dtype, device=dev), xp.asarray(b, dtype=dtype, device=dev))


class RankAllocator:
    """Importance-driven rank allocation over a fixed, ordered set of modules.

    ``ranks`` maps each module name to its current rank (``init_r`` for a fresh
    model; the saved ``r_i`` after loading a pruned checkpoint); the budgets are
    ``sum(ranks)`` and ``target_r * len(ranks)``.

    Call :meth:`update_and_allocate` once per optimizer step, after
    ``optimizer.step()``, with the weights and their gradients.

    A stateful wrapper over :func:`allocator_step`: it holds the
    :class:`StepState`, checks every input, step order and the weights'
    devices and dtypes, warns about non-finite steps and missing gradients
    and counts them, and saves and loads the state. The EMAs live in two flat
    buffers (see :mod:`adalora_core.layout`), so a step costs a fixed number
    of array ops whatever the number of modules, and never waits for the
    device.

    Across processes: ``reduce`` (given the ``(3, total_rank)`` per-triplet
    score parts on mask steps, returns them agreed across processes, e.g. an
    all-reduce) makes every process compute the same mask from its local
    gradients; ``parts`` (module -> :class:`~adalora_core.layout.Part`) says
    which rows of a sharded module this process holds, whose partial score
    parts ``reduce`` must then sum.
    """

    def __init__(self, config: AdaLoraConfig, ranks: Mapping[str, int], backend: Any = None, *,
                 reduce: Callable[[Array], Array] | None = None, parts: Mapping[str, Part] | None = None) -> None:
        if not ranks:
            raise ValueError("RankAllocator needs at least one module")
        for name, r in ranks.items():
            if not isinstance(r, int) or isinstance(r, bool) or r < 0:
                raise ValueError(f"ranks[{name!r}]={r!r} is invalid: must be an int >= 0")
        self.config = config
        self.ranks = dict(ranks)
        self.init_bgt = sum(self.ranks.values())
        self.target_bgt = config.target_r * len(self.ranks)
        self._backend = backend
        self._ema_update: Any = None  # the first step's backend's
        self.reduce: Callable[[Array], Array] | None = None
        self.parts: dict[str, Part] | None = None
        self.reset()
        self.set_distribution(reduce=reduce, parts=parts)

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Forget the EMAs, the pattern, the step counter and the weights' shapes."""
        self.commit(AllocatorState(ema_ipt={}, ema_unc={}, masks={}, finalized=False, last_step=None,
                            budget=self.init_bgt, skipped_steps=0, missing_grads=Counter(), shapes={}))

    def commit(self, state: AllocatorState) -> None:
        """Make ``state`` (a :meth:`check_state` output) the allocator's.

        The EMAs and masks are packed into the flat buffers of the modules'
        :class:`~adalora_core.layout.Layout` first; the assignments after that
        cannot fail half-way.
        """
        layout = self._layout_for(state.shapes) if state.shapes else None
        m = u = keep = None
        if state.ema_ipt and layout is not None:
            m, u = layout.pack(layout.flat(state.ema_ipt)), layout.pack(layout.flat(state.ema_unc or {}))
        if state.masks and layout is not None:
            keep = layout.join_scores(state.masks)
        self._layout = layout
        self._sc: StepConfig | None = None
        self._checked: tuple[Any, ...] | None = None  # the structure of the last inputs that passed the checks
        self._keeps: tuple[Any, Any, list[Array]] | None = None  # (keep, dtype, per-module masks) last returned
        # flags as Python values until a step computes them on the device, so a step never waits for it
        self._state = StepState(m, u, keep, bool(state.ema_ipt) or bool(state.masks), 0, state.finalized,
                                state.budget)
        self.last_step: int | None = state.last_step
        self._skipped = state.skipped_steps
        self.missing_grads: Counter[str] = state.missing_grads
        # module -> (in, out) of the weights this process holds: learned from the first step (or a state)
        self.shapes: dict[str, tuple[int, int]] = state.shapes
        self._warned: set[str] = set()

    def _layout_for(self, shapes: Mapping[str, tuple[int, int]]) -> Layout:
        """The layout of weights of these ``(in, out)``, its modules in :attr:`names` order (as flat inputs are)."""
        parts = self.parts or {}
        dims = {}
        for n in self.ranks:
            fan_in, out = shapes[n]
            part = parts.get(n)
            r = part.local_rank if part else self.ranks[n]
            dims[n] = ((r, fan_in), (r, 1), (out, self.ranks[n]))
        return Layout(dims, parts)

    @property
    def names(self) -> list[str]:
        return list(self.ranks)

    @property
    def finalized(self) -> bool:
        """Whether the final allocation is done (the pattern is then fixed and the EMAs dropped)."""
        return bool(self._state.finalized)

    @property
    def budget(self) -> int:
        """The budget of the last step (``init_bgt`` before the first)."""
        return int(self._state.budget)

    @property
    def ema_ipt(self) -> dict[str, Triplet] | None:
        """Per-module views of the sensitivity EMA; None once finalized, empty before the first update."""
        return self._views(self._state.m)

    @property
    def ema_unc(self) -> dict[str, Triplet] | None:
        """Per-module views of the uncertainty EMA (as :attr:`ema_ipt`)."""
        return self._views(self._state.u)

    def _views(self, flat: Array | None) -> dict[str, Triplet] | None:
        if self.finalized:
            return None
        if flat is None or self._layout is None:
            return {}
        return self._layout.unpack(flat)

    @property
    def masks(self) -> dict[str, Array]:
        """``{module: keep}`` of the last mask, over each module's full rank; empty before any mask."""
        keep = self._state.keep
        if keep is None or self._layout is None or not self._host_measured():
            return {}
        return self._layout.split_scores(keep)

    @property
    def rank_pattern(self) -> dict[str, list[bool]]:
        """``{"<module>.lora_E": [kept?] * r}`` of the last mask (PEFT's format); reads the device once."""
        if not self.masks:
            return {}
        assert self._layout is not None and self._state.keep is not None
        out = self._layout.split_scores(_host_list(self._state.keep))
        return {f"{n}.lora_E": out[n] for n in self.names}

    def current_ranks(self) -> dict[str, int]:
        """Triplets kept per module by the last mask (full rank before any mask)."""
        pattern = self.rank_pattern
        return {n: sum(pattern[f"{n}.lora_E"]) if pattern else r for n, r in self.ranks.items()}

    @property
    def skipped_steps(self) -> int:
        """Steps whose importance update was skipped for non-finite values (reads the device once)."""
        pending = self._state.skips
        if not isinstance(pending, int):  # counted on the device: read it once, then count here
            read = int(pending)
            self._state = self._state._replace(skips=0)
            if read:
                self._warn_nonfinite()
            self._skipped += read
            pending = 0
        return self._skipped + pending

    def _host_measured(self) -> bool:
        if not isinstance(self._state.measured, bool):
            self._state = self._state._replace(measured=bool(self._state.measured))
        return self._state.measured

    def budget_at(self, step: int) -> tuple[int, bool]:
        return scheduled_budget(self.config, self.init_bgt, self.target_bgt, step)

    # ------------------------------------------------------------------- step

    def update_and_allocate(
        self, step: int, params: Mapping[str, Triplet], grads: Mapping[str, Triplet | None] | None = None
    ) -> dict[str, Array]:
        """Advance to optimizer step ``step``; return the new ``E`` of every module.

        * ``step < T_f``: update the importance EMAs (skipped for the whole step,
          with one warning and a count, if any gradient or weight is non-finite;
          skipped per module, with a warning, where a gradient is None), then
          on mask steps prune to the scheduled budget;
        * the first call with ``step >= T_f``: prune to the target budget from
          the scores as they stand, keep that pattern, drop the EMAs;
        * later calls: re-apply the final pattern.

        ``params[name]`` and ``grads[name]`` are a :class:`Triplet` or a sequence
        of three arrays ``(A, E, B)``; a gradient entry may be None (the whole
        module) or hold None parts. Gradients must have their weights' shapes
        and dtypes: float64 gradients for float32 weights are refused, not cast,
        since the EMAs keep the weights' dtype and a silent cast would hide a
        mixed-precision bug. All inputs are checked before any state changes.
        """
        ps, apply = self._step(step, params, {} if grads is None else grads)
        assert self._layout is not None
        return _masked_E(self._state.keep, apply, ps, self._layout)

    def advance(self, step: int, params: Mapping[str, Any] | Sequence[Any], grads: Any = None, *,
                mask_dtype: Any = None) -> dict[str, Array] | list[Array] | None:
        """:meth:`update_and_allocate` without touching ``E``: the keep masks to apply, or None.

        The masks are shaped as ``E`` (``(rows, 1)``, the rows the caller holds
        under :attr:`parts`), bool or, with ``mask_dtype``, 1/0 of that dtype:
        a framework that updates its parameters in place multiplies them in
        with one multi-tensor op instead of taking new arrays back. Nothing
        here waits for the device: non-finite steps are counted on the device
        and reported when :attr:`skipped_steps` is read (at once where the
        arrays live in host memory).

        ``params`` and ``grads`` may also be flat sequences, module after
        module in :attr:`names` order, ``A, E, B`` each (a missing gradient is
        None): what a framework calling every step keeps at hand, so that no
        mapping is built per step. The masks are then a list in that order.
        """
        _, apply = self._step(step, params, {} if grads is None else grads)
        if not apply:
            return None
        keeps = self._local_keeps(mask_dtype)
        if keeps is None or not isinstance(params, Mapping):
            return keeps
        return dict(zip(self.names, keeps))

    def _step(self, step: int, params: Mapping[str, Any] | Sequence[Any], grads: Mapping[str, Any] | Sequence[Any]
              ) -> tuple[list[Array], bool]:
        """Check everything, count missing gradients, run :func:`_advance`: the flat weights and whether to mask ``E``."""
        self._check_step(step)
        ps, gs = self._flat(params, grads)
        self._check(ps, gs)
        sc = self._step_config(ps)
        self.last_step = step
        if not self.finalized and step < self.config.final_step:
            self._count_missing(gs)
        self._state, apply = _advance(self._state, ps, gs, step, sc)
        if not isinstance(self._state.skips, int) and on_host(ps[0]):
            self.skipped_steps  # noqa: B018 (reading it counts the skip and warns now, at no cost on the host)
        return ps, apply

    def _step_config(self, params: Sequence[Array]) -> StepConfig:
        """The :class:`StepConfig` of the current layout and distribution (built on the first step after a change)."""
        if self._sc is None:
            if self._ema_update is None:
                from adalora_core.backends import resolve

                self._ema_update = resolve(self._backend, params[0]).op("ema_update", ema_update)
            if not self.shapes:
                self.shapes = {n: (int(params[3 * i].shape[1]), int(params[3 * i + 2].shape[0]))
                               for i, n in enumerate(self.names)}
            if self._layout is None:
                self._layout = self._layout_for(self.shapes)
            self._sc = StepConfig(self.config, self._layout, self.init_bgt, self.target_bgt, self.reduce,
                                  self._ema_update)
        return self._sc

    def _check_step(self, step: int) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r} is invalid: must be an int >= 0")
        if self.last_step is not None and step < self.last_step:
            raise ValueError(f"step={step} goes backwards: the last step was {self.last_step}")
        assert self.config.total_step is not None
        if step > self.config.total_step:
            raise ValueError(f"step={step} is beyond total_step={self.config.total_step}")

    def _flat(self, params: Mapping[str, Any] | Sequence[Any], grads: Mapping[str, Any] | Sequence[Any]
              ) -> tuple[list[Array], list[Array | None]]:
        """``params`` and ``grads`` as flat lists in :attr:`names` order (3 per module; None where no gradient)."""
        n = 3 * len(self.ranks)
        if not isinstance(params, Mapping):
            if isinstance(grads, Mapping) or len(params) != n or len(grads) != n:
                raise ValueError(f"flat params and grads must both be sequences of {n} entries (A, E, B of each "
                                 f"module in names order); got {len(params)} and "
                                 f"{'a mapping' if isinstance(grads, Mapping) else len(grads)}")
            return list(params), list(grads)
        if not isinstance(grads, Mapping):
            raise TypeError(f"grads must be a mapping of module to (A, E, B) like params, not {type(grads).__name__}")
        if set(params) != set(self.ranks):
            missing, extra = sorted(set(self.ranks) - set(params)), sorted(set(params) - set(self.ranks))
            raise ValueError(f"params must name exactly the allocator's modules; missing {missing}, unknown {extra}")
        unknown = sorted(set(grads) - set(self.ranks))
        if unknown:
            raise ValueError(f"grads name unknown modules {unknown}")
        ps = [t for name in self.names for t in _triplet(params[name], f"params[{name!r}]", parts_may_be_none=False)]
        none = (None, None, None)
        gs = [t for name in self.names
              for t in (none if grads.get(name) is None else _triplet(grads[name], f"grads[{name!r}]"))]
        return ps, gs

    def _check(self, params: list[Array], grads: list[Array | None]) -> None:
        """Raise a ValueError for any bad input; inputs of the structure of the last good ones pass at once.

        The structure (every array's library, shape, dtype and device, and which gradients are None) is
        read in a few C-level passes; the per-module checks run only when it differs from the last
        inputs that passed (the first step, a parameter replaced or cast, a gradient gone missing).
        """
        key = _structure(params, grads)
        if key is not None and key == self._checked:
            return
        self._check_arrays_of(params, grads)
        self._checked = key

    def _check_arrays_of(self, params: list[Array], grads: list[Array | None]) -> None:
        """Every module's weights and gradients (the checks :meth:`_check` skips for a known structure)."""
        trips = {n: (_triplet(params[3 * i: 3 * i + 3], f"params[{n!r}]", parts_may_be_none=False),
                     _triplet(grads[3 * i: 3 * i + 3], f"grads[{n!r}]")) for i, n in enumerate(self.names)}
        namespace(*{type(t): t for t in chain(params, grads) if t is not None}.values())  # one per type: names a mix
        for name, (p, g) in trips.items():
            self._check_module(name, p, g)
        first = params[0]
        if any(getattr(t, "device", None) != getattr(first, "device", None) for t in params):
            raise ValueError(f"all weights must live on one device; found {sorted({str(device(t)) for t in params})}")
        if any(t.dtype != first.dtype for t in params):
            raise ValueError(f"all weights must share one dtype (the EMAs are one buffer); "
                             f"found {sorted({str(t.dtype) for t in params})}")

    def _check_module(self, name: str, p: Triplet, g: Triplet | None) -> None:
        """One module's weights against its rank and known shape, and its gradients against its weights."""
        A, E, B = p
        r, want = self.ranks[name], self.shapes.get(name)
        part = (self.parts or {}).get(name)
        rl = part.local_rank if part else r
        ok = len(A.shape) == 2 and len(B.shape) == 2 and (A.shape[0], tuple(E.shape), B.shape[1]) == (rl, (rl, 1), r)
        if ok and want is not None:
            ok = (A.shape[1], B.shape[0]) == want
        if not ok:
            known = f" and (in, out) = {want}" if want is not None else ""
            rows = f" holding rows {part.rows}" if part else ""
            raise ValueError(f"module {name!r}: expected rank {r}{rows}{known} (A (r, in), E (r, 1), B (out, r)); "
                             f"got A {tuple(A.shape)}, E {tuple(E.shape)}, B {tuple(B.shape)}")
        m = self._state.m
        if m is not None and A.dtype != m.dtype:
            raise ValueError(f"module {name!r}: weights of dtype {A.dtype}, but the importance EMAs are "
                             f"{m.dtype}; the allocator's state is for weights of another dtype")
        for part_name, t, gt in zip(PARTS, p, g or ()):
            if gt is None:
                continue
            if gt.shape != t.shape:
                raise ValueError(f"module {name!r}: grad of {part_name} has shape {tuple(gt.shape)}, "
                                 f"expected {tuple(t.shape)}")
            if gt.dtype != t.dtype:
                raise ValueError(f"module {name!r}: grad of {part_name} has dtype {gt.dtype}, its weight "
                                 f"{t.dtype}; cast the gradients to the weights' dtype")

    def _count_missing(self, grads: list[Array | None]) -> None:
        """Count and warn (once per module) where a gradient is None: PEFT skips just those tensors."""
        if not any(map(_is_none, grads)):
            return
        for i, name in enumerate(self.names):
            missing = [part for part, gp in zip(PARTS, grads[3 * i: 3 * i + 3]) if gp is None]
            if missing:
                self.missing_grads[name] += 1
                self._warn_once(f"missing:{name}", f"module {name!r} has no gradient for {missing}; their "
                                "importance is not updated (frozen or unused?)")

    def scores(self) -> dict[str, Array]:
        """Current triplet score per module; empty before the first importance update."""
        if self._layout is None:
            return {}
        score = _score(self._state.m, self._state.u, self._layout, self.reduce)
        return {} if score is None else self._layout.split_scores(score)

    def _local_keeps(self, dtype: Any = None) -> list[Array] | None:
        """The last mask per module (:attr:`names` order), over the rows of ``E`` held here, shaped as ``E``;
        None before any mask. Kept while the mask is (after the final allocation: every later step)."""
        keep = self._state.keep
        if keep is None or self._layout is None:
            return None
        if self._keeps is not None and self._keeps[0] is keep and self._keeps[1] == dtype:
            return self._keeps[2]
        xp = namespace(keep)
        column = xp.reshape(keep if dtype is None else xp.astype(keep, dtype), (-1, 1))  # one op for every module
        slices = self._layout.local_slices
        out = [column[slices[n][0]:slices[n][1], ...] for n in self.names]
        self._keeps = (keep, dtype, out)
        return out

    def keep_flat(self) -> Array | None:
        """The last mask of every triplet as one flat bool array (layout order); None before any mask."""
        return self._state.keep

    def set_distribution(self, *, reduce: Callable[[Array], Array] | None, parts: Mapping[str, Part] | None) -> None:
        """Set :attr:`reduce` and :attr:`parts` (see the class docstring) before the first step or load."""
        parts = dict(parts) if parts else None
        for name, part in (parts or {}).items():
            if name not in self.ranks or part.rank != self.ranks[name]:
                raise ValueError(f"parts[{name!r}]={part} does not match the module's rank {self.ranks.get(name)}")
        if parts != self.parts:
            if self._state.m is not None or self._state.keep is not None:
                raise ValueError("the allocator already holds EMAs or masks for another split of the weights; "
                                 "set the distribution before the first step or load")
            self.shapes, self._layout = {}, None  # learned again from the next step's (local) weights
        self.reduce, self.parts = reduce, parts
        self._sc = None  # rebuilt with these on the next step
        self._checked = None  # the rows each module holds are checked again

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, AdaLoraWarning, stacklevel=3)

    def _warn_nonfinite(self) -> None:
        self._warn_once("nonfinite", "non-finite gradients or weights: the importance update of this "
                        "step is skipped (counted in skipped_steps); further skips are silent")

    # ------------------------------------------------------------- persistence

    def state_dict(self) -> tuple[dict[str, Array], dict[str, Any]]:
        """``(arrays, meta)``: everything :meth:`load_state_dict` needs to resume exactly."""
        arrays: dict[str, Array] = {}
        for kind, store in zip(KINDS, (self.ema_ipt, self.ema_unc)):
            for name, trip in (store or {}).items():
                for part, t in zip(PARTS, trip):
                    arrays[ema_key(kind, name, part)] = t
        for name, m in self.masks.items():
            arrays[MASK + name] = m
        if not self._host_measured():  # EMAs of zeros: no update was applied yet, so there is nothing to keep
            arrays = {k: v for k, v in arrays.items() if k.startswith(MASK)}
        meta = {
            "ranks": dict(self.ranks),
            "shapes": {n: list(s) for n, s in self.shapes.items()} or None,
            "last_step": self.last_step,
            "finalized": self.finalized,
            "budget": self.budget,
            "skipped_steps": self.skipped_steps,
            "missing_grads": dict(self.missing_grads),
            "config": self.config.to_dict(),
        }
        return arrays, meta

    def load_state_dict(self, arrays: Mapping[str, Array], meta: Mapping[str, Any],
                        params: Mapping[str, Triplet] | None = None) -> None:
        """Restore :meth:`state_dict` output; a refused state changes nothing.

        Raises :class:`~adalora_core.errors.CheckpointError` (a ValueError) that
        lists every problem (see :meth:`check_state`). ``params``: the
        weights the state will be used with, when the caller has them, so that
        the EMAs are checked against their shapes and dtypes now rather than at
        the next step. A state saved before ``shapes`` were recorded loads too.
        """
        self.commit(self.check_state(arrays, meta, params))

    def check_state(self, arrays: Any, meta: Any, params: Mapping[str, Any] | None = None) -> AllocatorState:
        """Check a :meth:`state_dict` output against this allocator and return it staged; changes nothing.

        Every meta field is type- and range-checked; every array must be
        present (both EMAs, all three parts, every module, or none before the
        first update; masks for every module or none), with the shape of the
        weights (``params``, else the shapes learned from earlier steps, else
        the state's own), a floating dtype equal to the weights' where known,
        and finite values. All problems are raised together.
        """
        p = Problems("allocator state")
        meta = p.mapping(meta, "its metadata")
        if not isinstance(arrays, Mapping):
            p.add(f"its arrays must be a mapping of name to array, got {type(arrays).__name__}")
            arrays = {}
        fields = self._check_fields(p, meta)
        shapes, emas, masks = self._check_arrays(p, arrays, meta, params)
        finalized = fields["finalized"]
        p.require(not (finalized and emas), "a finalized state holds no EMAs (they are dropped at T_f)")
        p.require(not (masks and not emas and not finalized), "masks without EMAs (masks come from them)")
        p.require(not ("last_step" in meta and meta["last_step"] is None and (arrays or finalized)),
                  "a state before the first step (last_step=None) holds no arrays and is not finalized")
        p.raise_if_any()

        def store(kind: str) -> dict[str, Triplet] | None:
            if finalized:
                return None
            return {n: Triplet(*(emas[ema_key(kind, n, x)] for x in PARTS)) for n in self.names} if emas else {}

        return AllocatorState(ema_ipt=store("ema_ipt"), ema_unc=store("ema_unc"), masks=masks, shapes=shapes, **fields)

    def _check_fields(self, p: Problems, meta: Mapping[str, Any]) -> dict[str, Any]:
        """The scalar meta fields, type- and range-checked (None where a problem was recorded)."""
        ranks = meta.get("ranks")
        p.require(isinstance(ranks, Mapping) and dict(ranks) == self.ranks,
                  f"it is for modules/ranks {ranks!r}, not {self.ranks}")
        last_step = None
        if p.require("last_step" in meta, "missing field 'last_step'"):
            last_step = p.int_field(meta, "last_step", optional=True)
        total = self.config.total_step
        if last_step is not None and total is not None:
            p.require(last_step <= total, f"last_step={last_step} is beyond total_step={total}")
        budget = p.int_field(meta, "budget")
        lo, hi = sorted((self.init_bgt, self.target_bgt))
        if budget is not None:
            p.require(lo <= budget <= hi, f"budget={budget} must lie in [{lo}, {hi}] (the schedule's range)")
        self._check_config(p, meta)
        return {"finalized": p.bool_field(meta, "finalized"), "last_step": last_step, "budget": budget,
                "skipped_steps": p.int_field(meta, "skipped_steps"),
                "missing_grads": _meta_missing_grads(p, meta, self.ranks)}

    def _check_arrays(self, p: Problems, arrays: Mapping[Any, Any], meta: Mapping[str, Any],
                      params: Mapping[str, Any] | None) -> tuple[dict[str, tuple[int, int]], dict[str, Array],
                                                                 dict[str, Array]]:
        """``(shapes, EMA arrays by key, masks by module)`` of a state, each array checked against the weights."""
        known = None
        if params is not None:
            if set(params) != set(self.ranks):
                raise ValueError(f"params must name exactly the allocator's modules {self.names}, not {sorted(params)}")
            known = {n: _triplet(params[n], f"params[{n!r}]", parts_may_be_none=False) for n in self.names}
        shapes = {n: (int(t.A.shape[1]), int(t.B.shape[0])) for n, t in known.items()} if known else self.shapes
        saved = _meta_shapes(p, meta, self.ranks)
        if shapes and saved and saved != shapes:
            p.add(f"it is for weights of (in, out) {saved}, not {shapes}")
        emas: dict[str, Array] = {}
        if any(str(k).startswith(KINDS) for k in arrays):
            dims: Mapping[str, tuple[int, int] | None] = shapes or saved or {n: _ema_dims(arrays, n) for n in self.names}
            ref = known or self.ema_ipt or None  # arrays of the weights' dtypes, if any
            emas = self._check_emas(p, arrays, dims, ref)
            saved = saved or {n: d for n, d in dims.items() if d is not None}
        masks = self._check_masks(p, arrays)
        expected = {ema_key(kind, n, x) for kind in KINDS for n in self.names for x in PARTS}
        expected |= {MASK + n for n in self.names}
        unknown = sorted(str(k) for k in arrays if k not in expected)
        p.require(not unknown, f"unexpected arrays {unknown[:8]}")
        _check_one_library(p, arrays.values())
        return dict(shapes or saved), emas, masks

    def _check_config(self, p: Problems, meta: Mapping[str, Any]) -> None:
        """The saved config is a valid one with this allocator's schedule and betas."""
        raw = p.field(meta, "config")
        if "config" not in meta or not p.require(isinstance(raw, Mapping), "config must be a JSON object (a dict), "
                                                                           f"got {type(raw).__name__}"):
            return
        try:
            saved = AdaLoraConfig.from_dict(raw)
        except (TypeError, ValueError) as exc:
            p.add(f"config: {exc}")
            return
        diff = {f: getattr(saved, f) for f in SCHEDULE_FIELDS if getattr(saved, f) != getattr(self.config, f)}
        p.require(not diff, f"it was computed with config {diff}, this allocator has "
                            f"{ {f: getattr(self.config, f) for f in diff} }")

    def _check_emas(self, p: Problems, arrays: Mapping[Any, Any], dims: Mapping[str, tuple[int, int] | None],
                    ref: Mapping[str, Triplet] | None) -> dict[str, Array]:
        """Both EMAs of every module, all three parts, each against the weights' shape and dtype."""
        out: dict[str, Array] = {}
        missing = []
        for n, r in self.ranks.items():
            d = dims.get(n)
            p.require(d is not None, f"module {n!r}: ema_ipt.{n}.A and .B must be 2-d (they tell its (in, out))")
            rl = self.parts[n].local_rank if self.parts and n in self.parts else r  # rows held here
            for j, (x, shape) in enumerate(zip(PARTS, ((rl, d[0]) if d else None, (rl, 1), (d[1], r) if d else None))):
                for kind in KINDS:
                    key = ema_key(kind, n, x)
                    if key not in arrays:
                        missing.append(key)
                        continue
                    # the weights' dtype where known, else the sensitivity EMA's for the uncertainty EMA
                    dtype = ref[n][j].dtype if ref else getattr(out.get(f"ema_ipt.{n}.{x}"), "dtype", None)
                    p.array(key, arrays[key], shape, dtype=dtype)
                    out[key] = arrays[key]
        p.require(not missing, f"missing arrays {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        return out

    def _check_masks(self, p: Problems, arrays: Mapping[Any, Any]) -> dict[str, Array]:
        """A bool mask of shape ``(r,)`` for every module, or none at all."""
        keys = {MASK + n: n for n in self.names}
        if not any(k in keys for k in arrays):
            return {}
        missing = sorted(k for k in keys if k not in arrays)
        p.require(not missing, f"missing arrays {missing}")
        out: dict[str, Array] = {}
        for key, n in keys.items():
            t = arrays.get(key)
            if t is not None and p.array(key, t, (self.ranks[n],), floating=False, finite=False):
                p.require(namespace(t).isdtype(t.dtype, "bool"), f"{key!r} has dtype {t.dtype}, expected bool")
                out[n] = t
        return out


def _host_list(mask: Array) -> list[bool]:
    """A boolean mask as Python bools (one device-to-host copy)."""
    tolist = getattr(mask, "tolist", None)
    if tolist is not None:
        return [bool(b) for b in tolist()]
    from ._xp import to_numpy

    return [bool(b) for b in to_numpy(mask).tolist()]


@dataclass
class AllocatorState:
    """Everything :meth:`RankAllocator.commit` assigns, staged (and validated) beforehand."""

    ema_ipt: dict[str, Triplet] | None
    ema_unc: dict[str, Triplet] | None
    masks: dict[str, Array]
    finalized: bool
    last_step: int | None
    budget: int
    skipped_steps: int
    missing_grads: Counter[str]
    shapes: dict[str, tuple[int, int]]


def _triplet(entry: Any, what: str, parts_may_be_none: bool = True) -> Triplet:
    """``entry`` as a Triplet: a Triplet or any 3-sequence of arrays (None parts where allowed)."""
    if not isinstance(entry, (tuple, list)) or len(entry) != 3:
        got = f"a sequence of {len(entry)}" if isinstance(entry, (tuple, list)) else type(entry).__name__
        raise ValueError(f"{what} must be a Triplet (A, E, B) or a sequence of 3 arrays, got {got}")
    for part, t in zip(PARTS, entry):
        if not (t is None and parts_may_be_none) and not (hasattr(t, "shape") and hasattr(t, "dtype")):
            raise ValueError(f"{what}: {part} must be an array{' or None' if parts_may_be_none else ''}, "
                             f"got {type(t).__name__}")
    return entry if isinstance(entry, Triplet) else Triplet(*entry)


def _structure(params: list[Array], grads: list[Array | None]) -> tuple[Any, ...] | None:
    """What :meth:`RankAllocator._check_arrays_of` decides from, read in C-level passes; None if unreadable.

    Every array's type and shape, which gradients are None, and the sets of
    dtypes and weight devices: inputs that pass must have one weight dtype and
    device, and gradients of that dtype, which the sets then pin down.
    """
    present = list(filter(_is_not_none, grads))
    try:
        return (tuple(map(type, params)), tuple(map(type, grads)), tuple(map(_SHAPE, params)),
                tuple(map(_SHAPE, present)), frozenset(map(_DTYPE, params)), frozenset(map(_DTYPE, present)),
                frozenset(map(_DEVICE, params)))
    except (AttributeError, TypeError):  # not arrays, or unhashable dtypes or devices: checked in full
        return None


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _meta_missing_grads(p: Problems, meta: Mapping[str, Any], ranks: Mapping[str, int]) -> Counter[str]:
    """``missing_grads``: module -> count, for known modules only."""
    raw = p.field(meta, "missing_grads")
    if "missing_grads" not in meta:
        return Counter()
    raw = p.mapping(raw, "missing_grads")
    bad = {k: v for k, v in raw.items() if k not in ranks or not _is_count(v)}
    p.require(not bad, f"missing_grads {bad} must map the allocator's modules to ints >= 0")
    return Counter({k: v for k, v in raw.items() if k not in bad})


def _meta_shapes(p: Problems, meta: Mapping[str, Any], ranks: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """``shapes``: module -> ``[in, out]`` for every module; None (or absent, in older states) when unknown."""
    raw = meta.get("shapes")
    if raw is None:
        return {}
    ok = isinstance(raw, Mapping) and set(raw) == set(ranks) and all(
        isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_count(x) for x in v) for v in raw.values())
    if not p.require(ok, f"shapes={raw!r} must map every module to [in, out] (ints >= 0), or be null"):
        return {}
    return {n: (v[0], v[1]) for n, v in raw.items()}


def _ema_dims(arrays: Mapping[Any, Any], name: str) -> tuple[int, int] | None:
    """``(in, out)`` as the state's own sensitivity EMA of ``A`` and ``B`` tell them."""
    a, b = (tuple(getattr(arrays.get(f"ema_ipt.{name}.{x}"), "shape", ())) for x in "AB")
    return (int(a[1]), int(b[0])) if len(a) == 2 and len(b) == 2 else None


def _check_one_library(p: Problems, arrays: Any) -> None:
    """All arrays of one library and on one device."""
    present = [a for a in arrays if hasattr(a, "shape") and hasattr(a, "dtype")]
    if not present:
        return
    try:
        namespace(*present)
    except TypeError as exc:
        p.add(str(exc))
        return
    devices = {str(device(a)) for a in present}
    p.require(len(devices) <= 1, f"its arrays live on several devices {sorted(devices)}")
