"""Planted ranks on a real pretrained transformer: AdaLoRA (this library) against LoRA (PEFT).

The teacher is all-MiniLM-L6-v2 with a low-rank perturbation ``U diag(s) Vᵀ`` of a
known rank (``PLANTED``: 0 up to ``INIT_R``) added to 18 of its linears: the query
and value projections and the first MLP matrix of all six layers. The students
are the unperturbed model with AdaLoRA (``init_r`` 8 pruned to an average of
``target_r`` 4) or with LoRA at rank 4, on the same linears: the same final
number of rank-1 components, and the same number of trainable parameters when
AdaLoRA's final ranks are the planted ones (the planted ranks average 4 over the
attention projections and over the MLP matrices separately). Both are trained
with Adam on the same batches to match the teacher's hidden states (every
layer's output, padding masked out) on sentences of Python's own documentation,
and scored on held-out sentences. Each method gets its best learning rate from
the setting's ``lrs``, chosen on seed 0 by the loss on validation sentences
(taken from the training side, never the held-out ones) and kept for the other
seeds. The perturbations, their ranks and sizes, and the protocol were fixed
before any result was seen.

    python -m experiments.planted_rank --quick                          # a 2-core CPU, a few minutes
    python -m experiments.planted_rank --device cuda --json planted_rank.json --figures docs/img
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

import adalora_core as ac
from adalora_core import plot
from adalora_core.demo import spearman

from .common import encode, environment, finish, load_model, run_jobs, sentences, stats, write_json

INIT_R, TARGET_R = 8, 4
_KINDS = ("attention.self.query", "attention.self.value", "intermediate.dense")
_RANKS = (  # per layer: query, value, MLP in; mean 4 over the 12 attention and over the 6 MLP matrices
    (0, 6, 3),
    (2, 8, 8),
    (5, 0, 0),
    (8, 3, 6),
    (1, 7, 2),
    (4, 4, 5),
)
PLANTED: dict[str, int] = {f"encoder.layer.{i}.{kind}": k
                           for i, ranks in enumerate(_RANKS) for kind, k in zip(_KINDS, ranks)}
SV_SCALE = 1.0  # each planted singular value = SV_SCALE * the RMS singular value of the weight it perturbs
ORTH_REG_WEIGHT = 0.1
HELD_OUT = 0.2  # fraction of the sentences kept for scoring
VALIDATION = 0.1  # fraction used to choose the learning rate
DATA_SEED = 0  # the train / held-out split (the run seeds change the teacher, the inits and the batch order)


@dataclass(frozen=True)
class Setting:
    steps: int
    batch: int
    max_len: int
    eval_sentences: int
    eval_every: int
    deltaT: int
    lrs: tuple[float, ...]  # Adam learning rates tried per method on the first seed

    def adalora_config(self) -> ac.AdaLoraConfig:
        """Warm-up for the first 10% of the steps, pruning until 75%, the final ranks for the last 25%."""
        return ac.AdaLoraConfig(total_step=self.steps, init_r=INIT_R, target_r=TARGET_R, tinit=self.steps // 10,
                                tfinal=self.steps // 4, deltaT=self.deltaT, lora_alpha=INIT_R,
                                orth_reg_weight=ORTH_REG_WEIGHT, target_modules=list(PLANTED))


FULL = Setting(steps=3000, batch=64, max_len=64, eval_sentences=10_000, eval_every=100, deltaT=10,
               lrs=(3e-4, 1e-3, 3e-3, 1e-2))
QUICK = Setting(steps=120, batch=8, max_len=24, eval_sentences=96, eval_every=20, deltaT=5,
                lrs=(3e-3, 1e-2, 3e-2))  # a short run: larger rates


def make_teacher(base: Any, seed: int) -> Any:
    """``base`` plus a perturbation of rank ``PLANTED[name]`` (equal singular values) on each linear."""
    g = torch.Generator().manual_seed(1000 + seed)
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for name, k in PLANTED.items():
            if k == 0:
                continue
            W = teacher.get_submodule(name).weight
            out_f, in_f = W.shape
            U = torch.linalg.qr(torch.randn(out_f, k, generator=g, dtype=torch.float64))[0]
            V = torch.linalg.qr(torch.randn(in_f, k, generator=g, dtype=torch.float64))[0]
            s = SV_SCALE * float(W.double().norm()) / math.sqrt(min(out_f, in_f))  # on any device
            W += (s * U @ V.T).to(W.dtype).to(W.device)
    return teacher


def hidden_loss(student: Sequence[Any], teacher: Sequence[Any], mask: Any) -> Any:
    """Mean squared error over every layer's output (not the embeddings), real tokens only."""
    w = mask.unsqueeze(-1).to(student[-1].dtype)
    total = sum(((a - b).pow(2) * w).sum() for a, b in zip(student[1:], teacher[1:]))
    return total / (w.sum() * student[-1].shape[-1] * (len(student) - 1))


