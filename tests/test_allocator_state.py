"""Property tests: any corruption of a valid allocator state or training state is refused, changing nothing.

A valid state is mutated one way (an array dropped, reshaped, retyped or made
non-finite; a metadata field dropped or replaced by junk) and loaded into an
allocator (a model) that has trained a few steps of its own: the load must
raise a ValueError (a CheckpointError) and leave a full snapshot unchanged.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_allocator import CFG, SHAPES, assert_unchanged, snapshot, trained

from adalora_core import AdaLoraConfig, AdaLoraWarning, RankAllocator
from adalora_core.allocator import SCHEDULE_FIELDS

SETTINGS = settings(max_examples=40, deadline=None)

# Values no metadata field accepts (None is a valid last_step or shapes, a bool a valid finalized,
# a small list of ints a valid shape, a float a valid beta).
ENTRY_JUNK = st.one_of(st.text(max_size=4), st.integers(max_value=-1),
                       st.lists(st.integers(max_value=-1), min_size=1, max_size=3),
                       st.dictionaries(st.text("xyz", min_size=1, max_size=3), st.integers(), min_size=1, max_size=2))
FIELD_JUNK = st.one_of(ENTRY_JUNK, st.floats())


# ---------------------------------------------------------------- mutations


@dataclass(frozen=True)
class Ops:
    """How to damage one library's arrays, and which dtypes are wrong for masks and for float arrays."""

    reshape: Callable[[Any, str], Any]
    retype: Callable[[Any, Any], Any]
    poison: Callable[[Any, int, float], Any]
    mask_dtypes: tuple[Any, ...]
    float_dtypes: tuple[Any, ...]  # the weights' own dtype is not among them


@st.composite
def _array_mutation(draw, arrays, mask_prefix, ops):
    """One array of ``arrays`` dropped, reshaped, retyped or made non-finite."""
    arrays = dict(arrays)
    key = draw(st.sampled_from(sorted(arrays)))
    mask = key.startswith(mask_prefix)
    kind = draw(st.sampled_from(["drop", "reshape", "retype"] + ([] if mask else ["poison"])))
    t = arrays.pop(key)
    if kind == "reshape":
        arrays[key] = ops.reshape(t, draw(st.sampled_from(["add_row", "drop_row", "expand"])))
    elif kind == "retype":
        arrays[key] = ops.retype(t, draw(st.sampled_from(ops.mask_dtypes if mask else ops.float_dtypes)))
    elif kind == "poison":
        index = draw(st.integers(0, int(np.prod(t.shape)) - 1))
        arrays[key] = ops.poison(t, index, draw(st.sampled_from([np.nan, np.inf, -np.inf])))
    return arrays


@st.composite
def _meta_mutation(draw, meta, nested):
    """One metadata field of ``meta`` dropped or replaced by junk; ``nested`` names the allocator's part."""
    meta = copy.deepcopy(meta)
    alloc = meta[nested] if nested else meta
    kind = draw(st.sampled_from(["drop", "junk", "junk_entry"] + (["drop_top", "junk_top"] if nested else [])))
    if kind in ("drop_top", "junk_top"):
        key = draw(st.sampled_from(sorted(meta)))
        if kind == "drop_top":
            del meta[key]
        else:  # any string is a valid adapter_name (the tensors are keyed by module, not by adapter)
            meta[key] = draw(FIELD_JUNK.filter(lambda v: key != "adapter_name" or not isinstance(v, str)))
    elif kind == "drop":
        del alloc[draw(st.sampled_from(sorted(set(alloc) - {"shapes"})))]  # states before shapes load too
    elif kind == "junk":
        alloc[draw(st.sampled_from(sorted(alloc)))] = draw(FIELD_JUNK)
    else:
        field = draw(st.sampled_from(["ranks", "missing_grads", "shapes", "config"]))
        entry = draw(st.sampled_from(SCHEDULE_FIELDS if field == "config" else sorted(alloc["ranks"])))
        alloc[field] = {**alloc[field], entry: draw(ENTRY_JUNK)}
    return meta


# ---------------------------------------------------------------- the allocator


SOURCE = trained(0, 8).state_dict()
TARGET = trained(100, 4)
TARGET_SNAPSHOT = snapshot(TARGET)


def _np_reshape(t, how):
    if how == "add_row":
        return np.concatenate([t, t[:1]])
    return t[1:] if how == "drop_row" else t[None]


def _np_poison(t, i, value):
    t = t.copy()
    t.reshape(-1)[i] = value
    return t


