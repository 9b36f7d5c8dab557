"""Property tests: any damage to a valid checkpoint raises CheckpointError and leaves the loading object unchanged.

Each example saves a valid adapter directory or save_arrays file, damages it
one way (a dropped, reshaped or retyped array, a NaN, a truncated file, a
header lying about a tensor, a config field or metadata document replaced by
a wrong value), and loads it.
"""

from __future__ import annotations

import copy
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from test_checkpoint import CFG, PATTERN, weights

from adalora_core import CheckpointError, load_adapter, load_arrays, save_adapter, save_arrays
from adalora_core.checkpoint import CONFIG_NAME, META_KEY, WEIGHTS_NAME

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SHAPES = {"layers.0.q": (5, 3), "layers.1.v": (6, 2)}

# ------------------------------------------------------------------ damage to a safetensors file


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def _arrays(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    return dict(st_load(data)), _split(data)[0].get("__metadata__", {})


KINDS = ["drop", "reshape", "retype", "nonfinite", "truncate", "offsets", "dtype_code"]


@st.composite
def tensor_damage(draw, data: bytes) -> tuple[str, bytes]:
    """``(kind, damaged)``: ``data`` (a valid safetensors file) damaged in one way no loader may accept."""
    arrays, meta = _arrays(data)
    kind = draw(st.sampled_from(KINDS))
    if kind == "truncate":
        return kind, data[: draw(st.integers(0, len(data) - 1))]
    eligible = sorted(k for k, a in arrays.items()
                      if kind not in ("nonfinite", "dtype_code") or (a.size and a.dtype.kind == "f"))
    key = draw(st.sampled_from(eligible))
    a = arrays[key]
    if kind == "drop":
        del arrays[key]
    elif kind == "reshape":
        shape = list(a.shape)
        shape[draw(st.integers(0, a.ndim - 1))] += draw(st.integers(1, 3))
        arrays[key] = np.zeros(shape, a.dtype)
    elif kind == "retype":
        arrays[key] = a.astype(draw(st.sampled_from([t for t in ("float16", "float64", "int32") if t != a.dtype])))
    elif kind == "nonfinite":
        a = a.copy()
        a.flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        arrays[key] = a
    else:  # a header that lies: its offsets or dtype code no longer match the bytes
        header, body = _split(data)
        if kind == "offsets":
            header[key]["data_offsets"][1] += draw(st.integers(1, 64))
        else:
            header[key]["dtype"] = "F64" if header[key]["dtype"] != "F64" else "F32"
        return kind, _join(header, body)
    return kind, st_save(arrays, metadata=meta or None)


# ------------------------------------------------------------------ damage to JSON documents

BAD_CONFIG_FIELDS = {
    "init_r": ["4", -1, 2.5, None, 3],  # 3: the rank pattern no longer has init_r entries
    "lora_alpha": ["8", None],
    "rank_pattern": [5, "x", [True, False], "short", "count"],
    "peft_type": ["LORA"],
    "target_r": ["2"],
    "beta1": [2, "0.85"],
}


def _bad_pattern(pattern: dict, how: str):
    key = min(pattern)
    if how == "short":
        return {**pattern, key: pattern[key][:-1]}
    if how == "count":  # one triplet more or less than the weights hold
        return {**pattern, key: [not pattern[key][0], *pattern[key][1:]]}
    return how


@st.composite
def config_damage(draw, text: str) -> str:
    """``text`` (a valid adapter_config.json) damaged in one way no loader may accept."""
    kind = draw(st.sampled_from(["not_an_object", "truncate", "field"]))
    if kind == "not_an_object":
        return json.dumps(draw(st.sampled_from([[1, 2], 3, "text", None, [json.loads(text)]])))
    if kind == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))]
    doc = json.loads(text)
    field = draw(st.sampled_from(sorted(BAD_CONFIG_FIELDS)))
    value = draw(st.sampled_from(BAD_CONFIG_FIELDS[field]))
    doc[field] = _bad_pattern(doc["rank_pattern"], value) if field == "rank_pattern" else value
    return json.dumps(doc)


# ------------------------------------------------------------------ the core loaders


def _valid_adapter(d: Path) -> None:
    save_adapter(d, CFG, weights(), PATTERN)


@SETTINGS
@given(st.data())
def test_damaged_adapter_weights_are_refused(data):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _valid_adapter(d)
        f = d / WEIGHTS_NAME
        kind, damaged = data.draw(tensor_damage(f.read_bytes()))
        f.write_bytes(damaged)
        with pytest.raises(CheckpointError):
            load_adapter(d, shapes=SHAPES)
        if kind != "reshape":  # without shapes, other in/out sizes are a valid adapter of another model
            with pytest.raises(CheckpointError):
                load_adapter(d)


@SETTINGS
@given(st.data())
def test_damaged_adapter_config_is_refused(data):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _valid_adapter(d)
        f = d / CONFIG_NAME
        f.write_text(data.draw(config_damage(f.read_text())))
        with pytest.raises(CheckpointError, match=str(d)):  # names the config, or the weights it no longer fits
            load_adapter(d, shapes=SHAPES)


def _valid_arrays(f: Path) -> dict:
    expect = {"w": ((3, 4), "float32"), "ema": ((3, 1), "float64"), "mask": ((4,), "bool")}
    save_arrays(f, {"w": np.ones((3, 4), np.float32), "ema": np.zeros((3, 1)), "mask": np.ones(4, bool)},
                {"format": "x", "step": 3})
    return expect