def _hidden(model: Any, enc: dict[str, Any]) -> Any:
    return model(**enc, output_hidden_states=True).hidden_states


Evalset = Sequence[tuple[dict[str, Any], Any]]  # batches and the teacher's hidden states for them


@torch.no_grad()
def evaluate(model: Any, evalset: Evalset) -> float:
    """Held-out loss, weighted by the tokens of each batch."""
    num = den = 0.0
    for enc, target in evalset:
        n = float(enc["attention_mask"].sum())
        num += float(hidden_loss(_hidden(model, enc), target, enc["attention_mask"])) * n
        den += n
    return num / den


def make_student(method: str, base: Any, setting: Setting, seed: int) -> tuple[Any, list[Any]]:
    """The student model and its trainable parameters, initialised from ``seed``."""
    torch.manual_seed(seed)
    if method == "adalora":
        model = ac.get_adalora_model(copy.deepcopy(base), setting.adalora_config())
        return model, model.trainable_parameters()
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=TARGET_R, lora_alpha=TARGET_R, lora_dropout=0.0,
                                                           target_modules=list(PLANTED)))
    return model, [p for p in model.parameters() if p.requires_grad]


def train(method: str, lr: float, base: Any, teacher: Any, batches: Sequence[dict[str, Any]], held: Evalset,
          val: Evalset, setting: Setting, seed: int, log: Any) -> dict[str, Any]:
    """One student: held-out loss curve, final validation loss, and for AdaLoRA the ranks over training."""
    t0 = time.perf_counter()
    model, params = make_student(method, base, setting, seed)
    adalora = model if method == "adalora" else None
    cfg = setting.adalora_config()
    opt = torch.optim.Adam(params, lr=lr)
    curve = [(0, evaluate(model, held))]
    history: list[tuple[int, list[int]]] = []
    for step, enc in enumerate(batches):
        with torch.no_grad():
            target = _hidden(teacher, enc)
        loss = hidden_loss(_hidden(model, enc), target, enc["attention_mask"])
        (loss + adalora.orth_loss() if adalora is not None else loss).backward()
        opt.step()
        if adalora is not None:
            adalora.update_and_allocate(step)  # after opt.step(), before zero_grad()
            if step % cfg.deltaT == 0 or step >= cfg.final_step:
                history.append((step, [adalora.current_ranks()[n] for n in PLANTED]))
        opt.zero_grad(set_to_none=True)
        if (step + 1) % setting.eval_every == 0 or step + 1 == len(batches):
            curve.append((step + 1, evaluate(model, held)))
            log(f"  seed {seed} {method:7s} lr {lr:g}  step {step + 1:5d}  train {float(loss.detach()):.5f}  "
                f"held-out {curve[-1][1]:.5f}" + (f"  budget {sum(history[-1][1])}" if history else ""))
    out: dict[str, Any] = {"lr": lr, "final_loss": curve[-1][1], "val_loss": evaluate(model, val), "curve": curve,
                           "seconds": time.perf_counter() - t0}
    sizes = [sum(base.get_submodule(n).weight.shape) for n in PLANTED]
    if adalora is not None:
        final = history[-1][1]
        out.update(history=history, final_ranks=final, spearman=spearman(list(PLANTED.values()), final),
                   final_params=sum(r * (s + 1) for r, s in zip(final, sizes)))  # A row, B column, E entry
    else:
        out["final_params"] = TARGET_R * sum(sizes)
    return out


