"""Validated, frozen configuration dataclasses.

Every rule is checked in ``__post_init__`` and fails with a ValueError that names
the field, the bad value and the rule, so a wrong config never gets as far as a
training step (PEFT's AdaLoRA fails late, inside ``kthvalue``).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from .errors import AdaLoraWarning


def _fail(name: str, value: Any, rule: str) -> NoReturn:
    raise ValueError(f"{name}={value!r} is invalid: {rule}")


def check_int(name: str, value: Any, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, "must be an int")
    if minimum is not None and value < minimum:
        _fail(name, value, f"must be >= {minimum}")


def check_bool(name: str, value: Any) -> None:
    """A real bool: ``"False"`` from a YAML file or a CLI is truthy, so it is refused, not coerced."""
    if not isinstance(value, bool):
        _fail(name, value, "must be a bool (true or false)")


def check_float(name: str, value: Any, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """``value`` is a finite real in the interval given by ``low``/``high``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, value, "must be a number")
    if not math.isfinite(value):
        _fail(name, value, "must be finite")
    lo_ok = low is None or (value > low if low_open else value >= low)
    hi_ok = high is None or (value < high if high_open else value <= high)
    if not (lo_ok and hi_ok):
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        _fail(name, value, f"must lie in {lo or '(-inf'}, {hi or 'inf)'}")


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _names(name: str, value: Any) -> tuple[str, ...] | str | None:
    """None, a regex string, or the names as a tuple (a set, as PEFT holds them, sorted)."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(v, str) for v in value):
        _fail(name, value, "must be None, a regex string, or a list of module names")
    return tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)


def _layer_indexes(value: Any) -> tuple[int, ...] | int | None:
    if value is None or _is_index(value):
        return value
    if not isinstance(value, (list, tuple)) or not all(_is_index(i) for i in value):
        _fail("layers_to_transform", value, "must be None, a layer index (an int >= 0) or a list of them")
    return tuple(value)


def _rank_pattern(value: Any, init_r: int) -> FrozenDict | None:
    """PEFT's rank pattern: ``'<module>.lora_E'`` -> one bool per triplet of the full rank ``init_r``."""
    if value is None:
        return None
    rule = f"must map '<module>.lora_E' to a list of init_r={init_r} bools"
    if not isinstance(value, Mapping):
        _fail("rank_pattern", value, rule)
    for key, mask in value.items():
        if (not isinstance(key, str) or not isinstance(mask, (list, tuple)) or len(mask) != init_r
                or not all(isinstance(b, bool) for b in mask)):
            _fail("rank_pattern", {key: mask}, rule)
    return FrozenDict(value)


def _json_object(cls: type, data: Any) -> Mapping[str, Any]:
    """``data`` if it is a dict; a ValueError like every other bad config value (loaders catch those)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__}: expected a JSON object (a dict of fields), "  # noqa: TRY004
                         f"got {type(data).__name__} {data!r:.80}")
    return data


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


class FrozenDict(Mapping[str, Any]):
    """A read-only copy of a dict whose list values become tuples: what frozen configs hold.

    Unlike ``types.MappingProxyType`` it is hashable and picklable, so the
    config stays both. It equals any mapping with the same keys and values,
    lists and tuples alike: ``cfg.rank_pattern == {"m.lora_E": [True, False]}``.
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = {k: _frozen(v) for k, v in data.items()}

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return self._data == {k: _frozen(v) for k, v in other.items()}

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._data!r})"

    def __reduce__(self) -> tuple[type[FrozenDict], tuple[dict[str, Any]]]:
        return type(self), (self._data,)


_C = TypeVar("_C", bound="_Config")


class _Config:
    """What every config shares: ``replace``, ``to_dict``, and a strict ``from_dict``."""

    def replace(self: _C, **changes: Any) -> _C:  # noqa: PYI019 (typing.Self needs 3.11)
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[_C], data: Mapping[str, Any]) -> _C:  # noqa: PYI019
        """A config from :meth:`to_dict` output; unknown keys are an error (they mean another format)."""
        data = _json_object(cls, data)
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise ValueError(f"{cls.__name__} has no fields {unknown}; known: {sorted(known)}")
        return cls(**dict(data))


