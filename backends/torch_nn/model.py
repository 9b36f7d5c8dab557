"""``AdaLoraModel``: AdaLoRA on any torch module, PEFT's numerics (bit for bit with ``exact_peft=True``).

    model = get_adalora_model(torch_module, AdaLoraConfig(target_modules=[...], total_step=T))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    for step, batch in enumerate(batches):
        out = model(**batch)                    # called exactly like torch_module
        loss = out.loss + model.orth_loss()     # the regulariser is returned, never added for you
        loss.backward()
        opt.step()
        model.update_and_allocate(step)         # after opt.step(), before zero_grad()
        opt.zero_grad()
    model.save_pretrained("adapter")            # PEFT's directory layout

The wrapper replaces each targeted layer by an :class:`~.layer.SVDLinear` /
:class:`~.layer.SVDConv2d` holding the original layer as ``base_layer``; the
adapters' parameters are named as PEFT names them (``...lora_A.default``).
The allocator is the core's :class:`~adalora_core.RankAllocator`; this module
only gathers the weights and gradients and copies the masked ``E`` back.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from operator import attrgetter, is_, itemgetter
from typing import Any, NamedTuple, cast

import torch
from adalora_core.backends import get_backend
from torch import nn

from adalora_core.allocator import KINDS, MASK, RankAllocator, ema_key
from adalora_core.checkpoint import (
    read_adapter,
    read_adapter_config,
    save_adapter,
)
from adalora_core.config import AdaLoraConfig
from adalora_core.orth import orth_reg
from adalora_core.schema import Declared, Schema, dtype_name, expected
from adalora_core.triplet import Triplet
from adalora_core.validate import Problems

from . import allocator_state
from .distributed import (
    check_agreement,
    full,
    is_dtensor,
    local,
    mesh_group,
    parts_of,
    score_reduce,
)
from .layer import SVDLayer, check_supported, layer_kind, wrap
from .modules_to_save import wrapper_prefixes
from .peft_compat import (
    PeftCompatMixin,
    adapter_dir,
    apply_extras,
    effective_config,
    expose_signature,
    extra_tensors,
    load_base_model,
    mark_trainable_extras,
    plan_extras,
)
from .targets import find_targets, get_submodule_parent

TRAINING_STATE = Schema("adalora_core.torch_nn.training_state", 1)
PARTS = (("lora_A", "A"), ("lora_E", "E"), ("lora_B", "B"))
_GRAD, _PARAMETERS = attrgetter("grad"), attrgetter("_parameters")


class _StepParameters(NamedTuple):
    """The trainable adapter's parameters, gathered once for the per-step calls (see ``_step_parameters``)."""

    layers: Any  # the layer cache they were read from
    name: str
    stores: list[nn.ParameterDict]  # lora_A, lora_E, lora_B of each module, in module order
    params: list[nn.Parameter]  # what they hold under `name`, in the same order
    weights: dict[str, Triplet]  # the same parameters by module
    sharded: bool  # some are DTensors (FSDP2): the allocator takes their local part, orth_loss the whole


def _check_adapter_name(name: Any) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter_name={name!r} is invalid: must be a non-empty string without '.'")


