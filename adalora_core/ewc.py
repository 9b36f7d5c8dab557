"""EWC++: an online Fisher estimate and a penalty that keeps adapters from forgetting.

For each parameter matrix ``theta`` (an adapter's A and B) the state holds the
Fisher diagonal ``F`` and the anchor ``theta*`` (the weights at the end of the
previous task)::

    penalty      = lam / 2 * sum F * (theta - theta*)**2
    penalty_grad = lam * F * (theta - theta*)

The Fisher is fed the mean accumulated gradient ``g`` of each update:

* ``mode="ema"`` (the form of the original, ruvLLM's ``micro_lora.rs``; ``docs/spec-microlora.md``):
  ``F = decay * F + (1 - decay) * g**2``;
* ``mode="window"`` (Chaudhry et al. 2018, RWalk's EWC++): ``S += g**2`` on
  every update and, every K updates, ``F = alpha * S / K + (1 - alpha) * F``,
  ``S = 0``;

and optionally min-max normalised (per matrix) at a task boundary. The step
with the penalty is the stable proximal update by default, the original's
explicit one on request (``a = lr * lam * F``)::

    proximal:  theta = (theta - lr*g + a*theta*) / (1 + a)     any a >= 0
    explicit:  theta = theta - lr*g - a*(theta - theta*)        diverges for a >= 2

The explicit step is kept as the original had it (not refused for a >= 2);
a step whose result is not finite (an overflow of either form, or of the
Fisher fed ``g**2``) is undone by the adapter and counted in its
``skipped_updates``, so inf and NaN never reach the weights or this state.

The functions here are the Array API definitions; :class:`EwcState` owns the
arrays of one adapter and updates them (in place on mutable libraries); its
:meth:`~EwcState.step` is the EWC step an adapter runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._at import at, kept, owned_copy
from ._xp import Array, namespace
from .config import EwcConfig, check_float, check_int

__all__ = [
    "EwcState",
    "explicit_step",
    "fisher_ema",
    "fisher_window",
    "lora_apply_ewc",
    "minmax_normalise",
    "penalty",
    "penalty_grad",
    "proximal_step",
]


def fisher_ema(F: Array, g: Array, decay: float) -> Array:
    """``decay * F + (1 - decay) * g**2``."""
    return decay * F + (1.0 - decay) * (g * g)


def fisher_window(F: Array, sq_sum: Array, K: int, alpha: float) -> Array:
    """``alpha * (sq_sum / K) + (1 - alpha) * F`` (the windowed fold)."""
    return alpha * (sq_sum / float(K)) + (1.0 - alpha) * F


def minmax_normalise(F: Array) -> Array:
    """``(F - min) / (max - min)`` over the whole array; zeros when ``max == min`` (no host sync)."""
    xp = namespace(F)
    lo = xp.min(F)
    span = xp.max(F) - lo
    ok = span > 0
    safe = xp.where(ok, span, xp.ones_like(span))
    return xp.where(ok, (F - lo) / safe, xp.zeros_like(F))


def penalty(theta: Array, theta_star: Array, F: Array, lam: float) -> Array:
    """``lam / 2 * sum F * (theta - theta*)**2`` as a 0-d array."""
    xp = namespace(theta, theta_star, F)
    d = theta - theta_star
    return (float(lam) / 2.0) * xp.sum(F * d * d)


def penalty_grad(theta: Array, theta_star: Array, F: Array, lam: float) -> Array:
    """``lam * F * (theta - theta*)``."""
    return float(lam) * F * (theta - theta_star)


def proximal_step(theta: Array, g: Array, lr: float, lam: float, F: Array, theta_star: Array) -> Array:
    """``(theta - lr*g + a*theta*) / (1 + a)`` with ``a = lr*lam*F``: the minimiser of the
    linearised loss plus the penalty plus ``||theta - theta_old||^2 / (2 lr)``; stable for any a."""
    a = (float(lr) * float(lam)) * F
    return (theta - float(lr) * g + a * theta_star) / (1.0 + a)


def explicit_step(theta: Array, g: Array, lr: float, lam: float, F: Array, theta_star: Array) -> Array:
    """``theta - lr*g - a*(theta - theta*)`` (the original's form; unstable when ``a >= 2``)."""
    a = (float(lr) * float(lam)) * F
    return theta - float(lr) * g - a * (theta - theta_star)


def lora_apply_ewc(
    param: Array, grad: Array, inv_count: float, lr: float, lam: float, fisher: Array, optimal: Array,
    decay: float, proximal: bool, update_fisher: bool,
) -> tuple[Array, Array, Array]:
    """Array API default of the native ``lora_apply_ewc`` op: ``(param, grad, fisher)`` after
    one EWC++ step on the summed gradient ``grad`` (then cleared).

    ``g = grad * inv_count``; the Fisher EMA first (when ``update_fisher``),
    then the step uses the updated Fisher. Written into the arrays given where
    the library allows it.
    """
    namespace(param, grad, fisher, optimal)
    g = grad * float(inv_count)
    F = fisher_ema(fisher, g, float(decay)) if update_fisher else fisher
    step = proximal_step if proximal else explicit_step
    new = step(param, g, lr, lam, F, optimal)
    return at(param).set(new), at(grad).set(0), at(fisher).set(F) if update_fisher else fisher


class EwcState:
    """EWC++ state of one adapter: ``fisher_a``, ``fisher_b``, ``optimal_a``, ``optimal_b``
    (and the window sums ``window_a``, ``window_b``).

    Shapes follow the adapter's: ``(r, in)`` for A and ``(r, out)`` for B,
    C-contiguous where arrays are updated in place (the memory order of the
    adapter's own arrays, so the C kernels update them in place).
    ``EwcState.from_adapter(adapter)`` starts with F = 0 and
    ``theta*`` = the adapter's current weights. The state owns its arrays
    (the constructor copies them). Methods that change it are not locked:
    when the adapter is shared between threads, call them under
    ``adapter.lock`` (the adapter's own steps and MicroLoRA do).
    """

    def __init__(
        self,
        fisher_a: Array,
        fisher_b: Array,
        optimal_a: Array,
        optimal_b: Array,
        *,
        config: EwcConfig | None = None,
        window_a: Array | None = None,
        window_b: Array | None = None,
        window_steps: int = 0,
    ) -> None:
        xp = namespace(fisher_a, fisher_b, optimal_a, optimal_b, window_a, window_b)
        self.config = config if config is not None else EwcConfig()
        if not isinstance(self.config, EwcConfig):
            raise TypeError(f"config must be an EwcConfig, got {type(self.config).__name__}")
        check_int("window_steps", window_steps, 0)
        r, in_f = (int(d) for d in fisher_a.shape) if fisher_a.ndim == 2 else (-1, -1)
        out_f = int(fisher_b.shape[-1]) if fisher_b.ndim == 2 else -1
        want = {"fisher_a": (r, in_f), "optimal_a": (r, in_f), "window_a": (r, in_f),
                "fisher_b": (r, out_f), "optimal_b": (r, out_f), "window_b": (r, out_f)}
        given = {"fisher_a": fisher_a, "fisher_b": fisher_b, "optimal_a": optimal_a,
                 "optimal_b": optimal_b, "window_a": window_a, "window_b": window_b}
        for name, a in given.items():
            if a is None:
                continue
            if min(want[name]) < 1 or tuple(int(d) for d in a.shape) != want[name]:
                raise ValueError(f"{name} has shape {tuple(a.shape)}; EwcState needs fisher_a/optimal_a/window_a "
                                 "(r, in) and fisher_b/optimal_b/window_b (r, out) with matching r")
            if a.dtype != fisher_a.dtype:
                raise TypeError(f"{name} has dtype {a.dtype}, fisher_a has {fisher_a.dtype}")
        self._xp = xp
        self._fa = owned_copy(fisher_a)
        self._oa = owned_copy(optimal_a)
        self._fb = owned_copy(fisher_b)
        self._ob = owned_copy(optimal_b)
        self._sa = owned_copy(window_a) if window_a is not None else xp.zeros_like(self._fa)
        self._sb = owned_copy(window_b) if window_b is not None else xp.zeros_like(self._fb)
        self.window_steps = window_steps

    @classmethod
    def from_adapter(cls, adapter: Any, config: EwcConfig | None = None) -> EwcState:
        """F = 0, ``theta*`` = the adapter's current weights."""
        with adapter.lock:
            xp = adapter.xp
            return cls(xp.zeros_like(adapter.A), xp.zeros_like(adapter.B), adapter.A, adapter.B, config=config)

    @property
    def fisher_a(self) -> Array:
        return self._fa

    @property
    def fisher_b(self) -> Array:
        return self._fb

    @property
    def optimal_a(self) -> Array:
        return self._oa

    @property
    def optimal_b(self) -> Array:
        return self._ob

    @property
    def window_a(self) -> Array:
        """Sum of ``g**2`` for A since the last windowed fold."""
        return self._sa

    @property
    def window_b(self) -> Array:
        return self._sb

    def check_compatible(self, adapter: Any) -> None:
        """A ValueError/TypeError when this state does not fit ``adapter``."""
        if tuple(self._fa.shape) != (adapter.rank, adapter.in_features) or \
                tuple(self._fb.shape) != (adapter.rank, adapter.out_features):
            raise ValueError(
                f"EWC state is for A {tuple(self._fa.shape)} / B {tuple(self._fb.shape)} but the adapter has "
                f"A ({adapter.rank}, {adapter.in_features}) / B ({adapter.rank}, {adapter.out_features})")
        if self._fa.dtype != adapter.dtype:
            raise TypeError(f"EWC state has dtype {self._fa.dtype}, the adapter's is {adapter.dtype}")

    # -- updates -------------------------------------------------------------

    def step(self, A: Array, grad_A: Array, B: Array, grad_B: Array, inv_count: float, lr: float, lam: float, *,
             update_fisher: bool, proximal: bool, apply: Callable[..., Any] = lora_apply_ewc,
             ) -> tuple[Array, Array, Array, Array]:
        """One EWC++ step of an adapter's ``A`` and ``B`` on their summed
        gradients, which are cleared: returns the new ``(A, grad_A, B, grad_B)`` (the arrays
        given, updated in place, on mutable libraries).

        With ``update_fisher`` the mean gradient ``grad * inv_count`` feeds the Fisher first,
        as the config's mode says (the EMA in the same pass, or the window sums, folded every
        K steps). ``apply`` is the ``lora_apply_ewc`` op to run (a backend's override).
        """
        cfg = self.config
        if update_fisher and cfg.mode == "window":
            self._observe_window(grad_A * inv_count, grad_B * inv_count)
        ema = update_fisher and cfg.mode == "ema"
        A, grad_A, self._fa = apply(A, grad_A, inv_count, lr, lam, self._fa, self._oa, cfg.decay, proximal, ema)
        B, grad_B, self._fb = apply(B, grad_B, inv_count, lr, lam, self._fb, self._ob, cfg.decay, proximal, ema)
        return A, grad_A, B, grad_B

    def snapshot(self) -> tuple[Any, ...]:
        """What :meth:`step` changes (the Fisher and the window), copied: for :meth:`restore`."""
        return (*(kept(a) for a in (self._fa, self._fb, self._sa, self._sb)), self.window_steps)

    def restore(self, snapshot: tuple[Any, ...]) -> None:
        """Put back a :meth:`snapshot` (a step whose result is not kept)."""
        fa, fb, sa, sb, self.window_steps = snapshot
        self._fa, self._fb = at(self._fa).set(fa), at(self._fb).set(fb)
        self._sa, self._sb = at(self._sa).set(sa), at(self._sb).set(sb)

    def update_fisher(self, grad_a: Array, grad_b: Array, decay: float | None = None) -> None:
        """EMA form: ``F = decay*F + (1-decay)*g**2`` (``decay`` defaults to the config's)."""
        decay = self.config.decay if decay is None else decay
        check_float("decay", decay, 0.0, 1.0)
        self._fa = at(self._fa).set(fisher_ema(self._fa, grad_a, decay))
        self._fb = at(self._fb).set(fisher_ema(self._fb, grad_b, decay))

    def observe(self, grad_a: Array, grad_b: Array) -> None:
        """Feed one mean gradient, as the config's mode says (EMA, or the windowed sums)."""
        if self.config.mode == "ema":
            self.update_fisher(grad_a, grad_b)
        else:
            self._observe_window(grad_a, grad_b)

    def _observe_window(self, grad_a: Array, grad_b: Array) -> None:
        self._sa = at(self._sa).set(self._sa + grad_a * grad_a)
        self._sb = at(self._sb).set(self._sb + grad_b * grad_b)
        self.window_steps += 1
        if self.window_steps >= self.config.window:
            self.fold_window()

    def fold_window(self) -> None:
        """``F = alpha * S / k + (1 - alpha) * F`` over the ``k`` updates seen since the last fold
        (``k = K`` when called by :meth:`observe`); no-op when ``k = 0``."""
        k = self.window_steps
        if k == 0:
            return
        a = self.config.alpha
        self._fa = at(self._fa).set(fisher_window(self._fa, self._sa, k, a))
        self._fb = at(self._fb).set(fisher_window(self._fb, self._sb, k, a))
        self._sa, self._sb = at(self._sa).set(0), at(self._sb).set(0)
        self.window_steps = 0

    def normalise(self) -> None:
        """Min-max normalise each Fisher matrix to [0, 1] (zeros when it is constant)."""
        self._fa = at(self._fa).set(minmax_normalise(self._fa))
        self._fb = at(self._fb).set(minmax_normalise(self._fb))

    def update_optimal(self, adapter: Any) -> None:
        """``theta*`` = the adapter's current weights."""
        self.check_compatible(adapter)
        with adapter.lock:
            self._oa = at(self._oa).set(adapter.A)
            self._ob = at(self._ob).set(adapter.B)

    def start_new_task(self, adapter: Any, normalise: bool | None = None) -> None:
        """A task boundary: fold a partial window (window mode), normalise F if asked
        (default: ``config.normalise_at_task_boundary``), then ``theta*`` = current weights."""
        if self.config.mode == "window":
            self.fold_window()
        if self.config.normalise_at_task_boundary if normalise is None else normalise:
            self.normalise()
        self.update_optimal(adapter)

    def reset(self, adapter: Any) -> None:
        """F = 0, window cleared, ``theta*`` = the adapter's current weights."""
        self._fa, self._fb = at(self._fa).set(0), at(self._fb).set(0)
        self._sa, self._sb = at(self._sa).set(0), at(self._sb).set(0)
        self.window_steps = 0
        self.update_optimal(adapter)

    # -- penalty -------------------------------------------------------------

    def penalty(self, adapter: Any, lam: float | None = None) -> Array:
        """``lam/2 * sum F (theta - theta*)^2`` over A and B, a 0-d array (``lam``: config's by default)."""
        lam = self.config.lam if lam is None else lam
        check_float("lam", lam, 0.0)
        self.check_compatible(adapter)
        with adapter.lock:
            return penalty(adapter.A, self._oa, self._fa, lam) + penalty(adapter.B, self._ob, self._fb, lam)

    def penalty_grad(self, adapter: Any, lam: float | None = None) -> tuple[Array, Array]:
        """``(lam*F_a*(A - A*), lam*F_b*(B - B*))``, shaped as A and B."""
        lam = self.config.lam if lam is None else lam
        check_float("lam", lam, 0.0)
        self.check_compatible(adapter)
        with adapter.lock:
            ga = penalty_grad(adapter.A, self._oa, self._fa, lam)
            gb = penalty_grad(adapter.B, self._ob, self._fb, lam)
        return ga, gb

    def state_arrays(self) -> dict[str, Array]:
        return {"fisher_a": self._fa, "fisher_b": self._fb, "optimal_a": self._oa,
                "optimal_b": self._ob, "window_a": self._sa, "window_b": self._sb}

    def load_state_arrays(self, arrays: dict[str, Array], window_steps: int) -> None:
        self._fa, self._fb = at(self._fa).set(arrays["fisher_a"]), at(self._fb).set(arrays["fisher_b"])
        self._oa, self._ob = at(self._oa).set(arrays["optimal_a"]), at(self._ob).set(arrays["optimal_b"])
        self._sa, self._sb = at(self._sa).set(arrays["window_a"]), at(self._sb).set(arrays["window_b"])
        self.window_steps = int(window_steps)