#: PEFT 0.21's AdaLoRA ``adapter_config.json`` keys that are not fields here, with the values
#: PEFT writes for an AdaLoRA adapter: :meth:`AdaLoraConfig.to_peft_dict` writes them so that PEFT's
#: ``PeftConfig``, ``AutoPeftModel*`` and hub tooling read our directories as their own.
PEFT_DEFAULTS: Mapping[str, Any] = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "corda_config": None, "ensure_weight_tying": False, "eva_config": None, "kasa_config": None,
    "layer_replication": None, "loftq_config": {}, "lora_bias": False, "lora_ga_config": None,
    "megatron_config": None, "megatron_core": "megatron.core", "monteclora_config": None,
    "qalora_group_size": 16, "target_parameters": None, "trainable_token_indices": None, "use_bdlora": None,
    "use_dora": False, "use_qalora": False, "use_rslora": False, "velora_config": None,
}

#: Keys of PEFT's ``adapter_config.json`` that :meth:`AdaLoraConfig.from_dict` ignores silently
#: (any other unknown key warns). ``peft_version`` is PEFT's own version: read, never written.
PEFT_ONLY_KEYS: tuple[str, ...] = tuple(sorted([*PEFT_DEFAULTS, "peft_version"]))


class TaskType(str, enum.Enum):
    """PEFT's task types. SEQ_CLS, TOKEN_CLS and QUESTION_ANS train and save the model's head
    (``classifier``/``score``, ``qa_outputs``) with the adapter: see :data:`TASK_MODULES_TO_SAVE`."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


#: The head modules PEFT's task models add to ``modules_to_save`` (trained, saved, never adapted).
TASK_MODULES_TO_SAVE: Mapping[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",),
}


def _task_type(value: Any) -> str | None:
    """None or one of PEFT's task types, stored as a plain string (a PEFT ``TaskType`` member is accepted)."""
    value = value.value if isinstance(value, enum.Enum) else value
    if value is not None and value not in [t.value for t in TaskType]:
        _fail("task_type", value, f"must be None or one of {[t.value for t in TaskType]}")
    return value


