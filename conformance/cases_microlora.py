"""Conformance cases for MicroLoRA, EWC++ and the adapter pool.

Every case sets the adapters' weights from seeded NumPy draws (rounded to the
case's dtype), drives the library on one backend and returns host arrays;
the reference recomputes the same quantities with :mod:`reference` in
float64 from the same rounded inputs. Integer arrays (counters) are compared
exactly. ``microlora_cases()`` is what :mod:`.cases` loads.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import reference as R
from .cases import Case
from .common import TOL
from .common import Draw as _Draw
from .common import dev as _dev
from .common import host as _host
from .common import partner as _partner

__all__ = ["microlora_cases"]

IN, OUT, RANK, ALPHA = 24, 16, 2, 4.0
S = ALPHA / RANK


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _adapter(b: Any, dtype: str, A: np.ndarray, Bm: np.ndarray, rank: int = RANK, bias: np.ndarray | None = None):
    from adalora_core.lora import LoraAdapter

    ad = LoraAdapter(A.shape[1], Bm.shape[1], rank, ALPHA, backend=b, dtype=dtype, use_bias=bias is not None)
    ad.set_weights(_dev(b, A, dtype), _dev(b, Bm, dtype), None if bias is None else _dev(b, bias, dtype))
    return ad


def _weights(d: _Draw, n_in: int = IN, n_out: int = OUT, r: int = RANK) -> tuple[np.ndarray, np.ndarray]:
    """``A (r, in)``, ``B (r, out)``."""
    return _rank_major(d.normal((n_in, r), 0.5)), d.normal((r, n_out), 0.5)


def _rank_major(a: np.ndarray) -> np.ndarray:
    """An A-side draw ``(in, r)`` as ``(r, in)``: the values the cases have always drawn, in A's shape."""
    return np.ascontiguousarray(a.T)


def _case(name: str, run: Callable, ref: Callable, tol: dict[str, float] = TOL, stateful: bool = False) -> dict:
    return {"name": name, "run": run, "reference": ref, "tol": tol, "stateful": stateful}


# ---------------------------------------------------------------------------
# forward, forward_add
# ---------------------------------------------------------------------------


def _forward_cases() -> list[dict]:
    def inputs(dtype: str, batch: tuple[int, ...], seed: int):
        d = _Draw(seed, dtype)
        A, Bm = _weights(d)
        return A, Bm, d.normal((OUT,), 0.3), d.normal((*batch, IN)), d.normal((*batch, OUT))

    def make(tag: str, batch: tuple[int, ...], seed: int, via: str) -> dict:
        def run(b, dtype):
            from adalora_core.config import MicroLoraConfig
            from adalora_core.microlora import MicroLoRA

            A, Bm, bias, x, o = inputs(dtype, batch, seed)
            if via == "microlora":
                cfg = MicroLoraConfig(rank=RANK, alpha=ALPHA, in_features=IN, out_features=OUT,
                                      target_modules=("q_proj", "o_proj"), use_bias=True)
                m = MicroLoRA(cfg, backend=b, dtype=dtype, ewc=None)
                m.adapter("o_proj").set_weights(_dev(b, A, dtype), _dev(b, Bm, dtype), _dev(b, bias, dtype))
                y = m.forward(_dev(b, x, dtype), "o_proj")
                got = m.forward_add(_dev(b, x, dtype), "o_proj", _dev(b, o, dtype))
                if m.forward_count != 2:
                    raise AssertionError(f"forward_count {m.forward_count} != 2")
            else:
                ad = _adapter(b, dtype, A, Bm)
                y = ad.forward(_dev(b, x, dtype))
                got = ad.forward_add(_dev(b, x, dtype), _dev(b, o, dtype))
                bias = None
            return {"forward": _host(b, y, dtype, "forward"), "forward_add": _host(b, got, dtype, "forward_add")}

        def ref(dtype):
            A, Bm, bias, x, o = inputs(dtype, batch, seed)
            if via != "microlora":
                bias = None
            y = R.lora_forward(x, A, Bm, S, bias)
            return {"forward": y, "forward_add": o + y}

        return _case(f"microlora.forward.{tag}", run, ref)

    return [make("vector", (), 1001, "adapter"), make("batch", (9,), 1002, "adapter"),
            make("microlora_bias_vector", (), 1003, "microlora"), make("microlora_bias_batch", (5,), 1004, "microlora")]


