"""Benchmark of the native backend's C kernels (one CPU core).

    python benchmarks/bench_native.py [--quick] [--only ops,api,paths]

Prints markdown tables, all figures from the same run, single-threaded:

- ``ops``: each op from Python (the public op, one request), the C kernel
  alone (timed in a C loop, no Python), its floor from counted bytes and
  FLOPs, NumPy written the obvious way, and PyTorch written the obvious way
  (when importable);
- ``api``: ``LoraAdapter.forward_add``, ``MicroLoRA.forward_add`` and
  ``AdapterPool.forward_add_batched`` through the public API against the C
  kernel alone on the same memory layout (the adapters' rank-major storage);
- ``paths``: ways of calling one rank-2 kernel from Python: the op as built
  (a METH_FASTCALL entry using NumPy's C API) against cffi calls.

The kernel-alone figures come from a benchmark-only build of the same kernel
sources with the timing loops of ``native/bench/bench.c`` (compiled on first
use by ``native/bench/build.py``), so they exist whatever the installed
library is: the same script times an older install for a before/after table.

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
import importlib.util
import platform
import sys
import timeit
from pathlib import Path

import numpy as np
from machine import cpu_name

try:
    from adalora_core.backends import native

    import adalora_core
except ImportError as exc:  # pragma: no cover
    sys.exit(f"adalora_core is not installed ({exc}); run `pip install -e .` first")


def _bench_build():
    """``(ffi, lib)`` of the benchmark-only build (native/bench/build.py, by path)."""
    path = Path(__file__).resolve().parent.parent / "native" / "bench" / "build.py"
    spec = importlib.util.spec_from_file_location("adalora_bench_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.load()


FFI, TIMER = _bench_build()
ROW_MAJOR, RANK_MAJOR = 0, 1


def _fp(a: np.ndarray):
    """cffi pointer to the memory of a C- or F-contiguous float32 array."""
    return FFI.from_buffer("float[]", a if a.flags.c_contiguous else a.T)


def _layout(A: np.ndarray) -> int:
    """The kernels' layout of an ``A (r, in)``: C-contiguous is rank-major, its transposed view row-major."""
    return RANK_MAJOR if A.flags.c_contiguous else ROW_MAJOR


def kernel_ns_forward_add(x, A, B, s, out, iters: int) -> float:
    """ns per call of the forward kernel alone (x one vector; A (r, in) in either layout)."""
    r, d_in = A.shape
    return TIMER.adl_bench_forward_add(_fp(x), d_in, _fp(A), _layout(A), r, _fp(B), B.shape[1], s, _fp(out), iters)


def kernel_ns_accumulate(x, g, A, B, c, gA, gB, iters: int) -> float:
    r, d_in = A.shape
    return TIMER.adl_bench_accumulate(_fp(x), _fp(g), d_in, B.shape[1], _fp(A), _layout(A), r, _fp(B), c,
                                      _fp(gA), _fp(gB), iters)


def kernel_ns_apply_ewc(p, g, F, o, iters: int) -> float:
    return TIMER.adl_bench_apply_ewc(_fp(p), _fp(g), p.size, _fp(F), _fp(o), iters)


def kernel_ns_forward_add_batched(x, A_stack, B_stack, s, idx, out, iters: int) -> float:
    """ns per call of the batched kernel alone (all n requests); A_stack (m, r, in) C-contiguous
    (rank-major) or the (0, 2, 1) view of a C-contiguous (m, in, r) stack."""
    m, r, d_in = A_stack.shape
    rank_major = A_stack.flags.c_contiguous
    mem = A_stack if rank_major else A_stack.transpose(0, 2, 1)
    return TIMER.adl_bench_forward_add_batched(
        _fp(x), x.shape[0], d_in, FFI.from_buffer("float[]", mem), RANK_MAJOR if rank_major else ROW_MAJOR, r,
        _fp(B_stack), B_stack.shape[2], m, FFI.from_buffer("int64_t[]", idx), s, _fp(out), iters)


def read_ns(buf: np.ndarray, iters: int) -> float:
    return TIMER.adl_bench_read(_fp(buf), buf.size, iters)

