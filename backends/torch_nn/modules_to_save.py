"""PEFT's ``modules_to_save``: a trainable copy of a module per adapter, the original kept beside it.

A :class:`ModulesToSaveWrapper` replaces each module ``modules_to_save``
names (a classifier head, typically). It holds the frozen original as
``original_module`` and one deep copy per adapter in the ``modules_to_save``
``ModuleDict``, so the state-dict keys are PEFT's
(``classifier.modules_to_save.default.dense.weight``). The forward runs the
active adapter's copy, or the original when no adapter of this module is
active or adapters are disabled. The copy of the trainable adapter trains;
the others are frozen. Saved, a copy's tensors are keyed by the wrapped
module's path (``classifier.dense.weight``), as PEFT saves them.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from .targets import matches_name


def check_wrappable(module: nn.Module, path: str | None = None) -> None:
    """A container (``ModuleDict``, ``ModuleList``, ...) has no forward for a wrapper to run: a TypeError."""
    if isinstance(module, (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)):
        at = "" if path is None else f" ({path!r})"
        raise TypeError(f"modules_to_save cannot wrap a {type(module).__name__}{at}: it has no forward")


class ModulesToSaveWrapper(nn.Module):
    """The original module and a trainable copy of it per adapter (PEFT's layout and semantics)."""

    def __init__(self, module: nn.Module) -> None:
        check_wrappable(module)
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict({})
        self.active_adapter: str | None = None
        self.disable_adapters = False
        module.requires_grad_(False)

    def update(self, adapter_name: str, trainable: bool) -> None:
        """Give ``adapter_name`` its copy of the original module (trainable or frozen)."""
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.modules_to_save[adapter_name].requires_grad_(trainable)

    def held(self, names: Sequence[str]) -> str | None:
        """The one of ``names`` this module holds a copy for, or None.

        Two of them would leave no answer to which copy runs: a ValueError, as in PEFT.
        """
        held = [n for n in names if n in self.modules_to_save]
        if len(held) > 1:
            raise ValueError(f"adapters {held} each hold a copy of this module in modules_to_save; only one of "
                             "them can be active at a time")
        return held[0] if held else None

    def set_adapter(self, names: Sequence[str]) -> None:
        """Activate the copy of the one of ``names`` held here (none: the original runs)."""
        self.active_adapter = self.held(names)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    @property
    def active_module(self) -> nn.Module:
        """The module the forward runs."""
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """Attributes of the module that runs (``model.score.weight`` keeps working), as PEFT's wrapper."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save") or "_modules" not in self.__dict__:
                raise
            return getattr(self.active_module, name)


def find_modules_to_save(model: nn.Module, names: Sequence[str], required: Sequence[str],
                         skip_inside: Iterable[str] = ()) -> list[str]:
    """Paths of the modules ``names`` match, outermost only (name components, as ``target_modules``).

    ``skip_inside``: paths of existing adapter layers and wrappers, whose
    internals are never matched (an existing wrapper itself is). A
    ``required`` list (the user's own names) that matches nothing at all is
    a ValueError naming close matches; a task's default head names may match
    nothing (PEFT tries ``classifier`` and ``score`` on every model).
    """
    prefixes = tuple(f"{s}." for s in skip_inside)
    keys = [k for k, _ in model.named_modules() if k and not k.startswith(prefixes)]
    found: list[str] = []
    for k in keys:
        if matches_name(k, names) and not any(k.startswith(f"{f}.") for f in found):
            found.append(k)
    if required and not any(matches_name(k, required) for k in found):
        leaves = sorted({k.rsplit(".", 1)[-1] for k in keys})
        close = sorted({c for n in required for c in difflib.get_close_matches(n, leaves, n=3, cutoff=0.5)})
        raise ValueError(f"modules_to_save={list(required)!r} matches no module of the model; close names: "
                         f"{close}")
    return found


def wrapper_prefixes(model: nn.Module) -> list[str]:
    """Paths of the :class:`ModulesToSaveWrapper` modules of ``model``."""
    return [k for k, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