# ---------------------------------------------------------------------------
# gradients: accumulate (single, batched, reward), apply
# ---------------------------------------------------------------------------


def _grad_cases() -> list[dict]:
    def inputs(dtype: str, seed: int, n: int, batch: bool):
        d = _Draw(seed, dtype)
        A, Bm = _weights(d)
        xs = [d.normal(((3,) if batch else ()) + (IN,)) for _ in range(n)]
        gs = [d.normal(((3,) if batch else ()) + (OUT,)) for _ in range(n)]
        rewards = [d.scalar(-1.0, 1.0) for _ in range(n)]
        return A, Bm, xs, gs, rewards

    def make(tag: str, seed: int, n: int, batch: bool, with_reward: bool, lr: float | None) -> dict:
        def run(b, dtype):
            A, Bm, xs, gs, rewards = inputs(dtype, seed, n, batch)
            ad = _adapter(b, dtype, A, Bm)
            for x, g, rw in zip(xs, gs, rewards):
                ad.accumulate_gradient(_dev(b, x, dtype), _dev(b, g, dtype), rw if with_reward else 1.0)
            out = {"grad_A": _host(b, ad.grad_A, dtype, "grad_A"), "grad_B": _host(b, ad.grad_B, dtype, "grad_B"),
                   "pending": np.array([ad.pending_updates], dtype=np.int64)}
            if lr is not None:
                stepped = ad.apply_gradients(lr)
                out.update(A=_host(b, ad.A, dtype, "A"), B=_host(b, ad.B, dtype, "B"),
                           grad_A_after=_host(b, ad.grad_A, dtype, "grad_A"),
                           stepped=np.array([int(stepped), ad.pending_updates], dtype=np.int64))
            return out

        def ref(dtype):
            A, Bm, xs, gs, rewards = inputs(dtype, seed, n, batch)
            gA, gB = np.zeros_like(A), np.zeros_like(Bm)
            count = 0
            for x, g, rw in zip(xs, gs, rewards):
                dA, dB = R.lora_accumulate(x, g, A, Bm, S, rw if with_reward else 1.0)
                gA, gB = gA + dA, gB + dB
                count += x.shape[0] if x.ndim == 2 else 1
            out = {"grad_A": gA, "grad_B": gB, "pending": np.array([count], dtype=np.int64)}
            if lr is not None:
                out.update(A=R.lora_apply(A, gA, count, lr), B=R.lora_apply(Bm, gB, count, lr),
                           grad_A_after=np.zeros_like(A), stepped=np.array([1, 0], dtype=np.int64))
            return out

        return _case(f"microlora.{tag}", run, ref)

    return [
        make("accumulate.single", 1101, 1, False, False, None),
        make("accumulate.batched", 1102, 2, True, False, None),
        make("accumulate.reward", 1103, 4, False, True, None),
        make("apply", 1104, 3, False, True, 0.07),
        make("apply.batched", 1105, 2, True, True, 0.05),
    ]


