"""Forgetting: MicroLoRA on a layer of all-MiniLM-L6-v2, task A then task B, with and without EWC++.

The layer is the attention output projection of the model's last block
(``LAYER``, 384 -> 384, its real weights). A request is one sentence of Python's
documentation; its input to the layer is the mean over the sentence's tokens of
what the model feeds that projection (a real sentence embedding in the layer's
input space). A user wants the layer's output corrected by a hidden rank-1 map
``x @ D`` that differs between two domains: task A is sentences about the
language (statements, expressions, execution), task B sentences about objects
and types. A rank-2 MicroLoRA adapter learns from each request's feedback, the
gradient ``y - t`` of ``|y - t|^2 / 2`` at the layer's output, applied every
``PER_UPDATE`` requests: first on task A, then on task B. Scored: the loss on
held-out task-A sentences before and after task B, without EWC, with EWC++ and
the proximal step, and with the explicit step, over three seeds, and a sweep of
the penalty strength. A run whose adapter refuses a step that overflowed (or
serves a non-finite output) is counted as diverged. Everything below was fixed
before any result was seen.

    python -m experiments.forgetting --quick
    python -m experiments.forgetting --json forgetting.json --figures docs/img
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from adalora_core import plot
from adalora_core.config import EwcConfig, MicroLoraConfig
from adalora_core.errors import AdaLoraWarning
from adalora_core.microlora import AdaptFeedback, MicroLoRA

from .common import encode, environment, finish, load_model, run_jobs, sentences, stats

LAYER = "encoder.layer.5.attention.output.dense"
MODULE = "o_proj"  # the adapter's name in MicroLoRA
RANK = 2
PER_UPDATE = 8  # requests per applied update
STEP_SIZE = 1.6  # lr = STEP_SIZE / mean |x|^2 over the requests (input-normalised SGD)
CORRECTION = 2.0  # RMS size of a task's correction x @ D over its sentences
LAM = 10.0  # EWC penalty strength of the main comparison
HELD_OUT = 0.25  # of each domain's sentences
VARIANTS = ("none", "proximal", "explicit")
DATA_MODEL_TOPICS = {"objects", "specialnames", "specialattrs", "customization", "attribute-access",
                     "context-managers", "string-methods", "truth", "id-classes"}


def in_task_b(topic: str) -> bool:
    """Task B: objects and types (the data model); task A: everything else."""
    return topic.startswith(("types", "bltin-")) or topic.endswith("-types") or topic in DATA_MODEL_TOPICS


@dataclass(frozen=True)
class Setting:
    updates: int  # per task
    every: int  # evaluate every this many updates
    lams: tuple[float, ...]  # the sweep
    max_sentences: int  # embed at most this many (0: all)


FULL = Setting(updates=1500, every=25, lams=(1, 3, 10, 30, 100, 300, 1000), max_sentences=0)
QUICK = Setting(updates=400, every=20, lams=(1, 3, 10, 30, 100, 300, 1000), max_sentences=0)


def embed(device: str, max_sentences: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Per domain, the sentences' mean-pooled inputs to ``LAYER``; and its weight (in, out) and bias."""
    import torch

    tokenizer, model = load_model(device)
    items = sentences()
    if max_sentences:
        items = random.Random(0).sample(items, max_sentences)
    layer = model.get_submodule(LAYER)
    captured: list[Any] = []
    hook = layer.register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
    pooled = []
    with torch.no_grad():
        for i in range(0, len(items), 32):
            enc = encode(tokenizer, [s for _, s in items[i: i + 32]], 128, device)
            model(**enc)
            m = enc["attention_mask"].unsqueeze(-1).to(captured[-1].dtype)
            pooled.append(((captured[-1] * m).sum(1) / m.sum(1)).cpu().numpy())
    hook.remove()
    X = np.concatenate(pooled).astype(np.float32)
    b = np.array([in_task_b(t) for t, _ in items])
    W0 = layer.weight.detach().cpu().numpy().T.astype(np.float32)
    return {"A": X[~b], "B": X[b]}, W0, layer.bias.detach().cpu().numpy().astype(np.float32)