try:
    import torch

    torch.set_num_threads(1)
except ImportError:
    torch = None

F32 = np.float32
REPEAT = 5


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
            self.cache[kib] = max(kib * 1024 / read_ns(buf, iters) for _ in range(7))
        return self.cache[kib]


L1_BYTES = 32 * 1024


class Bench:
    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.rng = np.random.default_rng(0)
        self.bw = Bandwidth()
        read_ns(np.ones(1 << 20, F32), 50)  # wake the core up
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
    x, A, B, out = b.rnd(d), b.rnd(r, d), b.rnd(r, d), np.zeros(d, F32)
    s = 0.5
    op = native.lora_forward_add
    py = b.time(lambda: op(x, A, B, s, out))
    iters = max(100, 4_000_000 // d)
    kern = min(kernel_ns_forward_add(x, A, B, s, out, iters) for _ in range(5))
    np_ns = b.time(lambda: np.add(out, s * (x @ A.T) @ B, out=out))
    t_ns = None
    if torch is not None:
        tx, tA, tB, tout = (torch.from_numpy(a) for a in (x, A, B, out))
        t_ns = b.time(lambda: tout.add_(s * (tx @ tA.T) @ tB))
    loaded = 4 * d * (2 * r + 2)  # x, A, B, out
    b.add(f"forward_add r{r}", d, py, kern, loaded, 4 * d, 4 * r * d, loaded, np_ns, t_ns,
          target, published)  # fmt: skip


def bench_accumulate(b: Bench, d: int, target: str, published: str) -> None:
    r = 2
    x, g, A, B = b.rnd(d), b.rnd(d), b.rnd(r, d), b.rnd(r, d)
    gA, gB = np.zeros((r, d), F32), np.zeros((r, d), F32)
    s, reward = 0.5, 0.8
    c = s * reward
    op = native.lora_accumulate
    py = b.time(lambda: op(x, g, A, B, s, reward, gA, gB))
    iters = max(100, 2_000_000 // d)
    kern = min(kernel_ns_accumulate(x, g, A, B, c, gA, gB, iters) for _ in range(5))

    def numpy_way():
        gA.__iadd__(c * np.outer(g @ B.T, x))
        gB.__iadd__(c * np.outer(x @ A.T, g))

    np_ns = b.time(numpy_way)
    t_ns = None
    if torch is not None:
        tx, tg, tA, tB, tgA, tgB = (torch.from_numpy(a) for a in (x, g, A, B, gA, gB))

        def torch_way():
            tgA.add_(c * torch.outer(tg @ tB.T, tx))
            tgB.add_(c * torch.outer(tx @ tA.T, tg))

        t_ns = b.time(torch_way)
    loaded = 4 * d * (4 * r + 3)  # x twice, A, grad_out, B, gA, gB
    b.add("accumulate r2", d, py, kern, loaded, 8 * r * d, 8 * r * d, loaded, np_ns, t_ns,
          target, published)  # fmt: skip


def bench_ewc(b: Bench, d: int) -> None:
    r = 2
    ps = [b.rnd(r, d), b.rnd(r, d)]
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
    kern = sum(min(kernel_ns_apply_ewc(p, g, F, o, iters) for _ in range(5))
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
    A_stack, B_stack = b.rnd(m, r, d), b.rnd(m, r, d)
    idx = b.rng.permutation(m).astype(np.int64)
    s = 0.5
    op = native.lora_forward_add_batched
    py = b.time(lambda: op(x, A_stack, B_stack, s, idx, out), 2)
    kern = min(kernel_ns_forward_add_batched(x, A_stack, B_stack, s, idx, out, 50)
               for _ in range(5))  # fmt: skip

    def numpy_way():
        h = np.einsum("bi,bri->br", x, A_stack[idx])
        out.__iadd__(s * np.einsum("br,bro->bo", h, B_stack[idx]))

    np_ns = b.time(numpy_way, 2)
    t_ns = None
    if torch is not None:
        tx, tA, tB, ti, tout = (torch.from_numpy(a) for a in (x, A_stack, B_stack, idx, out))

        def torch_way():
            h = torch.bmm(tx.unsqueeze(1), tA[ti].transpose(1, 2))
            tout.add_(s * torch.bmm(h, tB[ti]).squeeze(1))

        t_ns = b.time(torch_way, 2) / n
    footprint = 4 * m * 2 * r * d + 2 * 4 * n * d  # every adapter, x, out
    b.add(f"batched forward r2, {n} requests / {m} adapters, per request", d, py / n, kern / n,
          4 * d * (2 * r + 2), 4 * d, 4 * r * d, footprint, np_ns / n, t_ns, target)  # fmt: skip


# ---------------------------------------------------------------------------
# the public API against the kernel alone on the same layout
# ---------------------------------------------------------------------------


def _table(head: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def _api_row(what: str, d: int, api_ns: float, kern_ns: float, target: float | None) -> list[str]:
    ratio = api_ns / kern_ns
    verdict = "" if target is None else f"<= {target}x: {'met' if ratio <= target else 'missed'}"
    return [what, str(d), fmt_ns(api_ns), fmt_ns(kern_ns), f"{ratio:.2f}x", fmt_ns(api_ns - kern_ns), verdict]


def bench_adapters(b: Bench, r: int, d: int) -> list[list[str]]:
    """LoraAdapter.forward_add and MicroLoRA.forward_add (one request, rank-major storage)."""
    from adalora_core import LoraAdapter, MicroLoRA, MicroLoraConfig

    x, out = b.rnd(d), np.zeros(d, F32)
    A, B = b.rnd(r, d), b.rnd(r, d)
    m = MicroLoRA(MicroLoraConfig(rank=r, in_features=d, out_features=d, target_modules=("q_proj",)),
                  backend="native", ewc=None)
    m.adapter("q_proj").set_weights(A, B)
    ad = LoraAdapter(d, d, r, backend="native")
    ad.set_weights(A, B)
    iters = max(100, 4_000_000 // d)
    kern = min(kernel_ns_forward_add(x, A, B, 1.0, out, iters) for _ in range(5))
    return [_api_row(f"LoraAdapter.forward_add r{r}", d, b.time(lambda: ad.forward_add(x, out)), kern, None),
            _api_row(f"MicroLoRA.forward_add r{r}", d, b.time(lambda: m.forward_add(x, "q_proj", out)), kern, None)]


def bench_pool(b: Bench, r: int, d: int, n: int = 64, m: int = 64) -> list[list[str]]:
    """AdapterPool.forward_add_batched, n requests over m sessions (by slot indices and by ids)."""
    from adalora_core import AdapterPool

    pool = AdapterPool(d, d, r, backend="native", capacity=m)
    A_stack, B_stack = b.rnd(m, r, d), b.rnd(m, r, d)
    ids = [f"user-{k}" for k in range(m)]
    for k, sid in enumerate(ids):
        pool.create(sid).set_weights(A_stack[k], B_stack[k])
    req = [ids[k] for k in b.rng.permutation(m)[:n]]
    idx = pool.indices(req)
    x, out = b.rnd(n, d), np.zeros((n, d), F32)
    # the pool's layout: rank-major A per adapter, slots in creation order
    kern = min(kernel_ns_forward_add_batched(x, A_stack, B_stack, pool.scaling, idx, out, 50) for _ in range(5))
    what = f"AdapterPool.forward_add_batched r{r}, {n} requests / {m} sessions"
    return [_api_row(what + ", slot indices", d, b.time(lambda: pool.forward_add_batched(x, idx, out), 2),
                     kern, 1.2),
            _api_row(what + ", session ids", d, b.time(lambda: pool.forward_add_batched(x, req, out), 2),
                     kern, None)]


def bench_paths(b: Bench, d: int = 768) -> list[list[str]]:
    """One rank-2 forward (d = in = out, one vector) called from Python in different ways."""
    x, out, A, B = b.rnd(d), np.zeros(d, F32), b.rnd(2, d), b.rnd(2, d)
    kern = min(kernel_ns_forward_add(x, A, B, 0.5, out, max(100, 4_000_000 // d)) for _ in range(5))
    op, fwd = native.lora_forward_add, TIMER.adl_lora_forward_add
    ptrs = [_fp(a) for a in (x, A, B, out)]
    ways = [
        ("the op as built (`native.lora_forward_add`)", lambda: op(x, A, B, 0.5, out)),
        ("cffi, `ffi.from_buffer` per array, no checks", lambda: fwd(
            FFI.from_buffer("float[]", x), 1, d, FFI.from_buffer("float[]", A), RANK_MAJOR, 2,
            FFI.from_buffer("float[]", B), d, 0.5, FFI.from_buffer("float[]", out))),
        ("cffi, pointers made once (a lower bound for any cffi path)", lambda: fwd(
            ptrs[0], 1, d, ptrs[1], RANK_MAJOR, 2, ptrs[2], d, 0.5, ptrs[3])),
        ("cffi, an empty call (`adl_active_isa()`)", TIMER.adl_active_isa),
    ]
    return [[what, fmt_ns(t), fmt_ns(t - kern)] for what, t in ((w, b.time(f)) for w, f in ways)] + \
        [["the kernel alone (C loop)", fmt_ns(kern), "0 ns"]]


def header(b: Bench, info: dict) -> None:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    tv = torch.__version__ if torch is not None else "not installed"
    bws = ", ".join(f"{k} KiB {v:.0f}" for k, v in sorted(b.bw.cache.items()))
    print(f"## adalora-core native kernels: {cpu_name()}, {now}\n")
    print(f"- adalora_core from {Path(adalora_core.__file__).parent}; kernel path `{info['isa']}` "
          f"({info['build']})")  # fmt: skip
    print(f"- Python {platform.python_version()}, NumPy {np.__version__}, PyTorch {tv}; "
          "one thread everywhere (BLAS and torch set to 1)")  # fmt: skip
    print(f"- times: best of {REPEAT} repeats of a timed loop; d = in = out features; "
          "one request = one vector; NumPy/PyTorch written the obvious way, same arrays")  # fmt: skip
    print(f"- measured read bandwidth (B/ns) by footprint: {bws}; peak {b.peak:.0f} FLOP/ns "
          f"(32 FLOP/cycle at ~{b.ghz:.1f} GHz, clock estimated from the L1 sweep at 64 B/cycle)")  # fmt: skip
    print("- floor = max(bytes / bandwidth at the footprint, FLOPs / peak): loads only (stores "
          "overlap); past L1, up to loads + stores (write-backs share the L2 path); "
          "kernel / floor uses the lower figure")  # fmt: skip
    print("- ruvLLM: the Rust original's published figures (Apple M4 Pro, NEON, rank 2; "
          "docs/spec-microlora.md), another machine, for orientation only\n")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter timing budget per figure")
    ap.add_argument("--only", default="ops,api,paths", help="comma-separated tables: ops, api, paths")
    args = ap.parse_args()
    tables = {t.strip() for t in args.only.split(",")}
    info = native.info()
    if not info["available"]:
        print(f"native backend not available: {info['reason']}")
        return 1
    TIMER.adl_select_isa(info["isa"].encode())  # time the path the library runs
    b = Bench(0.05 if args.quick else 0.25)
    if "ops" in tables:
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
    api: list[list[str]] = []
    if "api" in tables:
        for r in (1, 2):
            for d in (768, 4096):
                api += bench_adapters(b, r, d) + bench_pool(b, r, d)
    paths = bench_paths(b) if "paths" in tables else []

    header(b, info)
    if b.rows:
        _table(["op", "d", "native from Python", "kernel alone (C loop)", "floor", "kernel / floor",
                "loaded / stored, FLOPs", "NumPy", "PyTorch", "target (from Python)", "ruvLLM"], b.rows)
    if api:
        _table(["public API (native)", "d", "from Python", "kernel alone, same layout", "ratio", "overhead",
                "target"], api)
    if paths:
        _table(["rank-2 forward at d = 768, called as", "per call", "over the kernel"], paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