def _adapt_reward_case() -> list[dict]:
    """MicroLoRA.adapt: reward = feedback.reward, else quality; one source module or all targets."""
    n = 5

    def inputs(dtype: str):
        d = _Draw(1201, dtype)
        Aq, Bq = _weights(d)
        Av, Bv = _weights(d)
        steps = []
        for t in range(n):
            q = d.scalar(0.0, 1.0)
            rw = None if t % 2 else d.scalar(-1.0, 1.0)
            steps.append((d.normal((IN,)), d.normal((OUT,)), q, rw, None if t == 4 else ("q_proj", "v_proj")[t % 2]))
        return (Aq, Bq, Av, Bv), steps

    def run(b, dtype):
        from adalora_core.config import MicroLoraConfig
        from adalora_core.microlora import AdaptFeedback, MicroLoRA

        (Aq, Bq, Av, Bv), steps = inputs(dtype)
        m = MicroLoRA(MicroLoraConfig(rank=RANK, alpha=ALPHA, in_features=IN, out_features=OUT), backend=b,
                      dtype=dtype, ewc=None)
        m.adapter("q_proj").set_weights(_dev(b, Aq, dtype), _dev(b, Bq, dtype))
        m.adapter("v_proj").set_weights(_dev(b, Av, dtype), _dev(b, Bv, dtype))
        for x, g, q, rw, mod in steps:
            # the gradient goes in as a host list: feedback is host data
            m.adapt(_dev(b, x, dtype), AdaptFeedback(q, gradient_estimate=[float(v) for v in g], reward=rw,
                                                     source_module=mod))
        out = {}
        for mod in ("q_proj", "v_proj"):
            ad = m.adapter(mod)
            out[f"{mod}.grad_A"] = _host(b, ad.grad_A, dtype, "grad_A")
            out[f"{mod}.grad_B"] = _host(b, ad.grad_B, dtype, "grad_B")
            out[f"{mod}.pending"] = np.array([ad.pending_updates], dtype=np.int64)
        out["adaptation_count"] = np.array([m.adaptation_count], dtype=np.int64)
        return out

    def ref(dtype):
        (Aq, Bq, Av, Bv), steps = inputs(dtype)
        W = {"q_proj": (Aq, Bq), "v_proj": (Av, Bv)}
        G = {k: [np.zeros_like(a), np.zeros_like(bm), 0] for k, (a, bm) in W.items()}
        for x, g, q, rw, mod in steps:
            reward = q if rw is None else rw
            for k in ([mod] if mod else list(W)):
                dA, dB = R.lora_accumulate(x, g, *W[k], S, reward)
                G[k][0] = G[k][0] + dA
                G[k][1] = G[k][1] + dB
                G[k][2] += 1
        out = {}
        for k, (gA, gB, c) in G.items():
            out[f"{k}.grad_A"], out[f"{k}.grad_B"] = gA, gB
            out[f"{k}.pending"] = np.array([c], dtype=np.int64)
        out["adaptation_count"] = np.array([n], dtype=np.int64)
        return out

    return [_case("microlora.adapt.reward", run, ref)]


# ---------------------------------------------------------------------------
# EWC++
# ---------------------------------------------------------------------------


def _ewc_inputs(dtype: str, seed: int):
    d = _Draw(seed, dtype)
    A, Bm = _weights(d)
    return {
        "A": A, "B": Bm,
        "FA": _rank_major(d.uniform((IN, RANK), 0.0, 2.0)), "FB": d.uniform((RANK, OUT), 0.0, 2.0),
        "OA": A + _rank_major(d.normal((IN, RANK), 0.2)), "OB": Bm + d.normal((RANK, OUT), 0.2),
        "xs": [d.normal((IN,)) for _ in range(3)], "gs": [d.normal((OUT,)) for _ in range(3)],
    }


def _ewc_state(b: Any, dtype: str, v: dict, cfg: Any):
    from adalora_core.ewc import EwcState

    return EwcState(_dev(b, v["FA"], dtype), _dev(b, v["FB"], dtype), _dev(b, v["OA"], dtype),
                    _dev(b, v["OB"], dtype), config=cfg)