def make_task(X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A hidden rank-1 correction ``D = c u vᵀ`` whose output ``x @ D`` has RMS ``CORRECTION`` on ``X``."""
    d = X.shape[1]  # the layer is square
    u, v = (w / np.linalg.norm(w) for w in (rng.normal(size=d), rng.normal(size=d)))
    c = CORRECTION / math.sqrt(float(np.mean((X @ u) ** 2)))
    return (c * np.outer(u, v)).astype(np.float32)


def _loss(m: MicroLoRA, X: np.ndarray, D: np.ndarray) -> float:
    """Held-out ``|y - t|^2 / 2``: the base output cancels, so only the adapter against ``x @ D`` remains."""
    diff = m.forward(X, MODULE) - X @ D
    return float(np.mean(np.sum(diff * diff, axis=1)) / 2)


def run_one(domains: dict[str, np.ndarray], W0: np.ndarray, b0: np.ndarray, setting: Setting, seed: int,
            variant: str, lam: float) -> dict[str, Any]:
    """Task A, ``start_new_task``, task B (with the penalty unless ``variant == "none"``)."""
    rng = np.random.default_rng(seed)
    tasks, held, train = {}, {}, {}
    for name in ("A", "B"):
        X = domains[name][rng.permutation(len(domains[name]))]
        n = int(len(X) * HELD_OUT)
        held[name], train[name] = X[:n], X[n:]
        tasks[name] = make_task(X, rng)
    lr = STEP_SIZE / float(np.mean(np.sum(np.concatenate([train["A"], train["B"]]) ** 2, axis=1)))
    cfg = MicroLoraConfig(rank=RANK, in_features=W0.shape[0], out_features=W0.shape[1], target_modules=(MODULE,))
    ewc = EwcConfig(normalise_at_task_boundary=True, update="explicit" if variant == "explicit" else "proximal")
    m = MicroLoRA(cfg, seed=seed, ewc=ewc)
    curve = [(0, _loss(m, held["A"], tasks["A"]), _loss(m, held["B"], tasks["B"]))]
    update, after_a, diverged = 0, float("nan"), False
    for name in ("A", "B"):
        X, D = train[name], tasks[name]
        order = rng.permutation(len(X))
        for k in range(setting.updates):
            for j in range(k * PER_UPDATE, (k + 1) * PER_UPDATE):
                x = X[order[j % len(X)]]
                out = x @ W0 + b0  # the frozen layer ...
                y = m.forward_add(x, MODULE, out)  # ... plus the adapter: what this request was served
                grad = y - (x @ W0 + b0 + x @ D)  # what the user wanted: the feedback's gradient
                err = float(grad @ grad)
                if not math.isfinite(err):
                    diverged = True
                    break
                m.adapt(x, AdaptFeedback(math.exp(-0.5 * err), gradient_estimate=grad, reward=1.0))
            if diverged:
                break
            if name == "B" and variant != "none":
                m.apply_updates_with_ewc(lr, lam)
            else:
                m.apply_updates(lr)  # also feeds the online Fisher
            update += 1
            if update % setting.every == 0:
                curve.append((update, _loss(m, held["A"], tasks["A"]), _loss(m, held["B"], tasks["B"])))
        if name == "A":
            after_a = _loss(m, held["A"], tasks["A"])
            m.start_new_task()  # theta* = the weights after task A; Fisher min-max normalised
    diverged = diverged or m.skipped_updates > 0  # the adapter refused a step that overflowed
    end_a, end_b = (math.inf, math.inf) if diverged else (curve[-1][1], curve[-1][2])
    return {"seed": seed, "variant": variant, "lam": lam, "lr": lr, "start_a": curve[0][1], "after_a": after_a,
            "end_a": end_a, "end_b": end_b, "increase": end_a - after_a, "diverged": diverged,
            "skipped_updates": m.skipped_updates,
            "curve": [c for c in curve if all(map(math.isfinite, c))]}


def summarise(runs: Sequence[dict[str, Any]], plain: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean, spread over seeds; ``increase_cut``: the share of plain SGD's forgetting (same seed) avoided."""
    if any(r["diverged"] for r in runs):
        return {"diverged": sum(r["diverged"] for r in runs)}
    out: dict[str, Any] = {k: stats([r[k] for r in runs]) for k in ("after_a", "end_a", "end_b", "increase")}
    out["increase_cut"] = stats([1 - r["increase"] / p["increase"] for r, p in zip(runs, plain)])
    return out


def _quiet_run(*args: Any) -> dict[str, Any]:
    """:func:`run_one` with a diverging explicit step recorded, not warned."""
    with np.errstate(over="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", AdaLoraWarning)
        return run_one(*args)


def run(setting: Setting, seeds: Sequence[int], device: str = "cpu", log: Any = print, jobs: int = 1
        ) -> dict[str, Any]:
    """Embed the sentences once; every variant and penalty on every seed (``jobs`` at once); a JSON-ready record."""
    t0, env = time.perf_counter(), environment(device)
    domains, W0, b0 = embed(device, setting.max_sentences)
    log(f"{LAYER}: {W0.shape[0]} -> {W0.shape[1]}; task A {len(domains['A'])} sentences, task B "
        f"{len(domains['B'])}; {setting.updates} updates of {PER_UPDATE} requests per task; seeds {list(seeds)}")
    keys = [(v, LAM, s) for v in VARIANTS for s in seeds]
    keys += [(v, lam, s) for v in VARIANTS[1:] for lam in setting.lams for s in seeds]
    keys = list(dict.fromkeys(keys))  # the main penalty is in the sweep too: run once
    done = dict(zip(keys, run_jobs(_quiet_run, [(domains, W0, b0, setting, s, v, lam) for v, lam, s in keys],
                                   jobs)))
    runs = {v: [done[v, LAM, s] for s in seeds] for v in VARIANTS}
    sweep = {v: {lam: [dict(done[v, lam, s]) for s in seeds] for lam in setting.lams} for v in VARIANTS[1:]}
    for by_lam in sweep.values():  # the sweep keeps its numbers; the curves are the main runs'
        for sweep_runs in by_lam.values():
            for r in sweep_runs:
                del r["curve"]
    return {"experiment": "forgetting", "setting": asdict(setting), "seeds": list(seeds),
            "environment": env, "layer": LAYER, "rank": RANK, "per_update": PER_UPDATE,
            "step_size": STEP_SIZE, "correction": CORRECTION, "lam": LAM,
            "sentences": {k: len(v) for k, v in domains.items()},
            "summary": {v: summarise(runs[v], runs["none"]) for v in VARIANTS},
            "sweep_summary": {v: {str(lam): summarise(sweep[v][lam], runs["none"]) for lam in setting.lams}
                              for v in sweep},
            "runs": runs, "sweep": {v: {str(lam): r for lam, r in by_lam.items()} for v, by_lam in sweep.items()},
            "seconds": time.perf_counter() - t0}


def report(result: dict[str, Any]) -> str:
    def ms(d: dict[str, float]) -> str:
        return f"{d['mean']:.4f} ± {d['std']:.4f}"

    def row(name: str, s: dict[str, Any]) -> str:
        if "diverged" in s:
            return f"{name:24s} diverged in {s['diverged']} of {len(result['seeds'])} seeds"
        return (f"{name:24s} {ms(s['end_a']):>17s} {ms(s['increase']):>17s} {ms(s['increase_cut']):>17s} "
                f"{ms(s['end_b']):>17s}")

    s = result["summary"]
    lines = [f"loss on held-out task A after task A: {ms(s['none']['after_a'])} (the same for every variant)",
             " ".join([f"{'after task B':24s}", *(f"{h:>17s}" for h in ("loss on A", "increase on A",
                                                                     "share avoided", "loss on B"))]),
             row("no EWC", s["none"])]
    lines += [row(f"EWC++ {v}, lam {result['lam']:g}", s[v]) for v in VARIANTS[1:]]
    lines.append("penalty sweep:")
    for v, by_lam in result["sweep_summary"].items():
        lines += [row(f"  {v}, lam {lam}", summ) for lam, summ in by_lam.items()]
    return "\n".join(lines)


def figures(result: dict[str, Any], outdir: str, tag: str = "") -> list[str]:
    """Loss on both tasks over the updates (mean, min..max over seeds), and the penalty sweep."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    names = {"none": "no EWC", "proximal": "EWC++ proximal", "explicit": "EWC++ explicit"}
    series = []
    for k, v in reversed(list(enumerate(VARIANTS))):  # no EWC on top: the variants are one run until task B
        runs = result["runs"][v]
        x = [c[0] for c in runs[0]["curve"]]
        for task, col, style in (("A", 1, "-"), ("B", 2, "--")):
            series.append(plot.Series.over_runs(f"task {task}, {names[v]}", x, [[c[col] for c in r["curve"]]
                                                                               for r in runs], style, f"C{k}"))
    updates = result["setting"]["updates"]
    plot.lines(left, series, xlabel=f"update ({result['per_update']} requests each)",
               ylabel="held-out loss", marks=[(updates, "task B starts")], below=True,
               title=f"Loss on tasks A and B, lam {result['lam']:g}, {len(result['seeds'])} seeds{tag}")
    sweep = []
    for k, v in enumerate(VARIANTS[1:], start=1):
        ok = {float(lam): s for lam, s in result["sweep_summary"][v].items() if "diverged" not in s}
        lams = sorted(ok)
        for task, key, style in (("A", "end_a", "-"), ("B", "end_b", "--")):
            sweep.append(plot.Series(f"task {task}, {names[v]}", lams, [ok[x][key]["mean"] for x in lams],
                                     [ok[x][key]["min"] for x in lams], [ok[x][key]["max"] for x in lams],
                                     style + "o", f"C{k}"))
    plot.lines(right, sweep, xlabel="penalty strength lam", ylabel="held-out loss after task B", logx=True,
               below=True, title="Penalty sweep (a missing point: the run diverged)")
    none = result["summary"]["none"]
    right.axhline(none["end_a"]["mean"], color="C0", lw=1, label="task A, no EWC")
    right.axhline(none["end_b"]["mean"], color="C0", lw=1, ls="--", label="task B, no EWC")
    right.axhline(none["after_a"]["mean"], color="0.4", lw=1, ls=":", label="task A before task B")
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    path = f"{outdir}/forgetting.png"
    plot.save(fig, path)
    return [path]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small CPU setting (default: the full one)")
    ap.add_argument("--device", default="cpu", help="where the model embeds the sentences: cpu or cuda")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--updates", type=int, help="override the updates per task")
    ap.add_argument("--max-sentences", type=int, help="embed at most this many sentences")
    ap.add_argument("--lams", type=float, nargs="+", help="override the penalty sweep")
    ap.add_argument("--json", metavar="FILE", help="write every number (curves included) as JSON")
    ap.add_argument("--figures", metavar="DIR", help="write the PNG figure into DIR (needs matplotlib)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, in processes (default 1)")
    args = ap.parse_args(argv)
    changes = {f: getattr(args, f) for f in ("updates", "max_sentences", "lams") if getattr(args, f) is not None}
    return finish(sys.modules[__name__], args, replace(QUICK if args.quick else FULL, **changes))


if __name__ == "__main__":
    main()
