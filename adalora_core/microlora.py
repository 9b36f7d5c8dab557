"""MicroLoRA: rank-1/2 adapters for real-time, per-request adaptation, with EWC++.

A :class:`MicroLoRA` holds one :class:`~adalora_core.lora.LoraAdapter` per
target module (``"q_proj"``, ``"v_proj"``, ...). Serving adds the adapter's
output into the base layer's (``forward_add``: on the native backend a dict
lookup, a lock and one C call); feedback on a request accumulates a
reward-scaled gradient (``adapt``); ``apply_updates`` takes the step, feeding
the EWC++ Fisher first, and ``apply_updates_with_ewc`` adds the penalty that
keeps earlier tasks from being forgotten.

Fixes against the original (ruvLLM's ``micro_lora.rs``, summarised in
``docs/spec-microlora.md``): a rank other than 1 or 2 is an error, not silently clamped; a feedback without a gradient
estimate is an error (the original's ``quality * 0.01`` stand-in, which
carries no direction, only behind ``allow_heuristic_gradient=True``, with a
warning); the Fisher is actually fed, so EWC does something; feedback,
inputs, learning rates and checkpoints are validated before any state
changes; non-finite gradients are skipped and counted, never written.

Thread safety (NumPy / native): each adapter has a lock that every read and
write of its arrays holds; the counters are kept under locks too. Forward
calls, ``adapt`` and ``apply_updates`` may run from many threads at once.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._xp import Array, device, host_np, namespace, to_numpy
from .checkpoint import (
    PREFIX,
    Header,
    read_peft_dir,
    save_peft_dir,
)
from .config import KNOWN_MODULES, EwcConfig, MicroLoraConfig, check_float, check_int
from .errors import AdaLoraWarning, CheckpointError
from .ewc import EwcState
from .lora import LoraAdapter, a_side_from_v1, all_finite, state_shapes
from .schema import Declared, Schema
from .validate import Problems

__all__ = ["FORMAT", "FORMAT_VERSION", "PEFT_LORA_CONFIG", "AdaptFeedback", "MicroLoRA"]

FORMAT = "adalora_core.microlora"
#: Version 2 stores the A-side arrays (``lora_A``, ``grad_A``, ``ewc.*_a``) as ``(r, in)``; version 1
#: (``(in, r)``) is read too.
FORMAT_VERSION = 2
SCHEMA = Schema(FORMAT, FORMAT_VERSION, {1: a_side_from_v1})

#: The fields of PEFT's LoRA ``adapter_config.json`` that :meth:`MicroLoRA.save_peft` writes besides
#: ``r``, ``lora_alpha``, ``target_modules``, ``task_type`` and ``base_model_name_or_path``: plain LoRA,
#: ``scaling = lora_alpha / r``, as MicroLoRA computes it. PEFT fills in its other fields' defaults.
PEFT_LORA_CONFIG: Mapping[str, Any] = {
    "peft_type": "LORA", "bias": "none", "lora_bias": False, "lora_dropout": 0.0, "fan_in_fan_out": False,
    "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
    "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    "inference_mode": True, "revision": None,
}


@dataclass(frozen=True)
class AdaptFeedback:
    """Feedback on one request (or a batch of requests sharing it).

    ``quality``: a finite score in [0, 1] (anything else is a ValueError; the
    original silently skipped a negative quality). ``gradient_estimate``: the gradient
    of the loss with respect to the adapted module's output, ``(out,)`` (or
    ``(n, out)`` for a batch input): a list, a tuple or a real floating array
    (cast to the adapter's dtype; an array of another library, say NumPy
    for a torch MicroLoRA, is copied over). ``reward``
    scales it (default: ``quality``). ``source_module``: adapt this module
    only (default: every target). ``latency_us`` and ``session_id`` are
    carried for the caller's bookkeeping.
    """

    quality: float
    gradient_estimate: Any = None
    reward: float | None = None
    latency_us: int = 0
    source_module: str | None = None
    session_id: str | None = None

    def __post_init__(self) -> None:
        check_float("quality", self.quality, 0.0, 1.0)
        if self.reward is not None:
            check_float("reward", self.reward)
        check_int("latency_us", self.latency_us, 0)
        if self.source_module is not None and self.source_module not in KNOWN_MODULES:
            raise ValueError(f"source_module={self.source_module!r} is invalid: must be one of the known "
                             f"modules {list(KNOWN_MODULES)}")

    @property
    def effective_reward(self) -> float:
        """``reward`` when given, else ``quality``."""
        return float(self.quality if self.reward is None else self.reward)

    @classmethod
    def from_quality(cls, quality: float, **kw: Any) -> AdaptFeedback:
        return cls(quality, **kw)

    @classmethod
    def with_gradient(cls, quality: float, gradient: Any, **kw: Any) -> AdaptFeedback:
        return cls(quality, gradient_estimate=gradient, **kw)


class MicroLoRA:
    """A set of rank-1/2 adapters keyed by module name.

    ``MicroLoRA(config=MicroLoraConfig(), backend=None, seed=0, ewc=EwcConfig(), dtype="float32")``.
    ``backend``: a name (``"native"``, ``"numpy"``, ``"array_api_strict"``,
    ``"torch"``, ...) or a Backend; None picks the default (native when the C
    extension is built). ``ewc=None`` turns EWC++ off (no Fisher, no anchor).

    On mutable libraries ``forward_add`` adds into ``out`` in place and
    returns it; on immutable ones (array-api-strict) it returns a new array:
    ``out = m.forward_add(x, "q_proj", out)`` is portable.
    """

    def __init__(
        self,
        config: MicroLoraConfig | None = None,
        backend: Any = None,
        seed: int | None = 0,
        ewc: EwcConfig | None = EwcConfig(),  # noqa: B008 (frozen, shared safely)
        *,
        dtype: Any = "float32",
    ) -> None:
        from .backends import get_backend

        config = MicroLoraConfig() if config is None else config
        if not isinstance(config, MicroLoraConfig):
            raise TypeError(f"config must be a MicroLoraConfig, got {type(config).__name__}")
        if ewc is not None and not isinstance(ewc, EwcConfig):
            raise TypeError(f"ewc must be an EwcConfig or None, got {type(ewc).__name__}")
        be = get_backend(backend)
        self.config = config
        self.ewc_config = ewc
        self.backend = be
        self.seed = seed
        self._xp = be.xp
        self._rng = be.rng(seed)
        self._adapters: dict[str, LoraAdapter] = {}
        for m in config.target_modules:
            i, o = config.dims(m)
            self._adapters[m] = LoraAdapter(
                i, o, config.rank, config.alpha, backend=be, dtype=dtype, init=config.init,
                use_bias=config.use_bias, rng=self._rng,
            )
        first = self._adapters[config.target_modules[0]]
        self.dtype = first.dtype
        self.dtype_name = first.dtype_name
        self._ewc: dict[str, EwcState] | None = None
        if ewc is not None:
            self._ewc = {m: EwcState.from_adapter(a, ewc) for m, a in self._adapters.items()}
        self._enabled = True
        self._count_lock = threading.Lock()
        self._adaptations = 0
        self._skipped = 0  # adapt calls skipped for non-finite input

    # -- lookup ---------------------------------------------------------------

    def _unknown(self, module: Any) -> ValueError:
        if module in KNOWN_MODULES:
            return ValueError(f"module {module!r} is not adapted here; this MicroLoRA adapts "
                              f"{list(self.config.target_modules)}")
        return ValueError(f"unknown module {module!r}; known modules: {list(KNOWN_MODULES)} "
                          f"(this MicroLoRA adapts {list(self.config.target_modules)})")

    def adapter(self, module: str) -> LoraAdapter:
        """The adapter of ``module``."""
        ad = self._adapters.get(module)
        if ad is None:
            raise self._unknown(module)
        return ad

    @property
    def adapters(self) -> Mapping[str, LoraAdapter]:
        return dict(self._adapters)

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(self._adapters)

    def ewc_state(self, module: str) -> EwcState:
        if self._ewc is None:
            raise ValueError("EWC is off (constructed with ewc=None)")
        self.adapter(module)
        return self._ewc[module]

    def _select(self, modules: str | Iterable[str] | None) -> list[str]:
        if modules is None:
            return list(self._adapters)
        names = [modules] if isinstance(modules, str) else list(modules)
        for m in names:
            self.adapter(m)
        return names

    # -- switches and counters -------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self._enabled

    def enable(self) -> None:
        self._enabled = True

    def disable(self) -> None:
        """Forward adds nothing (``forward`` returns zeros) and ``adapt`` skips; nothing is counted."""
        self._enabled = False

    def set_enabled(self, enabled: bool) -> None:
        self._enabled = bool(enabled)

    @property
    def adaptation_count(self) -> int:
        """Number of ``adapt`` calls that accumulated a gradient."""
        return self._adaptations

    @property
    def forward_count(self) -> int:
        """Number of ``forward`` / ``forward_add`` calls (while enabled)."""
        return sum(a.forward_calls for a in self._adapters.values())

    @property
    def skipped_updates(self) -> int:
        """Adapt calls skipped for a non-finite input or gradient, plus steps skipped
        for a non-finite accumulated gradient."""
        return self._skipped + sum(a.skipped_updates for a in self._adapters.values())

    def pending_updates(self, module: str) -> int:
        return self.adapter(module).pending_updates

    def param_count(self) -> int:
        return sum(a.param_count() for a in self._adapters.values())

    def memory_bytes(self) -> int:
        return sum(a.memory_bytes() for a in self._adapters.values())

    # -- serving ---------------------------------------------------------------

    def forward(self, x: Array, module: str) -> Array:
        """The adapter's output ``scaling * (x @ A.T) @ B (+ bias)`` for ``x (in,)`` or ``(n, in)``."""
        ad = self._adapters.get(module)
        if ad is None:
            raise self._unknown(module)
        if not self._enabled:
            if getattr(x, "ndim", None) not in (1, 2):
                raise ValueError(f"x must be (in,) or (n, in), got shape {getattr(x, 'shape', None)}")
            shape = (ad.out_features,) if x.ndim == 1 else (int(x.shape[0]), ad.out_features)
            return self._xp.zeros(shape, dtype=ad.dtype, device=device(ad.B))
        return ad.forward(x)

    def forward_add(self, x: Array, module: str, out: Array) -> Array:
        """``out += scaling * (x @ A.T) @ B`` for ``module``; returns ``out`` (a new array on
        immutable libraries). The hot path: no allocation on NumPy/native."""
        ad = self._adapters.get(module)
        if ad is None:
            raise self._unknown(module)
        if not self._enabled:
            return out
        return ad.forward_add(x, out)

    # -- learning ----------------------------------------------------------------

    def _gradient(self, fb: AdaptFeedback, x: Array, out_f: int, module: str) -> Array:
        xp = self._xp
        g = fb.gradient_estimate
        want = (out_f,) if x.ndim == 1 else (int(x.shape[0]), out_f)
        if g is None:
            if not self.config.allow_heuristic_gradient:
                raise ValueError(
                    "feedback.gradient_estimate is required: pass the gradient of the loss with respect to "
                    f"the output of {module!r} (shape {want}); the quality-only stand-in of the original "
                    "carries no direction and is available only with MicroLoraConfig(allow_heuristic_gradient=True)")
            warnings.warn(
                "adapt() without a gradient estimate: using the heuristic quality * 0.01 for every output, "
                "which carries no direction (allow_heuristic_gradient=True)", AdaLoraWarning, stacklevel=3)
            return xp.full(want, fb.quality * 0.01, dtype=self.dtype, device=device(self._first_B()))
        if isinstance(g, (list, tuple)):
            try:
                g = self.backend.asarray(g, dtype=self.dtype_name)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"gradient_estimate must be a sequence of numbers: {exc}") from None
        else:
            try:
                gxp = namespace(g)
            except TypeError as exc:
                raise TypeError(f"gradient_estimate must be a list, tuple or array, got {type(g).__name__}") from exc
            if not gxp.isdtype(g.dtype, "real floating"):
                raise TypeError(f"gradient_estimate has dtype {g.dtype}; it must be a real floating array")
            if gxp is not xp:  # host data (say NumPy) for a device backend: copied over
                g = self.backend.asarray(to_numpy(g), dtype=self.dtype_name)
            elif g.dtype != self.dtype:
                g = xp.astype(g, self.dtype)
        if tuple(int(d) for d in g.shape) != want:
            raise ValueError(f"gradient_estimate has shape {tuple(g.shape)}, but {module!r} has "
                             f"out_features={out_f}: expected {want}")
        return g

    def _first_B(self) -> Array:
        return next(iter(self._adapters.values())).B

    def adapt(self, x: Array, feedback: AdaptFeedback) -> bool:
        """Accumulate the reward-scaled gradient of one request (``x (in,)``) or a batch
        (``x (n, in)`` with a gradient ``(n, out)``).

        Adapts ``feedback.source_module``, or every target module. Returns
        True when a gradient was accumulated. Skips (returns False, changes
        nothing) when disabled; skips and counts in ``skipped_updates`` (with
        an AdaLoraWarning) when ``x`` or the gradient is not finite. Bad
        feedback, shapes or dtypes raise before anything changes.
        """
        if not isinstance(feedback, AdaptFeedback):
            raise TypeError(f"feedback must be an AdaptFeedback, got {type(feedback).__name__}")
        if not self._enabled:
            return False
        modules = [feedback.source_module] if feedback.source_module is not None else list(self._adapters)
        plan = []
        for m in modules:
            ad = self.adapter(m)
            if getattr(x, "ndim", None) not in (1, 2):
                raise ValueError(f"x must be (in,) or (n, in), got shape {getattr(x, 'shape', None)}")
            namespace(x, ad.B)
            if x.dtype != ad.dtype:
                raise TypeError(f"x has dtype {x.dtype}, the adapters' is {ad.dtype}; cast it first")
            if int(x.shape[-1]) != ad.in_features:
                raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) but {m!r} has "
                                 f"in_features={ad.in_features}")
            plan.append((ad, self._gradient(feedback, x, ad.out_features, m)))
        xp = self._xp
        if not all_finite(xp, x, *(g for _, g in plan)):
            with self._count_lock:
                self._skipped += 1
            warnings.warn("adapt() skipped a request whose input or gradient estimate is not finite",
                          AdaLoraWarning, stacklevel=2)
            return False
        if self.config.dropout > 0.0:
            keep = 1.0 - self.config.dropout
            with self._count_lock:
                mask = self._rng.bernoulli(tuple(x.shape), keep, dtype=self.dtype_name)
            x = x * mask / keep
        reward = feedback.effective_reward
        for ad, g in plan:
            ad.accumulate_gradient(x, g, reward)
        with self._count_lock:
            self._adaptations += 1
        return True

    def apply_updates(self, lr: float, *, modules: str | Iterable[str] | None = None,
                      update_fisher: bool | None = None) -> int:
        """An SGD step on every adapter with pending gradients (or on ``modules``); returns how many stepped.

        With EWC on, the Fisher is fed each adapter's mean gradient before it
        is cleared (``update_fisher=False``, or ``EwcConfig(update_fisher=False)``, to stop that).
        """
        check_float("lr", lr, 0.0)
        n = 0
        for m in self._select(modules):
            ewc = self._ewc[m] if self._ewc is not None else None
            n += self._adapters[m].apply_gradients(lr, ewc=ewc, update_fisher=update_fisher)
        return n

    def apply_updates_with_ewc(self, lr: float, lam: float | None = None, *,
                               modules: str | Iterable[str] | None = None,
                               update_fisher: bool | None = None) -> int:
        """A step with the EWC++ penalty (``lam`` defaults to ``EwcConfig.lam``; the
        config's ``update`` picks proximal or explicit); returns how many adapters stepped."""
        if self._ewc is None:
            raise ValueError("apply_updates_with_ewc needs EWC: construct MicroLoRA with ewc=EwcConfig(...)")
        check_float("lr", lr, 0.0)
        lam = self.ewc_config.lam if lam is None else lam  # type: ignore[union-attr]  # EWC is on
        check_float("lam", lam, 0.0)
        n = 0
        for m in self._select(modules):
            n += self._adapters[m].apply_gradients_with_ewc(lr, self._ewc[m], lam, update_fisher=update_fisher)
        return n

    def start_new_task(self, modules: str | Iterable[str] | None = None) -> None:
        """A task boundary: ``theta*`` = current weights (and the Fisher folded / normalised as configured)."""
        if self._ewc is None:
            raise ValueError("start_new_task needs EWC: construct MicroLoRA with ewc=EwcConfig(...)")
        for m in self._select(modules):
            ad = self._adapters[m]
            with ad.lock:
                self._ewc[m].start_new_task(ad)

    def ewc_penalty(self, lam: float | None = None) -> Array:
        """The EWC++ penalty summed over the adapters (a 0-d array)."""
        if self._ewc is None:
            raise ValueError("ewc_penalty needs EWC: construct MicroLoRA with ewc=EwcConfig(...)")
        total = None
        for m, ad in self._adapters.items():
            p = self._ewc[m].penalty(ad, lam)
            total = p if total is None else total + p
        return total

    def merge_into_base(self, module: str, W: Array, layout: str = "out_in") -> Array:
        """``W += scaling * A.T @ B`` for ``module``: W ``(out, in)`` as a torch ``nn.Linear`` weight
        (the default), or ``layout="in_out"`` for ``(in, out)``."""
        return self.adapter(module).merge_into(W, layout)

    def reset(self) -> None:
        """B = 0 in every adapter, gradients cleared, counters zeroed, EWC state restarted (F = 0)."""
        for m, ad in self._adapters.items():
            with ad.lock:
                ad.reset()
                if self._ewc is not None:
                    self._ewc[m].reset(ad)
        with self._count_lock:
            self._adaptations = 0
            self._skipped = 0

    def __repr__(self) -> str:
        return (f"MicroLoRA(modules={list(self._adapters)}, rank={self.config.rank}, "
                f"backend={self.backend.name!r}, dtype={self.dtype_name}, ewc={self._ewc is not None})")

    # -- checkpoints ---------------------------------------------------------------

    def save(self, path: Any) -> None:
        """Write weights, pending gradients, EWC state, config and counters to one
        safetensors file (JSON metadata inside), atomically."""
        arrays: dict[str, Any] = {}
        modules: dict[str, Any] = {}
        to_np = self.backend.to_numpy
        for m, ad in self._adapters.items():
            with ad.lock:
                for k, a in ad.state_arrays().items():
                    arrays[f"{m}.{k}"] = host_np.array(to_np(a))
                info = {"pending": ad.pending_updates, "forward_calls": ad.forward_calls,
                        "skipped_updates": ad.skipped_updates}
                if self._ewc is not None:
                    st = self._ewc[m]
                    for k, a in st.state_arrays().items():
                        arrays[f"{m}.ewc.{k}"] = host_np.array(to_np(a))
                    info["window_steps"] = st.window_steps
            modules[m] = info
        meta = {
            "dtype": self.dtype_name,
            "config": self.config.to_dict(),
            "ewc": None if self.ewc_config is None else self.ewc_config.to_dict(),
            "seed": self.seed,
            "enabled": self._enabled,
            "adaptation_count": self._adaptations,
            "skipped": self._skipped,
            "modules": modules,
        }
        SCHEMA.write(path, arrays, meta)

    @classmethod
    def load(cls, path: Any, backend: Any = None, *, dtype: Any = None) -> MicroLoRA:
        """A MicroLoRA from :meth:`save`'s file, on ``backend`` (default: the default backend)
        and in ``dtype`` (default: the saved one).

        Everything is checked (format and version, config, shapes, dtypes,
        finite values, counters) before the object is built: a bad file
        raises :class:`~adalora_core.errors.CheckpointError` and nothing is created.
        """
        parsed: dict[str, Any] = {}

        def declare(meta: Mapping[str, Any], version: int, p: Problems) -> Declared:
            try:
                config = MicroLoraConfig.from_dict(meta["config"])
                ewc_cfg = None if meta.get("ewc") is None else EwcConfig.from_dict(meta["ewc"])
                saved_dtype = meta["dtype"]
                if saved_dtype not in ("float32", "float64"):
                    raise ValueError(f"dtype {saved_dtype!r} is not supported")
                modules = meta["modules"]
                if not isinstance(modules, dict) or sorted(modules) != sorted(config.target_modules):
                    raise ValueError(f"modules {sorted(modules) if isinstance(modules, dict) else modules!r} do "
                                     f"not match the config's target_modules {sorted(config.target_modules)}")
                counters = {"adaptation_count": meta["adaptation_count"], "skipped": meta["skipped"]}
                for m, info in modules.items():
                    for k in ("pending", "forward_calls", "skipped_updates") + (("window_steps",) if ewc_cfg else ()):
                        counters[f"{m}.{k}"] = info[k]
                for k, v in counters.items():
                    check_int(k, v, 0)
                if not isinstance(meta.get("enabled"), bool):
                    raise TypeError(f"enabled={meta.get('enabled')!r} must be a bool")
            except (KeyError, TypeError, ValueError) as exc:
                p.add(f"invalid metadata: {exc}")
                return Declared({})
            parsed.update(config=config, ewc=ewc_cfg, dtype=saved_dtype)
            expect: dict[str, tuple[tuple[int, ...], str]] = {}
            for m in config.target_modules:
                spec = state_shapes(*config.dims(m), config.rank, use_bias=config.use_bias, ewc=ewc_cfg is not None,
                                    version=version)
                expect.update({f"{m}.{k}": (shape, saved_dtype) for k, shape in spec.items()})
            return Declared(expect)

        host, meta, _ = SCHEMA.read(path, declare)
        config, ewc_cfg, saved_dtype, modules = parsed["config"], parsed["ewc"], parsed["dtype"], meta["modules"]
        for m in config.target_modules:
            for k in ("ewc.fisher_a", "ewc.fisher_b", "ewc.window_a", "ewc.window_b"):
                key = f"{m}.{k}"
                if key in host and bool((host[key] < 0).any()):
                    raise CheckpointError(f"{path}: {key!r} has negative values (a Fisher is >= 0)")
        target_dtype = saved_dtype if dtype is None else dtype
        seed = meta.get("seed") if isinstance(meta.get("seed"), int) else 0
        obj = cls(config, backend, seed=seed, ewc=ewc_cfg, dtype=target_dtype)
        be = obj.backend

        def conv(a: Any) -> Array:
            return be.asarray(a, dtype=obj.dtype_name)

        for m, ad in obj._adapters.items():
            info = modules[m]
            arrays = {k: conv(host[f"{m}.{k}"]) for k in ad.state_spec()}
            ad.load_state_arrays(arrays, info["pending"])
            ad.forward_calls = info["forward_calls"]
            ad.skipped_updates = info["skipped_updates"]
            if obj._ewc is not None:
                st = obj._ewc[m]
                st.load_state_arrays({k: conv(host[f"{m}.ewc.{k}"]) for k in st.state_arrays()},
                                     info["window_steps"])
        obj._adaptations = meta["adaptation_count"]
        obj._skipped = meta["skipped"]
        obj._enabled = meta["enabled"]
        return obj

    # -- PEFT's LoRA format --------------------------------------------------------

    def save_peft(self, path: Any, module_paths: Mapping[str, Sequence[str]] | None = None, *,
                  base_model_name_or_path: str | None = None, task_type: str | None = None) -> None:
        """Write the adapters as a PEFT LoRA adapter directory, for any stack that serves PEFT LoRA adapters.

        PEFT's LoRA adds ``lora_alpha / r * lora_B(lora_A(x))``: this
        MicroLoRA's ``scaling * (x @ A.T) @ B``, so ``A (r, in)`` is saved as
        ``lora_A.weight`` and ``B (r, out)`` as ``lora_B.weight (out, r)``
        (``adapter_model.safetensors``), with ``adapter_config.json`` naming
        ``peft_type: LORA``, ``r``, ``lora_alpha`` and ``target_modules``.
        ``module_paths`` maps each module to the layers it serves in the model
        (``{"q_proj": ["model.layers.0.self_attn.q_proj", ...]}``; each path ends
        in the module's name); by default a module's path is its name. Weights
        and config only: gradients, EWC state and counters stay in :meth:`save`.
        An output ``bias`` has no place in PEFT's format (its ``lora_bias`` is
        scaled): ``use_bias=True`` is refused.
        """
        if self.config.use_bias:
            raise ValueError("use_bias=True cannot be saved in PEFT's LoRA format (its lora_bias is scaled by "
                             "lora_alpha / r, this bias is not); use save()")
        paths = _peft_paths(self.modules, module_paths)
        tensors: dict[str, Any] = {}
        to_np = self.backend.to_numpy
        for m, ad in self._adapters.items():
            with ad.lock:
                a = host_np.array(to_np(ad.A), order="C")
                b = host_np.ascontiguousarray(host_np.array(to_np(ad.B)).T)
            for p in paths[m]:
                tensors[f"{PREFIX}{p}.lora_A.weight"] = a
                tensors[f"{PREFIX}{p}.lora_B.weight"] = b
        config = {**PEFT_LORA_CONFIG, "r": self.config.rank, "lora_alpha": self.config.alpha,
                  "target_modules": sorted(p for ps in paths.values() for p in ps),
                  "base_model_name_or_path": base_model_name_or_path, "task_type": task_type}
        save_peft_dir(path, tensors, config)

    @classmethod
    def load_peft(cls, path: Any, backend: Any = None, *, dtype: Any = "float32",
                  ewc: EwcConfig | None = EwcConfig(), seed: int | None = 0) -> MicroLoRA:  # noqa: B008
        """A MicroLoRA holding a PEFT LoRA adapter directory (:meth:`save_peft`'s, or PEFT's own).

        The directory must be plain LoRA of rank 1 or 2 on modules MicroLoRA
        knows (``q_proj``, ...); layers sharing a module name must hold equal
        weights (a MicroLoRA has one adapter per module name). Everything is
        checked before the object is built: a bad directory raises
        :class:`~adalora_core.errors.CheckpointError`.
        """
        config, host = read_peft_dir(path, _check_peft_lora)
        by_module: dict[str, tuple[Any, Any]] = {}
        problems = Problems(str(path))
        for key in sorted(host):
            if not key.endswith(".lora_A.weight"):
                continue
            layer = key[len(PREFIX): -len(".lora_A.weight")]
            m = layer.rsplit(".", 1)[-1]
            a, b = host[key], host[f"{PREFIX}{layer}.lora_B.weight"]
            first = by_module.setdefault(m, (a, b))
            problems.require(first[0].shape == a.shape and first[1].shape == b.shape
                             and bool((first[0] == a).all() and (first[1] == b).all()),
                             f"layers named {m!r} hold different weights ({layer!r}); a MicroLoRA holds one "
                             "adapter per module name")
        problems.require(bool(by_module), "no lora_A/lora_B tensors")
        problems.raise_if_any()
        dims = {m: (int(a.shape[1]), int(b.shape[0])) for m, (a, b) in by_module.items()}
        first_dims = next(iter(dims.values()))
        mc = MicroLoraConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                             target_modules=tuple(by_module), in_features=first_dims[0],
                             out_features=first_dims[1], module_dims=dims)
        obj = cls(mc, backend, seed=seed, ewc=ewc, dtype=dtype)
        for m, (a, b) in by_module.items():
            obj.adapter(m).set_weights(obj.backend.asarray(a, dtype=obj.dtype_name),
                                       obj.backend.asarray(b.T, dtype=obj.dtype_name))
        return obj