def _optional_str(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        _fail(name, value, "must be None or a string")


@dataclass(frozen=True)
class AdaLoraConfig(_Config):
    """AdaLoRA hyperparameters, with PEFT's field names and defaults.

    ``tfinal`` is a duration: the final phase starts at ``total_step - tfinal``.
    ``target_r == init_r`` is allowed and gives a constant budget (no pruning).
    Containers are stored as immutable copies: name lists and
    ``layers_to_transform`` as tuples, ``rank_pattern`` as a :class:`FrozenDict`
    of bool tuples; :meth:`to_dict` gives PEFT's lists and dicts back.

    PEFT's bookkeeping fields travel through ``adapter_config.json``:
    ``task_type`` (None or a :class:`TaskType`; the model wrapper adds the
    task's head to ``modules_to_save``), ``peft_type`` (always ``"ADALORA"``),
    ``base_model_name_or_path`` and ``revision`` (filled from the wrapped
    model when None). ``r`` is PEFT's LoRA rank field: accepted and ignored
    with a warning when not 8, as PEFT does (the rank is ``init_r``).
    """

    total_step: int | None = None
    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    rank_pattern: Mapping[str, Sequence[bool]] | None = None
    target_modules: Sequence[str] | str | None = None
    exclude_modules: Sequence[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Sequence[str] | None = None
    init_lora_weights: bool = True
    layers_to_transform: Sequence[int] | int | None = None
    layers_pattern: Sequence[str] | str | None = None
    inference_mode: bool = False
    task_type: str | None = None
    peft_type: str = "ADALORA"
    base_model_name_or_path: str | None = None
    revision: str | None = None
    r: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "task_type", _task_type(self.task_type))
        if self.peft_type != "ADALORA":
            _fail("peft_type", self.peft_type, "expected 'ADALORA'")
        _optional_str("base_model_name_or_path", self.base_model_name_or_path)
        _optional_str("revision", self.revision)
        check_int("r", self.r)
        if self.r != 8:  # PEFT's message: AdaLoRA's rank is init_r
            warnings.warn("Note that `r` is not used in AdaLora and will be ignored. If you intended to set the "
                          "initial rank, use `init_r` instead.", AdaLoraWarning, stacklevel=3)
        if self.total_step is None:
            _fail("total_step", None, "is required: the number of optimizer steps of the run (> 0)")
        check_int("total_step", self.total_step, 1)
        check_int("init_r", self.init_r, 1)
        check_int("target_r", self.target_r, 0)
        if self.target_r > self.init_r:
            _fail("target_r", self.target_r, f"must be <= init_r={self.init_r} (ranks are only pruned)")
        check_int("tinit", self.tinit, 0)
        check_int("tfinal", self.tfinal, 0)
        check_int("deltaT", self.deltaT, 1)
        if self.tinit >= self.total_step - self.tfinal:
            _fail("tinit", self.tinit, f"must be < total_step - tfinal = {self.total_step - self.tfinal} "
                  "so that a budgeting phase exists; decrease tinit/tfinal or increase total_step")
        check_float("beta1", self.beta1, 0.0, 1.0, low_open=True, high_open=True)
        check_float("beta2", self.beta2, 0.0, 1.0, low_open=True, high_open=True)
        check_float("orth_reg_weight", self.orth_reg_weight, 0.0)
        check_float("lora_alpha", self.lora_alpha, 0.0, low_open=True)
        check_float("lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True)
        if self.bias not in ("none", "all", "lora_only"):
            _fail("bias", self.bias, "must be 'none', 'all' or 'lora_only'")
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        check_bool("init_lora_weights", self.init_lora_weights)
        check_bool("inference_mode", self.inference_mode)
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
            object.__setattr__(self, name, _names(name, getattr(self, name)))
        object.__setattr__(self, "layers_to_transform", _layer_indexes(self.layers_to_transform))
        object.__setattr__(self, "rank_pattern", _rank_pattern(self.rank_pattern, self.init_r))
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            _fail("layers_to_transform", self.layers_to_transform,
                  "cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            _fail("layers_pattern", self.layers_pattern, "needs layers_to_transform as well")

    @property
    def final_step(self) -> int:
        """``T_f``: the first step of the final phase."""
        assert self.total_step is not None
        return self.total_step - self.tfinal

    @property
    def scaling(self) -> float:
        """The adapter scale, ``lora_alpha`` (AdaLoRA does not divide by r)."""
        return float(self.lora_alpha)

    def with_task_defaults(self) -> AdaLoraConfig:
        """This config with the task's head modules added to ``modules_to_save`` (as PEFT's task models do)."""
        extra = TASK_MODULES_TO_SAVE.get(self.task_type or "", ())
        names = list(self.modules_to_save or ())
        names += [n for n in extra if n not in names]
        return self.replace(modules_to_save=names or None) if extra else self

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (``peft_type`` included)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Mapping):
                v = {k: list(m) for k, m in v.items()}
            out[f.name] = v
        return out

    def to_peft_dict(self) -> dict[str, Any]:
        """``adapter_config.json``'s object: :meth:`to_dict` plus PEFT's other keys at PEFT's values."""
        return {**copy.deepcopy(dict(PEFT_DEFAULTS)), **self.to_dict()}

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (created if needed), as PEFT's config does."""
        from .checkpoint import write_adapter_config  # the checkpoint module imports this one

        write_adapter_config(save_directory, self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str],
                        subfolder: str | None = None) -> AdaLoraConfig:
        """The config in a local adapter directory's ``adapter_config.json`` (nothing is downloaded)."""
        from .checkpoint import read_adapter_config

        path = Path(pretrained_model_name_or_path)
        return read_adapter_config(path / subfolder if subfolder else path)

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike[str]) -> dict[str, Any]:
        """The JSON object in ``path_json_file``, as a dict: PEFT's ``from_json_file`` returns the dict too."""
        with open(path_json_file, encoding="utf-8") as fh:
            data = json.load(fh)
        return dict(_json_object(cls, data))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdaLoraConfig:
        """A config from ``to_dict`` output or PEFT's adapter_config.json.

        Unknown keys are ignored, as PEFT ignores them; those PEFT writes
        (:data:`PEFT_ONLY_KEYS`) silently, any other with one
        :class:`AdaLoraWarning` naming them all, so a typo such as ``beta_1``
        does not pass for a setting.
        """
        data = _json_object(cls, data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - set(PEFT_ONLY_KEYS), key=str)
        if unknown:
            warnings.warn(f"AdaLoraConfig.from_dict ignores unknown keys {unknown}: they are neither "
                          "AdaLoraConfig fields nor PEFT's; check their spelling", AdaLoraWarning, stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})


