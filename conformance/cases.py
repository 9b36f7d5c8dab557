"""Named conformance cases: seeded inputs, the reference's answer, a tolerance per dtype.

A :class:`Case` pairs ``run(backend, dtype)``, which drives the library on one
backend and returns host NumPy arrays, with ``reference(dtype)``, which computes
the same quantities with :mod:`reference` in float64. Both draw their inputs from
the same seeded NumPy generator and round them to ``dtype`` first, so a float32
run is compared with the float64 answer *for the float32 inputs*: the difference
is the library's own rounding, nothing else.

The runner compares every array a case returns with
``max|got - ref| / max(1, max|ref|)`` (per array; the case's error is the worst
array), and requires exact equality for integer and boolean arrays (schedules,
rank patterns, skip counts). Keys starting with ``_`` are notes, not compared.

A run raises :class:`Skip` when the case does not apply (an op the backend does
not override, a kernel without float64); any other exception is a failure.

Cases of other families live in ``cases_microlora.py`` and ``cases_peft.py``
(plain dicts, converted here); :func:`all_cases` loads them when their module
and its dependencies import, and :func:`extra_sources` says what happened.
"""

from __future__ import annotations

import importlib
import json
import math
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import reference as R
from .common import DTYPES, EXACT, TOL
from .common import Draw as _Draw
from .common import available_cycle as _available_cycle
from .common import dev as _dev
from .common import host as _host
from .common import partner as _partner
from .common import round_to as _round
from .common import spec_name as _spec_name

__all__ = ["DTYPES", "EXACT", "TOL", "Case", "Skip", "adalora_cases", "all_cases", "as_case", "extra_sources"]


class Skip(Exception):
    """Raised by ``Case.run`` when the case does not apply to this backend or dtype."""


@dataclass(frozen=True)
class Case:
    """One conformance check.

    ``run(backend, dtype)`` returns ``{key: host NumPy array}`` computed by the
    library; ``reference(dtype)`` returns the same keys computed by the float64
    reference on the same (dtype-rounded) inputs. ``tol[dtype]`` bounds the
    normalised error. ``backends`` limits the case to backends of those names
    (``None``: all). ``stateful`` marks sequences (allocator runs, optimizer
    steps, checkpoints) whose state carries from step to step.
    """

    name: str
    run: Callable[[Any, str], Mapping[str, Any]]
    reference: Callable[[str], Mapping[str, Any]]
    tol: dict[str, float]
    backends: frozenset[str] | None = None
    stateful: bool = False
    origin: str = field(default="cases", compare=False)


# ---------------------------------------------------------------------------
# helpers (the shared ones are in common.py)
# ---------------------------------------------------------------------------


def _mask_array(pattern: Mapping[str, Sequence[bool]] | None, names: Sequence[str], r: int) -> np.ndarray:
    """A rank pattern as a ``(modules, r)`` bool array (all kept when there is none yet)."""
    if not pattern:
        return np.ones((len(names), r), dtype=bool)
    keys = {f"{n}.lora_E" for n in names}
    if set(pattern) != keys:
        raise AssertionError(f"rank pattern keys {sorted(pattern)} != {sorted(keys)}")
    return np.array([[bool(v) for v in pattern[f"{n}.lora_E"]] for n in names], dtype=bool)


# ---------------------------------------------------------------------------
# SVD triplet: forward, backward, delta_weight, merge, unmerge
# ---------------------------------------------------------------------------

_SCALING = 8.0  # PEFT's default lora_alpha


def _triplet_inputs(seed: int, dtype: str, batch: tuple[int, ...], n_in: int, n_out: int, r: int,
                    fan_in_fan_out: bool = False) -> dict[str, np.ndarray]:
    d = _Draw(seed, dtype)
    return {
        "x": d.normal((*batch, n_in)),
        "A": d.normal((r, n_in), 0.5),
        "E": d.normal((r, 1)),
        "B": d.normal((n_out, r), 0.5),
        "g": d.normal((*batch, n_out)),
        "W": d.normal((n_in, n_out) if fan_in_fan_out else (n_out, n_in)),
    }


def _triplet_cases() -> list[Case]:
    from adalora_core import triplet as T

    cases = []
    n_in, n_out, r = 16, 12, 6

    def ranknum(b: Any, dtype: str, as_array: bool) -> Any:
        return _dev(b, [float(r)], dtype) if as_array else float(r)

    def forward_case(tag: str, seed: int, batch: tuple[int, ...], as_array: bool = False) -> Case:
        def run(b, dtype):
            t = _triplet_inputs(seed, dtype, batch, n_in, n_out, r)
            x, A, E, B = (_dev(b, t[k], dtype) for k in "xAEB")
            y = T.forward(x, A, E, B, _SCALING, ranknum(b, dtype, as_array))
            return {"y": _host(b, y, dtype, "forward")}

        def ref(dtype):
            t = _triplet_inputs(seed, dtype, batch, n_in, n_out, r)
            return {"y": R.triplet_forward(t["x"], t["A"], t["E"], t["B"], _SCALING, float(r))}

        return Case(f"triplet.forward.{tag}", run, ref, TOL)

    def backward_case(tag: str, seed: int, batch: tuple[int, ...]) -> Case:
        def run(b, dtype):
            t = _triplet_inputs(seed, dtype, batch, n_in, n_out, r)
            g, x, A, E, B = (_dev(b, t[k], dtype) for k in "gxAEB")
            out = T.backward(g, x, A, E, B, _SCALING, float(r))
            return {k: _host(b, v, dtype, f"backward d{k}") for k, v in zip(("dx", "dA", "dE", "dB"), out)}

        def ref(dtype):
            t = _triplet_inputs(seed, dtype, batch, n_in, n_out, r)
            out = R.triplet_backward(t["g"], t["x"], t["A"], t["E"], t["B"], _SCALING, float(r))
            return dict(zip(("dx", "dA", "dE", "dB"), out))

        return Case(f"triplet.backward.{tag}", run, ref, TOL)

    def weight_case(op: str, fifo: bool, seed: int) -> Case:
        tag = "fan_in_fan_out" if fifo else "linear"

        def run(b, dtype):
            t = _triplet_inputs(seed, dtype, (1,), n_in, n_out, r, fifo)
            W, A, E, B = (_dev(b, t[k], dtype) for k in "WAEB")
            if op == "delta_weight":
                out = T.delta_weight(A, E, B, _SCALING, float(r), fifo)
            elif op == "merge":
                out = T.merge(W, A, E, B, _SCALING, float(r), fifo)
            elif op == "unmerge":
                out = T.unmerge(W, A, E, B, _SCALING, float(r), fifo)
            else:  # merge then unmerge: back to W up to rounding
                out = T.unmerge(T.merge(W, A, E, B, _SCALING, float(r), fifo), A, E, B, _SCALING, float(r), fifo)
            return {"W": _host(b, out, dtype, op)}

        def ref(dtype):
            t = _triplet_inputs(seed, dtype, (1,), n_in, n_out, r, fifo)
            args = (t["A"], t["E"], t["B"], _SCALING, float(r), fifo)
            if op == "delta_weight":
                return {"W": R.delta_weight(*args)}
            if op == "merge":
                return {"W": R.merge(t["W"], *args)}
            if op == "unmerge":
                return {"W": R.unmerge(t["W"], *args)}
            return {"W": t["W"]}

        return Case(f"triplet.{op}.{tag}", run, ref, TOL)

    cases.append(forward_case("n", 101, (5,)))
    cases.append(forward_case("2x3", 102, (2, 3)))
    cases.append(forward_case("ranknum_array", 103, (4,), as_array=True))
    cases.append(backward_case("n", 104, (5,)))
    cases.append(backward_case("2x3", 105, (2, 3)))
    for i, op in enumerate(("delta_weight", "merge", "unmerge", "merge_unmerge")):
        for fifo in (False, True):
            cases.append(weight_case(op, fifo, 110 + 2 * i + fifo))
    return cases