def _peft_paths(modules: Sequence[str], module_paths: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    """Each module's layer paths for :meth:`MicroLoRA.save_peft`, checked (default: the module's own name)."""
    if module_paths is None:
        return {m: [m] for m in modules}
    if not isinstance(module_paths, Mapping) or set(module_paths) != set(modules):
        raise ValueError(f"module_paths must map each adapted module {list(modules)} to the paths of its layers, "
                         f"got {module_paths!r:.120}")
    out: dict[str, list[str]] = {}
    seen: set[str] = set()
    for m in modules:
        paths = module_paths[m]
        if isinstance(paths, str) or not isinstance(paths, Sequence) or not paths:
            raise ValueError(f"module_paths[{m!r}] must be a non-empty list of layer paths, got {paths!r}")
        for p in paths:
            if not isinstance(p, str) or not (p == m or p.endswith(f".{m}")) or p in seen:
                raise ValueError(f"module_paths[{m!r}]: {p!r} must be a path ending in '.{m}' (the layer MicroLoRA's "
                                 f"{m!r} adapter serves), each path once")
            seen.add(p)
        out[m] = list(paths)
    return out


def _check_peft_lora(config: Mapping[str, Any], header: Header, p: Problems) -> None:
    """A PEFT LoRA directory that MicroLoRA can hold: rank 1 or 2, plain LoRA, ``lora_A``/``lora_B`` of known modules."""
    p.require(config.get("peft_type") == "LORA", f"peft_type={config.get('peft_type')!r}: expected 'LORA'")
    r, alpha = config.get("r"), config.get("lora_alpha")
    p.require(r in (1, 2) and type(r) is int, f"r={r!r}: MicroLoRA holds rank 1 or 2")
    p.require(isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0,
              f"lora_alpha={alpha!r} must be a number > 0")
    for key in ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                "modules_to_save"):
        p.require(not config.get(key), f"{key}={config.get(key)!r}: MicroLoRA holds plain LoRA adapters only")
    p.require(config.get("bias", "none") == "none", f"bias={config.get('bias')!r}: expected 'none'")
    shapes: dict[str, tuple[int, ...]] = {}
    for key, (shape, dtype) in header.items():
        path, _, part = key.removeprefix(PREFIX).rpartition(".lora_")
        leaf = path.rsplit(".", 1)[-1]
        if not (key.startswith(PREFIX) and part in ("A.weight", "B.weight") and leaf in KNOWN_MODULES):
            p.add(f"unexpected tensor {key!r}: expected '{PREFIX}<path>.lora_A.weight' / '.lora_B.weight' of "
                  f"one of {list(KNOWN_MODULES)}")
            continue
        p.require(dtype in ("float16", "bfloat16", "float32", "float64"), f"{key!r} has dtype {dtype}")
        ok = len(shape) == 2 and shape[0 if part == "A.weight" else 1] == r
        p.require(ok, f"{key!r} has shape {shape}, expected ({r}, in) for lora_A, (out, {r}) for lora_B")
        shapes[key] = shape
    for key in shapes:
        other = key[: -len("A.weight")] + "B.weight" if key.endswith("A.weight") else key[: -len("B.weight")] + "A.weight"
        p.require(other in shapes, f"{key!r} has no matching {other!r}")