def _ewc_apply_cases() -> list[dict]:
    lr, lam, decay = 0.1, 3.0, 0.8  # explicit: a = lr*lam*F <= 0.6 < 2, stable

    def make(update: str, seed: int, feed: bool) -> dict:
        def run(b, dtype):
            from adalora_core.config import EwcConfig

            v = _ewc_inputs(dtype, seed)
            ad = _adapter(b, dtype, v["A"], v["B"])
            st = _ewc_state(b, dtype, v, EwcConfig(decay=decay, update=update, lam=lam, update_fisher=feed))
            for x, g in zip(v["xs"], v["gs"]):
                ad.accumulate_gradient(_dev(b, x, dtype), _dev(b, g, dtype), 1.0)
            ad.apply_gradients_with_ewc(lr, st)
            return {"A": _host(b, ad.A, dtype, "A"), "B": _host(b, ad.B, dtype, "B"),
                    "fisher_a": _host(b, st.fisher_a, dtype, "fisher_a"),
                    "fisher_b": _host(b, st.fisher_b, dtype, "fisher_b"),
                    "grad_B": _host(b, ad.grad_B, dtype, "grad_B")}

        def ref(dtype):
            v = _ewc_inputs(dtype, seed)
            gA, gB = np.zeros_like(v["A"]), np.zeros_like(v["B"])
            for x, g in zip(v["xs"], v["gs"]):
                dA, dB = R.lora_accumulate(x, g, v["A"], v["B"], S, 1.0)
                gA, gB = gA + dA, gB + dB
            n = len(v["xs"])
            step = R.ewc_apply_proximal if update == "proximal" else R.ewc_apply_explicit
            out = {"grad_B": np.zeros_like(v["B"])}
            for k, theta, g, F, O in (("a", v["A"], gA, v["FA"], v["OA"]), ("b", v["B"], gB, v["FB"], v["OB"])):
                gm = g / n
                F2 = R.ewc_fisher_ema(F, gm, decay) if feed else F
                out["A" if k == "a" else "B"] = step(theta, gm, lr, lam, F2, O)
                out[f"fisher_{k}"] = F2
            return out

        return _case(f"microlora.apply_ewc.{update}{'' if feed else '.no_fisher_update'}", run, ref)

    return [make("proximal", 1301, True), make("explicit", 1302, True), make("proximal", 1303, False)]


def _ewc_penalty_case() -> list[dict]:
    lam = 0.7

    def run(b, dtype):
        from adalora_core.config import EwcConfig

        v = _ewc_inputs(dtype, 1401)
        ad = _adapter(b, dtype, v["A"], v["B"])
        st = _ewc_state(b, dtype, v, EwcConfig(lam=lam))
        p = st.penalty(ad)
        ga, gb = st.penalty_grad(ad)
        return {"penalty": _host(b, p, dtype, "penalty").reshape(1), "grad_a": _host(b, ga, dtype, "grad_a"),
                "grad_b": _host(b, gb, dtype, "grad_b")}

    def ref(dtype):
        v = _ewc_inputs(dtype, 1401)
        p = R.ewc_penalty(v["A"], v["OA"], v["FA"], lam) + R.ewc_penalty(v["B"], v["OB"], v["FB"], lam)
        return {"penalty": np.array([p]), "grad_a": R.ewc_penalty_grad(v["A"], v["OA"], v["FA"], lam),
                "grad_b": R.ewc_penalty_grad(v["B"], v["OB"], v["FB"], lam)}

    return [_case("microlora.ewc.penalty", run, ref)]


def _ewc_window_case() -> list[dict]:
    """Windowed Fisher (K = 3, alpha = 0.6) over 7 observations, then a task boundary:
    the partial window is folded (k = 1) and F min-max normalised; theta* = current weights."""
    K, alpha, n = 3, 0.6, 7

    def inputs(dtype):
        d = _Draw(1501, dtype)
        v = _ewc_inputs(dtype, 1502)
        obs = [(_rank_major(d.normal((IN, RANK))), d.normal((RANK, OUT))) for _ in range(n)]
        return v, obs

    def run(b, dtype):
        from adalora_core.config import EwcConfig

        v, obs = inputs(dtype)
        ad = _adapter(b, dtype, v["A"], v["B"])
        st = _ewc_state(b, dtype, v, EwcConfig(mode="window", window=K, alpha=alpha, normalise_at_task_boundary=True))
        out = {}
        for t, (ga, gb) in enumerate(obs):
            st.observe(_dev(b, ga, dtype), _dev(b, gb, dtype))
            if t == 3:
                out["fisher_a_t3"] = _host(b, st.fisher_a, dtype, "fisher_a")
                out["window_b_t3"] = _host(b, st.window_b, dtype, "window_b")
        out["fisher_b_t6"] = _host(b, st.fisher_b, dtype, "fisher_b")
        st.start_new_task(ad)
        out.update(fisher_a=_host(b, st.fisher_a, dtype, "fisher_a"), fisher_b=_host(b, st.fisher_b, dtype, "fisher_b"),
                   optimal_a=_host(b, st.optimal_a, dtype, "optimal_a"),
                   optimal_b=_host(b, st.optimal_b, dtype, "optimal_b"),
                   window_steps=np.array([st.window_steps], dtype=np.int64))
        return out

    def ref(dtype):
        v, obs = inputs(dtype)
        F = [v["FA"], v["FB"]]
        Ssum = [np.zeros_like(v["FA"]), np.zeros_like(v["FB"])]
        steps = 0
        out = {}
        for t, gs in enumerate(obs):
            Ssum = [s + g**2 for s, g in zip(Ssum, gs)]
            steps += 1
            if steps == K:
                F = [R.ewc_fisher_window(f, s, K, alpha) for f, s in zip(F, Ssum)]
                Ssum = [np.zeros_like(s) for s in Ssum]
                steps = 0
            if t == 3:
                out["fisher_a_t3"], out["window_b_t3"] = F[0], Ssum[1]
        out["fisher_b_t6"] = F[1]
        F = [R.minmax_normalise(R.ewc_fisher_window(f, s, steps, alpha)) for f, s in zip(F, Ssum)]
        out.update(fisher_a=F[0], fisher_b=F[1], optimal_a=v["A"], optimal_b=v["B"],
                   window_steps=np.array([0], dtype=np.int64))
        return out

    return [_case("microlora.ewc.window_normalise", run, ref)]


