"""Run both experiments and redraw every figure of the docs (from the repository root):

    python -m experiments --quick                # a 2-core CPU, minutes: records *-quick-cpu.json
    python -m experiments --device cuda          # the full setting: records *-full-cuda.json
    python -m experiments --quick --redraw       # only redraw the figures from the recorded JSON

The figures go to docs/img, the records (every number, curves and rank
histories included) to experiments/results.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

from adalora_core import demo, plot

from . import forgetting, planted_rank
from .common import write_json


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small CPU setting (default: the full one)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--figures", default="docs/img", metavar="DIR")
    ap.add_argument("--results", default="experiments/results", metavar="DIR")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, in processes (default 1)")
    ap.add_argument("--redraw", action="store_true", help="redraw from the recorded JSON instead of running")
    args = ap.parse_args(argv)
    plot.require()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, raised inside PEFT
    os.makedirs(args.figures, exist_ok=True)
    os.makedirs(args.results, exist_ok=True)
    name = "quick-cpu" if args.quick else f"full-{args.device.split(':')[0]}"
    tag = " (quick)" if args.quick else ""
    plot.save(demo.figure(demo.run(seed=1, log=None)), f"{args.figures}/demo_allocation.png")
    for module in (planted_rank, forgetting):
        path = f"{args.results}/{module.__name__.rsplit('.', 1)[1]}-{name}.json"
        if args.redraw:
            with open(path) as f:
                result = json.load(f)
        else:
            setting = module.QUICK if args.quick else module.FULL
            result = module.run(setting, [0, 1, 2], args.device, jobs=args.jobs)
            print(module.report(result))
            write_json(path, result)
        print("figures:", ", ".join(module.figures(result, args.figures, tag)))


if __name__ == "__main__":
    main()