class AdaLoraModel(PeftCompatMixin, nn.Module):
    """A torch module with AdaLoRA adapters injected; called exactly like the module it wraps.

    Holds at most one trainable adapter (with its :class:`RankAllocator`) and
    any number of inference-mode adapters beside it; the forward adds the
    active adapters' deltas (:meth:`set_adapter`: one, or a list for
    inference). ``exact_peft`` and ``add_orth_to_loss``: see :func:`get_adalora_model`.
    PEFT's ``PeftModel`` names are here too (:class:`~.peft_compat.PeftCompatMixin`).
    """

    def __init__(self, model: nn.Module, config: AdaLoraConfig, adapter_name: str = "default", *,
                 autocast_adapter_dtype: bool = True, exact_peft: bool = False, add_orth_to_loss: bool = False,
                 process_group: Any = None, verify_masks: bool = False,
                 _checkpoint: str | os.PathLike[str] | None = None) -> None:
        if isinstance(model, AdaLoraModel):
            raise TypeError("the model is already an AdaLoraModel; use add_adapter() to add another adapter")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        if not isinstance(config, AdaLoraConfig):
            raise TypeError(f"config must be an adalora_core.AdaLoraConfig, not {type(config).__name__}")
        super().__init__()
        self.model = model
        self.peft_config: dict[str, AdaLoraConfig] = {}
        self.trainable_adapter_name: str | None = None
        self._active: list[str] = []
        self.add_orth_to_loss = add_orth_to_loss
        self.allocator: RankAllocator | None = None
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self.exact_peft = exact_peft
        # torch.distributed: the group whose processes agree on every mask (None: the world group, when
        # initialised at the first step), and whether to check the agreement after each mask step
        self.process_group = process_group
        self.verify_masks = verify_masks
        self._group: Any = None
        self._dist_for: RankAllocator | None = None
        self._param_cache: _StepParameters | None = None
        # adapter -> module -> kept indices into init_r, for modules loaded at a pruned rank
        self._kept_index: dict[str, dict[str, list[int]]] = {}
        self._unloaded = False
        self._layers: dict[str, SVDLayer] | None = None
        try:
            self._inject(adapter_name, config, checkpoint=_checkpoint)
        except BaseException:
            # nothing was changed in `model`; drop our reference so no half-built wrapper remains
            del self.model
            raise
        self.set_adapter(adapter_name)
        expose_signature(self, model)

    # ---------------------------------------------------------------- calling

    def forward(self, *args: Any, labels: Any = None, **kwargs: Any) -> Any:
        """Whatever the wrapped model returns for the same arguments (loss untouched).

        ``labels`` is named so that transformers' ``Trainer``, which reads label
        names from the class's ``forward``, finds it; it reaches the wrapped
        model as given. With ``add_orth_to_loss`` (PEFT's behaviour) a returned
        ``loss`` includes :meth:`orth_loss`.
        """
        self._check_loaded()
        if labels is not None:
            kwargs["labels"] = labels
        out = self.model(*args, **kwargs)
        if self.add_orth_to_loss and self.trainable_adapter_name is not None \
                and isinstance(getattr(out, "loss", None), torch.Tensor):
            out.loss = out.loss + self.orth_loss()
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model" or "model" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["model"], name)

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Forwarded for transformers' Trainer: does the wrapped forward take ``num_items_in_batch``?"""
        inner = self.model
        if hasattr(inner, "accepts_loss_kwargs"):
            return bool(inner.accepts_loss_kwargs)
        params = inspect.signature(inner.forward).parameters.values()
        return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)

    def get_base_model(self) -> nn.Module:
        """The wrapped module (with its layers wrapped in place)."""
        return self.model

    # ------------------------------------------------------------- structure

    def _check_loaded(self) -> None:
        if self._unloaded:
            raise RuntimeError("this AdaLoraModel was unloaded (merge_and_unload/unload); use the returned model")

    def svd_layers(self) -> dict[str, SVDLayer]:
        """``{module path: SVD layer}`` in ``named_modules()`` order (PEFT's module order).

        Cached (walking a large model every step costs more than the allocator's
        bookkeeping); every method here that changes the structure refreshes it.
        """
        if self._layers is None:
            self._layers = {k: m for k, m in self.model.named_modules() if isinstance(m, SVDLayer)}
        return dict(self._layers)

    def _adapter_layers(self, name: str) -> dict[str, SVDLayer]:
        return {k: m for k, m in self.svd_layers().items() if name in m.lora_A}

    def _device(self) -> torch.device:
        for layer in self.svd_layers().values():
            for p in _adapter_parameters(layer):
                return p.device
        return torch.device("cpu")

    def _require(self, name: str | None, what: str = "adapter") -> str:
        if name is None or name not in self.peft_config:
            raise ValueError(f"{what} {name!r} does not exist; adapters: {sorted(self.peft_config)}")
        return name

    def _require_trainable(self) -> str:
        if self.trainable_adapter_name is None or self.allocator is None:
            raise ValueError("this model has no trainable adapter (all adapters are in inference mode); "
                             "load one with is_trainable=True or add one with inference_mode=False")
        return self.trainable_adapter_name

    def _inject(self, adapter_name: str, config: AdaLoraConfig,
                checkpoint: str | os.PathLike[str] | None = None) -> None:
        """Add adapter ``adapter_name``; every check runs before the model is touched."""
        self._check_loaded()
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; pick another name or delete_adapter() it")
        trainable = not config.inference_mode
        if trainable and self.trainable_adapter_name is not None:
            raise ValueError(f"AdaLoRA trains one adapter at a time and {self.trainable_adapter_name!r} is "
                             f"trainable; add {adapter_name!r} with inference_mode=True")
        config = effective_config(config, self.model)
        existing = self.svd_layers()
        held = [k for k, m in existing.items() if adapter_name in m.lora_A]
        if held:  # another wrapper of this model owns it: re-initialising it would lose its training
            raise ValueError(f'the model already holds adapter "{adapter_name}" (in {held[:3]}); wrapping it '
                             "again would re-initialise the trained weights: keep using the AdaLoraModel that "
                             "holds it, or add a second adapter with add_adapter(<another name>, config)")
        names = find_targets(self.model, config, skip_inside=[*existing, *wrapper_prefixes(self.model)])
        modules = {k: self.model.get_submodule(k) for k in names}
        for k, m in modules.items():
            if not isinstance(m, SVDLayer):
                check_supported(k, m)
        pattern = dict(config.rank_pattern or {})
        unknown = [key for key in pattern if not key.endswith(".lora_E") or key[: -len(".lora_E")] not in modules]
        if unknown:
            raise ValueError(f"rank_pattern names modules that are not adapted: {unknown}; adapted modules: "
                             f"{[f'{k}.lora_E' for k in names][:8]}...")
        extras = plan_extras(self, adapter_name, config, names)  # modules_to_save and bias, checked
        loaded = loaded_extra = None
        if checkpoint is not None:
            shapes = {k: _in_out(m) for k, m in modules.items()}
            # validated: a bad directory raises here
            _, loaded, loaded_extra = read_adapter(checkpoint, shapes=shapes, extra=extras.spec, skip=extras.skip)
        # ---- from here on the model changes; nothing below is expected to fail
        adapter_params = {id(p) for layer in existing.values() for p in _adapter_parameters(layer)}
        for p in self.model.parameters():  # PEFT freezes everything but the adapters
            if id(p) not in adapter_params:
                p.requires_grad_(False)
        active = self.active_adapters
        for k in names:
            m = modules[k]
            if isinstance(m, SVDLayer):
                layer = m
            else:
                layer = wrap(m)
                layer.set_adapter(active)
                parent, child = get_submodule_parent(self.model, k)
                setattr(parent, child, layer)
            layer.exact_peft = self.exact_peft
            layer.update_layer(adapter_name, config.init_r, config, trainable=trainable,
                               autocast_adapter_dtype=self.autocast_adapter_dtype)
        self._layers = None
        kept: dict[str, list[int]] = {}
        if loaded is not None:
            layers = {k: cast(SVDLayer, self.model.get_submodule(k)) for k in names}  # wrapped above
            # PEFT resizes in the rank pattern's order, drawing fresh weights at each new rank
            for key, mask in pattern.items():
                path = key[: -len(".lora_E")]
                idx = [i for i, b in enumerate(mask) if b]
                layers[path].update_layer(adapter_name, len(idx), config, trainable=trainable,
                                          autocast_adapter_dtype=self.autocast_adapter_dtype, init_r=config.init_r)
                kept[path] = idx
            with torch.no_grad():
                for path, trip in loaded.items():
                    layer = layers[path]
                    for (attr, _), arr in zip(PARTS, (trip.A, trip.E, trip.B)):
                        getattr(layer, attr)[adapter_name].copy_(torch.from_numpy(arr))
        apply_extras(self, extras, loaded_extra, trainable)
        self._kept_index[adapter_name] = kept
        self.peft_config[adapter_name] = config
        if trainable:
            ranks = {k: layer.r[adapter_name] for k, layer in self._adapter_layers(adapter_name).items()}
            self.allocator = RankAllocator(config, ranks, backend=get_backend("torch", device=self._device()))
            self.trainable_adapter_name = adapter_name
        mark_trainable_extras(self)

    # -------------------------------------------------------------- adapters

    def add_adapter(self, adapter_name: str, config: AdaLoraConfig) -> None:
        """Inject another adapter (not made active). At most one may be trainable (``inference_mode=False``)."""
        self._inject(adapter_name, config)

    def load_adapter(self, path: str | os.PathLike[str], adapter_name: str, is_trainable: bool = False) -> None:
        """Load a saved adapter (ours or PEFT's) beside the existing ones, as PEFT's ``load_adapter``.

        Not made active; with ``is_trainable=False`` the model is put in eval mode, as PEFT does.
        """
        config = read_adapter_config(path).replace(inference_mode=not is_trainable)
        self._inject(adapter_name, config, checkpoint=path)
        if not is_trainable:
            self.eval()

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make ``adapter_name`` the adapter the forward uses (trainability does not change).

        A list activates several for inference, as PEFT's ``base_model.set_adapter([...])``:
        each layer adds their deltas in the list's order. Two of them holding a
        copy of the same ``modules_to_save`` module is a ValueError (which copy would run?).
        """
        self._check_loaded()
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names:
            raise ValueError("set_adapter needs at least one adapter name")
        for name in names:
            self._require(name)
        wrappers = self.modules_to_save_wrappers().values()
        for wrapper in wrappers:  # every wrapper checked before any module changes
            wrapper.held(names)
        for module in self._adapter_modules():
            module.set_adapter(names)
        self._active = names

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer; the first remaining one becomes active if it was."""
        self._check_loaded()
        self._require(adapter_name)
        merged = [k for k, layer in self.svd_layers().items() if adapter_name in layer.merged_adapters]
        if merged:
            raise ValueError(f"adapter {adapter_name!r} is merged into {merged[:3]}...; unmerge() first")
        for layer in self.svd_layers().values():
            layer.delete_adapter(adapter_name)
        for wrapper in self.modules_to_save_wrappers().values():
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        self._kept_index.pop(adapter_name, None)
        if adapter_name == self.trainable_adapter_name:
            self.trainable_adapter_name = None
            self.allocator = None
        if adapter_name in self._active:
            remaining = [n for n in self._active if n != adapter_name] or list(self.peft_config)[:1]
            if remaining:
                self.set_adapter(remaining)
            else:
                self._active = []

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block (merged adapters are unmerged, as PEFT does).

        As PEFT: all layers enabled before, all enabled after; all disabled,
        they stay so; a mix warns and every layer is enabled on exit.
        """
        self._check_loaded()
        states = {m.disable_adapters for m in self._adapter_modules()}
        if states == {True}:
            yield
            return
        if len(states) > 1:
            warnings.warn("The model contains some adapter layers that are enabled and others that are disabled. "
                          "This is most likely unintentional. After exiting the disable_adapter context, all "
                          "adapters will be enabled", UserWarning, stacklevel=3)
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()

    # -------------------------------------------------------------- training

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters to give the optimizer: the trainable adapter's A, E, B, its modules_to_save, its biases."""
        return [p for p in self.parameters() if p.requires_grad]

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    def _triplets(self, name: str, detach: bool = True) -> dict[str, Triplet]:
        out = {}
        for path, layer in self._adapter_layers(name).items():
            A, E, B = layer.lora_A[name], layer.lora_E[name], layer.lora_B[name]
            out[path] = Triplet(A.detach(), E.detach(), B.detach()) if detach else Triplet(A, E, B)
        return out

    def update_and_allocate(self, step: int) -> None:
        """One allocator step for the trainable adapter: call after ``optimizer.step()``, before ``zero_grad()``.

        ``step`` is the 0-based optimizer step. Importance is updated from the
        current gradients, and ``lora_E`` is masked to the scheduled budget on
        mask steps (in place, one multi-tensor op, no wait for the device).
        Steps must not go backwards or past ``total_step``; a bad step raises
        before anything changes. Under ``torch.distributed`` every process
        must call it (see ``docs/distributed.md``).
        """
        self._check_loaded()
        self._check_orth_used()
        name = self._require_trainable()
        assert self.allocator is not None
        cached = self._step_parameters(name)
        self._ensure_distributed(cached.weights)
        with torch.no_grad():
            params: list[Any] = cached.params
            grads = list(map(_GRAD, params))
            if cached.sharded:
                params, grads = [local(t) for t in params], [local(g) for g in grads]
            keep = self.allocator.advance(step, params, grads, mask_dtype=params[1].dtype)
            if keep is None:
                return
            Es = params[1::3]
            torch._foreach_mul_(Es, cast(list, keep))  # a list for flat inputs
            torch._foreach_add_(Es, 0.0)  # -0.0 -> 0.0, as PEFT's masked_fill writes
        if self.verify_masks and self._group is not None and self.allocator.masks:
            check_agreement(self.allocator.keep_flat(), self._group)  # type: ignore[arg-type]  # masks exist

    def _step_parameters(self, name: str) -> _StepParameters:
        """The adapter's parameters, cached for the per-step calls (walking hundreds of
        ParameterDicts costs more than the allocator's arithmetic). A structural change (a load, a
        deleted adapter) drops the layer cache and so this one; a parameter replaced under it (as
        ``fully_shard`` does, or an assignment into ``lora_A[name]``) is noticed by one identity
        pass over the ParameterDicts' entries. A parameter changed in place (``.data``, a cast) is
        the same object: the allocator's own checks see its new shape or dtype."""
        c = self._param_cache
        if c is not None and c.layers is self._layers and c.name == name:
            try:
                if all(map(is_, map(itemgetter(name), map(_PARAMETERS, c.stores)), c.params)):
                    return c
            except KeyError:  # an entry deleted from a ParameterDict: gathered again below
                pass
        found = self._triplets(name, detach=False)
        names = self.allocator.names if self.allocator is not None else list(found)
        if set(names) != set(found):
            raise ValueError(f"the modules holding adapter {name!r} are not the allocator's: missing "
                             f"{sorted(set(names) - set(found))[:4]}, unknown {sorted(set(found) - set(names))[:4]}")
        weights = {path: found[path] for path in names}  # the allocator's order: it takes them flat
        layers = self._adapter_layers(name)
        stores = [getattr(layers[path], attr) for path in weights for attr, _ in PARTS]
        params = [t for trip in weights.values() for t in trip]
        self._param_cache = _StepParameters(self._layers, name, stores, params, weights,
                                            any(is_dtensor(t) for t in params))
        return self._param_cache

    def _ensure_distributed(self, weights: Mapping[str, Triplet]) -> None:
        """Once per allocator, at its first step or load (after any ``fully_shard``): which rows are
        here, and how the processes' scores agree."""
        import torch.distributed as dist

        assert self.allocator is not None
        if self._dist_for is self.allocator:
            return
        mesh = mesh_group(weights)
        group = mesh if mesh is not None else self.process_group
        if group is None and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        parts = parts_of(weights)
        self.allocator.set_distribution(reduce=score_reduce(group, sharded=parts is not None), parts=parts)
        self._group = group
        self._dist_for = self.allocator

    def orth_loss(self) -> torch.Tensor:
        """``orth_reg_weight * mean ||AAᵀ - I||_F, ||BᵀB - I||_F`` over the trainable adapter.

        Returned, never added to any loss for you: add it to the training loss
        yourself (``loss = out.loss + model.orth_loss()``), or let
        :class:`~.callback.AdaLoraTrainerMixin` do it during training only.
        With ``orth_reg_weight == 0`` it is a zero tensor and costs nothing.
        The matrices are grouped by shape (one batched product per group);
        with ``exact_peft`` they are summed module by module, PEFT's order.
        Under FSDP2 the sharded matrices are gathered (differentiably) first.
        """
        self._check_loaded()
        self._orth_called = True
        name = self._require_trainable()
        weight = self.peft_config[name].orth_reg_weight
        cached = self._step_parameters(name)
        if weight == 0:
            ref: Any = local(cached.params[0])
            return torch.zeros((), dtype=ref.dtype, device=ref.device)
        pairs = list(zip(cached.params[0::3], cached.params[2::3]))
        if cached.sharded:
            pairs = [(full(A), full(B)) for A, B in pairs]
        return weight * orth_reg(pairs, peft_order=self.exact_peft)

    # ---------------------------------------------------------- rank pattern

    def _full_mask(self, name: str, path: str, mask: Sequence[bool]) -> list[bool]:
        """A mask over the module's current rows as a mask over its ``init_r`` triplets."""
        idx = self._kept_index.get(name, {}).get(path)
        if idx is None:
            return [bool(b) for b in mask]
        full = [False] * self.peft_config[name].init_r
        for j, i in enumerate(idx):
            full[i] = bool(mask[j])
        return full

    def get_rank_pattern(self, adapter_name: str | None = None) -> dict[str, list[bool]]:
        """``{"<module>.lora_E": [kept?] * init_r}`` (PEFT's format) of an adapter.

        For the trainable adapter: the allocator's last mask (empty before the
        first one); for a loaded adapter: the pattern it was saved with.
        """
        name = self._require(adapter_name or self.trainable_adapter_name or self._first_active())
        if name == self.trainable_adapter_name and self.allocator is not None and self.allocator.masks:
            return {key: self._full_mask(name, key[: -len(".lora_E")], mask)
                    for key, mask in self.allocator.rank_pattern.items()}
        return {k: [bool(b) for b in v] for k, v in (self.peft_config[name].rank_pattern or {}).items()}

    @property
    def rank_pattern(self) -> dict[str, list[bool]]:
        """The rank pattern of the trainable (else the active) adapter; see :meth:`get_rank_pattern`."""
        return self.get_rank_pattern()

    def current_ranks(self, adapter_name: str | None = None) -> dict[str, int]:
        """Triplets kept per module (``init_r`` before any pruning)."""
        name = self._require(adapter_name or self.trainable_adapter_name or self._first_active())
        if name == self.trainable_adapter_name and self.allocator is not None:
            return self.allocator.current_ranks()
        pattern = self.get_rank_pattern(name)
        return {path: (sum(pattern[f"{path}.lora_E"]) if f"{path}.lora_E" in pattern else layer.r[name])
                for path, layer in self._adapter_layers(name).items()}

    # ------------------------------------------------------------------ merge

    def merge(self, adapter_names: Sequence[str] | None = None) -> None:
        """Add the active adapter's ``ΔW`` into the base weights.

        All merged weights are computed (and checked finite) before any is
        written: a failure leaves every weight as it was.
        """
        self._check_loaded()
        plan = []
        for layer in self.svd_layers().values():
            names = layer.to_merge(adapter_names)
            if names:
                plan.append((layer, layer.merged_weight(names), names))
        for layer, weight, names in plan:
            layer.commit_merge(weight, names)

    def unmerge(self) -> None:
        """Subtract every merged adapter from the base weights."""
        self._check_loaded()
        for layer in self.svd_layers().values():
            if layer.merged:
                layer.unmerge()

    def unload(self) -> nn.Module:
        """Put the original layers back (adapters dropped, merged ones stay in the weights); return the model.

        A ``modules_to_save`` module becomes the active adapter's copy (the original if none is active), as in PEFT.
        """
        self._check_loaded()
        for path, layer in self.svd_layers().items():
            parent, child = get_submodule_parent(self.model, path)
            setattr(parent, child, layer.base_layer)
        for path, wrapper in self.modules_to_save_wrappers().items():
            parent, child = get_submodule_parent(self.model, path)
            active = wrapper.active_adapter
            setattr(parent, child, wrapper.original_module if active is None else wrapper.modules_to_save[active])
        self._layers = None
        self._unloaded = True
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Sequence[str] | None = None) -> nn.Module:
        """Merge the active adapters (or ``adapter_names``) into the base weights and return the plain model.

        PEFT's signature. Every merge is checked for non-finite values, whatever
        ``safe_merge`` says (``progressbar`` shows nothing: there is no loop worth one).
        """
        self.merge(adapter_names)
        return self.unload()

    # -------------------------------------------------------------- checkpoints

    def save_pretrained(self, path: str | os.PathLike[str], adapter_name: str | None = None, *,
                        selected_adapters: Sequence[str] | None = None, safe_serialization: bool = True,
                        is_main_process: bool | None = None) -> None:
        """Write adapters in PEFT's layout (``adapter_model.safetensors`` + ``adapter_config.json``).

        ``adapter_name``: that adapter alone, into ``path``. Otherwise PEFT's
        layout: every adapter (or ``selected_adapters``), ``"default"`` into
        ``path`` and any other into ``path/<name>``. Pruned triplets are sliced
        away by the rank pattern; ``modules_to_save`` copies and trained biases
        are saved with their adapter, keyed as PEFT keys them; the directory
        loads with :meth:`from_pretrained` and with PEFT's ``PeftModel.from_pretrained``.
        Only those two files are written (each atomically); everything else in
        ``path`` (a Trainer's ``checkpoint-*/``) is left as it is. Only
        safetensors is written (``safe_serialization=False``, a pickle, is refused).
        Under ``torch.distributed`` every process calls it: FSDP2 shards are
        gathered, and only the main process (``is_main_process``; by default
        rank 0) writes.
        """
        self._check_loaded()
        if safe_serialization is not True:
            raise ValueError("safe_serialization=False (a pickled adapter_model.bin) is not supported: pickles run "
                             "code when loaded; adapters are written as safetensors")
        names = [adapter_name] if adapter_name is not None else list(selected_adapters or self.peft_config)
        for name in names:
            self._require(name)
        if is_main_process is None:
            import torch.distributed as dist

            is_main_process = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        for name in names:  # every process gathers (a collective under FSDP2); the main one writes
            out = path if adapter_name is not None else adapter_dir(path, name)
            layers = self._adapter_layers(name)
            held = [k for k, w in self.modules_to_save_wrappers().items() if name in w.modules_to_save]
            extra = {k: full(t.detach()) for k, t in
                     extra_tensors(self.model, name, self.peft_config[name], layers, held).items()}
            weights = {k: Triplet(*(full(t) for t in trip)) for k, trip in self._triplets(name).items()}
            pattern = self.get_rank_pattern(name)
            if is_main_process:
                save_adapter(out, self.peft_config[name], weights, pattern or None, extra=extra)

    @classmethod
    def from_pretrained(cls, model: nn.Module | str | os.PathLike[str], path: str | os.PathLike[str] | None = None,
                        adapter_name: str = "default", is_trainable: bool = False,
                        config: AdaLoraConfig | None = None, **kwargs: Any) -> AdaLoraModel:
        """Wrap ``model`` with an adapter saved by :meth:`save_pretrained` or by PEFT.

        Modules are built at ``init_r``, resized to the saved rank pattern
        (``ranknum`` stays ``init_r``) and loaded; the directory is checked
        against the model first, so a mismatch raises and changes nothing.
        With ``is_trainable=False`` the adapter is frozen and the model is put
        in eval mode (as PEFT's ``from_pretrained``). ``config`` replaces the
        directory's. ``from_pretrained(path)`` alone loads the base model the
        config names, from local files (``AutoModelFor<task>``, as PEFT's
        ``AutoPeftModel*``; nothing is downloaded).
        """
        if path is None:
            if isinstance(model, nn.Module):
                raise TypeError("from_pretrained(model, path): the adapter directory is missing")
            path = model
        config = (config or read_adapter_config(path)).replace(inference_mode=not is_trainable)
        if not isinstance(model, nn.Module):
            model = load_base_model(config)
        obj = cls(model, config, adapter_name, _checkpoint=path, **kwargs)
        if not is_trainable:
            obj.eval()
        return obj

    # ----------------------------------------------------------- training state

    def training_state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, meta)``: the trainable adapter's weights and the allocator's full state.

        With the optimizer's own ``state_dict`` this is everything an exact
        resume needs (PEFT saves neither the importance EMAs nor the budget).
        Its layout is declared by ``_training_state_layout`` (one
        :class:`~adalora_core.schema.Schema` with MicroLoRA's and the pool's).
        """
        self._check_loaded()
        name = self._require_trainable()
        assert self.allocator is not None
        tensors: dict[str, torch.Tensor] = {}
        for path, trip in self._triplets(name).items():
            for (attr, _), t in zip(PARTS, (trip.A, trip.E, trip.B)):
                tensors[f"weights.{path}.{attr}"] = t.clone()
        arrays, meta = self.allocator.state_dict()
        for k, v in arrays.items():
            tensors[f"allocator.{k}"] = v.detach().clone()
        return tensors, TRAINING_STATE.stamp({"adapter_name": name, "allocator": meta,
                                              "kept_index": self._kept_index.get(name, {})})

    def _training_state_layout(self) -> Declared:
        """The arrays of this model's training state: every weight, and the allocator's EMAs (both, all
        three parts, every module) and masks (every module) when it has them."""
        name = self._require_trainable()
        assert self.allocator is not None
        weights, emas = {}, {}
        for path, layer in self._adapter_layers(name).items():
            for attr, part in PARTS:
                t = getattr(layer, attr)[name]
                spec = (tuple(t.shape), dtype_name(t))
                weights[f"weights.{path}.{attr}"] = spec
                emas.update({f"allocator.{ema_key(kind, path, part)}": spec for kind in KINDS})
        masks = {f"allocator.{MASK}{path}": ((r,), "bool") for path, r in self.allocator.ranks.items()}
        return Declared(weights, (emas, masks))

    def load_training_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`training_state_dict` output; everything is checked before anything changes.

        A refused state raises one :class:`~adalora_core.errors.CheckpointError` listing every problem
        (its layout, its metadata and its allocator part, checked by the
        allocator against these weights) and leaves the weights, the allocator
        and its step exactly as they were.
        """
        self._check_loaded()
        layout = self._training_state_layout()
        p, version = TRAINING_STATE.check(tensors, meta, lambda *_: layout, "training state")
        if version is not None:
            for key, t in tensors.items():
                p.require(isinstance(t, torch.Tensor), f"{key!r} is not a torch tensor ({type(t).__name__})")
        self._restore_training_state(p, tensors, meta)

    def _restore_training_state(self, p: Problems, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
                                ) -> None:
        """Check the metadata and the allocator part of a state whose layout ``p`` has checked; then commit."""
        name = self._require_trainable()
        assert self.allocator is not None
        layers = self._adapter_layers(name)
        kept: dict[str, list[int]] = {}
        if isinstance(meta, Mapping):  # (else ``p`` holds that problem)
            p.require(isinstance(meta.get("adapter_name"), str),
                      f"adapter_name={meta.get('adapter_name')!r} must be a string")
            kept = _check_kept_index(p, meta, {k: (layer.r[name], layer.init_r[name]) for k, layer in layers.items()})
        p.raise_if_any()
        weights = {k.removeprefix("weights."): t for k, t in tensors.items() if k.startswith("weights.")}
        expect = {f"{path}.{attr}": getattr(layer, attr)[name] for path, layer in layers.items() for attr, _ in PARTS}
        device = next(iter(expect.values())).device
        allocator = {k.removeprefix("allocator."): t.to(device) for k, t in tensors.items()
                     if k.startswith("allocator.")}
        staged = None
        try:
            staged = self.allocator.check_state(allocator, meta.get("allocator"), params=self._triplets(name))
        except ValueError as exc:
            p.add(f"its allocator part does not fit this model: {exc}")
        p.raise_if_any()
        assert staged is not None
        # ---- validated: from here on only assignments and same-shape, same-dtype copies
        self.allocator.commit(staged)
        with torch.no_grad():
            for k, t in weights.items():
                expect[k].copy_(t)
        self._kept_index[name] = kept

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        """``state_dict()`` carries the allocator's state (see :mod:`.allocator_state`)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.trainable_adapter_name is not None and self.allocator is not None:
            allocator_state.save(self.allocator, self._triplets(self.trainable_adapter_name), destination, prefix)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        """``load_state_dict()`` restores the allocator, checked before anything changes.

        This module's entries load before its children's weights, so a refused
        allocator state raises with the model untouched.
        """
        if self.trainable_adapter_name is not None and self.allocator is not None:
            weights = self._triplets(self.trainable_adapter_name)
            self._ensure_distributed(weights)
            allocator_state.load(self.allocator, weights, state_dict, prefix, missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def save_training_state(self, path: str | os.PathLike[str]) -> None:
        """:meth:`training_state_dict` to one safetensors file (atomic write)."""
        tensors, meta = self.training_state_dict()
        TRAINING_STATE.write(path, tensors, meta)

    def load_training_state(self, path: str | os.PathLike[str]) -> None:
        """Read :meth:`save_training_state` output back (validated; a bad file changes nothing).

        The file's header is checked against the arrays its metadata declares
        for this model before any tensor is read, so a huge or foreign file
        is refused at the cost of its header. bfloat16 tensors are stored as
        float32 (NumPy has no bfloat16; float32 holds them exactly).
        """
        self._check_loaded()
        layout = self._training_state_layout()
        host, meta, _ = TRAINING_STATE.read(path, lambda *_: layout)
        spec = expected(layout, host)  # bfloat16 was stored as float32: narrowed back, exactly
        tensors = {k: torch.from_numpy(v).to(getattr(torch, str(spec[k][1]))) for k, v in host.items()}
        self._restore_training_state(Problems(str(path)), tensors, meta)


def _adapter_parameters(layer: SVDLayer) -> Iterator[nn.Parameter]:
    for store in (layer.lora_A, layer.lora_B, layer.lora_E, layer.ranknum):
        yield from store.values()


def _in_out(module: Any) -> tuple[int, int]:  # Linear, Conv1D, Conv2d or a quantized linear
    if isinstance(module, SVDLayer):
        return module.in_features, module.out_features
    probe = layer_kind(module)
    w = module.weight
    if probe == "conv1d":
        return int(w.shape[0]), int(w.shape[1])
    if probe == "conv2d":
        return int(module.in_channels * module.kernel_size[0] * module.kernel_size[1]), int(module.out_channels)
    return int(module.in_features), int(module.out_features)  # not the weight's: bitsandbytes packs 4-bit ones


def _check_kept_index(p: Problems, meta: Mapping[str, Any], ranks: Mapping[str, tuple[int, int]]
                      ) -> dict[str, list[int]]:
    """``kept_index``: for modules loaded at a pruned rank, the ``r`` increasing indices they keep of ``init_r``.

    ``ranks`` maps each adapted module to its ``(r, init_r)``.
    """
    if not p.require("kept_index" in meta, "missing field 'kept_index'"):
        return {}
    out = {}
    for path, idx in p.mapping(meta["kept_index"], "kept_index").items():
        if not p.require(path in ranks, f"kept_index names {path!r}, which is not an adapted module"):
            continue
        r, init_r = ranks[path]
        ok = (isinstance(idx, (list, tuple)) and len(idx) == r and all(type(i) is int for i in idx)
              and list(idx) == sorted(set(idx)) and all(0 <= i < init_r for i in idx))
        if p.require(ok, f"kept_index[{path!r}]={idx!r} must list the {r} increasing indices in [0, {init_r}) "
                         "that module keeps"):
            out[path] = list(idx)
    return out


def get_adalora_model(model: nn.Module, config: AdaLoraConfig, adapter_name: str = "default", *,
                      autocast_adapter_dtype: bool = True, exact_peft: bool = False,
                      add_orth_to_loss: bool = False, process_group: Any = None,
                      verify_masks: bool = False) -> AdaLoraModel:
    """Inject AdaLoRA adapters into ``model`` (in place) and return the wrapper.

    By default the adapter forward costs what a LoRA forward costs (two
    matmuls, ``E`` and ``scaling / (ranknum + 1e-5)`` folded into the small
    factors) and the regulariser is one batched product per shape group;
    both agree with PEFT to float32 rounding (docs/peft-differences.md).
    ``exact_peft=True`` runs PEFT's op order instead, bit-identical to PEFT
    in float32 on CPU. ``autocast_adapter_dtype`` as PEFT:
    adapters of a float16/bfloat16 model are kept in float32.
    ``add_orth_to_loss=True`` is PEFT's behaviour: a ``loss`` the model
    returns includes :meth:`~AdaLoraModel.orth_loss` (in evaluation too, as
    PEFT's); by default the regulariser is returned, never added.
    Under ``torch.distributed``, ``process_group`` (default: the world group)
    is the set of processes that agree on every mask, and ``verify_masks=True``
    checks after each mask step that they do (docs/distributed.md).
    """
    return AdaLoraModel(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                        exact_peft=exact_peft, add_orth_to_loss=add_orth_to_loss, process_group=process_group,
                        verify_masks=verify_masks)


def get_peft_model(model: nn.Module, peft_config: AdaLoraConfig, adapter_name: str = "default", *,
                   autocast_adapter_dtype: bool = True, **kwargs: Any) -> AdaLoraModel:
    """PEFT's entry point, for AdaLoRA: :func:`get_adalora_model` under PEFT's name and argument names.

    ``peft_config`` must be this library's :class:`~adalora_core.AdaLoraConfig`
    (other PEFT methods are not implemented here); ``kwargs``:
    ``exact_peft``, ``add_orth_to_loss``.
    """
    if not isinstance(peft_config, AdaLoraConfig):
        raise TypeError(f"get_peft_model here implements AdaLoRA only: peft_config must be an "
                        f"adalora_core.AdaLoraConfig, not {type(peft_config).__name__}")
    return get_adalora_model(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                             **kwargs)