def _targets(tokenizer: Any, teacher: Any, texts: Sequence[str], setting: Setting, device: str) -> Evalset:
    out = []
    for i in range(0, len(texts), 32):
        enc = encode(tokenizer, texts[i: i + 32], setting.max_len, device)
        with torch.no_grad():
            out.append((enc, _hidden(teacher, enc)))
    return out


Split = Mapping[str, Sequence[str]]  # "train", "validation", "held_out" sentences


@dataclass
class SeedContext:
    """What every run of one seed shares: the teacher, its targets on the scored sentences, the batches."""

    base_loss: float
    teacher: Any
    held: Evalset
    val: Evalset
    batches: list[dict[str, Any]]


_CONTEXT: dict[tuple[Setting, int, str], SeedContext] = {}


def seed_context(texts: Split, setting: Setting, seed: int, device: str) -> SeedContext:
    """The seed's context, built once per process (the latest seed's is kept)."""
    key = (setting, seed, device)
    if key not in _CONTEXT:
        _CONTEXT.clear()
        tokenizer, base = load_model(device)
        teacher = make_teacher(base, seed)
        held = _targets(tokenizer, teacher, texts["held_out"], setting, device)
        train_s = texts["train"]
        rng = random.Random(seed)
        order: list[int] = []
        while len(order) < setting.steps * setting.batch:  # epochs, each shuffled
            order += rng.sample(range(len(train_s)), len(train_s))
        batches = [encode(tokenizer, [train_s[j] for j in order[b * setting.batch: (b + 1) * setting.batch]],
                          setting.max_len, device) for b in range(setting.steps)]
        _CONTEXT[key] = SeedContext(evaluate(base, held), teacher, held,
                                    _targets(tokenizer, teacher, texts["validation"], setting, device), batches)
    return _CONTEXT[key]


def train_job(texts: Split, setting: Setting, seed: int, method: str, lr: float, device: str,
              cache: str | None = None) -> dict[str, Any]:
    """One student of one seed (a unit :func:`~experiments.common.run_jobs` can run in any process).

    With ``cache`` (a directory) a finished run is kept there, and taken from
    there when the same run (setting, seed, method, rate) is asked again: an
    interrupted experiment resumes where it stopped.
    """
    key = json.dumps([asdict(setting), seed, method, lr, texts], sort_keys=True)
    path = os.path.join(cache, hashlib.sha256(key.encode()).hexdigest()[:24] + ".json") if cache else None
    if path and os.path.exists(path):
        with open(path) as f:
            return dict(json.load(f))
    ctx = seed_context(texts, setting, seed, device)
    base = load_model(device)[1]
    out = train(method, lr, base, ctx.teacher, ctx.batches, ctx.held, ctx.val, setting, seed,
                lambda line: print(line, flush=True))
    out["base_loss"] = ctx.base_loss
    if path:
        os.makedirs(cache, exist_ok=True)
        write_json(path, out)
    return out


