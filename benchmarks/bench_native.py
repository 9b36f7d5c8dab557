"""Benchmark of the native backend's C kernels (one CPU core).

    python benchmarks/bench_native.py [--quick]

Prints a markdown table: each op from Python (the public op, one request),
the C kernel alone (timed in a C loop, no Python), its floor from counted
bytes and FLOPs, NumPy written the obvious way, and PyTorch written the
obvious way (when importable), all in the same run, single-threaded.

Floors (stated with the table): a kernel cannot be faster than
  max(bytes loaded / load bandwidth at its footprint, FLOPs / peak FLOP rate)
- bytes loaded: every float32 array the kernel must read once (outputs that
  are updated in place are read too); stores are counted but assumed to
  overlap with loads (separate store port);
- load bandwidth: measured in this run by a read-only SIMD sweep over a
  buffer of the kernel's footprint (L1, L2 or L3 as the size dictates);
- peak FLOP rate: 2 FMA pipes x 8 float32 lanes x 2 FLOPs per cycle, at a
  clock estimated from the L1 sweep assuming 2 x 32-byte loads per cycle.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import datetime
import platform
import sys
import timeit

import numpy as np

try:
    from adalora_core.backends import native
except ImportError as exc:  # pragma: no cover
    sys.exit(f"adalora_core is not installed ({exc}); run `pip install -e .` first")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:
    torch = None

F32 = np.float32
REPEAT = 5


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def per_call_ns(fn, budget_s: float) -> float:
    """Best-of-REPEAT mean time per call of fn(), in ns."""
    t = timeit.Timer(fn)
    n, took = 1, t.timeit(1)
    while took < budget_s / REPEAT / 4 and n < 10**7:
        n *= 4
        took = t.timeit(n)
    n = max(1, int(n * (budget_s / REPEAT) / max(took, 1e-9)))
    return min(t.repeat(REPEAT, n)) / n * 1e9


def fmt_ns(ns: float | None) -> str:
    if ns is None:
        return "n/a"
    return f"{ns:,.0f} ns" if ns < 10_000 else f"{ns / 1000:,.1f} µs"


class Bandwidth:
    """Load bandwidth (bytes/ns) at a footprint, from the C read sweep."""

    def __init__(self) -> None:
        self.cache: dict[int, float] = {}

    def at(self, nbytes: int) -> float:
        kib = 16
        while kib * 1024 < nbytes:  # a power of two KiB at least as large
            kib *= 2
        if kib not in self.cache:
            buf = np.ones(kib * 256, F32)
            iters = max(3, int(3e7 / (kib * 1024)))
            self.cache[kib] = max(kib * 1024 / native.read_ns(buf, iters) for _ in range(7))
        return self.cache[kib]


L1_BYTES = 32 * 1024


class Bench:
    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.rng = np.random.default_rng(0)
        self.bw = Bandwidth()
        native.read_ns(np.ones(1 << 20, F32), 50)  # wake the core up
        self.l1_bw = self.bw.at(16 * 1024)
        self.ghz = self.l1_bw / 64.0  # 2 x 32-byte loads per cycle
        self.peak = 32.0 * self.ghz  # FLOP/ns: 2 FMA pipes x 8 lanes x 2
        self.rows: list[list[str]] = []

    def rnd(self, *shape):
        return self.rng.uniform(-1, 1, size=shape).astype(F32)

    def time(self, fn, scale: float = 1.0) -> float:
        return per_call_ns(fn, self.budget * scale)

    def add(
        self,
        op,
        d,
        py,
        kern,
        loaded,
        stored,
        flops,
        footprint,
        np_ns,
        t_ns,
        target="",
        published="",
    ):
        """One table row. Floor: loads only (stores overlap) up to loads plus
        stores when the footprint spills L1 (write-backs share the L2 path)."""
        bw = self.bw.at(footprint)
        lo = max(loaded / bw, flops / self.peak)
        hi = max((loaded + stored) / bw, flops / self.peak) if footprint > L1_BYTES else lo
        floor = fmt_ns(lo) if hi == lo else f"{fmt_ns(lo)} – {fmt_ns(hi)}"
        verdict = ""
        if target:
            verdict = " ✓" if py <= float(target.split()[1]) * 1000 else " ✗"
        self.rows.append([
            op, str(d), fmt_ns(py), fmt_ns(kern), floor, f"{kern / lo:.2f}x",
            f"{loaded / 1024:.0f} / {stored / 1024:.0f} KiB, {flops / 1000:.0f} k",
            fmt_ns(np_ns), fmt_ns(t_ns), target + verdict, published,
        ])  # fmt: skip


def bench_forward(b: Bench, r: int, d: int, target: str, published: str) -> None:
    x, A, B, out = b.rnd(d), b.rnd(d, r), b.rnd(r, d), np.zeros(d, F32)
    s = 0.5
    op = native.lora_forward_add
    py = b.time(lambda: op(x, A, B, s, out))
    iters = max(100, 4_000_000 // d)
    kern = min(native.kernel_ns_forward_add(x, A, B, s, out, iters) for _ in range(5))
    np_ns = b.time(lambda: np.add(out, s * (x @ A) @ B, out=out))
    t_ns = None
    if torch is not None:
        tx, tA, tB, tout = (torch.from_numpy(a) for a in (x, A, B, out))
        t_ns = b.time(lambda: tout.add_(s * (tx @ tA) @ tB))
    loaded = 4 * d * (2 * r + 2)  # x, A, B, out
    b.add(f"forward_add r{r}", d, py, kern, loaded, 4 * d, 4 * r * d, loaded, np_ns, t_ns,
          target, published)  # fmt: skip


def bench_accumulate(b: Bench, d: int, target: str, published: str) -> None:
    r = 2
    x, g, A, B = b.rnd(d), b.rnd(d), b.rnd(d, r), b.rnd(r, d)
    gA, gB = np.zeros((d, r), F32), np.zeros((r, d), F32)
    s, reward = 0.5, 0.8
    c = s * reward
    op = native.lora_accumulate
    py = b.time(lambda: op(x, g, A, B, s, reward, gA, gB))
    iters = max(100, 2_000_000 // d)
    kern = min(native.kernel_ns_accumulate(x, g, A, B, c, gA, gB, iters) for _ in range(5))

    def numpy_way():
        gA.__iadd__(c * np.outer(x, g @ B.T))
        gB.__iadd__(c * np.outer(x @ A, g))

    np_ns = b.time(numpy_way)
    t_ns = None
    if torch is not None:
        tx, tg, tA, tB, tgA, tgB = (torch.from_numpy(a) for a in (x, g, A, B, gA, gB))

        def torch_way():
            tgA.add_(c * torch.outer(tx, tg @ tB.T))
            tgB.add_(c * torch.outer(tx @ tA, tg))

        t_ns = b.time(torch_way)
    loaded = 4 * d * (4 * r + 3)  # x twice, A, grad_out, B, gA, gB
    b.add("accumulate r2", d, py, kern, loaded, 8 * r * d, 8 * r * d, loaded, np_ns, t_ns,
          target, published)  # fmt: skip


def bench_ewc(b: Bench, d: int) -> None:
    r = 2
    ps = [b.rnd(d, r), b.rnd(r, d)]
    gs = [p * F32(1e-3) for p in ps]
    Fs = [np.zeros_like(p) for p in ps]
    opts = [p.copy() for p in ps]
    arrays = list(zip(ps, gs, Fs, opts))
    op = native.lora_apply_ewc

    def native_way():
        for p, g, F, o in arrays:
            op(p, g, 1.0, 1e-3, 0.1, F, o, 0.999, True, True)

    py = b.time(native_way)
    iters = max(100, 2_000_000 // d)
    kern = sum(min(native.kernel_ns_apply_ewc(p, g, F, o, iters) for _ in range(5))
               for p, g, F, o in arrays)  # fmt: skip

    def numpy_way():
        for p, g, F, o in arrays:
            gm = g * 1.0
            F *= 0.999
            F += 0.001 * gm * gm
            a = 1e-3 * 0.1 * F
            p[...] = (p - 1e-3 * gm + a * o) / (1 + a)
            g[...] = 0

    np_ns = b.time(numpy_way)
    t_ns = None
    if torch is not None:
        tarrays = [tuple(torch.from_numpy(a) for a in group) for group in arrays]

        def torch_way():
            for p, g, F, o in tarrays:
                gm = g * 1.0
                F.mul_(0.999).add_(0.001 * gm * gm)
                a = 1e-3 * 0.1 * F
                p.copy_((p - 1e-3 * gm + a * o) / (1 + a))
                g.zero_()

        t_ns = b.time(torch_way)
    n_el = 2 * r * d  # A and B
    b.add("apply_ewc r2 (A and B)", d, py, kern, 16 * n_el, 12 * n_el, 11 * n_el, 16 * n_el,
          np_ns, t_ns)  # fmt: skip


def bench_batched(b: Bench, target: str) -> None:
    d, n, m, r = 4096, 64, 64, 2
    x, out = b.rnd(n, d), np.zeros((n, d), F32)
    A_stack, B_stack = b.rnd(m, d, r), b.rnd(m, r, d)
    idx = b.rng.permutation(m).astype(np.int64)
    s = 0.5
    op = native.lora_forward_add_batched
    py = b.time(lambda: op(x, A_stack, B_stack, s, idx, out), 2)
    kern = min(native.kernel_ns_forward_add_batched(x, A_stack, B_stack, s, idx, out, 50)
               for _ in range(5))  # fmt: skip

    def numpy_way():
        h = np.einsum("bi,bir->br", x, A_stack[idx])
        out.__iadd__(s * np.einsum("br,bro->bo", h, B_stack[idx]))

    np_ns = b.time(numpy_way, 2)
    t_ns = None
    if torch is not None:
        tx, tA, tB, ti, tout = (torch.from_numpy(a) for a in (x, A_stack, B_stack, idx, out))

        def torch_way():
            h = torch.bmm(tx.unsqueeze(1), tA[ti])
            tout.add_(s * torch.bmm(h, tB[ti]).squeeze(1))

        t_ns = b.time(torch_way, 2) / n
    footprint = 4 * m * 2 * r * d + 2 * 4 * n * d  # every adapter, x, out
    b.add(f"batched forward r2, {n} requests / {m} adapters, per request", d, py / n, kern / n,
          4 * d * (2 * r + 2), 4 * d, 4 * r * d, footprint, np_ns / n, t_ns, target)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter timing budget per figure")
    args = ap.parse_args()
    info = native.info()
    if not info["available"]:
        print(f"native backend not available: {info['reason']}")
        return 1
    b = Bench(0.05 if args.quick else 0.25)

    ruv_fwd = {768: "484 ns", 2048: "1.33 µs", 4096: "2.61 µs"}
    ruv_acc = {768: "2.6 µs", 2048: "6.5 µs", 4096: "21.9 µs"}
    fwd_target = {768: "<= 0.6 µs", 4096: "<= 1.0 µs"}
    for r in (1, 2):
        for d in (768, 2048, 4096):
            bench_forward(b, r, d, fwd_target.get(d, "") if r == 2 else "",
                          ruv_fwd[d] if r == 2 else "")  # fmt: skip
    for d in (768, 2048, 4096):
        bench_accumulate(b, d, "<= 2.0 µs" if d == 4096 else "", ruv_acc[d])
    for d in (768, 4096):
        bench_ewc(b, d)
    bench_batched(b, "<= 1.0 µs")

    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    tv = torch.__version__ if torch is not None else "not installed"
    bws = ", ".join(f"{k} KiB {v:.0f}" for k, v in sorted(b.bw.cache.items()))
    print(f"## adalora-core native kernels: {cpu_model()}, {now}\n")
    print(
        f"- kernel path `{info['isa']}` ({info['build']}); one-call fast path: {info['fast_path']}"
    )
    print(f"- Python {platform.python_version()}, NumPy {np.__version__}, PyTorch {tv}; "
          "one thread everywhere (BLAS and torch set to 1)")  # fmt: skip
    print(f"- times: best of {REPEAT} repeats of a timed loop; d = in = out features; "
          "one request = one vector; NumPy/PyTorch written the obvious way, same arrays")  # fmt: skip
    print(
        f"- measured read bandwidth (B/ns) by footprint: {bws}; peak {b.peak:.0f} FLOP/ns "
        f"(32 FLOP/cycle at ~{b.ghz:.1f} GHz, clock estimated from the L1 sweep at 64 B/cycle)"
    )
    print("- floor = max(bytes / bandwidth at the footprint, FLOPs / peak): loads only (stores "
          "overlap); past L1, up to loads + stores (write-backs share the L2 path); "
          "kernel / floor uses the lower figure")  # fmt: skip
    print("- ruvLLM: the Rust seed's published figures (Apple M4 Pro, NEON, rank 2), another "
          "machine, for orientation only\n")  # fmt: skip
    head = ["op", "d", "native from Python", "kernel alone (C loop)", "floor", "kernel / floor",
            "loaded / stored, FLOPs", "NumPy", "PyTorch", "target (from Python)", "ruvLLM"]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in b.rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