NP = Ops(_np_reshape, lambda t, dtype: t.astype(dtype), _np_poison, (np.int8, np.float64),
         (np.int32, np.bool_, np.float32))  # the weights are float64


def test_the_unmutated_state_loads():
    fresh = RankAllocator(CFG, {n: 4 for n in SHAPES})
    fresh.load_state_dict(*SOURCE)
    assert_unchanged(fresh, snapshot(trained(0, 8)))
    assert SOURCE[1]["missing_grads"] and SOURCE[1]["skipped_steps"] and "mask.a" in SOURCE[0]  # a rich state


def _refused(arrays, meta):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdaLoraWarning)  # from_dict names the junk keys of a junk config
        with pytest.raises(ValueError, match="allocator state"):
            TARGET.load_state_dict(arrays, meta)
    assert_unchanged(TARGET, TARGET_SNAPSHOT)


@SETTINGS
@given(data=st.data())
def test_a_corrupted_allocator_array_is_refused(data):
    _refused(data.draw(_array_mutation(SOURCE[0], "mask.", NP)), SOURCE[1])


@SETTINGS
@given(data=st.data())
def test_a_corrupted_allocator_field_is_refused(data):
    _refused(SOURCE[0], data.draw(_meta_mutation(SOURCE[1], None)))


# ---------------------------------------------------------------- a model's training state


def _trained_model(steps):
    torch = pytest.importorskip("torch")
    from adalora_core.backends.torch_nn import _parity as P
    from adalora_core.backends.torch_nn import get_adalora_model

    torch.manual_seed(1)
    cfg = AdaLoraConfig(init_r=4, target_r=2, tinit=2, tfinal=4, deltaT=2, total_step=20,
                        target_modules=["fc_in", "up", "down"])
    om = get_adalora_model(P.build("mlp"), cfg)
    for step in range(steps):
        (om(**P.inputs("mlp", step)).loss + om.orth_loss()).backward()
        with torch.no_grad():  # plain SGD (torch.optim's first step costs seconds of imports)
            for p in om.trainable_parameters():
                p -= 0.1 * p.grad
        om.update_and_allocate(step)
        om.zero_grad()
    return om


@lru_cache(maxsize=1)
def _models():
    """(source state, target model, its snapshot): built once, the target checked unchanged after each load."""
    target = _trained_model(3)
    return _trained_model(8).training_state_dict(), target, _model_snapshot(target)


def test_the_unmutated_training_state_loads():
    (tensors, meta), _, _ = _models()
    assert "allocator.mask.fc_in" in tensors and meta["allocator"]["last_step"] == 7  # a rich state
    fresh = _trained_model(3)
    fresh.load_training_state_dict(tensors, meta)
    assert _model_same(_model_snapshot(fresh), _model_snapshot(_trained_model(8)))


def _model_snapshot(om):
    arrays, meta = om.allocator.state_dict()
    return ({k: v.clone() for k, v in om.state_dict().items()}, {k: v.clone() for k, v in arrays.items()},
            copy.deepcopy(meta), copy.deepcopy(om._kept_index))


def _model_same(a, b):
    import torch

    def tensors_equal(x, y):
        return x.keys() == y.keys() and all(x[k].dtype == v.dtype and torch.equal(x[k], v) for k, v in y.items())

    return tensors_equal(a[0], b[0]) and tensors_equal(a[1], b[1]) and a[2:] == b[2:]


def _torch_ops():
    import torch

    def reshape(t, how):
        if how == "add_row":
            return torch.cat([t, t[:1]])
        return t[1:] if how == "drop_row" else t[None]

    def poison(t, i, value):
        t = t.clone()
        t.view(-1)[i] = value
        return t

    return Ops(reshape, lambda t, dtype: t.to(dtype), poison, (torch.int8, torch.float64),
               (torch.int32, torch.bool, torch.float64))  # the weights are float32


def _model_refused(tensors, meta):
    from adalora_core.errors import CheckpointError

    _, target, snap = _models()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdaLoraWarning)
        with pytest.raises(CheckpointError, match="training state"):
            target.load_training_state_dict(tensors, meta)
    assert _model_same(_model_snapshot(target), snap)


@SETTINGS
@given(data=st.data())
def test_a_corrupted_training_state_tensor_is_refused(data):
    tensors, meta = _models()[0]
    _model_refused(data.draw(_array_mutation(tensors, "allocator.mask.", _torch_ops())), meta)


@SETTINGS
@given(data=st.data())
def test_a_corrupted_training_state_field_is_refused(data):
    tensors, meta = _models()[0]
    _model_refused(tensors, data.draw(_meta_mutation(meta, "allocator")))