@SETTINGS
@given(st.data())
def test_damaged_save_arrays_files_are_refused(data):
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "s.safetensors"
        expect = _valid_arrays(f)
        raw = f.read_bytes()
        if data.draw(st.booleans(), label="damage the metadata document"):
            arrays, _ = _arrays(raw)
            doc = data.draw(st.sampled_from(["[1]", "3", "null", '"x"', "{not json", '{"format": "x"']))
            damaged = st_save(arrays, metadata={META_KEY: doc})
        else:
            damaged = data.draw(tensor_damage(raw))[1]
        f.write_bytes(damaged)
        with pytest.raises(CheckpointError):
            load_arrays(f, expect=expect)


# ------------------------------------------------------------------ the torch model's loads

torch_only = pytest.mark.usefixtures("torch_one_thread", "quiet")


def _model(**cfg):
    torch = pytest.importorskip("torch")
    from adalora_core.backends.torch_nn import _parity as P

    kw = P.config_kwargs("mlp", init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=6, **cfg)
    om = P.ours(P.build("mlp"), **kw)
    P.trajectory(om, "mlp", 4)  # pruned, with importance EMAs
    del torch
    return om


def _state(om) -> dict:
    """Everything a load could change: parameters and buffers, adapters, allocator state, kept indices."""
    snap = {"params": {k: v.clone() for k, v in om.state_dict().items()}, "adapters": list(om.peft_config),
            "modules": [n for n, _ in om.named_modules()], "kept": copy.deepcopy(om._kept_index),
            "training": om.training}
    if om.allocator is not None:
        arrays, meta = om.allocator.state_dict()
        snap["allocator"] = ({k: v.clone() for k, v in arrays.items()}, copy.deepcopy(meta))
    return snap


def _same_state(a: dict, b: dict) -> bool:
    import torch

    def eq(x, y):
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape and \
                bool(torch.equal(x, y) or (torch.isnan(x) == torch.isnan(y)).all() and
                     torch.equal(torch.nan_to_num(x), torch.nan_to_num(y)))
        if isinstance(x, dict):
            return isinstance(y, dict) and list(x) == list(y) and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return type(x) is type(y) and len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y))
        return x == y
    return eq(a, b)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained model, its adapter directory and its training state file (bytes, damaged per example)."""
    om = _model()
    d = tmp_path_factory.mktemp("adapter")
    om.save_pretrained(d)
    om.save_training_state(d / "state.safetensors")
    assert om.rank_pattern and om.allocator.ema_ipt  # pruned, EMAs present: every part can be damaged
    return om, {p.name: p.read_bytes() for p in d.iterdir()}


def _write(d: Path, files: dict, **changes) -> None:
    for name, data in {**files, **changes}.items():
        (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


@torch_only
@SETTINGS
@given(st.data())
def test_damaged_adapter_changes_no_model(trained, data):
    import copy as _copy

    from adalora_core.backends.torch_nn import AdaLoraModel
    from adalora_core.backends.torch_nn import _parity as P

    om, files = trained
    if data.draw(st.booleans(), label="damage the weights"):
        change = {WEIGHTS_NAME: data.draw(tensor_damage(files[WEIGHTS_NAME]))[1]}
    else:
        change = {CONFIG_NAME: data.draw(config_damage(files[CONFIG_NAME].decode()))}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _write(d, files, **change)
        base = P.build("mlp")
        before = {k: v.clone() for k, v in base.state_dict().items()}
        with pytest.raises(CheckpointError):
            AdaLoraModel.from_pretrained(base, d)
        assert _same_state({"p": base.state_dict()}, {"p": before})
        host = _copy.deepcopy(om)
        snap = _state(host)
        with pytest.raises(CheckpointError):
            host.load_adapter(d, "other")
        assert _same_state(_state(host), snap)


BAD_META = {
    "format": ["other", None, 3],
    "version": [2, "1", None],
    "adapter_name": [3, None],
    "allocator": [None, [], "x", {}],
    "kept_index": [5, "x", {"fc_in": "ab"}],
}
BAD_ALLOCATOR = {"last_step": ["7", -5, None, 2.5], "budget": ["3", None], "skipped_steps": [-1, "0"],
                 "ranks": [{}, [], None], "finalized": ["False", 1]}


@torch_only
@SETTINGS
@given(st.data())
def test_damaged_training_state_changes_nothing(trained, data):
    om, files = trained
    raw = files["state.safetensors"]
    kind = data.draw(st.sampled_from(["tensors", "meta", "allocator_meta"]))
    if kind == "tensors":
        damaged = data.draw(tensor_damage(raw))[1]
    else:
        arrays, metadata = _arrays(raw)
        meta = json.loads(metadata[META_KEY])
        table, target = (BAD_META, meta) if kind == "meta" else (BAD_ALLOCATOR, meta["allocator"])
        field = data.draw(st.sampled_from(sorted(table)))
        target[field] = data.draw(st.sampled_from(table[field]))
        damaged = st_save(arrays, metadata={META_KEY: json.dumps(meta)})
    host = copy.deepcopy(om)
    snap = _state(host)
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "state.safetensors"
        f.write_bytes(damaged)
        with pytest.raises(CheckpointError):
            host.load_training_state(f)
    assert _same_state(_state(host), snap)