__all__ = ["PEFT_DEFAULTS", "PEFT_ONLY_KEYS", "TASK_MODULES_TO_SAVE", "AdaLoraConfig", "FrozenDict", "TaskType",
           "check_bool", "check_float", "check_int"]


# ---------------------------------------------------------------------------
# MicroLoRA and EWC++
# ---------------------------------------------------------------------------

#: Module names MicroLoRA knows (transformer projections, embeddings, LM head).
KNOWN_MODULES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj",
    "gate_proj", "up_proj", "down_proj",
    "embed_tokens", "lm_head",
)

MICROLORA_INITS = ("kaiming", "deterministic")


def _module_name(name: str, value: Any) -> None:
    if not isinstance(value, str) or value not in KNOWN_MODULES:
        _fail(name, value, f"must be one of the known modules {list(KNOWN_MODULES)}")


@dataclass(frozen=True)
class MicroLoraConfig(_Config):
    """Rank-1/2 adapters for per-request adaptation (``docs/spec-microlora.md``).

    ``rank`` must be 1 or 2: the original silently clamped other values; here
    they are an error (use :class:`adalora_core.lora.LoraAdapter` for any rank).
    ``module_dims`` maps a module name to its ``(in_features, out_features)``
    when it differs from the defaults. ``init`` is ``"kaiming"`` (A uniform in
    ``±sqrt(2/in)`` from the seeded generator) or ``"deterministic"`` (the
    golden-ratio init). ``dropout`` is applied to the input of ``adapt`` only
    (the gradient step), never to the serving forward. A feedback without a
    gradient estimate is an error unless ``allow_heuristic_gradient`` is set,
    in which case the original's ``quality * 0.01`` stand-in is used, with a
    warning: it carries no direction.
    """

    rank: int = 2
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: Sequence[str] = ("q_proj", "v_proj")
    in_features: int = 768
    out_features: int = 768
    module_dims: Mapping[str, Sequence[int]] | None = None
    use_bias: bool = False
    init: str = "kaiming"
    allow_heuristic_gradient: bool = False

    def __post_init__(self) -> None:
        check_int("rank", self.rank)
        if self.rank not in (1, 2):
            _fail("rank", self.rank, "MicroLoRA supports rank 1 or 2 (use lora.LoraAdapter for other ranks)")
        check_float("alpha", self.alpha, 0.0, low_open=True)
        check_float("dropout", self.dropout, 0.0, 1.0, high_open=True)
        targets = self.target_modules
        if isinstance(targets, str):
            targets = (targets,)
        if not isinstance(targets, Sequence) or len(targets) == 0:
            _fail("target_modules", self.target_modules, f"must be a non-empty list of {list(KNOWN_MODULES)}")
        for t in targets:
            _module_name("target_modules", t)
        if len(set(targets)) != len(targets):
            _fail("target_modules", self.target_modules, "must not repeat a module")
        object.__setattr__(self, "target_modules", tuple(targets))
        check_int("in_features", self.in_features, 1)
        check_int("out_features", self.out_features, 1)
        if self.module_dims is not None:
            if not isinstance(self.module_dims, Mapping):
                _fail("module_dims", self.module_dims, "must map a module name to (in_features, out_features)")
            dims = {}
            for k, v in self.module_dims.items():
                _module_name("module_dims key", k)
                if (not isinstance(v, Sequence) or len(v) != 2
                        or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in v)):
                    _fail(f"module_dims[{k!r}]", v, "must be a pair (in_features, out_features) of ints >= 1")
                dims[k] = (int(v[0]), int(v[1]))
            object.__setattr__(self, "module_dims", FrozenDict(dims))
        check_bool("use_bias", self.use_bias)
        if self.init not in MICROLORA_INITS:
            _fail("init", self.init, f"must be one of {list(MICROLORA_INITS)}")
        check_bool("allow_heuristic_gradient", self.allow_heuristic_gradient)

    @classmethod
    def for_hidden_dim(cls, hidden_dim: int, **changes: Any) -> MicroLoraConfig:
        """A config with ``in_features = out_features = hidden_dim``."""
        return cls(in_features=hidden_dim, out_features=hidden_dim, **changes)

    @property
    def scaling(self) -> float:
        """``alpha / rank``."""
        return float(self.alpha) / self.rank

    def dims(self, module: str) -> tuple[int, int]:
        """``(in_features, out_features)`` of ``module``."""
        if self.module_dims and module in self.module_dims:
            d = self.module_dims[module]
            return int(d[0]), int(d[1])
        return self.in_features, self.out_features

    def memory_bytes(self, itemsize: int = 4) -> int:
        """Bytes of adapter parameters over all target modules (float32 by default)."""
        total = 0
        for m in self.target_modules:
            i, o = self.dims(m)
            total += i * self.rank + self.rank * o + (o if self.use_bias else 0)
        return total * itemsize

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["target_modules"] = list(self.target_modules)
        out["module_dims"] = None if self.module_dims is None else {k: list(v) for k, v in self.module_dims.items()}
        return out


