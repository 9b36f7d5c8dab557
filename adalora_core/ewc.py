"""EWC++: an online Fisher estimate and a penalty that keeps adapters from forgetting.

For each parameter matrix ``theta`` (an adapter's A and B) the state holds the
Fisher diagonal ``F`` and the anchor ``theta*`` (the weights at the end of the
previous task)::

    penalty      = lam / 2 * sum F * (theta - theta*)**2
    penalty_grad = lam * F * (theta - theta*)

The Fisher is fed the mean accumulated gradient ``g`` of each update:

* ``mode="ema"`` (the original's form): ``F = decay * F + (1 - decay) * g**2``;
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
arrays of one adapter and updates them (in place on mutable libraries).
"""

from __future__ import annotations

from typing import Any

from ._xp import Array, namespace
from .config import EwcConfig, check_float, check_int
from .lora import is_mutable, owned_copy

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
    decay: float, proximal: bool, update_fisher: bool, *, inplace: bool = True,
) -> tuple[Array, Array, Array]:
    """Array API default of the native ``lora_apply_ewc`` op: ``(param, grad, fisher)`` after
    one EWC++ step on the summed gradient ``grad`` (then cleared).

    ``g = grad * inv_count``; the Fisher EMA first (when ``update_fisher``),
    then the step uses the updated Fisher. In place when ``inplace``.
    """
    xp = namespace(param, grad, fisher, optimal)
    g = grad * float(inv_count)
    F = fisher_ema(fisher, g, float(decay)) if update_fisher else fisher
    step = proximal_step if proximal else explicit_step
    new = step(param, g, lr, lam, F, optimal)
    if inplace:
        if update_fisher:
            fisher[...] = F
        param[...] = new
        grad[...] = 0
        return param, grad, fisher
    return new, xp.zeros_like(grad), F


