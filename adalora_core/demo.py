"""The planted-rank demo: AdaLoRA finds which layers need rank.

A chain of ``L`` linear layers (``h <- W_l h``, ``W_l`` orthogonal) is adapted with
AdaLoRA triplets towards a teacher whose layers are the same base weights plus
low-rank perturbations of *different* ranks (1 up to ``init_r``, averaging
``target_r``). The student learns by layer-wise distillation: each layer sees
the teacher's activations and the loss is the sum of the layers' errors (an
end-to-end loss on a linear chain could move a correction from one layer to
its neighbour, so no per-layer rank would be right). One allocator shares one
budget across all layers, which is what is being tested. Training uses only the core: ``triplet.forward``/``backward``
(explicit VJP), the orthogonal regulariser's gradient, functional Adam and the
``RankAllocator``. If the allocator works, the ranks it keeps per layer follow
the planted ranks; the run ends by printing both and their Spearman correlation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import orth, triplet
from .allocator import RankAllocator
from .config import AdaLoraConfig
from .optim import Adam
from .random import init_triplet
from .triplet import Triplet


@dataclass(frozen=True)
class DemoResult:
    planted: list[int]
    final: list[int]
    spearman: float
    loss_start: float
    loss_end: float
    history: list[tuple[int, list[int]]]  # (step, kept triplets per layer): every deltaT steps, every step from T_f
    seconds: float
    config: AdaLoraConfig


PLANTED = (1, 2, 2, 3, 4, 5, 7, 8)  # mean 4 = target_r, spread 1..init_r


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va and vb else 0.0


def _planted_task(backend: Any, dim: int, planted: Sequence[int], seed: int,
                  sv: float = 0.6) -> tuple[list[Any], list[Any]]:
    """Orthogonal base weights and teacher perturbations ``U diag(s) Vᵀ`` of the planted ranks.

    Orthogonal bases keep gradient norms equal through depth, so a layer's
    importance reflects what its perturbation needs, not where it sits.
    """
    xp, rng = backend.xp, backend.rng(seed)
    base, delta = [], []
    for k in planted:
        q, _ = xp.linalg.qr(rng.normal((dim, dim), dtype="float32"))
        base.append(q)
        U, _ = xp.linalg.qr(rng.normal((dim, k), dtype="float32"))
        V, _ = xp.linalg.qr(rng.normal((dim, k), dtype="float32"))
        s = xp.asarray([sv] * k, dtype=xp.float32, device=backend.device)
        delta.append((U * s) @ V.T)
    return base, delta


def run(
    backend: Any = None,
    steps: int = 600,
    dim: int = 32,
    batch: int = 128,
    seed: int = 0,
    log_every: int = 50,
    log: Any = print,
) -> DemoResult:
    from .backends import get_backend

    be = get_backend(backend)
    xp = be.xp
    planted = list(PLANTED)
    L = len(planted)
    cfg = AdaLoraConfig(total_step=steps, init_r=8, target_r=4, tinit=steps // 5, tfinal=steps // 5,
                        deltaT=10, lora_alpha=8, orth_reg_weight=0.1)
    names = [f"layers.{i}" for i in range(L)]
    base, delta = _planted_task(be, dim, planted, seed)
    rng = be.rng(seed + 1)
    params: dict[str, Any] = {}
    ranknum = None
    for n in names:
        trip, ranknum = init_triplet(rng, cfg.init_r, dim, dim, "float32")
        params.update({f"{n}.A": trip.A, f"{n}.E": trip.E, f"{n}.B": trip.B})
    opt = Adam(lr=1e-2)
    state = opt.init(params)
    alloc = RankAllocator(cfg, {n: cfg.init_r for n in names}, backend=be)
    scale = cfg.scaling

    teacher_w = [b + d for b, d in zip(base, delta)]
    history: list[tuple[int, list[int]]] = []
    t0 = time.perf_counter()
    loss_start = loss = float("nan")
    for step in range(steps):
        h = rng.normal((batch, dim), dtype="float32")
        trips = [Triplet(params[f"{n}.A"], params[f"{n}.E"], params[f"{n}.B"]) for n in names]
        orth_g = orth.orth_reg_grad([(t.A, t.B) for t in trips])
        grads: dict[str, Any] = {}
        loss = 0.0
        for i, n in enumerate(names):  # layer-wise distillation on the teacher's activations
            target = h @ teacher_w[i].T
            diff = h @ base[i].T + triplet.forward(h, *trips[i], scale, ranknum) - target
            loss += float(xp.mean(xp.sum(diff * diff, axis=1)))
            tg = triplet.backward(2.0 * diff / batch, h, *trips[i], scale, ranknum)
            ga, gb = orth_g[i]
            grads[f"{n}.A"] = tg.A + cfg.orth_reg_weight * ga
            grads[f"{n}.E"] = tg.E
            grads[f"{n}.B"] = tg.B + cfg.orth_reg_weight * gb
            h = target
        if step == 0:
            loss_start = loss
        params, state = opt.step(params, grads, state)
        new_E = alloc.update_and_allocate(
            step,
            {n: Triplet(params[f"{n}.A"], params[f"{n}.E"], params[f"{n}.B"]) for n in names},
            {n: Triplet(grads[f"{n}.A"], grads[f"{n}.E"], grads[f"{n}.B"]) for n in names},
        )
        for n in names:
            params[f"{n}.E"] = new_E[n]
        ranks = list(alloc.current_ranks().values())
        if step % cfg.deltaT == 0 or step >= cfg.final_step:  # from step 0: the warm-up is part of the picture
            history.append((step, ranks))
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"step {step:4d}  loss {loss:9.5f}  budget {alloc.budget:3d}  ranks {ranks}")
    final = list(alloc.current_ranks().values())
    return DemoResult(planted, final, spearman(planted, final), loss_start, loss, history,
                      time.perf_counter() - t0, cfg)


def figure(res: DemoResult) -> Any:
    """The run as a picture: kept triplets per layer over the steps beside the planted ranks, and the budget."""
    from . import plot

    cfg = res.config
    assert cfg.total_step is not None
    labels = [f"layer {i} (planted {k})" for i, k in enumerate(res.planted)]
    return plot.allocation_figure(res.history, total_steps=cfg.total_step, init_r=cfg.init_r, labels=labels,
                                  planted=res.planted, schedule=plot.scheduled_budget(cfg, len(res.planted)),
                                  marks=plot.phases(cfg), title="AdaLoRA demo: kept triplets per layer")