# ---------------------------------------------------------------------------
# init, merge
# ---------------------------------------------------------------------------


def _init_merge_cases() -> list[dict]:
    n_in, r = 300, 2

    def run_init(b, dtype):
        from adalora_core.config import MicroLoraConfig
        from adalora_core.microlora import MicroLoRA

        m = MicroLoRA(MicroLoraConfig(rank=r, in_features=n_in, out_features=40, init="deterministic",
                                      target_modules=("k_proj",)), backend=b, dtype=dtype)
        ad = m.adapter("k_proj")
        return {"A": _host(b, ad.A, dtype, "A"), "B": _host(b, ad.B, dtype, "B")}

    def ref_init(dtype):
        # the reference is float64; the library rounds the float64 value to dtype once
        return {"A": np.asarray(R.golden_init(n_in, r), dtype=dtype).astype(np.float64), "B": np.zeros((r, 40))}

    def merge_inputs(dtype):
        d = _Draw(1601, dtype)
        A, Bm = _weights(d)
        return A, Bm, d.normal((IN, OUT)), d.normal((OUT, IN))

    def run_merge(b, dtype):
        A, Bm, W, Wt = merge_inputs(dtype)
        ad = _adapter(b, dtype, A, Bm)
        w1 = ad.merge_into(_dev(b, W, dtype), "in_out")
        w2 = ad.merge_into(_dev(b, Wt, dtype), "out_in")
        return {"in_out": _host(b, w1, dtype, "W"), "out_in": _host(b, w2, dtype, "W.T")}

    def ref_merge(dtype):
        A, Bm, W, Wt = merge_inputs(dtype)
        d = S * (A.T @ Bm)
        return {"in_out": W + d, "out_in": Wt + d.T}

    return [_case("microlora.init.golden", run_init, ref_init),
            _case("microlora.merge", run_merge, ref_merge)]


# ---------------------------------------------------------------------------
# many adapters: batched forward, batched adapt
# ---------------------------------------------------------------------------


