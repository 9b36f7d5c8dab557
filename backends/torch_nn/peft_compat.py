"""PEFT's names and semantics on :class:`~.model.AdaLoraModel`, so a PEFT script runs with its import changed.

What lives here, mixed into ``AdaLoraModel``:

* PeftModel's names: ``base_model`` (the wrapper itself, so PEFT's
  documented ``model.base_model.update_and_allocate(step)`` works),
  ``merge_adapter``/``unmerge_adapter``, ``enable_adapter_layers``/
  ``disable_adapter_layers``, ``get_nb_trainable_parameters``,
  ``get_layer_status``/``get_model_status``, ``active_adapter``.
* The tensors PEFT saves beside the triplets: the ``modules_to_save`` copies
  and, with ``bias="all"``/``"lora_only"``, the trained biases, keyed as PEFT
  keys them (one function for saving and loading, :func:`extra_tensors`).
* The regulariser check: a warning, once, when the allocator runs with
  ``orth_reg_weight > 0`` and ``orth_loss()`` was never called (a PEFT script
  ported as it is trains without the regulariser otherwise, silently).
* The wrapped model's ``forward`` signature on the instance, so transformers'
  ``Trainer`` keeps the batch columns the model takes.
"""

from __future__ import annotations

import collections
import inspect
import os
import types
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import nn

from adalora_core.config import AdaLoraConfig
from adalora_core.errors import AdaLoraWarning

from .layer import SVDLayer
from .modules_to_save import (
    ModulesToSaveWrapper,
    check_wrappable,
    find_modules_to_save,
    wrapper_prefixes,
)
from .targets import get_submodule_parent, resolve_targets

if TYPE_CHECKING:
    from .model import AdaLoraModel

#: transformers' ``AutoModel*`` class for each task type (``from_pretrained`` without a model).
AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel",
}


# ------------------------------------------------------------------ config


def effective_config(config: AdaLoraConfig, model: nn.Module) -> AdaLoraConfig:
    """``config`` as PEFT's model holds (and saves) it: the task's head in ``modules_to_save``, the default
    ``target_modules`` of the model type spelt out, the base model's name."""
    config = config.with_task_defaults()
    if config.target_modules is None:
        config = config.replace(target_modules=resolve_targets(model, config))
    if config.base_model_name_or_path is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        if isinstance(name, str) and name:
            config = config.replace(base_model_name_or_path=name)
    return config


def load_base_model(config: AdaLoraConfig) -> nn.Module:
    """The base model ``config.base_model_name_or_path`` names, from local files only (as ``AutoPeftModel``)."""
    name = config.base_model_name_or_path
    if not name:
        raise ValueError("the adapter's config names no base model (base_model_name_or_path is None): pass the "
                         "model, from_pretrained(model, path)")
    import transformers

    auto = getattr(transformers, AUTO_CLASSES.get(config.task_type or "", "AutoModel"))
    try:
        return auto.from_pretrained(name, revision=config.revision or "main", local_files_only=True)
    except OSError as exc:
        raise ValueError(f"cannot load the base model {name!r} from local files (this library never downloads): "
                         f"{exc}") from exc


def adapter_dir(path: str | os.PathLike[str], adapter_name: str) -> str | os.PathLike[str]:
    """Where PEFT's ``save_pretrained`` puts an adapter: ``"default"`` in ``path``, any other in ``path/<name>``."""
    return path if adapter_name == "default" else os.path.join(path, adapter_name)


# ------------------------------------------------------------------ extra tensors


def bias_params(model: nn.Module, bias: str, targets: Iterable[str], exclude: Iterable[str] = ()
                ) -> dict[str, nn.Parameter]:
    """The biases ``bias`` trains, keyed as PEFT saves them (``<target>.base_layer.bias`` for adapted layers).

    Works before the targets are wrapped (their ``.bias`` is renamed to where
    it will be) and after. Biases under ``exclude`` (modules_to_save) are
    saved with their module instead.
    """
    if bias == "none":
        return {}
    targets = set(targets)
    skip = tuple(f"{e}." for e in exclude)
    out = {}
    for name, p in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        if leaf != "bias" or name.startswith(skip):
            continue
        layer = module.removesuffix(".base_layer") if module.endswith(".base_layer") else module
        adapted = layer in targets
        if bias == "all" or adapted:
            out[f"{layer}.base_layer.bias" if adapted else name] = p
    return out


