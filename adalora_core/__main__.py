"""``python -m adalora_core demo | info | bench``."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from typing import Any


def _demo(args: argparse.Namespace) -> int:
    from . import demo, plot

    print(f"AdaLoRA planted-rank demo on backend {args.backend or 'default'}: {len(demo.PLANTED)} layers, "
          f"init_r 8 -> target_r 4, {args.steps} steps")
    res = demo.run(backend=args.backend, steps=args.steps, seed=args.seed)
    cfg = res.config
    print()
    print(plot.text_heatmap(res.history, cfg.init_r, total_steps=args.steps, marks=plot.phases(cfg)))
    print()
    print("layer    " + " ".join(f"{i:>3d}" for i in range(len(res.planted))))
    print("planted  " + " ".join(f"{k:>3d}" for k in res.planted))
    print("final    " + " ".join(f"{k:>3d}" for k in res.final))
    print(f"Spearman rank correlation (final vs planted): {res.spearman:.3f}")
    print(f"loss {res.loss_start:.4f} -> {res.loss_end:.4f} in {res.seconds:.1f} s")
    if args.plot:
        plot.save(demo.figure(res), args.plot)
        print(f"figure written to {args.plot}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import array_api_compat

    from . import __version__, native_info
    from .backends import get_backend

    print(f"adalora-core {__version__}")
    print(f"python {platform.python_version()} on {platform.machine()} ({platform.platform()})")
    print(f"array-api-compat {array_api_compat.__version__}")
    for name in ("numpy", "native", "array_api_strict", "torch", "cupy", "jax"):
        try:
            be = get_backend(name)
        except (ValueError, ImportError, RuntimeError) as exc:
            print(f"  {name:17s} unavailable: {str(exc).splitlines()[0]}")
            continue
        print(f"  {name:17s} available: {be.describe()}")
    info = native_info()
    print("native: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"default backend for NumPy arrays: {get_backend(None).name}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    """Allocator step time on a chosen backend (the full benchmarks live in benchmarks/)."""
    from .allocator import RankAllocator
    from .backends import get_backend
    from .config import AdaLoraConfig
    from .triplet import Triplet

    be = get_backend(args.backend)
    n_mod, r, d = args.modules, 12, args.dim
    cfg = AdaLoraConfig(total_step=10_000, init_r=r, target_r=8, tinit=0, tfinal=0, deltaT=1)
    rng = be.rng(0)

    def trip() -> Any:
        return Triplet(rng.normal((r, d)), rng.normal((r, 1)), rng.normal((d, r)))

    params = {f"m{i}": trip() for i in range(n_mod)}
    grads = {f"m{i}": trip() for i in range(n_mod)}
    alloc = RankAllocator(cfg, {k: r for k in params}, backend=be)
    times = []
    for step in range(args.steps):
        be.synchronize()
        t0 = time.perf_counter()
        alloc.update_and_allocate(step, params, grads)
        be.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    print(f"RankAllocator.update_and_allocate on {be.name}: {n_mod} modules, r={r}, d={d}, mask every step: "
          f"median {1e3 * times[len(times) // 2]:.2f} ms over {args.steps} steps")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adalora_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train AdaLoRA on a planted-rank task and show the ranks it finds")
    p.add_argument("--backend", default="numpy", help="numpy (default), array_api_strict, torch, jax, ...")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--plot", metavar="FILE", help="write a PNG of the kept triplets per layer and the budget over steps (needs matplotlib)")
    p.set_defaults(func=_demo)
    p = sub.add_parser("info", help="versions, backends, devices, native build")
    p.set_defaults(func=_info)
    p = sub.add_parser("bench", help="time the allocator on a backend")
    p.add_argument("--backend", default=None)
    p.add_argument("--modules", type=int, default=96)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    if getattr(args, "steps", 10) < 10:
        parser.error(f"--steps={args.steps} is too small: use at least 10")
    if getattr(args, "plot", None):
        from . import plot

        try:  # before the run, not after it
            plot.require()
        except ImportError as exc:
            parser.error(f"--plot: {exc}")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
