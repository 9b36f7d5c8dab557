"""One schema for the library's state files: one writer, one validator, one version field for every kind."""

from __future__ import annotations

import numpy as np
import pytest

from adalora_core import AdapterPool, MicroLoRA, MicroLoraConfig
from adalora_core.checkpoint import load_arrays, save_arrays
from adalora_core.errors import CheckpointError
from adalora_core.schema import Declared, Schema

F32 = "float32"


def declare(meta, version, p):
    n = meta.get("n")
    if not p.require(type(n) is int and n > 0, f"n={n!r} must be a positive int"):
        return Declared({})
    shape = (n, 2) if version == 2 else (2, n)
    return Declared({"w": (shape, F32)}, ({"ema.w": (shape, F32), "ema.count": ((1,), "int64")},))


KIND = Schema("test.kind", 2, {1: lambda host: {k: np.ascontiguousarray(a.T) if a.ndim == 2 else a
                                                for k, a in host.items()}})


def test_write_read_round_trip_and_upgrade(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    KIND.write(tmp_path / "v2", {"w": w}, {"n": 3})
    host, meta, version = KIND.read(tmp_path / "v2", declare)
    assert version == 2 and meta == {"n": 3, "format": "test.kind", "version": 2}
    np.testing.assert_array_equal(host["w"], w)
    save_arrays(tmp_path / "v1", {"w": w.T.copy()}, {"n": 3, "format": "test.kind", "version": 1})
    host, _, version = KIND.read(tmp_path / "v1", declare)  # read in the old layout, returned in the new
    assert version == 1
    np.testing.assert_array_equal(host["w"], w)


@pytest.mark.parametrize(("arrays", "meta", "match"), [
    ({"w": np.zeros((3, 2), np.float32)}, {"n": 3, "format": "other.kind", "version": 2}, "not a state of kind"),
    ({"w": np.zeros((3, 2), np.float32)}, {"n": 3, "format": "test.kind", "version": 3}, "version=3 is not one this library reads"),
    ({"w": np.zeros((3, 2), np.float32)}, {"n": 3, "format": "test.kind", "version": True}, "version=True"),
    ({"w": np.zeros((3, 2), np.float32)}, {"n": -1, "format": "test.kind", "version": 2}, "n=-1"),
    ({"w": np.zeros((4, 2), np.float32)}, {"n": 3, "format": "test.kind", "version": 2}, r"shape \(4, 2\)"),
    ({"w": np.zeros((3, 2), np.float64)}, {"n": 3, "format": "test.kind", "version": 2}, "dtype float64"),
    ({}, {"n": 3, "format": "test.kind", "version": 2}, r"missing keys \['w'\]"),
    ({"w": np.zeros((3, 2), np.float32), "x": np.zeros(1, np.float32)}, {"n": 3, "format": "test.kind", "version": 2},
     r"unexpected keys \['x'\]"),
    ({"w": np.zeros((3, 2), np.float32), "ema.w": np.zeros((3, 2), np.float32)},
     {"n": 3, "format": "test.kind", "version": 2}, r"missing keys \['ema.count'\]"),  # a group: all or nothing
    ({"w": np.full((3, 2), np.inf, np.float32)}, {"n": 3, "format": "test.kind", "version": 2}, "non-finite"),
])
def test_every_problem_is_refused_from_file_and_from_memory(tmp_path, arrays, meta, match):
    if all(np.isfinite(a).all() for a in arrays.values()):  # (save_arrays refuses to write non-finite values)
        save_arrays(tmp_path / "bad", arrays, meta)
        with pytest.raises(CheckpointError, match=match):
            KIND.read(tmp_path / "bad", declare)
    p, _ = KIND.check(arrays, meta, declare, "in memory")
    with pytest.raises(CheckpointError, match=match):
        p.raise_if_any()


def test_a_whole_group_is_accepted(tmp_path):
    arrays = {"w": np.zeros((3, 2), np.float32), "ema.w": np.ones((3, 2), np.float32),
              "ema.count": np.array([4], np.int64)}
    KIND.write(tmp_path / "s", arrays, {"n": 3})
    host, _, _ = KIND.read(tmp_path / "s", declare)
    assert sorted(host) == sorted(arrays)
    p, version = KIND.check(arrays, KIND.stamp({"n": 3}), declare, "in memory")
    assert not p and version == 2


def test_memory_takes_only_the_current_version():
    p, version = KIND.check({"w": np.zeros((2, 3), np.float32)}, {"n": 3, "format": "test.kind", "version": 1},
                            declare, "in memory")
    assert version is None and "version=1" in p.items[0]


def test_each_kind_refuses_the_others_files(tmp_path):
    micro = MicroLoRA(MicroLoraConfig(rank=1, in_features=8, out_features=8, target_modules=["q_proj"]))
    micro.save(tmp_path / "micro")
    pool = AdapterPool(8, 8)
    pool.create("s")
    pool.save(tmp_path / "pool")
    with pytest.raises(CheckpointError, match="not a state of kind 'adalora_core.adapter_pool'"):
        AdapterPool.load(tmp_path / "micro")
    with pytest.raises(CheckpointError, match="not a state of kind 'adalora_core.microlora'"):
        MicroLoRA.load(tmp_path / "pool")
    for path, load in ((tmp_path / "micro", MicroLoRA.load), (tmp_path / "pool", AdapterPool.load)):
        arrays, meta = load_arrays(path)
        save_arrays(path, arrays, {**meta, "version": 99})
        with pytest.raises(CheckpointError, match=r"version=99 is not one this library reads \(1, 2\)"):
            load(path)


def test_the_training_state_uses_the_same_schema(tmp_path):
    torch = pytest.importorskip("torch")
    from adalora_core.backends.torch_nn import _parity as P

    om = P.ours(P.build("mlp"), **P.config_kwargs("mlp"))
    om.save_training_state(tmp_path / "t")
    arrays, meta = load_arrays(tmp_path / "t")
    assert meta["format"] == "adalora_core.torch_nn.training_state" and meta["version"] == 1
    save_arrays(tmp_path / "t", arrays, {**meta, "version": 2})
    with pytest.raises(CheckpointError, match=r"version=2 is not one this library reads \(1\)"):
        om.load_training_state(tmp_path / "t")
    tensors, meta = om.training_state_dict()
    with pytest.raises(CheckpointError, match="not a state of kind"):
        om.load_training_state_dict(tensors, {**meta, "format": "adalora_core.microlora"})
    first = next(k for k in tensors if k.startswith("weights."))
    with pytest.raises(CheckpointError, match="non-finite"):
        om.load_training_state_dict({**tensors, first: torch.full_like(tensors[first], float("nan"))}, meta)


def test_a_bf16_training_state_resumes_from_its_file(tmp_path):
    torch = pytest.importorskip("torch")
    from adalora_core.backends.torch_nn import _parity as P

    om = P.ours(P.build("mlp"), **P.config_kwargs("mlp")).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    opt = torch.optim.SGD(om.trainable_parameters(), lr=0.1)
    for step in range(3):
        (om(x).logits.float().pow(2).mean() + om.orth_loss()).backward()
        opt.step()
        om.update_and_allocate(step)
        opt.zero_grad()
    om.save_training_state(tmp_path / "t")
    want, _ = om.training_state_dict()
    with torch.no_grad():
        for p in om.trainable_parameters():
            p.add_(1.0)
    om.load_training_state(tmp_path / "t")  # stored as float32 (NumPy has no bfloat16): refused before
    got, _ = om.training_state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert any(t.dtype == torch.bfloat16 for t in got.values())