def _module_state(module: nn.Module, adapter: str) -> Mapping[str, torch.Tensor]:
    if isinstance(module, ModulesToSaveWrapper):
        module = dict(module.modules_to_save.items()).get(adapter, module.original_module)
    return module.state_dict(keep_vars=True)


def extra_tensors(model: nn.Module, adapter: str, config: AdaLoraConfig, targets: Iterable[str],
                  modules_to_save: Sequence[str]) -> dict[str, torch.Tensor]:
    """Every tensor PEFT saves with ``adapter`` beside its triplets, keyed as PEFT keys them.

    ``modules_to_save`` copies as ``<module>.<name>``, then the trained
    biases. Before wrapping (to check a checkpoint) it gives the originals'
    tensors, after wrapping the adapter's own, so saving and loading share it.
    """
    out = {f"{path}.{k}": t for path in modules_to_save
           for k, t in _module_state(model.get_submodule(path), adapter).items()}
    out.update(bias_params(model, config.bias, targets, exclude=[*modules_to_save, *wrapper_prefixes(model)]))
    return out


def wrapper_internals(wrappers: Iterable[str]) -> list[str]:
    """Key prefixes of the copies inside these wrappers: PEFT also writes them with ``bias="all"``, and a
    reader skips them (they are not extras of their own)."""
    return [f"{w}.{part}." for w in wrappers for part in ("original_module", "modules_to_save")]


def copy_loaded(dest: Mapping[str, torch.Tensor], loaded: Mapping[str, Any]) -> None:
    """Copy checkpoint values into the model's tensors of the same keys, in place, outside autograd."""
    with torch.no_grad():
        for key, value in loaded.items():
            dest[key].copy_(torch.as_tensor(value))


@dataclass
class ExtrasPlan:
    """What adding an adapter does beyond its triplets, checked before the model changes."""

    adapter: str
    config: AdaLoraConfig
    targets: list[str]
    modules_to_save: list[str]
    spec: dict[str, tuple[int, ...]]  # the extra tensors a checkpoint of this adapter holds
    skip: list[str]  # key prefixes PEFT also writes with bias="all": a wrapper's internal copies


def plan_extras(ada: AdaLoraModel, adapter: str, config: AdaLoraConfig, targets: Sequence[str]) -> ExtrasPlan:
    """Check ``modules_to_save`` and ``bias`` of a new adapter; nothing is changed."""
    model = ada.model
    if config.bias != "none":
        others = [n for n, c in ada.peft_config.items() if c.bias != "none"]
        if others:
            raise ValueError(f"adapter {others[0]!r} already trains biases (bias={ada.peft_config[others[0]].bias!r})"
                             f"; a second adapter with bias={config.bias!r} would train the same base biases: set "
                             "bias='none' for it (PEFT allows one adapter with a bias)")
    layers = ada.svd_layers()
    found = find_modules_to_save(model, list(config.modules_to_save or ()), required=_user_names(config),
                                 skip_inside=[*layers, *wrapper_prefixes(model)])
    for path in found:
        inner = [k for k in layers if k == path or k.startswith(f"{path}.")]
        if inner:
            raise ValueError(f"modules_to_save names {path!r}, which holds adapted layers {inner[:3]}: a module "
                             "is either adapted or trained and saved whole, not both")
        check_wrappable(model.get_submodule(path), path)
    spec = {k: tuple(t.shape) for k, t in extra_tensors(model, adapter, config, targets, found).items()}
    skip = wrapper_internals([*found, *wrapper_prefixes(model)])
    return ExtrasPlan(adapter, config, list(targets), found, spec, skip)


def _user_names(config: AdaLoraConfig) -> list[str]:
    """The ``modules_to_save`` names the user gave (the task's head names removed)."""
    from adalora_core.config import TASK_MODULES_TO_SAVE

    defaults = TASK_MODULES_TO_SAVE.get(config.task_type or "", ())
    return [n for n in config.modules_to_save or () if n not in defaults]


