"""Which modules of a torch model get an adapter: ``target_modules`` matched as PEFT does.

A list entry matches a module whose full name equals it or ends with
``"." + entry`` (whole name components: ``"proj"`` never matches
``"q_proj"``); a string is a regular expression that must match the whole
name (``re.fullmatch``). ``exclude_modules`` follows the same rules;
``layers_to_transform`` / ``layers_pattern`` pick layers by index exactly as
PEFT's ``check_target_module_exists``. Unlike PEFT, a list entry that names no
module at all is an error (with the closest names), not silently ignored.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

from torch import nn

from adalora_core.config import AdaLoraConfig

# PEFT's TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING (0.21), for target_modules=None.
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def resolve_targets(model: nn.Module, config: AdaLoraConfig) -> Sequence[str] | str:
    """``config.target_modules``, or PEFT's default for the model's ``config.model_type``."""
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise ValueError(f"target_modules=None is invalid for this model (model_type={model_type!r} has no "
                     "default): list the module names to adapt, e.g. target_modules=['q_proj', 'v_proj']")


def matches_name(key: str, names: Iterable[str]) -> bool:
    """``key`` equals one of ``names`` or ends with ``"." + name`` (whole components: ``"proj"`` is not ``"q_proj"``)."""
    return any(key == n or key.endswith(f".{n}") for n in names)


def _name_matches(names: Sequence[str] | str, key: str) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return matches_name(key, names)


def _layer_index_ok(config: AdaLoraConfig, key: str) -> bool:
    """PEFT's ``layers_to_transform`` / ``layers_pattern`` rule (first numbered segment)."""
    indexes = config.layers_to_transform
    if indexes is None or (isinstance(indexes, (list, tuple)) and len(indexes) == 0):
        return True
    pattern = config.layers_pattern
    match = None
    if pattern is None or len(pattern) == 0:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == indexes if isinstance(indexes, int) else idx in indexes


def _inside(names: Sequence[str], key: str) -> bool:
    """``key`` is one of the modules ``names`` match (by name components) or lies inside one."""
    parts = key.split(".")
    return any(n.split(".") == parts[i:i + n.count(".") + 1] for n in names for i in range(len(parts)))


def is_target(config: AdaLoraConfig, targets: Sequence[str] | str, key: str) -> bool:
    """Whether module ``key`` gets an adapter (exclusions, ``modules_to_save`` and layer indexes applied).

    A module ``modules_to_save`` names, and anything inside it, is never
    adapted (PEFT: its copy is trained whole instead).
    """
    if config.exclude_modules and _name_matches(config.exclude_modules, key):
        return False
    if config.modules_to_save and _inside(config.modules_to_save, key):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    return _layer_index_ok(config, key)


def _suggestions(name: str, keys: Iterable[str]) -> list[str]:
    keys = list(keys)
    leaves = sorted({k.rsplit(".", 1)[-1] for k in keys})
    close = difflib.get_close_matches(name, leaves, n=5, cutoff=0.5)
    close += [k for k in difflib.get_close_matches(name, keys, n=3, cutoff=0.6) if k not in close]
    return close


def find_targets(model: nn.Module, config: AdaLoraConfig, skip_inside: Iterable[str] = ()) -> list[str]:
    """Names of the modules to adapt, in ``named_modules()`` order (PEFT's injection and RNG order).

    ``skip_inside``: names of existing SVD layers, whose internals (``base_layer``,
    dropout, ...) are never matched. Raises a ValueError, naming close matches,
    when a listed target names no module or when nothing is left to adapt.
    """
    targets = resolve_targets(model, config)
    prefixes = tuple(f"{s}." for s in skip_inside)
    keys = [k for k, _ in model.named_modules() if k and not k.startswith(prefixes)]
    if not isinstance(targets, str):
        unknown = [t for t in targets if not any(matches_name(k, (t,)) for k in keys)]
        if unknown:
            hints = "; ".join(f"{t!r}: did you mean {_suggestions(t, keys)}?" for t in unknown)
            raise ValueError(f"target_modules names modules that do not exist in the model: {hints} "
                             "(names match whole components: a name or a dotted suffix of one)")
    else:
        try:
            re.compile(targets)
        except re.error as exc:
            raise ValueError(f"target_modules={targets!r} is not a valid regular expression: {exc}") from None
    found = [k for k in keys if is_target(config, targets, k)]
    if not found:
        what = (f"the regular expression {targets!r} matches no module name" if isinstance(targets, str)
                else f"no module is left after exclude_modules={config.exclude_modules!r}, "
                     f"modules_to_save={config.modules_to_save!r} and "
                     f"layers_to_transform={config.layers_to_transform!r}")
        sample = keys[:8]
        raise ValueError(f"target_modules: {what}; module names look like {sample}")
    return found


def get_submodule_parent(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    parent_name, _, child = key.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, child