def _pool_cases() -> list[dict]:
    m_ad, n = 5, 11

    def inputs(dtype, seed):
        d = _Draw(seed, dtype)
        W = [_weights(d) for _ in range(m_ad)]
        idx = np.random.default_rng(seed).integers(0, m_ad, size=n)
        return W, idx, d.normal((n, IN)), d.normal((n, OUT)), d.normal((n, OUT)), [d.scalar(-1, 1) for _ in range(n)]

    def build(b, dtype, W):
        from adalora_core.pool import AdapterPool

        pool = AdapterPool(IN, OUT, RANK, ALPHA, backend=b, dtype=dtype, capacity=2)  # grows twice
        for k, (A, Bm) in enumerate(W):
            pool.create(f"tenant-{k}").set_weights(_dev(b, A, dtype), _dev(b, Bm, dtype))
        return pool

    def run_fwd(b, dtype):
        W, idx, x, o, _, _ = inputs(dtype, 1701)
        pool = build(b, dtype, W)
        ids = [f"tenant-{k}" for k in idx]
        got = pool.forward_add_batched(_dev(b, x, dtype), ids, _dev(b, o, dtype))
        y = pool.forward_batched(_dev(b, x, dtype), pool.indices(ids))
        return {"forward_add": _host(b, got, dtype, "out"), "forward": _host(b, y, dtype, "forward")}

    def ref_fwd(dtype):
        W, idx, x, o, _, _ = inputs(dtype, 1701)
        y = R.batched_forward(x, np.stack([w[0] for w in W]), np.stack([w[1] for w in W]), S, idx)
        return {"forward_add": o + y, "forward": y}

    lr = 0.05

    def run_adapt(b, dtype):
        W, idx, x, _, g, rw = inputs(dtype, 1702)
        pool = build(b, dtype, W)
        ids = [f"tenant-{k}" for k in idx]
        pool.adapt_batched(_dev(b, x, dtype), ids, _dev(b, g, dtype), rw)
        pool.apply_updates(lr)
        out = {}
        for k in range(m_ad):
            ad = pool.get(f"tenant-{k}")
            out[f"{k}.A"], out[f"{k}.B"] = _host(b, ad.A, dtype, "A"), _host(b, ad.B, dtype, "B")
        y = pool.forward_batched(_dev(b, x, dtype), ids)  # the stacks see the updates
        out["forward_after"] = _host(b, y, dtype, "forward")
        return out

    def ref_adapt(dtype):
        W, idx, x, _, g, rw = inputs(dtype, 1702)
        out = {}
        As, Bs = [], []
        for k, (A, Bm) in enumerate(W):
            rows = [i for i in range(n) if idx[i] == k]
            if not rows:
                out[f"{k}.A"], out[f"{k}.B"] = A, Bm
            else:
                gA, gB = np.zeros_like(A), np.zeros_like(Bm)
                for i in rows:
                    dA, dB = R.lora_accumulate(x[i], g[i], A, Bm, S, rw[i])
                    gA, gB = gA + dA, gB + dB
                out[f"{k}.A"] = R.lora_apply(A, gA, len(rows), lr)
                out[f"{k}.B"] = R.lora_apply(Bm, gB, len(rows), lr)
            As.append(out[f"{k}.A"])
            Bs.append(out[f"{k}.B"])
        out["forward_after"] = R.batched_forward(x, np.stack(As), np.stack(Bs), S, idx)
        return out

    return [_case("microlora.pool.batched_forward", run_fwd, ref_fwd),
            _case("microlora.pool.adapt_batched", run_adapt, ref_adapt, stateful=True)]


# ---------------------------------------------------------------------------
# stateful: a 20-step adapt sequence with EWC; save on one backend, load on another
# ---------------------------------------------------------------------------

_DIMS = {"q_proj": (IN, OUT), "v_proj": (IN, 10)}


def _seq_inputs(dtype: str, seed: int, n: int):
    d = _Draw(seed, dtype)
    W = {k: _weights(d, i, o) for k, (i, o) in _DIMS.items()}
    steps = []
    for t in range(n):
        mod = ("q_proj", "v_proj")[t % 2]
        q = d.scalar(0.0, 1.0)
        rw = None if t % 3 else d.scalar(-1.0, 1.0)
        steps.append((mod, d.normal((IN,)), d.normal((_DIMS[mod][1],)), q, rw))
    return W, steps


def _seq_config():
    from adalora_core.config import MicroLoraConfig

    return MicroLoraConfig(rank=RANK, alpha=ALPHA, target_modules=tuple(_DIMS), in_features=IN, out_features=OUT,
                           module_dims=_DIMS)


