"""Independent float64 reference implementation of every algorithm in adalora-core.

This module is the referee of the conformance suite: the library's results on
every backend and dtype are compared against the numbers computed here. It is
written for clarity, not speed, and it depends on nothing but NumPy and the
standard library. It must never import ``adalora_core`` (a test checks this).

Every function takes NumPy arrays (converted to float64) and Python numbers,
and returns new float64 arrays or Python numbers; no input is ever modified.

Sections
--------
AdaLoRA (``docs/spec-adalora.md``; Hugging Face PEFT 0.21 ``tuners/adalora``):
    triplet_forward, triplet_backward, delta_weight, merge, unmerge,
    orth_reg, orth_reg_grad, budget_schedule, ema_update, triplet_scores,
    kth_threshold, ReferenceAllocator.
MicroLoRA and EWC++ (``docs/spec-microlora.md``):
    lora_forward, lora_accumulate, lora_apply, ewc_fisher_ema,
    ewc_fisher_window, minmax_normalise, ewc_penalty, ewc_penalty_grad,
    ewc_apply_explicit, ewc_apply_proximal, golden_init, batched_forward.
Optimisers (for orchestration checks):
    adam_step (torch.optim.Adam defaults), sgd_step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "ReferenceAllocator",
    # optimisers
    "adam_step",
    "batched_forward",
    "budget_schedule",
    "delta_weight",
    "ema_update",
    "ewc_apply_explicit",
    "ewc_apply_proximal",
    "ewc_fisher_ema",
    "ewc_fisher_window",
    "ewc_penalty",
    "ewc_penalty_grad",
    "golden_init",
    "kth_threshold",
    "lora_accumulate",
    "lora_apply",
    # MicroLoRA / EWC++
    "lora_forward",
    "merge",
    "minmax_normalise",
    "orth_reg",
    "orth_reg_grad",
    "sgd_step",
    "triplet_backward",
    # AdaLoRA
    "triplet_forward",
    "triplet_scores",
    "unmerge",
]

#: The constant PEFT adds to ``ranknum`` before dividing (``layer.py``).
RANKNUM_EPS = 1e-5

#: The golden-ratio constant of MicroLoRA's deterministic init.
GOLDEN = 0.618033988749895


def _f64(a) -> np.ndarray:
    """A float64 copy of ``a`` (never a view of the caller's array)."""
    return np.array(a, dtype=np.float64, copy=True)


def _scalar(v) -> float:
    """A Python float from a number or a one-element array (``ranknum`` is ``(1,)`` in PEFT)."""
    arr = np.asarray(v, dtype=np.float64)
    if arr.size != 1:
        raise ValueError(f"expected a scalar or a one-element array, got shape {arr.shape}")
    return float(arr.reshape(-1)[0])


def _denominator(ranknum) -> float:
    return _scalar(ranknum) + RANKNUM_EPS


# ---------------------------------------------------------------------------
# AdaLoRA: the SVD triplet  dW = B diag(E) A * scaling / (ranknum + 1e-5)
# ---------------------------------------------------------------------------


def triplet_forward(x, A, E, B, scaling, ranknum) -> np.ndarray:
    """The adapter's contribution to the output (PEFT ``SVDLinear.forward``, without base/dropout).

    ``y = ((x @ (A * E).T) @ B.T) * scaling / (ranknum + 1e-5)``

    x: (..., in); A: (r, in); E: (r, 1); B: (out, r). Returns (..., out).
    ``scaling`` is ``lora_alpha`` (not divided by r); ``ranknum`` is ``float(init_r)``.
    """
    x, A, E, B = _f64(x), _f64(A), _f64(E), _f64(B)
    AE = A * E  # E broadcast over the columns of each row of A
    h = x @ AE.T  # (..., r)
    return (h @ B.T) * float(scaling) / _denominator(ranknum)


def triplet_backward(g, x, A, E, B, scaling, ranknum):
    """Vector-Jacobian product of :func:`triplet_forward` for the upstream gradient ``g``.

    With ``c = scaling / (ranknum + 1e-5)``, ``W = A * E`` (r, in), ``h = x @ W.T``
    and ``y = c * h @ B.T``:

    - ``dB = c * sum_batch g^T h``                          (out, r)
    - ``dh = c * g @ B``                                    (..., r)
    - ``dW = sum_batch dh^T x``                             (r, in)
    - ``dA = dW * E``  (row i scaled by E[i])               (r, in)
    - ``dE[i] = sum_j dW[i, j] * A[i, j]``                  (r, 1)
    - ``dx = dh @ W``                                       (..., in)

    Returns ``(dx, dA, dE, dB)``; all batch dimensions are summed for the parameter gradients.
    """
    g, x, A, E, B = _f64(g), _f64(x), _f64(A), _f64(E), _f64(B)
    c = float(scaling) / _denominator(ranknum)
    r, n_in = A.shape
    n_out = B.shape[0]
    W = A * E
    xf = x.reshape(-1, n_in)  # (N, in)
    gf = g.reshape(-1, n_out)  # (N, out)
    hf = xf @ W.T  # (N, r)
    dB = c * (gf.T @ hf)  # (out, r)
    dhf = c * (gf @ B)  # (N, r)
    dW = dhf.T @ xf  # (r, in)
    dA = dW * E
    dE = np.zeros((r, 1), dtype=np.float64)
    for i in range(r):
        dE[i, 0] = float(np.sum(dW[i, :] * A[i, :]))
    dx = (dhf @ W).reshape(x.shape)
    return dx, dA, dE, dB


def delta_weight(A, E, B, scaling, ranknum, fan_in_fan_out: bool = False) -> np.ndarray:
    """``transpose(B @ (A * E), fan_in_fan_out) * scaling / (ranknum + 1e-5)``.

    (out, in) normally; (in, out) when ``fan_in_fan_out`` (HF ``Conv1D`` weights).
    """
    A, E, B = _f64(A), _f64(E), _f64(B)
    d = B @ (A * E)
    if fan_in_fan_out:
        d = d.T
    return d * float(scaling) / _denominator(ranknum)


def merge(W, A, E, B, scaling, ranknum, fan_in_fan_out: bool = False) -> np.ndarray:
    """``W + delta_weight(...)`` (a new array)."""
    return _f64(W) + delta_weight(A, E, B, scaling, ranknum, fan_in_fan_out)


def unmerge(W, A, E, B, scaling, ranknum, fan_in_fan_out: bool = False) -> np.ndarray:
    """``W - delta_weight(...)`` (a new array)."""
    return _f64(W) - delta_weight(A, E, B, scaling, ranknum, fan_in_fan_out)


# ---------------------------------------------------------------------------
# AdaLoRA: orthogonal regulariser
# ---------------------------------------------------------------------------


def _gram_A(A: np.ndarray) -> np.ndarray:
    return A @ A.T  # (r, r)


def _gram_B(B: np.ndarray) -> np.ndarray:
    return B.T @ B  # (r, r)


def orth_reg(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean over the 2N matrices of ``||A A^T - I||_F`` and ``||B^T B - I||_F``.

    Frobenius norm, not squared (PEFT ``AdaLoraModel.forward``:
    ``torch.norm(para_cov - I, p="fro")`` averaged over ``num_param``).
    Returns 0.0 for an empty list.
    """
    total = 0.0
    count = 0
    for A, B in pairs:
        A, B = _f64(A), _f64(B)
        GA = _gram_A(A)
        GB = _gram_B(B)
        total += math.sqrt(float(np.sum((GA - np.eye(GA.shape[0])) ** 2)))
        total += math.sqrt(float(np.sum((GB - np.eye(GB.shape[0])) ** 2)))
        count += 2
    if count == 0:
        return 0.0
    return total / count


def orth_reg_grad(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Gradient of :func:`orth_reg` with respect to every A and B.

    With ``D = A A^T - I`` (symmetric) and ``n = ||D||_F``: ``d n / d A = 2 D A / n``.
    With ``D = B^T B - I`` and ``n = ||D||_F``: ``d n / d B = 2 B D / n``.
    Each is divided by ``2N`` (the mean). Where ``n == 0`` the gradient is 0
    (the subgradient torch's norm backward returns at zero).
    """
    n_mats = 2 * len(pairs)
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for A, B in pairs:
        A, B = _f64(A), _f64(B)
        DA = _gram_A(A) - np.eye(A.shape[0])
        nA = math.sqrt(float(np.sum(DA**2)))
        gA = np.zeros_like(A) if nA == 0.0 else (2.0 * DA @ A) / nA / n_mats
        DB = _gram_B(B) - np.eye(B.shape[1])
        nB = math.sqrt(float(np.sum(DB**2)))
        gB = np.zeros_like(B) if nB == 0.0 else (2.0 * B @ DB) / nB / n_mats
        out.append((gA, gB))
    return out


# ---------------------------------------------------------------------------
# AdaLoRA: budget schedule, importance, threshold
# ---------------------------------------------------------------------------


def budget_schedule(
    step, init_bgt, target_bgt, tinit, tfinal, total_step, deltaT
) -> tuple[int, bool]:
    """PEFT ``RankAllocator.budget_schedule``: returns ``(budget, mask_ind)``.

    - ``step <= tinit``:                ``(init_bgt, False)``
    - ``step > total_step - tfinal``:   ``(target_bgt, True)``
    - otherwise ``mul = 1 - (step - tinit) / (total_step - tfinal - tinit)``,
      ``budget = int((init_bgt - target_bgt) * mul**3 + target_bgt)`` (Python float
      math, truncation toward zero) and ``mask_ind = step % deltaT == 0``.
    """
    if step <= tinit:
        return int(init_bgt), False
    if step > total_step - tfinal:
        return int(target_bgt), True
    mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt)
    mask_ind = step % deltaT == 0
    return budget, bool(mask_ind)


def ema_update(m, u, p, g, beta1, beta2) -> tuple[np.ndarray, np.ndarray]:
    """One step of the sensitivity / uncertainty EMAs (PEFT ``update_ipt``).

    ``ipt = |p * g|``; ``m' = beta1*m + (1-beta1)*ipt``;
    ``u' = beta2*u + (1-beta2)*|ipt - m'|`` (with the *updated* m).
    """
    m, u, p, g = _f64(m), _f64(u), _f64(p), _f64(g)
    ipt = np.abs(p * g)
    m_new = beta1 * m + (1 - beta1) * ipt
    u_new = beta2 * u + (1 - beta2) * np.abs(ipt - m_new)
    return m_new, u_new


def triplet_scores(sA, sE, sB) -> np.ndarray:
    """Score of each rank index: ``s_E[i] + (mean_j sA[i, j] + mean_o sB[o, i])``.

    sA: (r, in), sE: (r, 1), sB: (out, r) element scores (``m * u``). Returns (r,).
    The parenthesisation is PEFT's (``_combine_ipt``: A and B means summed first).
    """
    sA, sE, sB = _f64(sA), _f64(sE), _f64(sB)
    r = sA.shape[0]
    scores = np.zeros(r, dtype=np.float64)
    for i in range(r):
        mean_a = float(np.mean(sA[i, :]))
        mean_b = float(np.mean(sB[:, i]))
        scores[i] = float(sE.reshape(-1)[i]) + (mean_a + mean_b)
    return scores


def kth_threshold(scores, k) -> float:
    """The k-th smallest (1-based, as ``torch.kthvalue``) of the concatenated scores.

    ``scores`` is one array or a sequence of arrays (concatenated after flattening).
    ``k <= 0`` means no pruning: returns ``-inf`` (no score is ``<= -inf``).
    ``k`` larger than the number of scores is an error (as in torch).
    """
    k = int(k)
    if k <= 0:
        return -math.inf
    if isinstance(scores, np.ndarray):
        flat = _f64(scores).reshape(-1)
    else:
        parts = [_f64(s).reshape(-1) for s in scores]
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
    if k > flat.size:
        raise ValueError(f"k={k} is larger than the number of scores ({flat.size})")
    return float(np.sort(flat, kind="stable")[k - 1])


class ReferenceAllocator:
    """The AdaLoRA rank allocator over plain arrays (the spec's ``update_and_allocate(step)``).

    Parameters
    ----------
    init_r, target_r, tinit, tfinal, total_step, deltaT, beta1, beta2:
        As ``AdaLoraConfig``. ``tfinal`` is a duration: the final phase starts at
        ``T_f = total_step - tfinal``.
    ranks:
        ``{module name: current rank}`` in module order. ``init_bgt`` is the sum of
        these ranks (the current shapes), ``target_bgt = target_r * N``.

    ``update_and_allocate(step, params, grads)`` takes ``params[name] = (A, E, B)``
    (the values at call time, i.e. after the optimizer step) and
    ``grads[name] = (gA, gE, gB)`` or ``None``, and returns ``{name: E}``: a masked
    float64 copy of every module's E (masked entries exactly 0.0). A and B are never
    changed. Attributes:

    - ``rank_pattern``: ``{"<name>.lora_E": [bool] * r}`` (True = kept) from the last
      mask; ``None`` before the first mask (PEFT's ``config.rank_pattern`` default).
    - ``skipped_steps``: number of steps whose importance update was skipped because
      some gradient was non-finite.
    - ``exp_avg_ipt`` / ``exp_avg_unc``: ``{name: (A-like, E-like, B-like)}`` EMAs
      (zeros at construction; ``None`` after finalisation).
    - ``finalized``: True once the final allocation at or past ``T_f`` has been made.
    - ``last_budget``: the budget of the last call (``None`` before any call).
    """

    def __init__(
        self,
        init_r: int,
        target_r: int,
        tinit: int,
        tfinal: int,
        total_step: int,
        deltaT: int,
        beta1: float,
        beta2: float,
        ranks: Mapping[str, int],
    ) -> None:
        self.init_r = int(init_r)
        self.target_r = int(target_r)
        self.tinit = int(tinit)
        self.tfinal = int(tfinal)
        self.total_step = int(total_step)
        self.deltaT = int(deltaT)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.names: list[str] = list(ranks.keys())
        self.ranks: dict[str, int] = {n: int(ranks[n]) for n in self.names}
        self.init_bgt = int(sum(self.ranks.values()))
        self.target_bgt = self.target_r * len(self.names)
        self.T_f = self.total_step - self.tfinal
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.final_pattern: dict[str, list[bool]] | None = None
        self.finalized = False
        self.skipped_steps = 0
        self.importance_updates = 0  # applied (not skipped) importance updates
        self.last_budget: int | None = None
        # EMAs are created lazily from the first params' shapes (zeros).
        self.exp_avg_ipt: dict[str, list[np.ndarray]] | None = {}
        self.exp_avg_unc: dict[str, list[np.ndarray]] | None = {}

    # -- helpers ---------------------------------------------------------

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        return budget_schedule(
            step,
            self.init_bgt,
            self.target_bgt,
            self.tinit,
            self.tfinal,
            self.total_step,
            self.deltaT,
        )

    def _ensure_emas(self, params) -> None:
        assert self.exp_avg_ipt is not None and self.exp_avg_unc is not None
        for name in self.names:
            if name not in self.exp_avg_ipt:
                A, E, B = params[name]
                self.exp_avg_ipt[name] = [
                    np.zeros(np.shape(t), dtype=np.float64) for t in (A, E, B)
                ]
                self.exp_avg_unc[name] = [
                    np.zeros(np.shape(t), dtype=np.float64) for t in (A, E, B)
                ]

    def _update_importance(self, params, grads) -> None:
        """Update every module's EMAs, or none of them if any gradient is non-finite."""
        for name in self.names:
            gtuple = grads.get(name) if grads is not None else None
            if gtuple is None:
                continue
            for gt in gtuple:
                if gt is not None and not np.all(np.isfinite(np.asarray(gt, dtype=np.float64))):
                    self.skipped_steps += 1
                    return
        updated = False
        ipt, unc = self.exp_avg_ipt, self.exp_avg_unc
        assert ipt is not None and unc is not None
        for name in self.names:
            gtuple = grads.get(name) if grads is not None else None
            if gtuple is None:  # missing gradient: skip this module
                continue
            for j, (p, g) in enumerate(zip(params[name], gtuple)):
                if g is None:  # missing gradient of one tensor: skip that tensor
                    continue
                ipt[name][j], unc[name][j] = ema_update(ipt[name][j], unc[name][j], p, g, self.beta1, self.beta2)
                updated = True
        if updated:
            self.importance_updates += 1

    def scores(self) -> dict[str, np.ndarray]:
        """Current triplet scores ``{name: (r,)}`` from the EMAs."""
        assert self.exp_avg_ipt is not None and self.exp_avg_unc is not None
        out = {}
        for name in self.names:
            (mA, mE, mB), (uA, uE, uB) = self.exp_avg_ipt[name], self.exp_avg_unc[name]
            out[name] = triplet_scores(mA * uA, mE * uE, mB * uB)
        return out

    def _mask_to_budget(
        self, params, budget: int
    ) -> tuple[dict[str, np.ndarray], dict[str, list[bool]] | None]:
        if self.importance_updates == 0:
            # No importance has been measured yet: nothing to rank by, prune nothing.
            return {n: _f64(params[n][1]) for n in self.names}, self.rank_pattern
        scores = self.scores()
        threshold = kth_threshold([scores[n] for n in self.names], self.init_bgt - budget)
        Es: dict[str, np.ndarray] = {}
        pattern: dict[str, list[bool]] = {}
        for name in self.names:
            E = _f64(params[name][1])
            keep = [not (float(s) <= threshold) for s in scores[name]]
            for i, k in enumerate(keep):
                if not k:
                    E[i, ...] = 0.0
            Es[name] = E
            pattern[f"{name}.lora_E"] = keep
        return Es, pattern

    def _apply_pattern(
        self, params, pattern: Mapping[str, Sequence[bool]]
    ) -> dict[str, np.ndarray]:
        Es = {}
        for name in self.names:
            E = _f64(params[name][1])
            for i, k in enumerate((pattern or {}).get(f"{name}.lora_E", ())):
                if not k:
                    E[i, ...] = 0.0
            Es[name] = E
        return Es

    # -- the training hook -------------------------------------------------

    def update_and_allocate(self, step: int, params, grads) -> dict[str, np.ndarray]:
        """One call per optimizer step, after ``optimizer.step()``.

        - ``step < T_f`` (and not finalized): update importance (skipped entirely,
          and counted, if any gradient is non-finite); then, if the schedule's
          ``mask_ind``: mask E to the budget and store the pattern.
        - first call with ``step >= T_f``: mask to ``target_bgt`` from the scores as
          they stand (no importance update), store the final pattern, drop the EMAs.
        - every later call: re-apply the stored final pattern.
        """
        if self.finalized:
            assert self.final_pattern is not None
            self.last_budget = self.target_bgt
            return self._apply_pattern(params, self.final_pattern)

        self._ensure_emas(params)
        if step < self.T_f:
            self._update_importance(params, grads)
            budget, mask_ind = self.budget_schedule(step)
            self.last_budget = budget
            if mask_ind:
                Es, pattern = self._mask_to_budget(params, budget)
                self.rank_pattern = pattern
                return Es
            return {name: _f64(params[name][1]) for name in self.names}

        # Final allocation (PEFT: force_mask at step == T_f, where the schedule's
        # budget is target_bgt), then drop the EMA state.
        Es, pattern = self._mask_to_budget(params, self.target_bgt)
        self.last_budget = self.target_bgt
        self.rank_pattern = pattern
        self.final_pattern = {k: list(v) for k, v in (pattern or {}).items()}
        self.finalized = True
        self.exp_avg_ipt = None
        self.exp_avg_unc = None
        return Es


# ---------------------------------------------------------------------------
# MicroLoRA
# ---------------------------------------------------------------------------


def lora_forward(x, A, B, scaling, bias=None) -> np.ndarray:
    """``y = scaling * (x @ A.T) @ B (+ bias)``; A (r, in), B (r, out); x (in,) or (n, in)."""
    x, A, B = _f64(x), _f64(A), _f64(B)
    y = float(scaling) * ((x @ A.T) @ B)
    if bias is not None:
        y = y + _f64(bias)
    return y


def lora_accumulate(x, grad_out, A, B, scaling, reward) -> tuple[np.ndarray, np.ndarray]:
    """Gradient increments of ``y = s (x A.T) B`` for the upstream gradient ``reward * grad_out``.

    ``dB = s * reward * sum_n outer(x_n @ A.T, grad_out_n)``    (r, out)
    ``dA = s * reward * sum_n outer(grad_out_n @ B.T, x_n)``    (r, in)

    x (in,) with grad_out (out,), or x (n, in) with grad_out (n, out). Returns ``(dA, dB)``.
    """
    x, go, A, B = _f64(x), _f64(grad_out), _f64(A), _f64(B)
    X = x.reshape(-1, A.shape[1])
    G = go.reshape(-1, B.shape[1])
    if X.shape[0] != G.shape[0]:
        raise ValueError(f"batch mismatch: x has {X.shape[0]} rows, grad_out has {G.shape[0]}")
    c = float(scaling) * float(reward)
    dA = np.zeros_like(A)
    dB = np.zeros_like(B)
    for n in range(X.shape[0]):
        dB += c * np.outer(X[n] @ A.T, G[n])
        dA += c * np.outer(G[n] @ B.T, X[n])
    return dA, dB


def lora_apply(theta, g_sum, count, lr) -> np.ndarray:
    """``theta - (lr / count) * g_sum``; ``theta`` unchanged (a copy) when ``count == 0``."""
    theta = _f64(theta)
    if int(count) == 0:
        return theta
    return theta - (float(lr) / int(count)) * _f64(g_sum)


# ---------------------------------------------------------------------------
# EWC++
# ---------------------------------------------------------------------------


def ewc_fisher_ema(F, g, decay) -> np.ndarray:
    """Online Fisher (seed form): ``decay * F + (1 - decay) * g**2``."""
    F, g = _f64(F), _f64(g)
    return decay * F + (1 - decay) * g**2


def ewc_fisher_window(F, sq_sum, K, alpha) -> np.ndarray:
    """Windowed Fisher (Chaudhry et al. 2018, RWalk): ``alpha * (sq_sum / K) + (1 - alpha) * F``."""
    F, sq_sum = _f64(F), _f64(sq_sum)
    return alpha * (sq_sum / K) + (1 - alpha) * F


def minmax_normalise(F) -> np.ndarray:
    """``(F - min) / (max - min)`` over the whole array; zeros when ``max == min``."""
    F = _f64(F)
    lo = float(np.min(F))
    hi = float(np.max(F))
    if hi == lo:
        return np.zeros_like(F)
    return (F - lo) / (hi - lo)


def ewc_penalty(theta, theta_star, F, lam) -> float:
    """``lam / 2 * sum F * (theta - theta_star)**2``."""
    theta, theta_star, F = _f64(theta), _f64(theta_star), _f64(F)
    return float(lam) / 2.0 * float(np.sum(F * (theta - theta_star) ** 2))


def ewc_penalty_grad(theta, theta_star, F, lam) -> np.ndarray:
    """``lam * F * (theta - theta_star)``."""
    theta, theta_star, F = _f64(theta), _f64(theta_star), _f64(F)
    return float(lam) * F * (theta - theta_star)


def ewc_apply_explicit(theta, g_mean, lr, lam, F, theta_star) -> np.ndarray:
    """Seed form: ``theta - lr * g_mean - lr * lam * F * (theta - theta_star)``."""
    theta, g_mean, F, theta_star = _f64(theta), _f64(g_mean), _f64(F), _f64(theta_star)
    return theta - lr * g_mean - lr * lam * F * (theta - theta_star)


def ewc_apply_proximal(theta, g_mean, lr, lam, F, theta_star) -> np.ndarray:
    """Stable proximal form: ``(theta - lr*g_mean + lr*lam*F*theta_star) / (1 + lr*lam*F)``."""
    theta, g_mean, F, theta_star = _f64(theta), _f64(g_mean), _f64(F), _f64(theta_star)
    return (theta - lr * g_mean + lr * lam * F * theta_star) / (1 + lr * lam * F)


# ---------------------------------------------------------------------------
# MicroLoRA: init and many adapters
# ---------------------------------------------------------------------------


def golden_init(in_features: int, r: int) -> np.ndarray:
    """Deterministic golden-ratio init of A (r, in).

    ``A[j, i] = ((k * 0.618033988749895) % 1 - 0.5) * 2 * sqrt(2 / in) * 0.01`` with
    ``k = i * r + j`` (Python float arithmetic, evaluated left to right).
    """
    in_features, r = int(in_features), int(r)
    A = np.zeros((r, in_features), dtype=np.float64)
    scale = math.sqrt(2.0 / in_features)
    for i in range(in_features):
        for j in range(r):
            k = i * r + j
            A[j, i] = ((k * GOLDEN) % 1.0 - 0.5) * 2.0 * scale * 0.01
    return A


def batched_forward(x, A_stack, B_stack, scaling, idx) -> np.ndarray:
    """Per-request adapters (BGMV shape): ``out[b] = s * (x[b] @ A[idx[b]].T) @ B[idx[b]]``.

    x (batch, in); A_stack (n_adapters, r, in); B_stack (n_adapters, r, out);
    idx (batch,) integers. ``scaling`` is one number, or a (n_adapters,) array of
    per-adapter scalings (indexed by ``idx[b]``). Returns (batch, out).
    """
    x, As, Bs = _f64(x), _f64(A_stack), _f64(B_stack)
    idx = np.asarray(idx).astype(np.int64).reshape(-1)
    if idx.shape[0] != x.shape[0]:
        raise ValueError(f"idx has {idx.shape[0]} entries, x has {x.shape[0]} rows")
    s_arr = _f64(scaling).reshape(-1) if np.ndim(scaling) > 0 else None  # one scaling per adapter
    out = np.zeros((x.shape[0], Bs.shape[2]), dtype=np.float64)
    for b in range(x.shape[0]):
        a = int(idx[b])
        s = float(s_arr[a]) if s_arr is not None else float(scaling)
        out[b] = s * ((x[b] @ As[a].T) @ Bs[a])
    return out


# ---------------------------------------------------------------------------
# Optimisers (orchestration checks)
# ---------------------------------------------------------------------------


def adam_step(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    """One ``torch.optim.Adam`` step (defaults: non-amsgrad, L2 ``weight_decay``, bias-corrected).

    ``step`` is the 1-based index of this update (torch increments ``state["step"]``
    before using it). Returns ``(param, m, v)``:

    ``g = grad + weight_decay * param``; ``m = beta1*m + (1-beta1)*g``;
    ``v = beta2*v + (1-beta2)*g*g``;
    ``param -= (lr / (1 - beta1**step)) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)``.
    """
    param, grad, m, v = _f64(param), _f64(grad), _f64(m), _f64(v)
    step = int(step)
    if step < 1:
        raise ValueError(f"step must be >= 1 (1-based), got {step}")
    if weight_decay != 0:
        grad = grad + weight_decay * param
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad * grad
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = np.sqrt(v) / math.sqrt(bias_correction2) + eps
    param = param - step_size * (m / denom)
    return param, m, v


def sgd_step(param, grad, lr) -> np.ndarray:
    """Plain SGD: ``param - lr * grad``."""
    return _f64(param) - float(lr) * _f64(grad)
