"""AdaLoRA in plain JAX: the whole training step, allocator included, is one ``jax.jit`` function.

    python examples/train_jax.py [--steps 600] [--seed 1]

The task is the planted-rank demo's (``python -m adalora_core demo``): an
8-layer linear MLP whose layers are orthogonal base weights, adapted with
AdaLoRA triplets towards a teacher that adds low-rank perturbations of
ranks 1 to 8 (mean 4 = ``target_r``), trained by layer-wise distillation.
Here JAX does the differentiation (``jax.grad`` of the loss plus the
orthogonal regulariser), the optimizer is the core's functional Adam, and
the rank allocation is the core's pure :func:`allocator_step`, all inside one
compiled step that takes the step number as a traced array: it compiles
once and never reads the device. The host reads the device only to print
the loss and the ranks. If the allocator works, the ranks it keeps per layer
follow the planted ones.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp

from adalora_core import AdaLoraConfig, Adam, orth, triplet
from adalora_core.allocator import allocator_step, current_ranks, init_state, step_config
from adalora_core.demo import PLANTED, spearman
from adalora_core.triplet import Triplet


def planted_task(key: Any, dim: int, planted: list[int], sv: float = 0.6) -> tuple[Any, Any]:
    """Orthogonal base weights and teacher weights ``base + U diag(sv) Vᵀ`` of the planted ranks, stacked.

    One batched QR and whole-stack ops: eager JAX compiles each new op and shape once.
    """
    q, _ = jnp.linalg.qr(jax.random.normal(key, (len(planted), 3, dim, dim)))
    s = sv * (jnp.arange(dim) < jnp.asarray(planted)[:, None])  # the first k columns of U and V count
    return q[:, 0], q[:, 0] + (q[:, 1] * s[:, None, :]) @ jnp.swapaxes(q[:, 2], -1, -2)


def init_adapters(key: Any, names: list[str], r: int, dim: int) -> dict[str, Triplet]:
    """PEFT's AdaLoRA initialisation: E = 0, A and B ~ N(0, 0.02)."""
    ka, kb = jax.random.split(key)
    A = 0.02 * jax.random.normal(ka, (len(names), r, dim))
    B = 0.02 * jax.random.normal(kb, (len(names), dim, r))
    return {n: Triplet(A[i], jnp.zeros((r, 1)), B[i]) for i, n in enumerate(names)}


def flat(trips: dict[str, Triplet]) -> dict[str, Any]:
    return {f"{n}.{part}": t for n, trip in trips.items() for part, t in zip("AEB", trip)}


def nested(arrays: dict[str, Any], names: list[str]) -> dict[str, Triplet]:
    return {n: Triplet(*(arrays[f"{n}.{part}"] for part in "AEB")) for n in names}


def run(steps: int = 600, dim: int = 32, batch: int = 128, seed: int = 1, log_every: int = 50,
        log: Any = print) -> dict[str, Any]:
    planted = list(PLANTED)
    names = [f"layers.{i}" for i in range(len(planted))]
    cfg = AdaLoraConfig(total_step=steps, init_r=8, target_r=4, tinit=steps // 5, tfinal=steps // 5, deltaT=10,
                        lora_alpha=8, orth_reg_weight=0.1)
    k_task, k_init, k_data = jax.random.split(jax.random.key(seed), 3)
    base, teacher = planted_task(k_task, dim, planted)
    params = init_adapters(k_init, names, cfg.init_r, dim)
    ranknum = float(cfg.init_r)

    opt = Adam(lr=1e-2)
    opt_state = opt.init(flat(params))
    opt_state["step"] = {k: jnp.asarray(0) for k in opt_state["step"]}  # arrays from the start: one compilation
    sc = step_config(cfg, params)  # the allocator's static part: the layout of the modules and the schedule
    alloc_state = init_state(sc, params[names[0]].A)  # its dynamic part: arrays only
    # committed to one device, as the step's outputs will be: the step compiles once
    params, opt_state, alloc_state = jax.device_put((params, opt_state, alloc_state), jax.devices()[0])

    def loss_fn(params: dict[str, Triplet], h: Any) -> Any:
        """Layer-wise distillation: each layer sees the teacher's activations."""
        loss: Any = 0.0
        for n, w, w_t in zip(names, base, teacher):
            target = h @ w_t.T
            diff = h @ w.T + triplet.forward(h, *params[n], cfg.scaling, ranknum) - target
            loss = loss + jnp.mean(jnp.sum(diff * diff, axis=1))
            h = target
        return loss

    def objective(params: dict[str, Triplet], h: Any) -> tuple[Any, Any]:
        loss = loss_fn(params, h)
        reg = orth.orth_reg([(params[n].A, params[n].B) for n in names])
        return loss + cfg.orth_reg_weight * reg, loss

    @jax.jit
    def train_step(params, opt_state, alloc_state, step):
        h = jax.random.normal(jax.random.fold_in(k_data, step), (batch, dim))
        grads, loss = jax.grad(objective, has_aux=True)(params, h)
        new, opt_state = opt.step(flat(params), flat(grads), opt_state)
        params = nested(new, names)
        alloc_state, new_E = allocator_step(alloc_state, params, grads, step, sc)
        params = {n: params[n]._replace(E=new_E[n]) for n in names}
        return params, opt_state, alloc_state, loss

    t0 = time.perf_counter()
    loss_start = None
    for step in range(steps):
        params, opt_state, alloc_state, loss = train_step(params, opt_state, alloc_state, jnp.asarray(step))
        if step == 0:
            loss_start = float(loss)
        if log and (step % log_every == 0 or step == steps - 1):
            ranks = list(current_ranks(alloc_state, sc).values())  # the host reads the device here only
            log(f"step {step:4d}  loss {float(loss):9.5f}  budget {int(alloc_state.budget):3d}  ranks {ranks}")
    final = list(current_ranks(alloc_state, sc).values())
    compiled = train_step._cache_size()  # type: ignore[attr-defined]  # JAX's count of compiled variants
    result = {"planted": planted, "final": final, "spearman": spearman(planted, final), "loss_start": loss_start,
              "loss_end": float(loss), "compilations": compiled, "skipped_steps": int(alloc_state.skips),
              "seconds": time.perf_counter() - t0}
    if log:
        log(f"planted ranks {planted}")
        log(f"found ranks   {final}  (Spearman {result['spearman']:.2f})")
        log(f"{steps} steps in {result['seconds']:.1f} s, train_step compiled {result['compilations']} time(s)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    run(steps=args.steps, seed=args.seed)


if __name__ == "__main__":
    main()