class _RefSeq:
    """The reference side of a MicroLoRA + EWC++ run (EMA or windowed Fisher)."""

    def __init__(self, W: dict, ewc: Any) -> None:
        self.W = {k: [A.copy(), Bm.copy()] for k, (A, Bm) in W.items()}
        self.G = {k: [np.zeros_like(A), np.zeros_like(Bm), 0] for k, (A, Bm) in W.items()}
        self.F = {k: [np.zeros_like(A), np.zeros_like(Bm)] for k, (A, Bm) in W.items()}
        self.Sq = {k: [np.zeros_like(A), np.zeros_like(Bm), 0] for k, (A, Bm) in W.items()}
        self.O = {k: [A.copy(), Bm.copy()] for k, (A, Bm) in W.items()}
        self.cfg = ewc
        self.adaptations = 0

    def adapt(self, mod, x, g, q, rw) -> None:
        A, B = self.W[mod]
        dA, dB = R.lora_accumulate(x, g, A, B, S, q if rw is None else rw)
        G = self.G[mod]
        G[0], G[1], G[2] = G[0] + dA, G[1] + dB, G[2] + 1
        self.adaptations += 1

    def apply(self, lr: float, lam: float | None) -> None:
        c = self.cfg
        for k in self.W:
            gA, gB, n = self.G[k]
            if n == 0:
                continue
            gm = [gA / n, gB / n]
            if c.mode == "ema":
                self.F[k] = [R.ewc_fisher_ema(f, g, c.decay) for f, g in zip(self.F[k], gm)]
            else:
                sq = self.Sq[k]
                sq[0], sq[1], sq[2] = sq[0] + gm[0] ** 2, sq[1] + gm[1] ** 2, sq[2] + 1
                if sq[2] == c.window:
                    self.F[k] = [R.ewc_fisher_window(f, s, c.window, c.alpha) for f, s in zip(self.F[k], sq[:2])]
                    self.Sq[k] = [np.zeros_like(sq[0]), np.zeros_like(sq[1]), 0]
            if lam is None:
                self.W[k] = [R.lora_apply(w, g, n, lr) for w, g in zip(self.W[k], (gA, gB))]
            else:
                step = R.ewc_apply_proximal if c.update == "proximal" else R.ewc_apply_explicit
                self.W[k] = [step(w, g, lr, lam, f, o) for w, g, f, o in zip(self.W[k], gm, self.F[k], self.O[k])]
            self.G[k] = [np.zeros_like(gA), np.zeros_like(gB), 0]

    def new_task(self) -> None:
        for k in self.W:
            self.O[k] = [w.copy() for w in self.W[k]]

    def result(self) -> dict[str, np.ndarray]:
        out = {}
        for k in self.W:
            out[f"{k}.A"], out[f"{k}.B"] = self.W[k]
            out[f"{k}.fisher_a"], out[f"{k}.fisher_b"] = self.F[k]
            out[f"{k}.optimal_a"], out[f"{k}.optimal_b"] = self.O[k]
            out[f"{k}.pending"] = np.array([self.G[k][2]], dtype=np.int64)
        out["adaptation_count"] = np.array([self.adaptations], dtype=np.int64)
        return out


def _lib_result(b: Any, m: Any, dtype: str) -> dict[str, np.ndarray]:
    out = {}
    for k in _DIMS:
        ad, st = m.adapter(k), m.ewc_state(k)
        out[f"{k}.A"], out[f"{k}.B"] = _host(b, ad.A, dtype, f"{k}.A"), _host(b, ad.B, dtype, f"{k}.B")
        for name in ("fisher_a", "fisher_b", "optimal_a", "optimal_b"):
            out[f"{k}.{name}"] = _host(b, getattr(st, name), dtype, f"{k}.{name}")
        out[f"{k}.pending"] = np.array([ad.pending_updates], dtype=np.int64)
    out["adaptation_count"] = np.array([m.adaptation_count], dtype=np.int64)
    return out