class EwcState:
    """EWC++ state of one adapter: ``fisher_a``, ``fisher_b``, ``optimal_a``, ``optimal_b``.

    Shapes follow the adapter's public layout, ``(in, r)`` for A and ``(r, out)``
    for B; storage is rank-major like the adapter's, so the C kernels update
    it in place. ``EwcState.from_adapter(adapter)`` starts with F = 0 and
    ``theta*`` = the adapter's current weights. The state owns its arrays
    (the constructor copies them). Methods that change it are not locked:
    when the adapter is shared between threads, call them under
    ``adapter.lock`` (MicroLoRA does).
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
        in_f, r = (int(d) for d in fisher_a.shape) if fisher_a.ndim == 2 else (-1, -1)
        out_f = int(fisher_b.shape[-1]) if fisher_b.ndim == 2 else -1
        want = {"fisher_a": (in_f, r), "optimal_a": (in_f, r), "window_a": (in_f, r),
                "fisher_b": (r, out_f), "optimal_b": (r, out_f), "window_b": (r, out_f)}
        given = {"fisher_a": fisher_a, "fisher_b": fisher_b, "optimal_a": optimal_a,
                 "optimal_b": optimal_b, "window_a": window_a, "window_b": window_b}
        for name, a in given.items():
            if a is None:
                continue
            if min(want[name]) < 1 or tuple(int(d) for d in a.shape) != want[name]:
                raise ValueError(f"{name} has shape {tuple(a.shape)}; EwcState needs fisher_a/optimal_a/window_a "
                                 "(in, r) and fisher_b/optimal_b/window_b (r, out) with matching r")
            if a.dtype != fisher_a.dtype:
                raise TypeError(f"{name} has dtype {a.dtype}, fisher_a has {fisher_a.dtype}")
        self._xp = xp
        self._mutable = is_mutable(xp)
        self._Fa = owned_copy(xp, fisher_a.T)
        self._Oa = owned_copy(xp, optimal_a.T)
        self._Fb = owned_copy(xp, fisher_b)
        self._Ob = owned_copy(xp, optimal_b)
        self._Sa = owned_copy(xp, window_a.T) if window_a is not None else xp.zeros_like(self._Fa)
        self._Sb = owned_copy(xp, window_b) if window_b is not None else xp.zeros_like(self._Fb)
        self.window_steps = window_steps

    @classmethod
    def from_adapter(cls, adapter: Any, config: EwcConfig | None = None) -> EwcState:
        """F = 0, ``theta*`` = the adapter's current weights."""
        with adapter.lock:
            xp = adapter.xp
            return cls(xp.zeros_like(adapter.A), xp.zeros_like(adapter.B), adapter.A, adapter.B, config=config)

    # public layout views
    @property
    def fisher_a(self) -> Array:
        return self._Fa.T

    @property
    def fisher_b(self) -> Array:
        return self._Fb

    @property
    def optimal_a(self) -> Array:
        return self._Oa.T

    @property
    def optimal_b(self) -> Array:
        return self._Ob

    @property
    def window_a(self) -> Array:
        """Sum of ``g**2`` for A since the last windowed fold."""
        return self._Sa.T

    @property
    def window_b(self) -> Array:
        return self._Sb

    def check_compatible(self, adapter: Any) -> None:
        """A ValueError/TypeError when this state does not fit ``adapter``."""
        if tuple(self._Fa.shape) != (adapter.rank, adapter.in_features) or \
                tuple(self._Fb.shape) != (adapter.rank, adapter.out_features):
            raise ValueError(
                f"EWC state is for A {tuple(self.fisher_a.shape)} / B {tuple(self._Fb.shape)} but the adapter has "
                f"A ({adapter.in_features}, {adapter.rank}) / B ({adapter.rank}, {adapter.out_features})")
        if self._Fa.dtype != adapter.dtype:
            raise TypeError(f"EWC state has dtype {self._Fa.dtype}, the adapter's is {adapter.dtype}")

    # -- updates -------------------------------------------------------------

    def _set(self, name: str, value: Array) -> None:
        if self._mutable:
            getattr(self, name)[...] = value
        else:
            setattr(self, name, value)

    def update_fisher(self, grad_a: Array, grad_b: Array, decay: float | None = None) -> None:
        """EMA form: ``F = decay*F + (1-decay)*g**2`` (``decay`` defaults to the config's)."""
        decay = self.config.decay if decay is None else decay
        check_float("decay", decay, 0.0, 1.0)
        self._set("_Fa", fisher_ema(self._Fa, grad_a.T, decay))
        self._set("_Fb", fisher_ema(self._Fb, grad_b, decay))

    def observe(self, grad_a: Array, grad_b: Array) -> None:
        """Feed one mean gradient, as the config's mode says (EMA, or the windowed sums)."""
        if self.config.mode == "ema":
            self.update_fisher(grad_a, grad_b)
        else:
            self._observe_window_t(grad_a.T, grad_b)

    def _observe_window_t(self, gAt: Array, gB: Array) -> None:
        self._set("_Sa", self._Sa + gAt * gAt)
        self._set("_Sb", self._Sb + gB * gB)
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
        self._set("_Fa", fisher_window(self._Fa, self._Sa, k, a))
        self._set("_Fb", fisher_window(self._Fb, self._Sb, k, a))
        self._set("_Sa", self._xp.zeros_like(self._Sa))
        self._set("_Sb", self._xp.zeros_like(self._Sb))
        self.window_steps = 0

    def normalise(self) -> None:
        """Min-max normalise each Fisher matrix to [0, 1] (zeros when it is constant)."""
        self._set("_Fa", minmax_normalise(self._Fa))
        self._set("_Fb", minmax_normalise(self._Fb))

    def update_optimal(self, adapter: Any) -> None:
        """``theta*`` = the adapter's current weights."""
        self.check_compatible(adapter)
        with adapter.lock:
            self._set("_Oa", owned_copy(self._xp, adapter.A.T))
            self._set("_Ob", owned_copy(self._xp, adapter.B))

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
        xp = self._xp
        for name in ("_Fa", "_Fb", "_Sa", "_Sb"):
            self._set(name, xp.zeros_like(getattr(self, name)))
        self.window_steps = 0
        self.update_optimal(adapter)

    # -- penalty -------------------------------------------------------------

    def penalty(self, adapter: Any, lam: float | None = None) -> Array:
        """``lam/2 * sum F (theta - theta*)^2`` over A and B, a 0-d array (``lam``: config's by default)."""
        lam = self.config.lam if lam is None else lam
        check_float("lam", lam, 0.0)
        self.check_compatible(adapter)
        with adapter.lock:
            return penalty(adapter.A.T, self._Oa, self._Fa, lam) + penalty(adapter.B, self._Ob, self._Fb, lam)

    def penalty_grad(self, adapter: Any, lam: float | None = None) -> tuple[Array, Array]:
        """``(lam*F_a*(A - A*), lam*F_b*(B - B*))`` in the public layout."""
        lam = self.config.lam if lam is None else lam
        check_float("lam", lam, 0.0)
        self.check_compatible(adapter)
        with adapter.lock:
            ga = penalty_grad(adapter.A.T, self._Oa, self._Fa, lam)
            gb = penalty_grad(adapter.B, self._Ob, self._Fb, lam)
        return ga.T, gb

    def state_arrays(self) -> dict[str, Array]:
        return {"fisher_a": self.fisher_a, "fisher_b": self.fisher_b, "optimal_a": self.optimal_a,
                "optimal_b": self.optimal_b, "window_a": self.window_a, "window_b": self.window_b}

    def load_state_arrays(self, arrays: dict[str, Array], window_steps: int) -> None:
        xp = self._xp
        for name, key, t in (("_Fa", "fisher_a", True), ("_Fb", "fisher_b", False), ("_Oa", "optimal_a", True),
                             ("_Ob", "optimal_b", False), ("_Sa", "window_a", True), ("_Sb", "window_b", False)):
            a = arrays[key].T if t else arrays[key]
            self._set(name, a if self._mutable else xp.asarray(a, copy=True))
        self.window_steps = int(window_steps)