def apply_extras(ada: AdaLoraModel, plan: ExtrasPlan, loaded: Mapping[str, Any] | None, trainable: bool) -> None:
    """Wrap the plan's ``modules_to_save`` (or add a copy to an existing wrapper) and copy loaded values."""
    model = ada.model
    for path in plan.modules_to_save:
        module = model.get_submodule(path)
        if not isinstance(module, ModulesToSaveWrapper):
            wrapper = ModulesToSaveWrapper(module)
            parent, child = get_submodule_parent(model, path)
            setattr(parent, child, wrapper)
            module = wrapper
        module.update(plan.adapter, trainable)
        module.set_adapter(ada.active_adapters)
    if loaded:
        copy_loaded(extra_tensors(model, plan.adapter, plan.config, plan.targets, plan.modules_to_save), loaded)


def mark_trainable_extras(ada: AdaLoraModel) -> None:
    """The trainable adapter's ``modules_to_save`` copies and biases train; nothing else outside the triplets."""
    name = ada.trainable_adapter_name
    for wrapper in ada.modules_to_save_wrappers().values():
        for adapter, copy in wrapper.modules_to_save.items():
            copy.requires_grad_(adapter == name)
    if name is not None:
        config = ada.peft_config[name]
        for p in bias_params(ada.model, config.bias, ada._adapter_layers(name),
                             exclude=wrapper_prefixes(ada.model)).values():
            p.requires_grad_(True)


# ------------------------------------------------------------------ status