EWC_MODES = ("ema", "window")
EWC_UPDATES = ("proximal", "explicit")


@dataclass(frozen=True)
class EwcConfig(_Config):
    """EWC++ (online Fisher) settings.

    ``mode="ema"``: ``F = decay*F + (1-decay)*g**2`` on every update (the
    original's form). ``mode="window"``: every ``window`` (K) updates,
    ``F = alpha*(S/K) + (1-alpha)*F`` with ``S`` the sum of ``g**2`` since the
    last fold (Chaudhry et al. 2018). ``g`` is the mean accumulated gradient of
    an ``apply_updates`` call; ``update_fisher=False`` stops feeding it.
    ``normalise_at_task_boundary`` min-max normalises F (per matrix) when a new
    task starts. ``update`` is the step used with the penalty: ``"proximal"``
    (stable for any ``lr*lam*F``) or ``"explicit"`` (the original's; diverges
    when ``lr*lam*F >= 2``). ``lam`` is the default penalty strength.
    """

    decay: float = 0.999
    mode: str = "ema"
    window: int = 10
    alpha: float = 0.5
    normalise_at_task_boundary: bool = False
    update: str = "proximal"
    lam: float = 1.0
    update_fisher: bool = True

    def __post_init__(self) -> None:
        check_float("decay", self.decay, 0.0, 1.0, high_open=True)
        if self.mode not in EWC_MODES:
            _fail("mode", self.mode, f"must be one of {list(EWC_MODES)}")
        check_int("window", self.window, 1)
        check_float("alpha", self.alpha, 0.0, 1.0, low_open=True)
        check_bool("normalise_at_task_boundary", self.normalise_at_task_boundary)
        if self.update not in EWC_UPDATES:
            _fail("update", self.update, f"must be one of {list(EWC_UPDATES)}")
        check_float("lam", self.lam, 0.0)
        check_bool("update_fisher", self.update_fisher)


__all__ += ["KNOWN_MODULES", "EwcConfig", "MicroLoraConfig"]