def run_seeds(texts: Split, setting: Setting, seeds: Sequence[int], lrs: Mapping[str, Sequence[float]],
              device: str, jobs: int, log: Any, cache: str | None = None) -> list[dict[str, Any]]:
    """Both students on each seed, each trained at every rate in ``lrs[method]``; per seed and method
    the run with the lowest validation loss is kept (and the validation loss of every rate tried)."""
    tasks = [(texts, setting, seed, method, lr, device, cache) for seed in seeds for method in lrs for lr in lrs[method]]
    done = run_jobs(train_job, tasks, jobs, device)
    runs = []
    for seed in seeds:
        tried = {m: [r for t, r in zip(tasks, done) if t[2] == seed and t[3] == m] for m in lrs}
        res: dict[str, Any] = {"seed": seed, "base_loss": tried["adalora"][0]["base_loss"]}
        log(f"seed {seed}: held-out loss of the unadapted model {res['base_loss']:.5f}")
        for method, rs in tried.items():
            res[method] = min(rs, key=lambda r: r["val_loss"])
            del res[method]["base_loss"]
            if len(rs) > 1:
                res.setdefault("lr_search", {})[method] = {str(r["lr"]): r["val_loss"] for r in rs}
        runs.append(res)
    return runs


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    rel = {m: [r[m]["final_loss"] / r["base_loss"] for r in runs] for m in ("adalora", "lora")}
    return {
        "adalora_loss": stats([r["adalora"]["final_loss"] for r in runs]),
        "lora_loss": stats([r["lora"]["final_loss"] for r in runs]),
        "adalora_relative": stats(rel["adalora"]), "lora_relative": stats(rel["lora"]),
        "spearman": stats([r["adalora"]["spearman"] for r in runs]),
        "adalora_params": stats([r["adalora"]["final_params"] for r in runs]),
        "lora_params": runs[0]["lora"]["final_params"],
        "adalora_better": sum(r["adalora"]["final_loss"] < r["lora"]["final_loss"] for r in runs),
    }


def run(setting: Setting, seeds: Sequence[int], device: str = "cpu", log: Any = print, jobs: int = 1,
        cache: str | None = None) -> dict[str, Any]:
    """The whole experiment: every seed, both students; a JSON-ready record.

    The learning rates are chosen on the first seed and kept for the others;
    ``jobs`` runs that many students at once (the same numbers, sooner);
    ``cache``: see :func:`train_job`.
    """
    t0, env = time.perf_counter(), environment(device)
    texts = [s for _, s in sentences()]
    random.Random(DATA_SEED).shuffle(texts)
    n_held, n_val = int(len(texts) * HELD_OUT), int(len(texts) * VALIDATION)
    split = {"held_out": texts[:n_held][: setting.eval_sentences],
             "validation": texts[n_held: n_held + n_val][: setting.eval_sentences],
             "train": texts[n_held + n_val:]}
    log(f"{len(split['train'])} training, {len(split['validation'])} validation and {len(split['held_out'])} "
        f"held-out sentences; {len(PLANTED)} perturbed linears; {setting.steps} steps of {setting.batch} "
        f"sentences (<= {setting.max_len} tokens); learning rates {list(setting.lrs)}")
    runs = run_seeds(split, setting, seeds[:1], {m: list(setting.lrs) for m in ("adalora", "lora")}, device, jobs,
                     log, cache)
    chosen = {m: [runs[0][m]["lr"]] for m in ("adalora", "lora")}
    runs += run_seeds(split, setting, seeds[1:], chosen, device, jobs, log, cache)
    return {"experiment": "planted_rank", "setting": asdict(setting), "seeds": list(seeds),
            "environment": env, "planted": PLANTED, "init_r": INIT_R, "target_r": TARGET_R,
            "sv_scale": SV_SCALE,
            "sentences": {k: len(v) for k, v in split.items()}, "runs": runs, "summary": summarise(runs),
            "seconds": time.perf_counter() - t0}


