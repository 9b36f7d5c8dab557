"""AdaLoRA's RankAllocator on plain arrays: importance EMAs, triplet scores, masks.

The allocator holds the EMA state and the rank pattern; the weights stay the
caller's. Each call returns new ``E`` arrays (masked where a triplet is
pruned) and never mutates its inputs, so it runs on any Array API library and
the torch integration simply copies the results into its parameters.

Semantics follow PEFT's ``RankAllocator`` bit for bit on torch in float32, with
its failure paths fixed (see docs/peft-differences.md): budgets come from the
current shapes, the final allocation happens at the first step at or past
``T_f``, non-finite or missing gradients are skipped instead of poisoning the
EMAs, and ``state_dict`` captures everything needed to resume exactly.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ._xp import Array, device, namespace
from .config import AdaLoraConfig
from .errors import AdaLoraWarning
from .schedule import budget_schedule
from .triplet import Triplet

PARTS = ("A", "E", "B")


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


def kth_threshold(scores: Sequence[Array], k: int) -> Array | None:
    """The ``k``-th smallest (1-based, as ``torch.kthvalue``) of all scores; None when ``k <= 0``."""
    if k <= 0:
        return None
    xp = namespace(*scores)
    flat = xp.concat([xp.reshape(s, (-1,)) for s in scores])
    if k > flat.shape[0]:
        raise ValueError(f"cannot prune {k} triplets out of {flat.shape[0]}")
    return xp.sort(flat)[k - 1]


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


class RankAllocator:
    """Importance-driven rank allocation over a fixed, ordered set of modules.

    ``ranks`` maps each module name to its current rank (``init_r`` for a fresh
    model; the saved ``r_i`` after loading a pruned checkpoint); the budgets are
    ``sum(ranks)`` and ``target_r * len(ranks)``.

    Call :meth:`update_and_allocate` once per optimizer step, after
    ``optimizer.step()``, with the weights and their gradients.
    """

    def __init__(self, config: AdaLoraConfig, ranks: Mapping[str, int], backend: Any = None) -> None:
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
        self._ema_update = None
        self.reset()

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Forget the EMAs, the pattern and the step counter."""
        self.ema_ipt: dict[str, Triplet] | None = {}
        self.ema_unc: dict[str, Triplet] | None = {}
        self.masks: dict[str, Array] = {}
        self.finalized = False
        self.last_step: int | None = None
        self.budget = self.init_bgt
        self.skipped_steps = 0
        self.missing_grads: Counter[str] = Counter()
        self._warned: set[str] = set()

    @property
    def names(self) -> list[str]:
        return list(self.ranks)

    @property
    def rank_pattern(self) -> dict[str, list[bool]]:
        """``{"<module>.lora_E": [kept?] * r}`` of the last mask (PEFT's format)."""
        return {f"{n}.lora_E": [bool(b) for b in _host_list(m)] for n, m in self.masks.items()}

    def current_ranks(self) -> dict[str, int]:
        """Triplets kept per module by the last mask (full rank before any mask)."""
        return {n: (sum(_host_list(self.masks[n])) if n in self.masks else r) for n, r in self.ranks.items()}

    def budget_at(self, step: int) -> tuple[int, bool]:
        c = self.config
        assert c.total_step is not None
        return budget_schedule(step, init_bgt=self.init_bgt, target_bgt=self.target_bgt, tinit=c.tinit,
                               tfinal=c.tfinal, total_step=c.total_step, deltaT=c.deltaT)

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

        All inputs are checked before any state changes.
        """
        grads = grads or {}
        self._check(step, params, grads)
        if self._ema_update is None:
            from adalora_core.backends import resolve

            backend = resolve(self._backend, params[self.names[0]].A)
            self._ema_update = backend.op("ema_update", ema_update)
        self.last_step = step
        if self.finalized:
            return self._masked(params)
        if step < self.config.final_step:
            self._update_importance(params, grads)
            budget, mask_now = self.budget_at(step)
            self.budget = budget
            if mask_now:
                self._mask_to_budget(budget)
                return self._masked(params)
            return {n: params[n].E for n in self.names}
        self._mask_to_budget(self.target_bgt)
        self.budget = self.target_bgt
        self.finalized = True
        self.ema_ipt = self.ema_unc = None
        return self._masked(params)

    def _check(self, step: int, params: Mapping[str, Triplet], grads: Mapping[str, Triplet | None]) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r} is invalid: must be an int >= 0")
        if self.last_step is not None and step < self.last_step:
            raise ValueError(f"step={step} goes backwards: the last step was {self.last_step}")
        assert self.config.total_step is not None
        if step > self.config.total_step:
            raise ValueError(f"step={step} is beyond total_step={self.config.total_step}")
        if set(params) != set(self.ranks):
            missing, extra = sorted(set(self.ranks) - set(params)), sorted(set(params) - set(self.ranks))
            raise ValueError(f"params must name exactly the allocator's modules; missing {missing}, unknown {extra}")
        unknown = sorted(set(grads) - set(self.ranks))
        if unknown:
            raise ValueError(f"grads name unknown modules {unknown}")
        devices = set()
        for name in self.names:
            A, E, B = params[name]
            r = self.ranks[name]
            if A.shape[0] != r or E.shape != (r, 1) or B.shape[1] != r:
                raise ValueError(f"module {name!r}: expected rank {r} (A (r, in), E (r, 1), B (out, r)); "
                                 f"got A {tuple(A.shape)}, E {tuple(E.shape)}, B {tuple(B.shape)}")
            g = grads.get(name)
            if g is not None:
                for part, p, gp in zip(PARTS, params[name], g):
                    if gp is not None and gp.shape != p.shape:
                        raise ValueError(f"module {name!r}: grad of {part} has shape {tuple(gp.shape)}, "
                                         f"expected {tuple(p.shape)}")
            devices.update(str(device(t)) for t in (A, E, B))
        if len(devices) > 1:
            raise ValueError(f"all weights must live on one device; found {sorted(devices)}")
        namespace(*(t for n in self.names for t in params[n]),
                  *(t for g in grads.values() if g is not None for t in g if t is not None))

    def _update_importance(self, params: Mapping[str, Triplet], grads: Mapping[str, Triplet | None]) -> None:
        assert self.ema_ipt is not None and self.ema_unc is not None
        entries: list[tuple[str, int]] = []
        ipts = []
        for name in self.names:
            g = grads.get(name) or (None, None, None)
            missing = [part for part, gp in zip(PARTS, g) if gp is None]
            if missing:  # PEFT reads p.grad per parameter: skip just those tensors
                self.missing_grads[name] += 1
                self._warn_once(f"missing:{name}", f"module {name!r} has no gradient for {missing}; their "
                                "importance is not updated (frozen or unused?)")
            for j, (p, gp) in enumerate(zip(params[name], g)):
                if gp is not None:
                    entries.append((name, j))
                    ipts.append(importance(p, gp))
        if not ipts:
            return
        xp = namespace(*ipts)
        finite = xp.all(xp.stack([xp.all(xp.isfinite(t)) for t in ipts]))
        if not bool(finite):
            self.skipped_steps += 1
            self._warn_once("nonfinite", "non-finite gradients or weights: the importance update of this "
                            "step is skipped (counted in skipped_steps); further skips are silent")
            return
        if not self.ema_ipt:  # EMAs start at zero for every module, updated or not
            for name in self.names:
                self.ema_ipt[name] = Triplet(*(xp.zeros_like(p) for p in params[name]))
                self.ema_unc[name] = Triplet(*(xp.zeros_like(p) for p in params[name]))
        ms = [self.ema_ipt[n][j] for n, j in entries]
        us = [self.ema_unc[n][j] for n, j in entries]
        new_m, new_u = self._ema_update(ms, us, ipts, self.config.beta1, self.config.beta2)
        for (name, j), m, u in zip(entries, new_m, new_u):
            self.ema_ipt[name] = self.ema_ipt[name]._replace(**{PARTS[j]: m})
            self.ema_unc[name] = self.ema_unc[name]._replace(**{PARTS[j]: u})

    def scores(self) -> dict[str, Array]:
        """Current triplet score per module; empty before the first importance update."""
        out = {}
        for name, m in (self.ema_ipt or {}).items():
            u = self.ema_unc[name]  # type: ignore[index]
            sA, sE, sB = (mp * up for mp, up in zip(m, u))
            out[name] = triplet_scores(sA, sE, sB)
        return out

    def _mask_to_budget(self, budget: int) -> None:
        scores = self.scores()
        if not scores:  # no importance update applied yet: nothing to rank by, so prune nothing
            return
        threshold = kth_threshold(list(scores.values()), self.init_bgt - budget)
        self.masks = {n: keep_mask(scores[n], threshold) for n in self.names}

    def _masked(self, params: Mapping[str, Triplet]) -> dict[str, Array]:
        if not self.masks:
            return {n: params[n].E for n in self.names}
        return {n: apply_mask(params[n].E, self.masks[n]) for n in self.names}

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, AdaLoraWarning, stacklevel=3)

    # ------------------------------------------------------------- persistence

    def state_dict(self) -> tuple[dict[str, Array], dict[str, Any]]:
        """``(arrays, meta)``: everything :meth:`load_state_dict` needs to resume exactly."""
        arrays: dict[str, Array] = {}
        for kind, store in (("ema_ipt", self.ema_ipt), ("ema_unc", self.ema_unc)):
            for name, trip in (store or {}).items():
                for part, t in zip(PARTS, trip):
                    arrays[f"{kind}.{name}.{part}"] = t
        for name, m in self.masks.items():
            arrays[f"mask.{name}"] = m
        meta = {
            "ranks": self.ranks,
            "last_step": self.last_step,
            "finalized": self.finalized,
            "budget": self.budget,
            "skipped_steps": self.skipped_steps,
            "missing_grads": dict(self.missing_grads),
            "config": self.config.to_dict(),
        }
        return arrays, meta

    def load_state_dict(self, arrays: Mapping[str, Array], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; validated first, so a mismatch changes nothing."""
        if dict(meta.get("ranks", {})) != self.ranks:
            raise ValueError(f"allocator state is for modules/ranks {meta.get('ranks')}, not {self.ranks}")
        ema: dict[str, dict[str, dict[str, Array]]] = {"ema_ipt": {}, "ema_unc": {}}
        masks: dict[str, Array] = {}
        for key, t in arrays.items():
            kind, _, rest = key.partition(".")
            if kind == "mask" and rest in self.ranks and tuple(t.shape) == (self.ranks[rest],):
                masks[rest] = t
                continue
            name, _, part = rest.rpartition(".")
            if kind not in ema or name not in self.ranks or part not in PARTS:
                raise ValueError(f"allocator state has an unexpected array {key!r} of shape {tuple(t.shape)}")
            ema[kind].setdefault(name, {})[part] = t
        finalized = bool(meta["finalized"])
        for kind, store in ema.items():
            for name, parts in store.items():
                if set(parts) != set(PARTS) or parts["E"].shape != (self.ranks[name], 1):
                    raise ValueError(f"allocator state {kind}.{name} is incomplete or has the wrong rank")
        if set(ema["ema_ipt"]) != set(ema["ema_unc"]):
            raise ValueError("allocator state has sensitivity and uncertainty EMAs for different modules")
        self.reset()
        self.ema_ipt = None if finalized else {n: Triplet(*(p[x] for x in PARTS)) for n, p in ema["ema_ipt"].items()}
        self.ema_unc = None if finalized else {n: Triplet(*(p[x] for x in PARTS)) for n, p in ema["ema_unc"].items()}
        self.masks = masks
        self.finalized = finalized
        self.last_step = meta["last_step"]
        self.budget = int(meta["budget"])
        self.skipped_steps = int(meta["skipped_steps"])
        self.missing_grads = Counter(meta.get("missing_grads", {}))


def _host_list(mask: Array) -> list[bool]:
    """A boolean mask as Python bools (one device-to-host copy)."""
    tolist = getattr(mask, "tolist", None)
    if tolist is not None:
        return [bool(b) for b in tolist()]
    from ._xp import to_numpy

    return [bool(b) for b in to_numpy(mask).tolist()]
