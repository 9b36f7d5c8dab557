"""The core allocator's step on one device through different array libraries (torch, CuPy, JAX, NumPy).

    python benchmarks/bench_allocator_backends.py --backends torch:cuda,cupy --shape llama7b

``RankAllocator.update_and_allocate`` on the Llama-7B or BERT adapter shapes (224 or 84
modules, rank 12), every step a masking step, the same weights and gradients converted to
each library; median of ``--reps`` steps between device syncs. The masks of every backend
are compared with the first one's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import adalora_core as ac

SHAPES = {"llama7b": (32, 4096, 11008), "bert": (12, 768, 3072), "quick": (2, 64, 96)}


def modules(blocks: int, d: int, ffn: int) -> dict[str, tuple[int, int]]:
    """(in, out) per adapted linear: q, k, v, o, gate, up, down per block."""
    out = {}
    for b in range(blocks):
        for name, io in (("q", (d, d)), ("k", (d, d)), ("v", (d, d)), ("o", (d, d)), ("gate", (d, ffn)),
                         ("up", (d, ffn)), ("down", (ffn, d))):
            out[f"blocks.{b}.{name}"] = io
    return out


def host_data(dims: dict[str, tuple[int, int]], r: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(0)

    def trip(n_in: int, n_out: int) -> ac.Triplet:
        return ac.Triplet(*(rng.standard_normal(s, dtype=np.float32) for s in ((r, n_in), (r, 1), (n_out, r))))

    return {n: trip(*io) for n, io in dims.items()}, {n: trip(*io) for n, io in dims.items()}


def run(spec: str, params: dict, grads: dict, r: int, reps: int) -> tuple[float, dict]:
    name, _, dev = spec.partition(":")
    b = ac.get_backend(name, device=dev or None)
    conv = {n: ac.Triplet(*(b.asarray(t) for t in trip)) for n, trip in params.items()}
    gconv = {n: ac.Triplet(*(b.asarray(t) for t in trip)) for n, trip in grads.items()}
    cfg = ac.AdaLoraConfig(total_step=10_000, init_r=r, target_r=r * 2 // 3, tinit=0, tfinal=0, deltaT=1)
    alloc = ac.RankAllocator(cfg, {n: r for n in params}, backend=b)
    times = []
    for step in range(reps + 3):
        b.synchronize()
        t0 = time.perf_counter()
        alloc.update_and_allocate(step, conv, gconv)
        b.synchronize()
        if step >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), alloc.rank_pattern


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="numpy,torch")
    p.add_argument("--shape", choices=sorted(SHAPES), default="bert")
    p.add_argument("--reps", type=int, default=15)
    a = p.parse_args()
    dims = modules(*SHAPES[a.shape])
    params, grads = host_data(dims, 12)
    first = None
    print(f"update_and_allocate, {a.shape}: {len(dims)} modules, rank 12, masking every step; median of {a.reps}")
    for spec in a.backends.split(","):
        ms, pattern = run(spec, params, grads, 12, a.reps)
        first = first or (spec, pattern)
        same = "same masks as " + first[0] if pattern == first[1] else "MASKS DIFFER from " + first[0]
        print(f"  {spec:>12}: {ms:8.2f} ms  ({same})")


if __name__ == "__main__":
    main()
