from __future__ import annotations

import json
import os

import numpy as np
import pytest

from adalora_core import (
    AdaLoraConfig,
    CheckpointError,
    Triplet,
    load_adapter,
    load_arrays,
    save_adapter,
    save_arrays,
)
from adalora_core.checkpoint import CONFIG_NAME, WEIGHTS_NAME

CFG = AdaLoraConfig(total_step=10, init_r=4, target_r=2)


def weights(seed=0):
    rng = np.random.default_rng(seed)
    return {"layers.0.q": Triplet(*(rng.normal(size=s).astype(np.float32) for s in [(4, 5), (4, 1), (3, 4)])),
            "layers.1.v": Triplet(*(rng.normal(size=s).astype(np.float32) for s in [(4, 6), (4, 1), (2, 4)]))}


PATTERN = {"layers.0.q.lora_E": [True, False, True, False], "layers.1.v.lora_E": [False] * 4}


def test_round_trip_slices_by_pattern_across_backends(tmp_path, backend):
    w = weights()
    save_adapter(tmp_path / "ad", CFG, {n: Triplet(*(backend.asarray(t) for t in tr)) for n, tr in w.items()},
                 PATTERN)
    cfg, loaded = load_adapter(tmp_path / "ad", convert=backend.asarray)
    assert cfg.rank_pattern == PATTERN and cfg.inference_mode
    np.testing.assert_array_equal(backend.to_numpy(loaded["layers.0.q"].A), w["layers.0.q"].A[[0, 2]])
    np.testing.assert_array_equal(backend.to_numpy(loaded["layers.0.q"].B), w["layers.0.q"].B[:, [0, 2]])
    assert tuple(loaded["layers.1.v"].A.shape) == (0, 6)  # pruned to rank 0
    meta = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert meta["peft_type"] == "ADALORA" and meta["rank_pattern"] == PATTERN


def _saved(tmp_path):
    save_adapter(tmp_path / "ad", CFG, weights(), PATTERN)
    return tmp_path / "ad"


def test_truncated_file(tmp_path):
    d = _saved(tmp_path)
    data = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_adapter(d)


def test_missing_key_wrong_shape_and_pattern_length(tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _saved(tmp_path)
    tensors = load_file(d / WEIGHTS_NAME)
    del tensors["base_model.model.layers.0.q.lora_B"]
    save_file(tensors, d / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_adapter(d)
    d = _saved(tmp_path)
    with pytest.raises(CheckpointError, match=r"shape \(2, 5\), expected \(2, 6\)"):
        load_adapter(d, shapes={"layers.0.q": (6, 3), "layers.1.v": (6, 2)})
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg["rank_pattern"]["layers.0.q.lora_E"] = [True, False]
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rank_pattern"):
        load_adapter(d)


def test_pattern_for_unknown_module_and_non_finite_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="names no adapted module"):
        save_adapter(tmp_path / "x", CFG, weights(), {"nope.lora_E": [True] * 4})
    w = weights()
    w["layers.0.q"] = w["layers.0.q"]._replace(E=w["layers.0.q"].E * np.nan)
    with pytest.raises(CheckpointError, match="non-finite"):
        save_adapter(tmp_path / "x", CFG, w)
    assert not (tmp_path / "x").exists()


def test_failed_save_leaves_the_old_directory(tmp_path, monkeypatch):
    d = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(d, CFG, weights(1), PATTERN)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]  # no temp leftovers


def test_save_arrays_round_trip_and_validation(tmp_path):
    f = tmp_path / "s.safetensors"
    save_arrays(f, {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "m": np.asarray([True, False])}, {"k": 1})
    arrays, meta = load_arrays(f, expect={"x": ((2, 3), "float32"), "m": ((2,), "bool")})
    assert meta == {"k": 1} and arrays["m"].tolist() == [True, False]
    with pytest.raises(CheckpointError, match="expected \\(3, 2\\)"):
        load_arrays(f, expect={"x": ((3, 2), "float32"), "m": ((2,), "bool")})
    with pytest.raises(CheckpointError, match="non-finite"):
        save_arrays(f, {"x": np.asarray([np.inf])}, {})
    with pytest.raises(CheckpointError, match="JSON"):
        save_arrays(f, {}, {"bad": object()})
    assert load_arrays(f)[1] == {"k": 1}  # the failed saves left the file as it was
    with pytest.raises(CheckpointError, match="cannot read"):
        load_arrays(tmp_path / "missing.safetensors")


def test_module_already_at_its_pruned_rank_is_saved_as_is(tmp_path):
    w = weights()
    pruned = Triplet(w["layers.0.q"].A[[2, 3]], w["layers.0.q"].E[[2, 3]], w["layers.0.q"].B[:, [2, 3]])
    pattern = {"layers.0.q.lora_E": [False, False, True, True]}
    save_adapter(tmp_path / "ad", CFG, {"layers.0.q": pruned}, pattern)
    _, loaded = load_adapter(tmp_path / "ad")
    np.testing.assert_array_equal(loaded["layers.0.q"].A, pruned.A)