@dataclass
class TunerLayerStatus:
    """PEFT's ``TunerLayerStatus`` fields for one adapter layer or ``modules_to_save`` wrapper."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Literal["irregular"]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


@dataclass
class TunerModelStatus:
    """PEFT's ``TunerModelStatus`` fields: the layers' status summed up ("irregular" where they disagree)."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Literal["irregular"]
    active_adapters: list[str] | Literal["irregular"]
    merged_adapters: list[str] | Literal["irregular"]
    requires_grad: dict[str, bool | Literal["irregular"]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Literal["irregular"] = None


def _agree(values: Iterable[Any]) -> Any:
    """The one value all of ``values`` share, else ``"irregular"``."""
    distinct = {v if not isinstance(v, list) else tuple(v) for v in values}
    if len(distinct) != 1:
        return "irregular"
    one = distinct.pop()
    return list(one) if isinstance(one, tuple) else one


def _grad_state(params: Iterable[torch.Tensor]) -> bool | Literal["irregular"]:
    return _agree(p.requires_grad for p in params)


def _layer_status(name: str, module: nn.Module) -> TunerLayerStatus:
    if isinstance(module, ModulesToSaveWrapper):
        stores: dict[str, list[torch.Tensor]] = {a: list(m.parameters()) for a, m in module.modules_to_save.items()}
        devices = stores
        active = [module.active_adapter] if module.active_adapter is not None else []
        merged: list[str] = []
        available = sorted(module.modules_to_save)
    else:
        assert isinstance(module, SVDLayer)
        stores = collections.defaultdict(list)
        for store in (module.lora_A, module.lora_B, module.lora_E):
            for a, p in store.items():
                stores[a].append(p)
        devices = {a: [*ps, module.ranknum[a]] for a, ps in stores.items()}
        active, merged, available = list(module.active_adapters), list(module.merged_adapters), sorted(module.lora_A)
    return TunerLayerStatus(
        name=name, module_type=type(module).__name__, enabled=not module.disable_adapters, active_adapters=active,
        merged_adapters=merged, requires_grad={a: _grad_state(ps) for a, ps in stores.items()},
        available_adapters=available, devices={a: sorted({p.device.type for p in ps}) for a, ps in devices.items()})


# ------------------------------------------------------------------ the mixin


class PeftCompatMixin:
    """PeftModel's names on the wrapper; see the module docstring."""

    #: PEFT's tuner prefix: every adapter parameter name contains it.
    prefix = "lora_"
    _orth_called = False
    _orth_warned = False

    if TYPE_CHECKING:
        model: nn.Module
        peft_config: dict[str, AdaLoraConfig]
        trainable_adapter_name: str | None

        @property
        def active_adapters(self) -> list[str]: ...
        def svd_layers(self) -> dict[str, SVDLayer]: ...
        def merge(self, adapter_names: Sequence[str] | None = None) -> None: ...
        def unmerge(self) -> None: ...
        def get_base_model(self) -> nn.Module: ...
        def _require(self, name: str | None, what: str = "adapter") -> str: ...
        def _adapter_layers(self, name: str) -> dict[str, SVDLayer]: ...

    @property
    def base_model(self) -> Any:
        """The wrapper itself: PEFT's ``model.base_model`` is the tuner that holds ``update_and_allocate``.

        ``model.base_model.model`` is the wrapped model, as in PEFT.
        """
        return self

    @property
    def active_adapter(self) -> str | list[str] | None:
        """The active adapter's name; a list while several are active (PEFT's ``base_model.active_adapter``)."""
        names = self.active_adapters
        if not names:
            return None
        return names[0] if len(names) == 1 else list(names)

    def _first_active(self) -> str | None:
        return self.active_adapters[0] if self.active_adapters else None

    def modules_to_save_wrappers(self) -> dict[str, ModulesToSaveWrapper]:
        return {k: m for k, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)}

    def _adapter_modules(self) -> list[SVDLayer | ModulesToSaveWrapper]:
        return [*self.svd_layers().values(), *self.modules_to_save_wrappers().values()]

    # -- merging and switching, PeftModel's names

    def merge_adapter(self, adapter_names: Sequence[str] | None = None) -> None:
        """PEFT's name for :meth:`merge`; warns when every adapter is merged already, as PEFT."""
        layers = self.svd_layers().values()
        if layers and all(not layer.to_merge(adapter_names) for layer in layers):
            warnings.warn("All adapters are already merged, nothing to do.", UserWarning, stacklevel=2)
            return
        self.merge(adapter_names)

    def unmerge_adapter(self) -> None:
        """PEFT's name for :meth:`unmerge`."""
        self.unmerge()

    def enable_adapter_layers(self) -> None:
        """Every adapter layer and ``modules_to_save`` wrapper takes part in the forward again."""
        for m in self._adapter_modules():
            m.disable_adapters = False

    def disable_adapter_layers(self) -> None:
        """The base model alone runs until :meth:`enable_adapter_layers` (merged adapters are unmerged first).

        Trained biases stay in the base model: warned, as PEFT does.
        """
        for name in self.active_adapters:
            bias = self.peft_config[name].bias
            if bias != "none":
                warnings.warn(f"Careful, disabling adapter layers with bias configured to be '{bias}' does not "
                              "produce the same output as the base model would without adaption.", UserWarning,
                              stacklevel=2)
        for m in self._adapter_modules():
            m.disable_adapters = True

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        """Refused: forwarded to the wrapped model it would upload the whole base model, not the adapter."""
        raise NotImplementedError("push_to_hub is not implemented here (nothing in this library talks to the Hub): "
                                  "save_pretrained(directory) and upload that directory with huggingface_hub")

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Refused, as PEFT refuses it for AdaLoRA (rank patterns do not combine)."""
        raise TypeError(f"{type(self).__name__} does not support add_weighted_adapter method.")

    # -- counting and status

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts, as PEFT's."""
        params = list(cast(nn.Module, self).parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """PEFT's ``get_layer_status``: one entry per adapter layer and ``modules_to_save`` wrapper.

        Names are PEFT's too: relative to the tuner, so ``model.<path>``.
        """
        status = [_layer_status(f"model.{k}", m) for k, m in self.model.named_modules()
                  if isinstance(m, (SVDLayer, ModulesToSaveWrapper))]
        if not status:
            raise ValueError("no adapter layers found in the model")
        return status

    def get_model_status(self) -> TunerModelStatus:
        """PEFT's ``get_model_status``: the layers' status summed up."""
        layers = self.get_layer_status()
        trainable, total = self.get_nb_trainable_parameters()
        merged_all = sorted({a for s in layers for a in s.merged_adapters})
        merged: list[str] | Literal["irregular"] = merged_all
        if any(set(merged_all) & (set(s.available_adapters) - set(s.merged_adapters)) for s in layers):
            merged = "irregular"
        grads: dict[str, list[Any]] = collections.defaultdict(list)
        devices: dict[str, set[str]] = collections.defaultdict(set)
        for s in layers:
            for a, v in s.requires_grad.items():
                grads[a].append(v)
            for a, d in s.devices.items():
                devices[a].update(d)
        actives = {tuple(s.active_adapters) for s in layers}
        return TunerModelStatus(
            base_model_type=type(self.get_base_model()).__name__, adapter_model_type=type(self).__name__,
            peft_types={a: "ADALORA" for a in self.peft_config}, trainable_params=trainable, total_params=total,
            num_adapter_layers=len(layers), enabled=_agree(s.enabled for s in layers),
            active_adapters=list(actives.pop()) if len(actives) == 1 else "irregular", merged_adapters=merged,
            requires_grad={a: v[0] if all(x is v[0] for x in v) and v[0] != "irregular" else "irregular"
                           for a, v in grads.items()},
            available_adapters=sorted({a for s in layers for a in s.available_adapters}),
            devices={a: sorted(d) for a, d in devices.items()})

    def load_saved_extras(self, path: Any, adapter_name: str | None = None) -> None:
        """Copy the ``modules_to_save`` copies and trained biases an adapter directory holds into this model.

        The triplets are left alone: a resumed run takes them (and the
        allocator) from its training state, and the rest from here. Checked
        before anything is copied.
        """
        from adalora_core.checkpoint import read_adapter

        name = self._require(adapter_name or self.trainable_adapter_name or self._first_active())
        layers = self._adapter_layers(name)
        held = [k for k, w in self.modules_to_save_wrappers().items() if name in w.modules_to_save]
        dest = extra_tensors(self.model, name, self.peft_config[name], layers, held)
        if not dest:
            return
        shapes = {k: (layer.in_features, layer.out_features) for k, layer in layers.items()}
        loaded = read_adapter(path, shapes=shapes, extra={k: tuple(t.shape) for k, t in dest.items()},
                              skip=wrapper_internals(held)).extra
        copy_loaded(dest, loaded)

    # -- gradient checkpointing, as PEFT prepares a model for it

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> nn.Module:
        """Make the input embeddings' output require grad, so reentrant checkpointing reaches the adapters."""
        module: Any = model  # a transformers model: its methods, not nn.Module's attribute types
        if hasattr(module, "enable_input_require_grads"):
            module.enable_input_require_grads()
        elif hasattr(module, "get_input_embeddings"):
            module.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        return model

    # -- the regulariser check

    def _check_orth_used(self) -> None:
        """Warn once when the allocator runs while a weighted regulariser was never asked for."""
        if self._orth_called or self._orth_warned or self.trainable_adapter_name is None:
            return
        if self.peft_config[self.trainable_adapter_name].orth_reg_weight > 0:
            self._orth_warned = True
            warnings.warn("update_and_allocate() runs but orth_loss() was never called: the orthogonal regulariser "
                          "(orth_reg_weight > 0) is not in the training loss. Add it: loss = out.loss + "
                          "model.orth_loss(), or wrap with add_orth_to_loss=True (PEFT's behaviour), or use "
                          "AdaLoraTrainer; set orth_reg_weight=0 to train without it.", AdaLoraWarning, stacklevel=3)


def expose_signature(ada: nn.Module, inner: nn.Module) -> None:
    """Give ``ada`` a ``forward`` whose signature is ``inner.forward``'s (the same code runs).

    transformers' ``Trainer`` keeps only the batch columns the model's
    ``forward`` names; the wrapper's own is ``(*args, labels=None, **kwargs)``.
    """
    try:
        params = list(inspect.signature(inner.forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or C forward: keep the generic one
        return
    func = type(ada).forward
    signed = types.FunctionType(func.__code__, func.__globals__, func.__name__, func.__defaults__,
                                func.__closure__)
    signed.__kwdefaults__ = func.__kwdefaults__
    signed.__doc__ = func.__doc__
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    signed.__signature__ = inspect.Signature([self_param, *params])  # type: ignore[attr-defined]
    object.__setattr__(ada, "forward", types.MethodType(signed, ada))
