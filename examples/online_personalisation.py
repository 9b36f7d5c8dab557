"""Online personalisation with MicroLoRA: learn from per-request feedback, then a
second task, with and without EWC++.

A frozen base layer ``y0 = x @ W0`` serves requests; a rank-2 MicroLoRA adapter
on it learns, one request at a time, a hidden per-user correction ``x @ D_task``
(a rank-1 map). After each request the user's feedback carries a real gradient
estimate: the gradient of the squared error ``L = |y - t|^2 / 2`` with respect
to the layer output, ``y - t``, plus a quality score ``exp(-L)``. Every 8
requests the accumulated gradient is applied.

Task A's requests use the first half of the input features, task B's the second
half (say two domains of one user): a rank-2 adapter has room for both maps,
but plain SGD on task B rewrites the adapter's ``B`` matrix that task A relies
on. EWC++ (online Fisher fed by every update, min-max normalised at the task
boundary, proximal step) keeps most of it. The script prints the loss on task A
(and B) across both tasks for both runs, and a sweep of the penalty strength.

    python examples/online_personalisation.py [--backend native] [--lam 5] [--plot curves.png]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from adalora_core.config import EwcConfig, MicroLoraConfig
from adalora_core.microlora import AdaptFeedback, MicroLoRA

D = 64  # hidden size of the toy layer
MODULE = "q_proj"


def make_task(seed: int, features: slice) -> tuple[np.ndarray, slice]:
    """A hidden rank-1 correction ``D = 2 u v^T`` whose input side lives on ``features``."""
    rng = np.random.default_rng(seed)
    u = np.zeros(D)
    u[features] = rng.normal(size=features.stop - features.start)
    v = rng.normal(size=D)
    return 2.0 * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v)), features


def requests(rng: np.random.Generator, task: tuple[np.ndarray, slice], n: int) -> np.ndarray:
    _, feats = task
    x = np.zeros((n, D))
    x[:, feats] = rng.normal(size=(n, feats.stop - feats.start))
    return x.astype(np.float32)


class Layer:
    """The frozen base layer plus the MicroLoRA adapter: what serving calls per request."""

    def __init__(self, adapter: MicroLoRA, W0: np.ndarray) -> None:
        self.m, self.W0 = adapter, W0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = x @ self.W0  # the base model's output, (in, out) layout
        return self.m.forward_add(x, MODULE, out)  # + the adapter, in place


def eval_loss(layer: Layer, task: tuple[np.ndarray, slice], xs: np.ndarray) -> float:
    target = xs @ layer.W0 + xs @ task[0]
    return float(np.mean(np.sum((layer(xs) - target) ** 2, axis=1)) / 2)


def run(backend: str | None, lam: float, steps: int, seed: int, every: int = 25) -> dict:
    """Task A for ``steps`` updates, then task B; EWC penalty ``lam`` (0 = plain SGD) on task B."""
    cfg = MicroLoraConfig(rank=2, in_features=D, out_features=D, target_modules=(MODULE,))
    m = MicroLoRA(cfg, backend=backend, seed=seed, ewc=EwcConfig(normalise_at_task_boundary=True))
    W0 = np.random.default_rng(7).normal(0, 1 / math.sqrt(D), (D, D)).astype(np.float32)
    layer = Layer(m, W0)
    tasks = (make_task(1 + seed, slice(0, D // 2)), make_task(50 + seed, slice(D // 2, D)))
    held_out = [requests(np.random.default_rng(99 + k), t, 256) for k, t in enumerate(tasks)]
    rng = np.random.default_rng(100 + seed)
    lr, per_update = 0.05, 8
    curve = []  # (update, loss on A, loss on B)
    update = 0
    for phase, task in enumerate(tasks):
        Dm = task[0]
        for _ in range(steps):
            for x in requests(rng, task, per_update):  # one request at a time
                y = layer(x)
                t = x @ W0 + x @ Dm  # what this user wanted
                grad = y - t  # dL/dy of L = |y - t|^2 / 2: the gradient estimate
                quality = math.exp(-0.5 * float(grad @ grad))
                m.adapt(x, AdaptFeedback(quality, gradient_estimate=grad, reward=1.0))
            if phase == 1 and lam > 0:
                m.apply_updates_with_ewc(lr, lam)
            else:
                m.apply_updates(lr)  # also feeds the EWC++ Fisher
            update += 1
            if update % every == 0:
                curve.append((update, eval_loss(layer, tasks[0], held_out[0]), eval_loss(layer, tasks[1], held_out[1])))
        if phase == 0:
            m.start_new_task()  # theta* = weights after task A; Fisher min-max normalised
            after_a = eval_loss(layer, tasks[0], held_out[0])
    end_a, end_b = curve[-1][1], curve[-1][2]
    return {"curve": curve, "after_a": after_a, "end_a": end_a, "end_b": end_b, "forgetting": end_a - after_a,
            "requests": m.adaptation_count, "forward_calls": m.forward_count, "backend": m.backend.name}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default=None, choices=("native", "numpy"),
                    help="NumPy-array backend (default: native when the C extension is built)")
    ap.add_argument("--lam", type=float, default=5.0, help="EWC penalty strength on task B")
    ap.add_argument("--steps", type=int, default=600, help="updates (of 8 requests) per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", metavar="FILE", help="save the loss curves (needs matplotlib)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    plain = run(args.backend, 0.0, args.steps, args.seed)
    ewc = run(args.backend, args.lam, args.steps, args.seed)
    print(f"backend {plain['backend']}: {plain['requests']} requests per run, rank-2 adapter, d={D}, "
          f"{args.steps} updates per task")
    print()
    print(f"{'update':>7} {'task':>5} | {'loss A, SGD':>12} {'loss A, EWC':>12} | {'loss B, SGD':>12} {'loss B, EWC':>12}")
    step = max(1, len(plain["curve"]) // 16)
    for (u, a0, b0), (_, a1, b1) in list(zip(plain["curve"], ewc["curve"]))[step - 1 :: step]:
        print(f"{u:>7} {'A' if u <= args.steps else 'B':>5} | {a0:>12.4f} {a1:>12.4f} | {b0:>12.4f} {b1:>12.4f}")
    print()
    print(f"loss on A after task A:             {plain['after_a']:.4f} (both runs)")
    print(f"loss on A after task B, plain SGD:  {plain['end_a']:.4f}   forgetting {plain['forgetting']:+.4f}")
    print(f"loss on A after task B, EWC lam={args.lam:g}: {ewc['end_a']:.4f}   forgetting {ewc['forgetting']:+.4f}"
          f"   ({plain['forgetting'] / max(ewc['forgetting'], 1e-12):.1f}x less)")
    print(f"loss on B after task B:             plain {plain['end_b']:.4f}, EWC {ewc['end_b']:.4f}")
    print()
    print("penalty sweep (loss on A / loss on B after task B):")
    sweep = []
    for lam in (1.0, 2.0, 5.0, 20.0, 100.0):
        r = ewc if lam == args.lam else run(args.backend, lam, args.steps, args.seed)
        sweep.append((lam, r))
        print(f"  lam={lam:>6g}: A {r['end_a']:.4f}   B {r['end_b']:.4f}")
    print("  (the online Fisher is an empirical one: squared mean gradients, which point along task A's\n"
          "   residuals, so it protects B's entries unevenly; too strong a penalty stalls task B and need\n"
          "   not protect A better: choose lam on held-out data)")
    print(f"\n{time.perf_counter() - t0:.1f} s")

    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot")
            return
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for res, label, style in ((plain, "plain SGD", "-"), (ewc, f"EWC++ (lam={args.lam:g})", "--")):
            u = [c[0] for c in res["curve"]]
            ax.plot(u, [c[1] for c in res["curve"]], style, color="C0", label=f"loss on task A, {label}")
            ax.plot(u, [c[2] for c in res["curve"]], style, color="C1", label=f"loss on task B, {label}")
        ax.axvline(args.steps, color="grey", lw=0.8)
        ax.text(args.steps, ax.get_ylim()[1] * 0.95, "  task B starts", color="grey", va="top")
        ax.set_xlabel("update (8 requests each)")
        ax.set_ylabel("held-out squared error")
        ax.set_title("MicroLoRA online personalisation: forgetting with and without EWC++")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot saved to {args.plot}")


if __name__ == "__main__":
    main()
