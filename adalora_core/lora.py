"""Low-rank adapters of any rank: ``y = scaling * (x @ A) @ B (+ bias)``.

``A`` is ``(in, r)``, ``B`` is ``(r, out)``, ``scaling = alpha / r`` (the
public layout, used by checkpoints and by every property). Internally ``A``
is stored rank-major, as a C-contiguous ``(r, in)`` array whose transpose is
the public ``A``: the layout the C kernels load fastest, and the one they
accept directly.

The math, with ``c = scaling * reward`` (exact backprop of ``y`` for the
upstream gradient ``reward * grad_out``)::

    forward:     y  = scaling * (x @ A) @ B
    accumulate:  gB += c * outer(x @ A, grad_out)      (summed over a batch)
                 gA += c * outer(x, grad_out @ B.T)
                 count += number of examples
    apply:       theta -= (lr / count) * g;  g = 0;  count = 0

Dispatch: an adapter looks its four ops up once, at construction, with
``backend.op(name, default)``; the defaults are the Array API functions of
this module (and ``ewc.lora_apply_ewc``), the native backend overrides them
with C kernels. Overrides are float32 kernels: other dtypes use the
defaults.

Mutation: on libraries with mutable arrays (NumPy, PyTorch, CuPy) the
adapter updates its own arrays in place, and ``forward_add`` adds into the
caller's ``out``. On other libraries (array-api-strict, the portability
referee, whose arrays are treated as immutable) updates rebind the adapter's
arrays and ``forward_add`` returns a new array. Either way ``forward_add``
returns the result: write ``out = adapter.forward_add(x, out)`` to be
portable.

Thread safety: every method that reads or writes the adapter's arrays holds
the adapter's lock (a ``threading.RLock``), so concurrent forwards and
updates never see a half-written adapter; the counters are updated under
the same lock. An adapter's lock is fixed for its life (a pool's adapters
share the pool's lock and keep it after eviction): a thread waiting on it
must find, once it has it, that it guards the arrays it is about to touch.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

from ._xp import Array, device, library_name, namespace
from .config import check_float, check_int
from .errors import AdaLoraWarning

__all__ = [
    "GOLDEN",
    "LORA_INITS",
    "LoraAdapter",
    "golden_init",
    "is_mutable",
    "lora_accumulate",
    "lora_apply",
    "lora_forward_add",
    "lora_forward_add_batched",
]

#: The golden-ratio constant of the deterministic init.
GOLDEN = 0.618033988749895

LORA_INITS = ("kaiming", "deterministic")

# Libraries whose arrays the core may update in place.
_MUTABLE = frozenset({"numpy", "torch", "cupy"})


def is_mutable(xp: Any) -> bool:
    """True when arrays of namespace ``xp`` may be updated in place (NumPy, PyTorch, CuPy)."""
    return library_name(xp) in _MUTABLE


# ---------------------------------------------------------------------------
# checks (the C kernels make the same ones; the Array API would broadcast)
# ---------------------------------------------------------------------------


def _shape(a: Array) -> tuple[int, ...]:
    return tuple(int(d) for d in a.shape)


def check_rows(xname: str, x: Array, in_f: int, oname: str, o: Array, out_f: int, dtype: Any) -> int:
    """Number of examples in ``x`` (1 for a vector); a clear error for any mismatch.

    ``x`` is ``(in,)`` or ``(n, in)`` and ``o`` matches it with ``out_f``
    columns; both of dtype ``dtype``. TypeError for dtypes, ValueError for shapes.
    """
    if getattr(x, "ndim", None) not in (1, 2):
        raise ValueError(f"{xname} must be (in,) = ({in_f},) or (n, in), got shape {getattr(x, 'shape', None)}")
    if x.dtype != dtype:
        raise TypeError(f"{xname} has dtype {x.dtype}, the adapter's is {dtype}; cast it first")
    if x.shape[-1] != in_f:
        raise ValueError(f"{xname} has {x.shape[-1]} features (shape {_shape(x)}) but the adapter expects {in_f}")
    want = (out_f,) if x.ndim == 1 else (int(x.shape[0]), out_f)
    if getattr(o, "ndim", None) is None or _shape(o) != want:
        raise ValueError(f"{oname} must have shape {want} to match {xname} {_shape(x)}, got {getattr(o, 'shape', None)}")
    if o.dtype != dtype:
        raise TypeError(f"{oname} has dtype {o.dtype}, the adapter's is {dtype}; cast it first")
    return 1 if x.ndim == 1 else int(x.shape[0])


# ---------------------------------------------------------------------------
# Array API defaults of the ops (same signatures as the native kernels)
# ---------------------------------------------------------------------------


def lora_forward_add(x: Array, A: Array, B: Array, scaling: float, out: Array, *, inplace: bool = True) -> Array:
    """``out + scaling * (x @ A) @ B``; written into ``out`` when ``inplace`` (then ``out`` is returned).

    x ``(in,)`` or ``(n, in)``; A ``(in, r)``; B ``(r, out)``; out ``(out,)`` or ``(n, out)``.
    """
    namespace(x, A, B, out)  # one library, or a TypeError naming them
    check_rows("x", x, int(A.shape[0]), "out", out, int(B.shape[1]), A.dtype)
    delta = scaling * ((x @ A) @ B)
    if inplace:
        out += delta
        return out
    return out + delta


def lora_accumulate(
    x: Array, grad_out: Array, A: Array, B: Array, scaling: float, reward: float, gA: Array, gB: Array,
    *, inplace: bool = True,
) -> tuple[Array, Array]:
    """``(gA + dA, gB + dB)``: the reward-scaled gradient of ``y = s (x A) B``, summed over a batch.

    ``dB = s*reward * outer(x @ A, grad_out)``, ``dA = s*reward * outer(x, grad_out @ B.T)``;
    written into ``gA``/``gB`` when ``inplace``.
    """
    namespace(x, grad_out, A, B, gA, gB)
    check_rows("x", x, int(A.shape[0]), "grad_out", grad_out, int(B.shape[1]), A.dtype)
    c = float(scaling) * float(reward)
    if x.ndim == 1:
        h = c * (x @ A)  # (r,)
        gh = c * (grad_out @ B.T)  # (r,)
        dB = h[:, None] * grad_out[None, :]
        dA = x[:, None] * gh[None, :]
    else:
        dB = (c * (x @ A)).T @ grad_out
        dA = x.T @ (c * (grad_out @ B.T))
    if inplace:
        gA += dA
        gB += dB
        return gA, gB
    return gA + dA, gB + dB


def lora_apply(param: Array, grad: Array, lr_over_count: float, *, inplace: bool = True) -> tuple[Array, Array]:
    """``(param - lr_over_count * grad, 0)``: an SGD step on the summed gradient, which is cleared."""
    if inplace:
        param -= lr_over_count * grad
        grad[...] = 0
        return param, grad
    xp = namespace(param, grad)
    return param - lr_over_count * grad, xp.zeros_like(grad)


def lora_forward_add_batched(
    x: Array, A_stack: Array, B_stack: Array, scaling: float | Array, idx: Array, out: Array,
    *, inplace: bool = True,
) -> Array:
    """Many adapters in one vectorised call: ``out[b] += s * (x[b] @ A[idx[b]]) @ B[idx[b]]``.

    x ``(n, in)``; A_stack ``(m, in, r)``; B_stack ``(m, r, out)``; idx ``(n,)``
    integers in ``[0, m)``; ``scaling`` a number or an ``(m,)`` array. A gather
    (``xp.take``) and two batched matmuls.
    """
    xp = namespace(x, A_stack, B_stack, out)
    _, in_f, _ = _shape(A_stack)
    check_rows("x", x, in_f, "out", out, int(B_stack.shape[2]), A_stack.dtype)
    if x.ndim != 2:
        raise ValueError(f"x must be a batch (n, in), got shape {_shape(x)}")
    if _shape(idx) != (int(x.shape[0]),):
        raise ValueError(f"idx must have one entry per row of x ({x.shape[0]}), got shape {_shape(idx)}")
    Ag = xp.take(A_stack, idx, axis=0)  # (n, in, r)
    Bg = xp.take(B_stack, idx, axis=0)  # (n, r, out)
    h = xp.matmul(x[:, None, :], Ag)  # (n, 1, r)
    delta = xp.matmul(h, Bg)[:, 0, :]
    if isinstance(scaling, (int, float)):
        delta = float(scaling) * delta
    else:
        delta = xp.take(scaling, idx, axis=0)[:, None] * delta
    if inplace:
        out += delta
        return out
    return out + delta


# ---------------------------------------------------------------------------
# init
# ---------------------------------------------------------------------------


def golden_init(xp: Any, in_features: int, r: int, dtype: Any, device: Any = None) -> Array:
    """The deterministic golden-ratio init, rank-major: ``At (r, in)`` with ``At[j, i] = A[i, j]``.

    ``A[i, j] = ((k * 0.618033988749895) % 1 - 0.5) * 2 * sqrt(2/in) * 0.01``,
    ``k = i*r + j``, evaluated in float64 and rounded once to ``dtype``.
    """
    f64 = xp.float64
    i = xp.arange(in_features, dtype=f64, device=device)
    j = xp.arange(r, dtype=f64, device=device)
    k = i[None, :] * float(r) + j[:, None]
    vals = ((k * GOLDEN) % 1.0 - 0.5) * 2.0 * math.sqrt(2.0 / in_features) * 0.01
    return xp.astype(vals, dtype)


def all_finite(xp: Any, *arrays: Array) -> bool:
    return all(bool(xp.all(xp.isfinite(a))) for a in arrays if a is not None)


def owned_copy(xp: Any, src: Array, like: Array | None = None) -> Array:
    """A copy of ``src`` owned by the caller: C-contiguous on mutable libraries (so a
    transposed source becomes rank-major memory), a plain copy elsewhere."""
    if is_mutable(xp):
        dev = device(like if like is not None else src)
        out = xp.zeros(src.shape, dtype=src.dtype if like is None else like.dtype, device=dev)
        out[...] = src
        return out
    return xp.asarray(src, copy=True)


def dtype_name(xp: Any, dtype: Any) -> str:
    for name in ("float32", "float64", "float16"):
        if hasattr(xp, name) and dtype == getattr(xp, name):
            return name
    raise TypeError(f"dtype {dtype} is not supported: use float32 or float64")


# ---------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------


class LoraAdapter:
    """One module's low-rank adapter (any rank ``r >= 1``).

    ``LoraAdapter(in_features, out_features, rank, alpha=4.0, backend=..., dtype="float32",
    seed=0, init="kaiming")``: B = 0 (the adapter starts as the identity), A
    uniform in ``±sqrt(2/in)`` from ``backend.rng(seed)`` (or ``rng=`` a
    generator), or the golden-ratio init with ``init="deterministic"``.
    ``use_bias`` adds a trainable ``(out,)`` bias (plain SGD; EWC covers A and B).

    Counters (read them, do not set them): ``pending_updates`` (examples
    accumulated since the last step), ``forward_calls``, ``skipped_updates``
    (steps dropped because the accumulated gradient was not finite).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float = 4.0,
        *,
        backend: Any = None,
        dtype: Any = "float32",
        seed: int | None = 0,
        init: str = "kaiming",
        use_bias: bool = False,
        rng: Any = None,
        lock: Any = None,
    ) -> None:
        from .backends import get_backend

        check_int("in_features", in_features, 1)
        check_int("out_features", out_features, 1)
        check_int("rank", rank, 1)
        check_float("alpha", alpha, 0.0, low_open=True)
        if init not in LORA_INITS:
            raise ValueError(f"init={init!r} is invalid: must be one of {list(LORA_INITS)}")
        be = get_backend(backend)
        xp = be.xp
        dt = be.dtype(dtype)
        self.dtype_name = dtype_name(xp, dt)
        self.backend = be
        self.in_features = in_features
        self.out_features = out_features
        self._rank = rank
        self.alpha = float(alpha)
        self.scaling = float(alpha) / rank
        self.use_bias = bool(use_bias)
        self._xp = xp
        self._mutable = is_mutable(xp)
        self._lock = lock if lock is not None else threading.RLock()  # never replaced: see forward_add
        self._on_change: Callable[[LoraAdapter], None] | None = None
        self.pending_updates = 0
        self.forward_calls = 0
        self.skipped_updates = 0

        At = be.zeros((rank, in_features), dtype=dt)
        if init == "kaiming":
            bound = math.sqrt(2.0 / in_features)
            gen = rng if rng is not None else be.rng(seed)
            At = self._fill(At, gen.uniform((rank, in_features), -bound, bound, dtype=dt))
        else:
            At = self._fill(At, golden_init(xp, in_features, rank, dt, device(At)))
        self._bind(
            At,
            be.zeros((rank, out_features), dtype=dt),
            be.zeros((rank, in_features), dtype=dt),
            be.zeros((rank, out_features), dtype=dt),
        )
        self._bias = be.zeros((out_features,), dtype=dt) if use_bias else None
        self._gbias = be.zeros((out_features,), dtype=dt) if use_bias else None
        self._dtype = At.dtype
        self._pick_ops(be, dt)

    # -- plumbing ---------------------------------------------------------

    def _fill(self, dst: Array, src: Array) -> Array:
        if self._mutable:
            dst[...] = src
            return dst
        return src

    def _bind(self, At: Array, B: Array, gAt: Array, gB: Array) -> None:
        """Point the adapter at new storage (rank-major ``At``/``gAt``) and refresh the views."""
        self._At, self._B, self._gAt, self._gB = At, B, gAt, gB
        self._A = At.T
        self._gA = gAt.T

    def _pick_ops(self, be: Any, dt: Any) -> None:
        from .ewc import lora_apply_ewc

        fast = dt == be.dtype("float32")
        defaults = {
            "lora_forward_add": lora_forward_add,
            "lora_accumulate": lora_accumulate,
            "lora_apply": lora_apply,
            "lora_apply_ewc": lora_apply_ewc,
        }
        ops = {}
        for name, fn in defaults.items():
            d = fn if self._mutable else partial(fn, inplace=False)
            ops[name] = be.op(name, d) if fast else d
        self._fwd_raw = ops["lora_forward_add"]
        self._acc = ops["lora_accumulate"]
        self._apply = ops["lora_apply"]
        self._apply_ewc = ops["lora_apply_ewc"]
        self.uses_override = {k: be.ops.get(k) is ops[k] for k in ops}
        self._fwd = self._fwd_bias if self.use_bias else self._fwd_raw

    def _fwd_bias(self, x: Array, A: Array, B: Array, scaling: float, out: Array) -> Array:
        r = self._fwd_raw(x, A, B, scaling, out)
        out = out if r is None else r
        if self._mutable:
            out += self._bias
            return out
        return out + self._bias

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)

    # -- public views -------------------------------------------------------

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def lock(self) -> Any:
        """The adapter's lock; hold it to read several arrays consistently."""
        return self._lock

    @property
    def xp(self) -> Any:
        return self._xp

    @property
    def dtype(self) -> Any:
        return self._dtype

    @property
    def A(self) -> Array:
        """``(in, r)``: a view of the adapter's storage on mutable libraries; do not write to it."""
        return self._A

    @property
    def B(self) -> Array:
        """``(r, out)``."""
        return self._B

    @property
    def bias(self) -> Array | None:
        return self._bias

    @property
    def grad_A(self) -> Array:
        """The summed, not yet applied gradient of A ``(in, r)``."""
        return self._gA

    @property
    def grad_B(self) -> Array:
        return self._gB

    def param_count(self) -> int:
        return self._rank * (self.in_features + self.out_features) + (self.out_features if self.use_bias else 0)

    def memory_bytes(self) -> int:
        """Bytes of the parameters (gradient buffers take as much again)."""
        return self.param_count() * (self._xp.finfo(self._dtype).bits // 8)

    def __repr__(self) -> str:
        return (f"LoraAdapter(in={self.in_features}, out={self.out_features}, r={self._rank}, "
                f"scaling={self.scaling}, backend={self.backend.name!r}, dtype={self.dtype_name})")

    # -- forward ------------------------------------------------------------

    def forward_add(self, x: Array, out: Array) -> Array:
        """``out += scaling * (x @ A) @ B (+ bias)`` for ``x (in,)`` or ``(n, in)``; returns ``out``.

        In place on mutable libraries (no allocation on the native backend);
        a new array on immutable ones. Wrong shapes or dtypes raise before
        anything is written.
        """
        lock = self._lock  # release exactly the lock acquired
        lock.acquire()  # try/finally: cheaper than a with-statement on this hot path
        try:
            r = self._fwd(x, self._A, self._B, self.scaling, out)
            self.forward_calls += 1
        finally:
            lock.release()
        return out if r is None else r

    def forward(self, x: Array) -> Array:
        """``scaling * (x @ A) @ B (+ bias)``: a new ``(out,)`` or ``(n, out)`` array."""
        if getattr(x, "ndim", None) not in (1, 2):
            raise ValueError(f"x must be (in,) or (n, in), got shape {getattr(x, 'shape', None)}")
        shape = (self.out_features,) if x.ndim == 1 else (int(x.shape[0]), self.out_features)
        out = self._xp.zeros(shape, dtype=self._dtype, device=device(self._B))
        return self.forward_add(x, out)

    # -- gradients ----------------------------------------------------------

    def accumulate_gradient(self, x: Array, grad_out: Array, reward: float = 1.0) -> int:
        """Add the gradient of ``y`` for upstream ``reward * grad_out`` (one example or a batch).

        Returns the number of examples added to ``pending_updates``.
        """
        check_float("reward", reward)
        with self._lock:
            n = 1 if getattr(x, "ndim", None) == 1 else int(x.shape[0]) if getattr(x, "ndim", None) == 2 else 0
            r = self._acc(x, grad_out, self._A, self._B, self.scaling, reward, self._gA, self._gB)
            if r is not None and not self._mutable:
                gA, gB = r
                self._bind(self._At, self._B, gA.T, gB)
            if self._gbias is not None:
                g = grad_out if grad_out.ndim == 1 else self._xp.sum(grad_out, axis=0)
                if self._mutable:
                    self._gbias += float(reward) * g
                else:
                    self._gbias = self._gbias + float(reward) * g
            self.pending_updates += n
        return n

    def discard_gradients(self) -> None:
        """Drop the accumulated gradient without a step."""
        with self._lock:
            self._zero_grads()

    def _zero_grads(self) -> None:
        xp = self._xp
        if self._mutable:
            self._gAt[...] = 0
            self._gB[...] = 0
            if self._gbias is not None:
                self._gbias[...] = 0
        else:
            self._bind(self._At, self._B, xp.zeros_like(self._gAt), xp.zeros_like(self._gB))
            if self._gbias is not None:
                self._gbias = xp.zeros_like(self._gbias)
        self.pending_updates = 0

    def _ready(self) -> bool:
        """True when a step should run; drops (and counts) a non-finite gradient."""
        if self.pending_updates == 0:
            return False
        if not all_finite(self._xp, self._gAt, self._gB, self._gbias):
            self._skip(f"the gradient accumulated over {self.pending_updates} examples is not finite")
            return False
        return True

    def _skip(self, why: str) -> None:
        """Discard the pending gradient and count a skipped update; the weights are unchanged."""
        self._zero_grads()
        self.skipped_updates += 1
        warnings.warn(f"skipped an update of {self!r}: {why}; the gradient was discarded and the weights "
                      "were left unchanged", AdaLoraWarning, stacklevel=5)

    def _step(self, run: Callable[[], None], ewc: Any) -> bool:
        """Run the step ``run`` (which clears the gradient); keep it only if all it wrote is finite.

        A finite gradient can still overflow: a huge ``lr``, the explicit EWC
        step with a large ``lr*lam*F``, a squared gradient fed to the Fisher.
        Then the weights, the bias and ``ewc``'s Fisher and window sums are put
        back and the update is skipped and counted: nothing non-finite is written.
        """
        xp = self._xp
        parts = [(self, "_At"), (self, "_B")] + ([(self, "_bias")] if self._bias is not None else [])
        if ewc is not None:
            parts += [(ewc, k) for k in ("_Fa", "_Fb", "_Sa", "_Sb")]
        saved = [owned_copy(xp, getattr(o, k)) if self._mutable else getattr(o, k) for o, k in parts]
        window_steps = ewc.window_steps if ewc is not None else 0
        n = self.pending_updates
        run()
        if all_finite(xp, *(getattr(o, k) for o, k in parts)):
            self.pending_updates = 0
            self._changed()
            return True
        for (o, k), a in zip(parts, saved):
            if self._mutable:
                getattr(o, k)[...] = a
            else:
                setattr(o, k, a)
        self._bind(self._At, self._B, self._gAt, self._gB)
        if ewc is not None:
            ewc.window_steps = window_steps
        self._skip(f"the step over {n} examples is not finite (an overflow: lower lr, or lam with the "
                   "explicit EWC update)")
        return False

    def _step_bias(self, lr_over_count: float) -> None:
        if self._bias is None:
            return
        if self._mutable:
            self._bias -= lr_over_count * self._gbias
            self._gbias[...] = 0
        else:
            self._bias = self._bias - lr_over_count * self._gbias
            self._gbias = self._xp.zeros_like(self._gbias)

    def apply_gradients(self, lr: float, *, ewc: Any = None, update_fisher: bool | None = None) -> bool:
        """``theta -= (lr / count) * g``, then clear the gradient. Returns whether a step ran.

        No-op when nothing is pending. A non-finite accumulated gradient, or a
        step whose result is not finite (an overflow), is discarded instead
        (``skipped_updates`` counts it, an AdaLoraWarning says so): inf and NaN
        never reach the weights or the EWC state. With ``ewc`` (an
        :class:`~adalora_core.ewc.EwcState`) the Fisher is fed the mean
        gradient first, unless ``update_fisher`` (default: the EWC config's) is False.
        """
        check_float("lr", lr, 0.0)
        if ewc is not None:
            ewc.check_compatible(self)
        with self._lock:
            if not self._ready():
                return False
            feed = ewc is not None and (ewc.config.update_fisher if update_fisher is None else update_fisher)
            if feed:
                return self._step(partial(self._step_ewc, lr, 0.0, ewc, True, True), ewc)
            return self._step(partial(self._step_sgd, lr), None)

    def _step_sgd(self, lr: float) -> None:
        s = float(lr) / self.pending_updates
        At, _ = self._call_apply(self._At, self._gAt, s)
        B, _ = self._call_apply(self._B, self._gB, s)
        if not self._mutable:
            self._bind(At, B, self._xp.zeros_like(self._gAt), self._xp.zeros_like(self._gB))
        self._step_bias(s)

    def _call_apply(self, p: Array, g: Array, s: float) -> tuple[Array, Array]:
        r = self._apply(p, g, s)
        return (p, g) if r is None else r

    def apply_gradients_with_ewc(
        self, lr: float, ewc: Any, lam: float | None = None, *, update_fisher: bool | None = None
    ) -> bool:
        """A step with the EWC++ penalty ``lam/2 * sum F (theta - theta*)^2``.

        The Fisher is fed the mean gradient first (unless ``update_fisher`` is
        False; default from ``ewc.config``), then, with ``a = lr*lam*F``:
        proximal (default, stable) ``theta = (theta - lr*g + a*theta*) / (1 + a)``,
        or explicit (``ewc.config.update == "explicit"``) ``theta -= lr*g + a*(theta - theta*)``.
        ``lam`` defaults to ``ewc.config.lam``. Same skipping rules as :meth:`apply_gradients`;
        the explicit step is not refused for ``a >= 2`` (it oscillates with a growing amplitude, as
        the original did), but a step that overflows is skipped and counted.
        """
        check_float("lr", lr, 0.0)
        lam = ewc.config.lam if lam is None else lam
        check_float("lam", lam, 0.0)
        ewc.check_compatible(self)
        feed = ewc.config.update_fisher if update_fisher is None else bool(update_fisher)
        with self._lock:
            if not self._ready():
                return False
            return self._step(partial(self._step_ewc, lr, lam, ewc, feed, ewc.config.update == "proximal"), ewc)

    def _step_ewc(self, lr: float, lam: float, ewc: Any, feed: bool, proximal: bool) -> None:
        inv = 1.0 / self.pending_updates
        cfg = ewc.config
        ema = feed and cfg.mode == "ema"
        if feed and cfg.mode == "window":
            ewc._observe_window_t(self._gAt * inv, self._gB * inv)
        pa = self._apply_ewc(self._At, self._gAt, inv, float(lr), float(lam), ewc._Fa, ewc._Oa,
                             cfg.decay, proximal, ema)
        pb = self._apply_ewc(self._B, self._gB, inv, float(lr), float(lam), ewc._Fb, ewc._Ob,
                             cfg.decay, proximal, ema)
        if pa is not None and not self._mutable:
            self._bind(pa[0], pb[0], pa[1], pb[1])
            ewc._Fa, ewc._Fb = pa[2], pb[2]
        self._step_bias(float(lr) * inv)

    # -- weights ------------------------------------------------------------

    def delta_weight(self, layout: str = "in_out") -> Array:
        """``scaling * A @ B`` as ``(in, out)``; ``layout="out_in"`` gives torch ``nn.Linear``'s ``(out, in)``."""
        if layout not in ("in_out", "out_in"):
            raise ValueError(f"layout={layout!r} is invalid: must be 'in_out' (W is (in, out)) or "
                             "'out_in' (torch nn.Linear weight, (out, in))")
        with self._lock:
            if layout == "in_out":
                return self.scaling * (self._A @ self._B)
            return self.scaling * (self._B.T @ self._At)

    def merge_into(self, W: Array, layout: str = "in_out") -> Array:
        """``W += scaling * A @ B`` (bias not included); returns ``W``.

        ``layout="in_out"``: W is ``(in, out)`` (this module's convention, ``y = x @ W``);
        ``layout="out_in"``: W is ``(out, in)`` (torch ``nn.Linear.weight``, ``y = x @ W.T``).
        In place on mutable libraries, a new array otherwise; W's dtype is kept.
        """
        delta = self.delta_weight(layout)
        want = (self.in_features, self.out_features) if layout == "in_out" else (self.out_features, self.in_features)
        if _shape(W) != want:
            raise ValueError(f"W has shape {_shape(W)}, expected {want} for layout={layout!r}")
        xp = namespace(W, delta)
        if W.dtype != delta.dtype:
            delta = xp.astype(delta, W.dtype)
        if self._mutable:
            W += delta
            return W
        return W + delta

    def set_weights(self, A: Array, B: Array, bias: Array | None = None) -> None:
        """Copy ``A (in, r)``, ``B (r, out)`` (and ``bias``) into the adapter, after checking them."""
        xp = self._xp
        want = {"A": (self.in_features, self._rank), "B": (self._rank, self.out_features)}
        for name, a in (("A", A), ("B", B)):
            self._check_array(name, a, want[name])
        if bias is not None:
            if self._bias is None:
                raise ValueError("bias given but the adapter has use_bias=False")
            self._check_array("bias", bias, (self.out_features,))
        if not all_finite(xp, A, B, bias):
            raise ValueError("weights must be finite")
        with self._lock:
            if self._mutable:
                self._At[...] = A.T
                self._B[...] = B
                if bias is not None:
                    self._bias[...] = bias
            else:
                self._bind(xp.asarray(A.T, copy=True), xp.asarray(B, copy=True), self._gAt, self._gB)
                if bias is not None:
                    self._bias = xp.asarray(bias, copy=True)
            self._changed()

    def _check_array(self, name: str, a: Array, shape: tuple[int, ...]) -> None:
        namespace(a, self._B)  # same library, or a TypeError naming both
        if _shape(a) != shape:
            raise ValueError(f"{name} has shape {_shape(a)}, expected {shape}")
        if a.dtype != self._dtype:
            raise TypeError(f"{name} has dtype {a.dtype}, the adapter's is {self._dtype}")

    def reset(self) -> None:
        """B = 0 (and bias = 0), gradients cleared, counters zeroed; A is kept (so the adapter is the identity again)."""
        with self._lock:
            if self._mutable:
                self._B[...] = 0
                if self._bias is not None:
                    self._bias[...] = 0
            else:
                self._bind(self._At, self._xp.zeros_like(self._B), self._gAt, self._gB)
                if self._bias is not None:
                    self._bias = self._xp.zeros_like(self._bias)
            self._zero_grads()
            self.forward_calls = 0
            self.skipped_updates = 0
            self._changed()

    # -- state (checkpoints) --------------------------------------------------

    def state_arrays(self) -> dict[str, Array]:
        """The adapter's arrays in the public layout (views on mutable libraries; copy them under ``lock``)."""
        out = {"lora_A": self._A, "lora_B": self._B, "grad_A": self._gA, "grad_B": self._gB}
        if self._bias is not None:
            out["bias"] = self._bias
            out["grad_bias"] = self._gbias
        return out

    def state_spec(self) -> dict[str, tuple[int, ...]]:
        i, r, o = self.in_features, self._rank, self.out_features
        spec = {"lora_A": (i, r), "lora_B": (r, o), "grad_A": (i, r), "grad_B": (r, o)}
        if self._bias is not None:
            spec["bias"] = (o,)
            spec["grad_bias"] = (o,)
        return spec

    def load_state_arrays(self, arrays: dict[str, Array], pending: int) -> None:
        """Inverse of :meth:`state_arrays` (arrays already checked and on this backend)."""
        xp = self._xp
        with self._lock:
            if self._mutable:
                self._At[...] = arrays["lora_A"].T
                self._B[...] = arrays["lora_B"]
                self._gAt[...] = arrays["grad_A"].T
                self._gB[...] = arrays["grad_B"]
                if self._bias is not None:
                    self._bias[...] = arrays["bias"]
                    self._gbias[...] = arrays["grad_bias"]
            else:
                self._bind(*(xp.asarray(a, copy=True) for a in (
                    arrays["lora_A"].T, arrays["lora_B"], arrays["grad_A"].T, arrays["grad_B"])))
                if self._bias is not None:
                    self._bias = xp.asarray(arrays["bias"], copy=True)
                    self._gbias = xp.asarray(arrays["grad_bias"], copy=True)
            self.pending_updates = int(pending)
            self._changed()