def _sequence_cases() -> list[dict]:
    from adalora_core.config import EwcConfig

    lr, lam, n = 0.05, 0.5, 20
    ema = EwcConfig(decay=0.9, lam=lam, update="proximal")

    def lib_step(m, t, b, dtype, mod, x, g, q, rw):
        from adalora_core.microlora import AdaptFeedback

        m.adapt(_dev(b, x, dtype), AdaptFeedback(q, gradient_estimate=_dev(b, g, dtype), reward=rw,
                                                 source_module=mod))

    def build(b, dtype, W, ewc):
        from adalora_core.microlora import MicroLoRA

        m = MicroLoRA(_seq_config(), backend=b, dtype=dtype, ewc=ewc)
        for k, (A, Bm) in W.items():
            m.adapter(k).set_weights(_dev(b, A, dtype), _dev(b, Bm, dtype))
        m.start_new_task()  # theta* = the weights just set (F is still 0)
        return m

    def run_seq(b, dtype):
        W, steps = _seq_inputs(dtype, 1801, n)
        m = build(b, dtype, W, ema)
        for t, st in enumerate(steps):
            lib_step(m, t, b, dtype, *st)
            if t % 4 == 3:
                if t < 10:
                    m.apply_updates(lr)
                else:
                    m.apply_updates_with_ewc(lr, lam)
            if t == 9:
                m.start_new_task()
        return _lib_result(b, m, dtype)

    def ref_seq(dtype):
        W, steps = _seq_inputs(dtype, 1801, n)
        r = _RefSeq(W, ema)
        for t, st in enumerate(steps):
            r.adapt(*st)
            if t % 4 == 3:
                r.apply(lr, None if t < 10 else lam)
            if t == 9:
                r.new_task()
        return r.result()

    window = EwcConfig(mode="window", window=2, alpha=0.7, lam=2.0, update="explicit")

    def run_ckpt(b, dtype):
        from adalora_core.microlora import MicroLoRA

        W, steps = _seq_inputs(dtype, 1901, 12)
        m = build(b, dtype, W, window)
        for t, st in enumerate(steps[:7]):
            lib_step(m, t, b, dtype, *st)
            if t in (2, 4, 6):
                m.apply_updates(lr)
        m.start_new_task()
        lib_step(m, 7, b, dtype, *steps[7])  # pending gradients go into the file too
        reader = _partner(b)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "micro.safetensors"
            m.save(path)
            m2 = MicroLoRA.load(path, backend=reader)
        if m2.dtype_name != dtype:
            raise AssertionError(f"loaded dtype {m2.dtype_name}, saved {dtype}")
        for t, st in enumerate(steps[8:], start=8):
            lib_step(m2, t, reader, dtype, *st)
            if t in (9, 11):
                m2.apply_updates_with_ewc(lr)
        out = _lib_result(reader, m2, dtype)
        out["_note"] = f"saved on {b!r}, loaded and continued on {reader!r}"
        return out

    def ref_ckpt(dtype):
        W, steps = _seq_inputs(dtype, 1901, 12)
        r = _RefSeq(W, window)
        for t, st in enumerate(steps[:7]):
            r.adapt(*st)
            if t in (2, 4, 6):
                r.apply(lr, None)
        # a task boundary folds a partial window (k = 1 here: one update since the last fold)
        for k in r.W:
            sq = r.Sq[k]
            if sq[2]:
                r.F[k] = [R.ewc_fisher_window(f, s, sq[2], window.alpha) for f, s in zip(r.F[k], sq[:2])]
                r.Sq[k] = [np.zeros_like(sq[0]), np.zeros_like(sq[1]), 0]
        r.new_task()
        r.adapt(*steps[7])
        for t, st in enumerate(steps[8:], start=8):
            r.adapt(*st)
            if t in (9, 11):
                r.apply(lr, window.lam)
        return r.result()

    return [_case("microlora.adapt_sequence.ema_20_steps", run_seq, ref_seq, stateful=True),
            _case("microlora.checkpoint.cross_backend", run_ckpt, ref_ckpt, stateful=True)]


def microlora_cases() -> list[Case]:
    """Every MicroLoRA / EWC++ / pool case."""
    from .cases import as_case

    found = [*_forward_cases(), *_grad_cases(), *_adapt_reward_case(), *_ewc_apply_cases(), *_ewc_penalty_case(),
             *_ewc_window_case(), *_init_merge_cases(), *_pool_cases(), *_sequence_cases()]
    return [as_case(c, origin="cases_microlora") for c in found]