# ---------------------------------------------------------------------------
# orthogonal regulariser
# ---------------------------------------------------------------------------

_ORTH_SHAPES = ((4, 10, 8), (6, 6, 12), (3, 16, 5), (8, 5, 9))  # (r, in, out); the last has r > in


def _orth_pairs(seed: int, dtype: str, exact_first: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    d = _Draw(seed, dtype)
    pairs = [(d.normal((r, i), 0.3), d.normal((o, r), 0.3)) for r, i, o in _ORTH_SHAPES]
    if exact_first:  # A A^T = I and B^T B = I exactly: the norm is 0, so is its gradient
        r, i, o = 3, 5, 7
        pairs.insert(0, (np.eye(r, i), np.eye(o, r)))
    return pairs


def _orth_cases() -> list[Case]:
    from adalora_core import orth as O

    def make(tag: str, seed: int, exact_first: bool) -> list[Case]:
        def inputs(b, dtype):
            return [(_dev(b, A, dtype), _dev(b, B, dtype)) for A, B in _orth_pairs(seed, dtype, exact_first)]

        def run_value(b, dtype):
            return {"orth": _host(b, O.orth_reg(inputs(b, dtype)), dtype, "orth_reg")}

        def ref_value(dtype):
            return {"orth": np.array(R.orth_reg(_orth_pairs(seed, dtype, exact_first)))}

        def run_grad(b, dtype):
            out = {}
            for i, (gA, gB) in enumerate(O.orth_reg_grad(inputs(b, dtype))):
                out[f"dA{i}"] = _host(b, gA, dtype, f"orth_reg_grad dA{i}")
                out[f"dB{i}"] = _host(b, gB, dtype, f"orth_reg_grad dB{i}")
            return out

        def ref_grad(dtype):
            out = {}
            for i, (gA, gB) in enumerate(R.orth_reg_grad(_orth_pairs(seed, dtype, exact_first))):
                out[f"dA{i}"], out[f"dB{i}"] = gA, gB
            return out

        return [Case(f"orth.value.{tag}", run_value, ref_value, TOL),
                Case(f"orth.grad.{tag}", run_grad, ref_grad, TOL)]

    return make("random", 201, False) + make("zero_residual", 202, True)


# ---------------------------------------------------------------------------
# budget schedule (exact)
# ---------------------------------------------------------------------------

# The spec's worked example (init 8, target 4, tinit 2, tfinal 3, T 12, deltaT 2).
_SPEC_TABLE = {0: (8, False), 1: (8, False), 2: (8, False), 3: (6, False), 4: (5, True),
               5: (4, False), 6: (4, True), 7: (4, False), 8: (4, True), 9: (4, False)}

# tag -> (ranks, init_r, target_r, tinit, tfinal, total_step, deltaT)
_SCHEDULES: dict[str, tuple[dict[str, int], int, int, int, int, int, int]] = {
    "spec_example": ({"a": 4, "b": 4}, 4, 2, 2, 3, 12, 2),
    "peft_defaults": ({"q": 12, "k": 12, "v": 12}, 12, 8, 0, 0, 10, 1),
    "long_deltaT10": ({f"m{i}": 12 for i in range(6)}, 12, 4, 100, 200, 1000, 10),
    "target_zero": ({f"m{i}": 6 for i in range(5)}, 6, 0, 5, 8, 44, 3),
    "no_op": ({"a": 8, "b": 8}, 8, 8, 3, 4, 20, 1),
    "pruned_ranks": ({"a": 3, "b": 5, "c": 0}, 6, 2, 4, 6, 30, 4),
}


def _schedule_cases() -> list[Case]:
    from adalora_core import AdaLoraConfig, RankAllocator
    from adalora_core.schedule import budget_schedule

    def make(tag: str) -> Case:
        ranks, init_r, target_r, tinit, tfinal, T, dT = _SCHEDULES[tag]
        init_bgt, target_bgt = sum(ranks.values()), target_r * len(ranks)

        def table(fn: Callable[[int], tuple[int, bool]]) -> np.ndarray:
            rows = []
            for step in range(T + 3):
                budget, mask = fn(step)
                if type(budget) is not int or type(mask) is not bool:
                    raise AssertionError(f"step {step}: got ({budget!r}, {mask!r}), expected (int, bool)")
                rows.append((budget, int(mask)))
            return np.array(rows, dtype=np.int64)

        def run(b, dtype):
            cfg = AdaLoraConfig(total_step=T, init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal,
                                deltaT=dT)
            alloc = RankAllocator(cfg, ranks, backend=b)
            return {
                "function": table(lambda s: budget_schedule(s, init_bgt=init_bgt, target_bgt=target_bgt,
                                                            tinit=tinit, tfinal=tfinal, total_step=T,
                                                            deltaT=dT)),
                "allocator": table(alloc.budget_at),
            }

        def ref(dtype):
            tab = table(lambda s: R.budget_schedule(s, init_bgt, target_bgt, tinit, tfinal, T, dT))
            if tag == "spec_example":  # the referee itself must reproduce the spec's table
                for s in range(T + 3):
                    want = _SPEC_TABLE.get(s, (4, True))
                    if tuple(tab[s]) != (want[0], int(want[1])):
                        raise AssertionError(f"reference disagrees with the spec at step {s}: {tab[s]} != {want}")
            return {"function": tab, "allocator": tab}

        return Case(f"schedule.{tag}", run, ref, EXACT)

    return [make(tag) for tag in _SCHEDULES]


# ---------------------------------------------------------------------------
# importance EMAs, scores, thresholds
# ---------------------------------------------------------------------------

_EMA_SHAPES = ((6, 10), (6, 1), (12, 6), (4, 7), (4, 1), (5, 4))


def _ema_inputs(seed: int, dtype: str, steps: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    d = _Draw(seed, dtype)
    seq = []
    for t in range(steps):
        row = []
        for shape in _EMA_SHAPES:
            p, g = d.normal(shape), d.normal(shape, 0.5 * (1 + t % 3))
            p[0, 0] = 0.0  # an exact zero importance
            row.append((p, g))
        seq.append(row)
    return seq


def _ema_cases() -> list[Case]:
    from adalora_core import allocator as AL

    def make(tag: str, seed: int, beta1: float, beta2: float, steps: int = 10) -> Case:
        def run(b, dtype):
            op = b.op("ema_update", AL.ema_update)
            ms = [b.zeros(s, dtype=dtype) for s in _EMA_SHAPES]
            us = [b.zeros(s, dtype=dtype) for s in _EMA_SHAPES]
            hist: dict[str, list[np.ndarray]] = {}
            for row in _ema_inputs(seed, dtype, steps):
                ipts = [AL.importance(_dev(b, p, dtype), _dev(b, g, dtype)) for p, g in row]
                ms, us = op(ms, us, ipts, beta1, beta2)
                ms, us = list(ms), list(us)
                for i, (m, u) in enumerate(zip(ms, us)):
                    hist.setdefault(f"m{i}", []).append(_host(b, m, dtype, f"ema m{i}"))
                    hist.setdefault(f"u{i}", []).append(_host(b, u, dtype, f"ema u{i}"))
            return {k: np.stack(v) for k, v in hist.items()}

        def ref(dtype):
            ms = [np.zeros(s) for s in _EMA_SHAPES]
            us = [np.zeros(s) for s in _EMA_SHAPES]
            hist: dict[str, list[np.ndarray]] = {}
            for row in _ema_inputs(seed, dtype, steps):
                for i, (p, g) in enumerate(row):
                    ms[i], us[i] = R.ema_update(ms[i], us[i], p, g, beta1, beta2)
                    hist.setdefault(f"m{i}", []).append(ms[i])
                    hist.setdefault(f"u{i}", []).append(us[i])
            return {k: np.stack(v) for k, v in hist.items()}

        return Case(f"ema.{tag}", run, ref, TOL, stateful=True)

    return [make("peft_betas", 301, 0.85, 0.85), make("mixed_betas", 302, 0.5, 0.99)]


_SCORE_DIMS = ((6, 10, 8), (6, 4, 16), (3, 12, 5), (8, 7, 7))  # (r, in, out)


def _score_inputs(seed: int, dtype: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    d = _Draw(seed, dtype)
    return [(d.uniform((r, i), 0, 1), d.uniform((r, 1), 0, 1), d.uniform((o, r), 0, 1)) for r, i, o in _SCORE_DIMS]


# Exactly representable tied scores (multiples of 1/16) in three modules.
_TIED = (np.array([3, 5, 5, 1, 8, 5]) / 16, np.array([5, 2, 2, 9]) / 16, np.array([1, 1, 5, 7, 3, 8]) / 16)
# Element scores whose triplet scores tie exactly (means over power-of-two sizes of multiples of 1/16).
_TIED_PARTS = (
    (np.array([[1, 3], [2, 2], [0, 4], [4, 4]]) / 16, np.array([[2], [2], [1], [0]]) / 16,
     np.array([[1, 1, 2, 0], [3, 1, 1, 2], [0, 2, 2, 4], [1, 1, 1, 1]]).T / 16),
    (np.array([[2, 2], [0, 0], [3, 3]]) / 16, np.array([[2], [3], [1]]) / 16,
     np.array([[2, 2, 2, 2], [1, 1, 1, 1], [4, 0, 0, 0]]).T / 16),
)


def _score_cases() -> list[Case]:
    from adalora_core import allocator as AL

    def run_scores(b, dtype):
        out = {}
        for i, (sA, sE, sB) in enumerate(_score_inputs(401, dtype)):
            s = AL.triplet_scores(_dev(b, sA, dtype), _dev(b, sE, dtype), _dev(b, sB, dtype))
            out[f"score{i}"] = _host(b, s, dtype, f"triplet_scores {i}")
        return out

    def ref_scores(dtype):
        return {f"score{i}": R.triplet_scores(*t) for i, t in enumerate(_score_inputs(401, dtype))}

    def sweep(b, dtype, scores: list[Any], Es: list[Any]) -> dict[str, np.ndarray]:
        """Threshold, keep masks and masked E for every k from 0 (no pruning) to all."""
        n = sum(int(s.shape[0]) for s in scores)
        thr, keep, masked = [], [], []
        for k in range(n + 1):
            t = AL.kth_threshold(scores, k)
            thr.append(-math.inf if t is None else float(_host(b, t, dtype, "threshold")))
            ks = [AL.keep_mask(s, t) for s in scores]
            keep.append(np.concatenate([_host(b, m, None, "keep_mask") for m in ks]))
            masked.append(np.concatenate([_host(b, AL.apply_mask(E, m), dtype, "apply_mask").reshape(-1)
                                          for E, m in zip(Es, ks)]))
        return {"threshold": np.array(thr), "keep": np.array(keep, dtype=bool), "E": np.array(masked)}

    def ref_sweep(scores: list[np.ndarray], Es: list[np.ndarray]) -> dict[str, np.ndarray]:
        flat_s, flat_E = np.concatenate(scores), np.concatenate([E.reshape(-1) for E in Es])
        thr, keep, masked = [], [], []
        for k in range(flat_s.size + 1):
            t = R.kth_threshold(scores, k)
            kp = np.array([not (float(s) <= t) for s in flat_s], dtype=bool)
            thr.append(t)
            keep.append(kp)
            masked.append(np.where(kp, flat_E, 0.0))
        return {"threshold": np.array(thr), "keep": np.array(keep, dtype=bool), "E": np.array(masked)}

    def tied_Es(dtype, sizes):
        d = _Draw(403, dtype)
        return [d.signed((n, 1)) for n in sizes]

    def run_ties(b, dtype):
        scores = [_dev(b, s, dtype) for s in _TIED]
        Es = [_dev(b, E, dtype) for E in tied_Es(dtype, [s.size for s in _TIED])]
        return sweep(b, dtype, scores, Es)

    def ref_ties(dtype):
        return ref_sweep([np.array(s) for s in _TIED], tied_Es(dtype, [s.size for s in _TIED]))

    def run_ties_scores(b, dtype):
        scores = [AL.triplet_scores(*(_dev(b, t, dtype) for t in parts)) for parts in _TIED_PARTS]
        Es = [_dev(b, E, dtype) for E in tied_Es(dtype, [p[1].shape[0] for p in _TIED_PARTS])]
        out = sweep(b, dtype, scores, Es)
        out["scores"] = np.concatenate([_host(b, s, dtype, "triplet_scores") for s in scores])
        return out

    def ref_ties_scores(dtype):
        scores = [R.triplet_scores(*parts) for parts in _TIED_PARTS]
        flat = np.concatenate(scores)
        if len(set(flat.tolist())) == flat.size:
            raise AssertionError("case design: these scores were meant to tie")
        out = ref_sweep(scores, tied_Es(dtype, [p[1].shape[0] for p in _TIED_PARTS]))
        out["scores"] = flat
        return out

    return [
        Case("scores.random", run_scores, ref_scores, TOL),
        Case("threshold.ties", run_ties, ref_ties, EXACT),
        Case("threshold.ties_from_scores", run_ties_scores, ref_ties_scores, EXACT),
    ]


# ---------------------------------------------------------------------------
# whole allocator runs with scripted gradients
# ---------------------------------------------------------------------------

_MODULES = (  # (name, in, out)
    ("model.layers.0.self_attn.q_proj", 8, 12),
    ("model.layers.0.self_attn.v_proj", 16, 8),
    ("model.layers.0.mlp.fc1", 10, 10),
    ("model.layers.1.self_attn.q_proj", 12, 20),
    ("model.layers.1.mlp.fc2", 6, 14),
)
# Per-module gradient scales: a factor of about 2 between neighbours in score
# (scores grow like the square of the gradient scale), interleaved so that the
# final pattern mixes kept and pruned triplets within modules.
_MODULE_SCALE = (1.0, 1.45, 0.7, 2.0, 0.85)


@dataclass(frozen=True)
class _Script:
    """A scripted training run: weights drift, E is revived by the "optimizer", gradients are scaled per triplet."""

    seed: int
    init_r: int
    target_r: int
    tinit: int
    tfinal: int
    total_step: int
    deltaT: int
    beta1: float = 0.85
    beta2: float = 0.85
    steps: tuple[int, ...] | None = None  # default: 0..total_step
    nonfinite: tuple[tuple[int, int, str, float], ...] = ()  # (step, module, part, value)
    missing: tuple[tuple[int, int | None], ...] = ()  # (step, module) whose gradient is None; None: all
    partial: tuple[tuple[int, int, str], ...] = ()  # (step, module, part) whose gradient alone is None
    resume_at: tuple[int, ...] = ()  # save/load the allocator state after these steps, switching backend

    @property
    def names(self) -> list[str]:
        return [m[0] for m in _MODULES]

    @property
    def call_steps(self) -> list[int]:
        return list(self.steps) if self.steps is not None else list(range(self.total_step + 1))

    def config(self) -> Any:
        from adalora_core import AdaLoraConfig

        return AdaLoraConfig(total_step=self.total_step, init_r=self.init_r, target_r=self.target_r,
                             tinit=self.tinit, tfinal=self.tfinal, deltaT=self.deltaT,
                             beta1=self.beta1, beta2=self.beta2)

    def base(self, dtype: str) -> dict[str, Any]:
        rng = np.random.default_rng(self.seed)
        r = self.init_r
        base = {}
        for (name, n_in, n_out), s in zip(_MODULES, _MODULE_SCALE):
            factor = 1.0 + 0.35 * rng.permutation(r)  # well-separated per-triplet scales
            d = _Draw(rng.integers(2**31), dtype)
            base[name] = {"A": d.signed((r, n_in)), "E": d.signed((r, 1)), "B": d.signed((n_out, r)),
                          "c": s * factor}
        return base

    def step_inputs(self, base: dict[str, Any], t: int, E_prev: Mapping[str, np.ndarray] | None, dtype: str
                    ) -> tuple[dict[str, tuple[np.ndarray, ...]], dict[str, tuple[np.ndarray | None, ...] | None]]:
        """Weights (after the optimizer step) and gradients of step ``t``, host float64 rounded to dtype."""
        rng = np.random.default_rng([self.seed, t])
        params: dict[str, tuple[np.ndarray, ...]] = {}
        grads = {}
        for name in self.names:
            bm = base[name]
            A = _round(bm["A"] + 0.02 * rng.normal(size=bm["A"].shape), dtype)
            B = _round(bm["B"] + 0.02 * rng.normal(size=bm["B"].shape), dtype)
            noise_E = 0.1 * rng.normal(size=bm["E"].shape)
            E = bm["E"] if E_prev is None else _round(E_prev[name] + noise_E, dtype)
            c = bm["c"]

            def grad(shape, scale):
                mag = rng.uniform(0.5, 1.5, size=shape)
                sign = np.where(rng.random(size=shape) < 0.5, -1.0, 1.0)
                return _round(scale * mag * sign, dtype)

            gA = grad(A.shape, c[:, None])
            gE = grad(E.shape, c[:, None])
            gB = grad(B.shape, c[None, :])
            params[name] = (A, E, B)
            grads[name] = [gA, gE, gB]
        idx = {"A": 0, "E": 1, "B": 2}
        for step, m, part, value in self.nonfinite:
            if step == t:
                g = grads[self.names[m]][idx[part]].copy()
                g.flat[0] = value
                grads[self.names[m]][idx[part]] = g
        for step, m, part in self.partial:
            if step == t:
                grads[self.names[m]][idx[part]] = None
        out_grads: dict[str, tuple[np.ndarray | None, ...] | None] = {n: tuple(g) for n, g in grads.items()}
        for step, mod in self.missing:
            if step == t:
                if mod is None:
                    out_grads = {}
                else:
                    out_grads.pop(self.names[mod], None)
        return params, out_grads


def _check_separation(scores: Mapping[str, np.ndarray], k: int, step: int) -> None:
    """The reference's k-th and (k+1)-th scores must be far apart (no threshold flips in float32)."""
    flat = np.sort(np.concatenate([np.asarray(s).reshape(-1) for s in scores.values()]))
    if 0 < k < flat.size:
        lo, hi = flat[k - 1], flat[k]
        if not (hi - lo) > 1e-3 * max(abs(hi), 1e-30):
            raise AssertionError(f"case design: near-tie at the threshold of step {step}: {lo!r} vs {hi!r}")


def _alloc_reference(script: _Script, dtype: str) -> dict[str, np.ndarray]:
    """The reference run, with the score-separation check done on the scores used at each mask."""
    names, r = script.names, script.init_r
    ref = R.ReferenceAllocator(script.init_r, script.target_r, script.tinit, script.tfinal, script.total_step,
                               script.deltaT, script.beta1, script.beta2, {n: r for n in names})
    base = script.base(dtype)
    E_prev = None
    rec: dict[str, list[Any]] = {"masks": [], "budget": []}
    prev_scores: dict[str, np.ndarray] | None = None
    for t in script.call_steps:
        params, grads = script.step_inputs(base, t, E_prev, dtype)
        was_final = ref.finalized
        Es = ref.update_and_allocate(t, params, grads)
        if not was_final:
            if ref.finalized:  # scores as they stood before this call
                assert prev_scores is not None
                _check_separation(prev_scores, ref.init_bgt - ref.target_bgt, t)
            elif ref.budget_schedule(t)[1]:
                assert ref.last_budget is not None
                _check_separation(ref.scores(), ref.init_bgt - ref.last_budget, t)
        if not ref.finalized:
            prev_scores = ref.scores()
            for n in names:
                rec.setdefault(f"scores.{n}", []).append(prev_scores[n])
        for n in names:
            rec.setdefault(f"E.{n}", []).append(Es[n].reshape(-1))
        rec["masks"].append(_mask_array(ref.rank_pattern, names, r))
        rec["budget"].append(ref.last_budget)
        E_prev = Es
    out = {k: np.array(v) for k, v in rec.items()}
    out["budget"] = out["budget"].astype(np.int64)
    out["final_pattern"] = _mask_array(ref.rank_pattern, names, r)
    out["current_ranks"] = out["final_pattern"].sum(axis=1).astype(np.int64)
    out["skipped_steps"] = np.array([ref.skipped_steps], dtype=np.int64)
    return out


def _roundtrip_state(alloc: Any, src: Any, dst: Any, dtype: str, cfg: Any, ranks: dict[str, int]) -> Any:
    """``alloc``'s state through save_arrays/load_arrays, into a fresh allocator on ``dst``."""
    from adalora_core import RankAllocator, load_arrays, save_arrays

    arrays, meta = alloc.state_dict()
    host = {k: _host(src, v, dtype if k.startswith("ema") else None, f"state {k}") for k, v in arrays.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "allocator.safetensors"
        save_arrays(path, arrays, meta)
        loaded, meta2 = load_arrays(path, convert=dst.asarray)
    if set(loaded) != set(host):
        raise AssertionError(f"state keys changed in the round trip: {sorted(set(loaded) ^ set(host))}")
    for k, v in loaded.items():
        back = _host(dst, v, dtype if k.startswith("ema") else None, f"loaded state {k}")
        if back.dtype != host[k].dtype or not np.array_equal(back, host[k]):
            raise AssertionError(f"state array {k!r} changed in the round trip")
    if json.loads(json.dumps(meta)) != meta2:
        raise AssertionError(f"state metadata changed in the round trip: {meta} -> {meta2}")
    fresh = RankAllocator(cfg, ranks, backend=dst)
    fresh.load_state_dict(loaded, meta2)
    return fresh


def _alloc_run(script: _Script, b: Any, dtype: str) -> dict[str, np.ndarray]:
    from adalora_core import RankAllocator, Triplet

    names, r = script.names, script.init_r
    ranks = {n: r for n in names}
    cfg = script.config()
    alloc = RankAllocator(cfg, ranks, backend=b)
    base = script.base(dtype)
    E_prev = None
    rec: dict[str, list[Any]] = {"masks": [], "budget": []}
    cur, notes = b, []
    for t in script.call_steps:
        params_h, grads_h = script.step_inputs(base, t, E_prev, dtype)
        params = {n: Triplet(*(_dev(cur, a, dtype) for a in params_h[n])) for n in names}
        grads = {n: (None if g is None else Triplet(*(None if a is None else _dev(cur, a, dtype) for a in g)))
                 for n, g in grads_h.items()}
        Es = alloc.update_and_allocate(t, params, grads)
        E_host = {n: _host(cur, Es[n], dtype, f"E of {n} at step {t}") for n in names}
        if not alloc.finalized:
            sc = alloc.scores()
            for n in names:
                s = _host(cur, sc[n], dtype, f"scores of {n}") if n in sc else np.zeros(r)
                rec.setdefault(f"scores.{n}", []).append(s)
        for n in names:
            rec.setdefault(f"E.{n}", []).append(E_host[n].reshape(-1))
        rec["masks"].append(_mask_array(alloc.rank_pattern, names, r))
        rec["budget"].append(alloc.budget)
        E_prev = {n: E_host[n].astype(np.float64) for n in names}
        if t in script.resume_at:
            nxt = _partner(cur) if cur is b else b
            alloc = _roundtrip_state(alloc, cur, nxt, dtype, cfg, ranks)
            notes.append(f"{_spec_name(cur)}->{_spec_name(nxt)} after step {t}")
            cur = nxt
    out: dict[str, Any] = {k: np.array(v) for k, v in rec.items()}
    out["budget"] = out["budget"].astype(np.int64)
    out["final_pattern"] = _mask_array(alloc.rank_pattern, names, r)
    cr = alloc.current_ranks()
    out["current_ranks"] = np.array([cr[n] for n in names], dtype=np.int64)
    out["skipped_steps"] = np.array([alloc.skipped_steps], dtype=np.int64)
    if notes:
        out["_note"] = "state " + ", ".join(notes)
    return out


_SCRIPTS: dict[str, _Script] = {
    # warm-up 0..5, cubic budgeting masked every 3rd step, final allocation at T_f = 36, replay to 44
    "allocator.run.deltaT3": _Script(seed=501, init_r=6, target_r=3, tinit=5, tfinal=8, total_step=44, deltaT=3),
    # no warm-up, mask every step, final allocation at T_f = total_step
    "allocator.run.deltaT1": _Script(seed=502, init_r=4, target_r=2, tinit=0, tfinal=0, total_step=40, deltaT=1),
    # steps jump over T_f = 38: the final allocation happens at the first step past it (37 -> 41)
    "allocator.run.skip_Tf": _Script(seed=503, init_r=5, target_r=1, tinit=3, tfinal=12, total_step=50, deltaT=2,
                                     beta1=0.7, beta2=0.9,
                                     steps=tuple(range(36)) + (37, 41, 42, 45, 50)),
    # non-finite gradients (whole step skipped, counted), a module without gradients, a step without any
    "allocator.run.nonfinite_missing": _Script(
        seed=504, init_r=6, target_r=2, tinit=4, tfinal=6, total_step=42, deltaT=2,
        nonfinite=((3, 1, "A", math.nan), (7, 0, "E", math.inf), (12, 2, "B", -math.inf), (13, 4, "A", math.nan)),
        missing=((5, 3), (9, None), (20, 0), (21, 0))),
    # only one tensor of a module has no gradient (a frozen E, say)
    "allocator.run.partial_grads": _Script(
        seed=505, init_r=6, target_r=3, tinit=4, tfinal=6, total_step=42, deltaT=2,
        partial=((6, 2, "E"), (7, 2, "E"), (10, 4, "B"), (11, 1, "A"))),
    # the allocator state saved mid-budgeting on one backend, resumed on another, and back after the final mask
    "checkpoint.allocator_state.resume": _Script(seed=501, init_r=6, target_r=3, tinit=5, tfinal=8, total_step=44,
                                                 deltaT=3, resume_at=(20, 38)),
}


def _allocator_cases() -> list[Case]:
    def make(name: str, script: _Script) -> Case:
        def run(b, dtype):
            return _alloc_run(script, b, dtype)

        def ref(dtype):
            return _alloc_reference(script, dtype)

        return Case(name, run, ref, TOL, stateful=True)

    return [make(name, script) for name, script in _SCRIPTS.items()]


# ---------------------------------------------------------------------------
# optimizers
# ---------------------------------------------------------------------------

_OPT_SHAPES = {"A": (4, 6), "E": (4, 1), "B": (5, 4)}


def _opt_inputs(seed: int, dtype: str, steps: int):
    d = _Draw(seed, dtype)
    params = {k: d.normal(s) for k, s in _OPT_SHAPES.items()}
    grads = [{k: d.normal(s, 0.1 * (1 + t)) for k, s in _OPT_SHAPES.items()} for t in range(steps)]
    return params, grads


def _optim_cases() -> list[Case]:
    from adalora_core import SGD, Adam

    def adam_case(tag: str, seed: int, kw: dict[str, float], missing: dict[int, set[str]], steps: int = 6) -> Case:
        def run(b, dtype):
            p0, gs = _opt_inputs(seed, dtype, steps)
            opt = Adam(**kw)
            params = {k: _dev(b, v, dtype) for k, v in p0.items()}
            state = opt.init(params)
            hist: dict[str, list[np.ndarray]] = {}
            for t, g in enumerate(gs):
                grads = {k: (None if k in missing.get(t, ()) else _dev(b, v, dtype)) for k, v in g.items()}
                params, state = opt.step(params, grads, state)
                for k, v in params.items():
                    hist.setdefault(f"param.{k}", []).append(_host(b, v, dtype, f"param {k}"))
            out = {k: np.stack(v) for k, v in hist.items()}
            for k in _OPT_SHAPES:
                out[f"m.{k}"] = _host(b, state[f"m.{k}"], dtype, f"m.{k}")
                out[f"v.{k}"] = _host(b, state[f"v.{k}"], dtype, f"v.{k}")
            return out

        def ref(dtype):
            # torch.optim.Adam semantics: a parameter without a gradient is skipped
            # entirely, and its own step count (bias correction) does not advance.
            p, gs = _opt_inputs(seed, dtype, steps)
            m = {k: np.zeros(s) for k, s in _OPT_SHAPES.items()}
            v = {k: np.zeros(s) for k, s in _OPT_SHAPES.items()}
            count = dict.fromkeys(_OPT_SHAPES, 0)
            hist: dict[str, list[np.ndarray]] = {}
            for t, g in enumerate(gs):
                for k in _OPT_SHAPES:
                    if k not in missing.get(t, ()):
                        count[k] += 1
                        p[k], m[k], v[k] = R.adam_step(p[k], g[k], m[k], v[k], count[k], **kw)
                    hist.setdefault(f"param.{k}", []).append(p[k])
            out = {k: np.stack(val) for k, val in hist.items()}
            for k in _OPT_SHAPES:
                out[f"m.{k}"], out[f"v.{k}"] = m[k], v[k]
            return out

        return Case(f"optim.adam.{tag}", run, ref, TOL, stateful=True)

    def run_sgd(b, dtype):
        p0, gs = _opt_inputs(601, dtype, 5)
        opt = SGD(lr=0.05)
        params = {k: _dev(b, v, dtype) for k, v in p0.items()}
        state = opt.init(params)
        hist: dict[str, list[np.ndarray]] = {}
        for t, g in enumerate(gs):
            grads = {k: (None if (t == 2 and k == "E") else _dev(b, v, dtype)) for k, v in g.items()}
            params, state = opt.step(params, grads, state)
            for k, v in params.items():
                hist.setdefault(f"param.{k}", []).append(_host(b, v, dtype, f"param {k}"))
        return {k: np.stack(v) for k, v in hist.items()}

    def ref_sgd(dtype):
        p, gs = _opt_inputs(601, dtype, 5)
        hist: dict[str, list[np.ndarray]] = {}
        for t, g in enumerate(gs):
            for k in _OPT_SHAPES:
                if not (t == 2 and k == "E"):
                    p[k] = R.sgd_step(p[k], g[k], 0.05)
                hist.setdefault(f"param.{k}", []).append(p[k])
        return {k: np.stack(v) for k, v in hist.items()}

    return [
        adam_case("defaults", 602, {"lr": 1e-2}, {}),
        adam_case("betas_weight_decay", 603, {"lr": 3e-3, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6,
                                              "weight_decay": 0.01}, {}),
        adam_case("missing_grad", 604, {"lr": 1e-2}, {1: {"E"}, 2: {"E", "B"}}),
        Case("optim.sgd", run_sgd, ref_sgd, TOL, stateful=True),
    ]


# ---------------------------------------------------------------------------
# checkpoints across backends
# ---------------------------------------------------------------------------

_ADAPTER_MODULES = {  # name -> (in, out, rank pattern or None)
    "model.layers.0.self_attn.q_proj": (8, 6, [True, False, True, True]),
    "model.layers.0.self_attn.v_proj": (8, 6, [False, False, False, False]),  # everything pruned: r_i = 0
    "model.layers.0.mlp.fc1": (8, 12, None),  # no pattern entry: full rank
    "model.layers.1.mlp.fc2": (12, 8, [False, True, False, True]),
}


def _adapter_inputs(seed: int, dtype: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    d = _Draw(seed, dtype)
    return {n: (d.normal((4, i)), d.normal((4, 1)), d.normal((o, 4))) for n, (i, o, _) in _ADAPTER_MODULES.items()}


def _checkpoint_cases() -> list[Case]:
    from adalora_core import AdaLoraConfig, Triplet, load_adapter, save_adapter

    cfg = AdaLoraConfig(total_step=100, init_r=4, target_r=2, lora_alpha=16, tinit=10, tfinal=20, deltaT=5,
                        target_modules=["q_proj", "v_proj", "fc1", "fc2"])
    pattern = {f"{n}.lora_E": p for n, (_, _, p) in _ADAPTER_MODULES.items() if p is not None}

    def make(tag: str, seed: int, with_shapes: bool) -> Case:
        def run(b, dtype):
            weights = {n: Triplet(*(_dev(b, t, dtype) for t in trip)) for n, trip in _adapter_inputs(seed, dtype).items()}
            shapes = {n: (i, o) for n, (i, o, _) in _ADAPTER_MODULES.items()} if with_shapes else None
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "adapter"
                save_adapter(path, cfg, weights, rank_pattern=pattern)
                loaded = {}
                for target in _available_cycle():  # every backend reads it; all must agree exactly
                    loaded[target] = load_adapter(path, shapes=shapes, convert=target.asarray)
            reader = _partner(b)
            first: dict[str, np.ndarray] | None = None
            for target, (config, trips) in loaded.items():
                if sorted(trips) != sorted(_ADAPTER_MODULES):
                    raise AssertionError(f"loaded modules {sorted(trips)} != {sorted(_ADAPTER_MODULES)}")
                host = {}
                for n, trip in trips.items():
                    for part, t in zip("AEB", trip):
                        host[f"{n}.lora_{part}"] = _host(target, t, dtype, f"{n}.lora_{part} read by "
                                                         f"{_spec_name(target)}")
                if first is None:
                    first = host
                elif any(not np.array_equal(first[k], host[k]) for k in host):
                    raise AssertionError(f"{_spec_name(target)} read different values than {_spec_name(reader)}")
                if target is reader:
                    out = dict(host)
                    out["config"] = np.array([config.init_r, config.target_r, config.total_step, config.lora_alpha,
                                              config.tinit, config.tfinal, config.deltaT, int(config.inference_mode)],
                                             dtype=np.float64)
                    out["rank_pattern"] = np.array(
                        [config.rank_pattern.get(k, [None] * 4) if config.rank_pattern else [None] * 4
                         for k in sorted(pattern)], dtype=bool)
            out["_note"] = f"written by {_spec_name(b)}, read by {_spec_name(reader)} and {len(loaded) - 1} more"
            return out

        def ref(dtype):
            out = {}
            for n, (A, E, B) in _adapter_inputs(seed, dtype).items():
                mask = _ADAPTER_MODULES[n][2]
                idx = np.flatnonzero(mask) if mask is not None else np.arange(4)
                out[f"{n}.lora_A"], out[f"{n}.lora_E"], out[f"{n}.lora_B"] = A[idx], E[idx], B[:, idx]
            out["config"] = np.array([4, 2, 100, 16, 10, 20, 5, 1], dtype=np.float64)
            out["rank_pattern"] = np.array([pattern[k] for k in sorted(pattern)], dtype=bool)
            return out

        return Case(f"checkpoint.adapter.{tag}", run, ref, EXACT, stateful=True)

    return [make("cross_backend", 701, False), make("cross_backend_shapes", 702, True)]


# ---------------------------------------------------------------------------
# seeded init
# ---------------------------------------------------------------------------


def _random_cases() -> list[Case]:
    from adalora_core.random import init_triplet

    r, n_in, n_out = 6, 256, 200

    def run(b, dtype):
        (A, E, B), ranknum = init_triplet(b.rng(1234), r, n_in, n_out, dtype=dtype)
        (A2, _, B2), _ = init_triplet(b.rng(1234), r, n_in, n_out, dtype=dtype)
        hA, hB = _host(b, A, dtype, "A"), _host(b, B, dtype, "B")
        if not (np.array_equal(hA, _host(b, A2, dtype, "A")) and np.array_equal(hB, _host(b, B2, dtype, "B"))):
            raise AssertionError("the same seed gave different weights")
        for what, h in (("A", hA), ("B", hB)):
            if not (0.015 < float(np.std(h)) < 0.025 and abs(float(np.mean(h))) < 0.005):
                raise AssertionError(f"{what} is not N(0, 0.02): mean {np.mean(h):.4g}, std {np.std(h):.4g}")
        return {"E": _host(b, E, dtype, "E"), "ranknum": _host(b, ranknum, dtype, "ranknum"),
                "shapes": np.array([*A.shape, *E.shape, *B.shape], dtype=np.int64)}

    def ref(dtype):
        return {"E": np.zeros((r, 1)), "ranknum": np.array([float(r)]),
                "shapes": np.array([r, n_in, r, 1, n_out, r], dtype=np.int64)}

    return [Case("random.init_triplet", run, ref, EXACT)]


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------


def adalora_cases() -> list[Case]:
    """The AdaLoRA core cases defined in this module."""
    return [*_triplet_cases(), *_orth_cases(), *_schedule_cases(), *_ema_cases(), *_score_cases(),
            *_allocator_cases(), *_optim_cases(), *_checkpoint_cases(), *_random_cases()]


def as_case(obj: Any, origin: str = "cases") -> Case:
    """A :class:`Case` from a Case or a plain dict (``name, run, reference, tol``, optional ``backends``, ``stateful``)."""
    if isinstance(obj, Case):
        return obj
    if not isinstance(obj, Mapping):
        raise TypeError(f"a case must be a Case or a dict, not {type(obj).__name__}")
    missing = [k for k in ("name", "run", "reference", "tol") if k not in obj]
    if missing:
        raise ValueError(f"case {obj.get('name', '?')!r} lacks {missing}")
    backends = obj.get("backends")
    return Case(
        name=str(obj["name"]),
        run=obj["run"],
        reference=obj["reference"],
        tol={str(k): float(v) for k, v in dict(obj["tol"]).items()},
        backends=None if backends is None else frozenset({str(backends)} if isinstance(backends, str) else backends),
        stateful=bool(obj.get("stateful", False)),
        origin=origin,
    )


_EXTRA = (("cases_microlora", "microlora_cases"), ("cases_peft", "peft_cases"))


def _broken(name: str, message: str, origin: str) -> Case:
    def run(b, dtype):
        raise RuntimeError(message)

    def ref(dtype):
        raise RuntimeError(message)

    return Case(name, run, ref, TOL, origin=origin)


def _load_extra() -> tuple[list[Case], dict[str, str]]:
    cases: list[Case] = []
    status: dict[str, str] = {}
    for module, fn in _EXTRA:
        try:
            mod = importlib.import_module(f"{__package__}.{module}")
            found = getattr(mod, fn)()
        except ImportError as exc:  # the module, or a library it needs (peft, torch), is missing
            status[module] = f"skipped: {type(exc).__name__}: {exc}"
            continue
        except Exception as exc:  # noqa: BLE001 - a broken case module must show up as a failure
            cases.append(_broken(f"{module}.load", f"{fn}() raised {type(exc).__name__}: {exc}", module))
            status[module] = f"error: {fn}() raised {type(exc).__name__}: {exc}"
            continue
        n = 0
        for i, obj in enumerate(found):
            try:
                cases.append(as_case(obj, origin=module))
                n += 1
            except (TypeError, ValueError) as exc:
                cases.append(_broken(f"{module}.case{i}", f"malformed case: {exc}", module))
        status[module] = f"loaded {n} cases"
    return cases, status


def extra_sources() -> dict[str, str]:
    """What happened to each optional case module: ``loaded N cases``, ``skipped: ...`` or ``error: ...``."""
    return _load_extra()[1]


def all_cases() -> list[Case]:
    """Every registered case: the AdaLoRA core cases, then MicroLoRA's and PEFT's when they load."""
    extra, _ = _load_extra()
    cases = [*adalora_cases(), *extra]
    seen: set[str] = set()
    for c in cases:
        if c.name in seen:
            raise ValueError(f"two conformance cases are named {c.name!r}")
        seen.add(c.name)
    return cases


def select(cases: Iterable[Case], pattern: str | Sequence[str] | None) -> list[Case]:
    """Cases whose name contains any of the comma-separated substrings of ``pattern``."""
    if pattern is None:
        return list(cases)
    subs = [p.strip() for p in (pattern.split(",") if isinstance(pattern, str) else pattern) if p.strip()]
    return [c for c in cases if any(s in c.name for s in subs)]