def report(result: dict[str, Any]) -> str:
    s, first = result["summary"], result["runs"][0]

    def ms(d: dict[str, float], f: str = ".5f") -> str:
        return f"{d['mean']:{f}} ± {d['std']:{f}} (min {d['min']:{f}}, max {d['max']:{f}})"

    lines = [
        f"held-out loss, AdaLoRA: {ms(s['adalora_loss'])}",
        f"held-out loss, LoRA:    {ms(s['lora_loss'])}",
        f"relative to the unadapted model, AdaLoRA: {ms(s['adalora_relative'], '.3f')}",
        f"relative to the unadapted model, LoRA:    {ms(s['lora_relative'], '.3f')}",
        f"AdaLoRA below LoRA in {s['adalora_better']} of {len(result['runs'])} seeds",
        f"Spearman (AdaLoRA final ranks vs planted): {ms(s['spearman'], '.3f')}",
        f"learning rates (chosen on seed {first['seed']}): AdaLoRA {first['adalora']['lr']:g}, LoRA {first['lora']['lr']:g}",
        f"final trainable parameters: AdaLoRA {s['adalora_params']['mean']:.0f} (mean), LoRA {s['lora_params']}",
        "module                                planted  final ranks per seed",
    ]
    for i, (name, k) in enumerate(result["planted"].items()):
        lines.append(f"  {name:36s} {k:5d}    " + " ".join(f"{r['adalora']['final_ranks'][i]:2d}" for r in result["runs"]))
    return "\n".join(lines)


def _label(name: str) -> str:
    layer = name.split(".")[2]
    return f"L{layer} " + {"query": "query", "value": "value", "dense": "MLP in"}[name.rsplit(".", 1)[1]]


def figures(result: dict[str, Any], outdir: str, tag: str = "") -> list[str]:
    """The first seed's ranks over training beside the planted ones, and the held-out loss curves."""
    from matplotlib.figure import Figure

    setting = Setting(**result["setting"])
    cfg = setting.adalora_config()
    first = result["runs"][0]
    planted = list(result["planted"].values())
    fig = plot.allocation_figure(first["adalora"]["history"], total_steps=setting.steps, init_r=INIT_R,
                                 labels=[_label(n) for n in result["planted"]], planted=planted,
                                 schedule=plot.scheduled_budget(cfg, len(planted)), marks=plot.phases(cfg),
                                 title=f"AdaLoRA on all-MiniLM-L6-v2, seed {first['seed']}{tag}: "
                                       f"kept triplets per linear")
    paths = [f"{outdir}/planted_rank_allocation.png"]
    plot.save(fig, paths[0])
    fig = Figure(figsize=(7.5, 4), layout="constrained")
    ax = fig.subplots()
    series = []
    for method, label in (("adalora", f"AdaLoRA (this library), init_r {INIT_R} -> {TARGET_R}"),
                          ("lora", f"LoRA (PEFT), r {TARGET_R}")):
        x = [s for s, _ in first[method]["curve"]]
        runs = [[v / r["base_loss"] for _, v in r[method]["curve"]] for r in result["runs"]]
        series.append(plot.Series.over_runs(label, x, runs))
    plot.lines(ax, series, xlabel="optimizer step", ylabel="held-out loss / unadapted model's", logy=True,
               marks=plot.phases(cfg), title=f"Matching the planted teacher: mean and min..max over "
                                             f"{len(result['runs'])} seeds{tag}")
    paths.append(f"{outdir}/planted_rank_loss.png")
    plot.save(fig, paths[1])
    return paths


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small CPU setting (default: the full one)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lrs", type=float, nargs="+", help="override the learning rates tried on the first seed")
    for field in ("steps", "batch", "max_len", "eval_sentences", "eval_every", "deltaT"):
        ap.add_argument(f"--{field.replace('_', '-')}", type=int, help=f"override the setting's {field}")
    ap.add_argument("--json", metavar="FILE", help="write every number (curves, rank histories) as JSON")
    ap.add_argument("--figures", metavar="DIR", help="write the PNG figures into DIR (needs matplotlib)")
    ap.add_argument("--jobs", type=int, default=1, help="students trained at once, in processes (default 1)")
    ap.add_argument("--cache", metavar="DIR", help="keep each finished student in DIR; a rerun resumes from it")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, raised inside PEFT
    changes = {f: getattr(args, f) for f in asdict(FULL) if getattr(args, f) is not None}
    if args.lrs:
        changes["lrs"] = tuple(args.lrs)
    return finish(sys.modules[__name__], args, replace(QUICK if args.quick else FULL, **changes))


if __name__ == "__main__":
    main()
