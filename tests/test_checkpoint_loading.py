"""Loads: non-object JSON, bfloat16 adapters (PEFT's bf16 training), and huge files refused before they are read."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import save as st_save
from test_checkpoint import CFG, PATTERN, weights

from adalora_core import CheckpointError, load_adapter, load_arrays, save_adapter
from adalora_core.checkpoint import CONFIG_NAME, META_KEY, PREFIX, WEIGHTS_NAME

# ------------------------------------------------------------------ JSON that is not an object


@pytest.mark.parametrize("doc", ["[1, 2]", "3", '"text"', "null"])
def test_adapter_config_that_is_not_an_object(tmp_path, doc):
    save_adapter(tmp_path, CFG, weights(), PATTERN)
    (tmp_path / CONFIG_NAME).write_text(doc)
    with pytest.raises(CheckpointError, match=rf"{CONFIG_NAME}.*must be a JSON object"):
        load_adapter(tmp_path)


@pytest.mark.parametrize("doc", ["[1, 2]", "3", "null"])
def test_save_arrays_metadata_that_is_not_an_object(tmp_path, doc):
    f = tmp_path / "s.safetensors"
    f.write_bytes(st_save({"x": np.ones(2, np.float32)}, metadata={META_KEY: doc}))
    with pytest.raises(CheckpointError, match=r"s\.safetensors.*must be a JSON object"):
        load_arrays(f)


def test_training_state_metadata_that_is_not_an_object_changes_nothing(tmp_path):
    torch = pytest.importorskip("torch")
    from adalora_core.backends.torch_nn import _parity as P

    om = P.ours(P.build("mlp"), **P.config_kwargs("mlp"))
    om.save_training_state(tmp_path / "state.safetensors")
    tensors, _ = om.training_state_dict()
    host = {k: v.numpy() for k, v in tensors.items()}
    (tmp_path / "state.safetensors").write_bytes(st_save(host, metadata={META_KEY: "[1]"}))
    before = {k: v.clone() for k, v in om.state_dict().items()}
    with pytest.raises(CheckpointError, match="must be a JSON object"):
        om.load_training_state(tmp_path / "state.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in om.state_dict().items())


# ------------------------------------------------------------------ bfloat16


def _bf16_dir(path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    save_adapter(path, CFG, weights(), PATTERN)
    with open(path / WEIGHTS_NAME, "rb") as fh:
        from safetensors.numpy import load

        host = load(fh.read())
    tensors = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in host.items()}
    save_file(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})
    return tensors


def test_bf16_adapter_loads_exactly_as_float32(tmp_path):
    tensors = _bf16_dir(tmp_path)
    cfg, loaded = load_adapter(tmp_path)
    assert cfg.rank_pattern == PATTERN
    for name, trip in loaded.items():
        for part, a in zip(("lora_A", "lora_E", "lora_B"), trip):
            assert a.dtype == np.float32
            np.testing.assert_array_equal(a, tensors[f"{PREFIX}{name}.{part}"].float().numpy())


def test_bf16_loads_without_torch_as_torch_decodes_it(tmp_path):
    tensors = _bf16_dir(tmp_path)
    out = tmp_path / "loaded.npz"
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # as if torch were not installed
        import numpy as np
        from adalora_core import load_adapter
        _, loaded = load_adapter({str(tmp_path)!r})
        np.savez({str(out)!r}, **{{f"{{m}}.{{p}}": a for m, t in loaded.items() for p, a in zip("AEB", t)}})
    """)
    run = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    got = np.load(out)
    assert len(got.files) == len(tensors)
    for key, t in tensors.items():
        name, part = key[len(PREFIX):].rsplit(".lora_", 1)
        a = got[f"{name}.{part}"]
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a.view(np.uint32), t.float().numpy().view(np.uint32))


def test_every_finite_bf16_value_decodes_as_torch_decodes_it(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    bits = np.arange(2**16, dtype=np.uint16)
    finite = bits[(bits & 0x7F80) != 0x7F80]  # every bf16 pattern but inf and NaN: subnormals, -0.0 included
    x = torch.from_numpy(finite.view(np.int16).copy()).view(torch.bfloat16)
    f = tmp_path / "bf16.safetensors"
    save_file({"x": x.reshape(-1, 2), "empty": x[:0]}, f, metadata={META_KEY: "{}"})
    got, _ = load_arrays(f, {"x": ((finite.size // 2, 2), "bfloat16"), "empty": ((0,), "bfloat16")})
    assert got["x"].dtype == got["empty"].dtype == np.float32 and got["empty"].shape == (0,)
    np.testing.assert_array_equal(got["x"].reshape(-1).view(np.uint32), x.float().numpy().view(np.uint32))


def _bf16_file(path, code="BF16"):
    """A one-tensor file, ``x`` of shape (2, 2) holding the bf16 words 1..4 << 7 (small positive values)."""
    words = (np.arange(1, 5, dtype=np.uint16) << 7).astype("<u2")
    _raw(path, {"x": {"dtype": code, "shape": [2, 2], "data_offsets": [0, 8]}}, 8)
    with open(path, "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(words.tobytes())
    return words


@pytest.mark.parametrize("checked", [{"x": ((4, 2), "bfloat16")}, {"x": ((2, 2), "bfloat16"), "y": ((1,), "bfloat16")},
                                     "F16"])
def test_a_bf16_file_replaced_after_its_header_was_checked_is_refused(tmp_path, checked):
    """The bf16 reader re-reads the header: a file that no longer matches the checked header is not misread."""
    from adalora_core.checkpoint import _read_bf16

    f = tmp_path / "bf16.safetensors"
    words = _bf16_file(f)
    ok = _read_bf16(f, {"x": ((2, 2), "bfloat16")})["x"]
    np.testing.assert_array_equal(ok.view(np.uint32), (words.astype(np.uint32) << 16).reshape(2, 2))
    if checked == "F16":  # same shape, another dtype since
        _bf16_file(f, "F16")
        checked = {"x": ((2, 2), "bfloat16")}
    with pytest.raises(CheckpointError, match="changed while it was being read"):
        _read_bf16(f, checked)


@pytest.mark.usefixtures("torch_one_thread", "quiet")
@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_bf16_peft_adapter_gives_peft_outputs(tmp_path, base_dtype):
    """PEFT saves bf16 adapters for bf16 training; ours loads them with PEFT's exact outputs."""
    import copy

    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from adalora_core.backends.torch_nn import AdaLoraModel
    from adalora_core.backends.torch_nn import _parity as P
    from safetensors import safe_open

    cfg = P.config_kwargs("gpt2", init_r=4, target_r=1, tinit=2, tfinal=4, deltaT=2, total_step=20, lora_alpha=8)
    base = P.build("gpt2")
    pm = P.peft(base, **cfg)
    P.trajectory(pm, "gpt2", 21, lr=3e-2)
    with torch.no_grad():  # the adapter as bf16 training leaves it
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(torch.bfloat16)
    pm.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["rank_pattern"]
    dtype = getattr(torch, base_dtype)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base).to(dtype), str(tmp_path))
    ours = AdaLoraModel.from_pretrained(copy.deepcopy(base).to(dtype), tmp_path, exact_peft=True)
    with torch.no_grad():
        x = P.inputs("gpt2", 123)
        want = ref.base_model.model(**x).logits
        got = ours(**x).logits
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)


# ------------------------------------------------------------------ huge or lying files


def _raw(path, header: dict, data_len: int) -> None:
    """A safetensors file with this header and ``data_len`` bytes of data, sparse (nothing written)."""
    h = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(h)) + h)
        fh.truncate(8 + len(h) + data_len)


GIB3 = 3 * 2**30


def _peak_rss_of_load(call: str, path, setup: str = "") -> tuple[str, int]:
    """Run ``call`` (``PATH`` stands for ``path``) in a fresh process after ``setup``: (its outcome, its peak RSS
    growth in bytes)."""
    script = textwrap.dedent(f"""
        import resource, time
        from adalora_core import load_adapter, load_arrays, CheckpointError
        PATH = {str(path)!r}
        {setup}
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        try:
            {call}
            print("loaded")
        except CheckpointError as exc:
            print("refused:", exc)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, time.perf_counter() - t)
    """)
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stderr
    rss, secs = lines[1].split()
    assert float(secs) < 5
    return lines[0], int(rss)


def _inflate(path, key: str, n: int) -> None:
    """Rewrite the safetensors file ``path`` with ``key`` as ``n`` float32 values (sparse: nothing is written),
    every other tensor and the metadata as they were: a file consistent in itself, and huge."""
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8:8 + size]), raw[8 + size:]
    out, blobs, pos = {"__metadata__": header.pop("__metadata__")}, [], 0
    for k, e in header.items():
        if k != key:
            begin, end = e["data_offsets"]
            blobs.append(data[begin:end])
            out[k] = {**e, "data_offsets": [pos, pos + end - begin]}
            pos += end - begin
    out[key] = {"dtype": "F32", "shape": [n], "data_offsets": [pos, pos + 4 * n]}
    h = json.dumps(out).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
        fh.truncate(8 + len(h) + pos + 4 * n)


def test_a_huge_file_is_refused_before_it_is_read(tmp_path):
    f = tmp_path / "big.safetensors"
    n = GIB3 // 4
    _raw(f, {"__metadata__": {META_KEY: "{}"}, "x": {"dtype": "F32", "shape": [n], "data_offsets": [0, n * 4]}},
         n * 4)
    assert f.stat().st_size > GIB3
    msg, rss = _peak_rss_of_load("load_arrays(PATH, {'x': ((2, 3), 'float32')})", f)
    assert "refused:" in msg and f"shape ({n},), expected (2, 3)" in msg
    assert rss < 200 * 2**20, f"peak RSS grew by {rss / 2**20:.0f} MiB"


def test_a_huge_adapter_is_refused_before_it_is_read(tmp_path):
    save_adapter(tmp_path, CFG, weights(), PATTERN)
    n = GIB3 // 4 // 2
    key = f"{PREFIX}layers.0.q.lora_A"
    _raw(tmp_path / WEIGHTS_NAME, {key: {"dtype": "F32", "shape": [2, n], "data_offsets": [0, 8 * n]}}, 8 * n)
    msg, rss = _peak_rss_of_load("load_adapter(PATH, shapes={'layers.0.q': (5, 3), 'layers.1.v': (6, 2)})", tmp_path)
    assert "refused:" in msg and f"shape (2, {n}), expected (2, 5)" in msg
    assert rss < 200 * 2**20, f"peak RSS grew by {rss / 2**20:.0f} MiB"


_TORCH_STATE = "from adalora_core.backends.torch_nn import _parity as P; om = P.ours(P.build('mlp'), **P.config_kwargs('mlp'))"


@pytest.mark.parametrize(("setup", "save", "key", "call", "why"), [
    (_TORCH_STATE, "om.save_training_state(PATH)", "weights.{m}.lora_A", "om.load_training_state(PATH)",
     "expected ("),
    (_TORCH_STATE, "om.save_training_state(PATH)", "allocator.ema_ipt.{m}.A", "om.load_training_state(PATH)",
     "expected ("),
    ("from adalora_core import MicroLoRA, MicroLoraConfig",
     "MicroLoRA(MicroLoraConfig(rank=1, in_features=8, out_features=8, target_modules=['q_proj'])).save(PATH)",
     "q_proj.lora_A", "MicroLoRA.load(PATH)", "expected (1, 8)"),
    ("from adalora_core import AdapterPool", "pool = AdapterPool(8, 8); pool.create('s'); pool.save(PATH)",
     "lora_A", "AdapterPool.load(PATH)", "expected (1, 2, 8)"),
])
def test_a_huge_state_file_is_refused_before_it_is_read(tmp_path, setup, save, key, call, why):
    """Training states, MicroLoRA and pool checkpoints: a file with one array grown to 3 GiB (header, offsets and
    file size agreeing) is refused from its header, without its bytes being read."""
    if "torch" in setup:
        pytest.importorskip("torch")
    f = tmp_path / "state.safetensors"
    subprocess.run([sys.executable, "-c", f"PATH = {str(f)!r}; {setup}; {save}"], check=True, timeout=120)
    if "{m}" in key:  # the first adapted module (a state saved before the first step has no EMAs: one is added)
        first = next(k for k in load_arrays(f)[0] if k.startswith("weights."))
        key = key.format(m=first.removeprefix("weights.").removesuffix(".lora_A"))
    n = GIB3 // 4
    _inflate(f, key, n)
    assert f.stat().st_size > GIB3
    msg, rss = _peak_rss_of_load(call, f, setup)
    assert "refused:" in msg and why in msg, msg
    assert rss < 200 * 2**20, f"peak RSS grew by {rss / 2**20:.0f} MiB"


def test_a_file_replaced_between_its_header_and_its_arrays_is_refused(tmp_path):
    from adalora_core.checkpoint import read_header, save_arrays

    f = tmp_path / "s.safetensors"
    x = {"x": np.ones(3, np.float32)}
    save_arrays(f, x, {"n": 1, "odd": float("nan")})
    found = read_header(f)
    assert found.arrays == {"x": ((3,), "float32")} and found.meta["n"] == 1
    got, _ = load_arrays(f, found.arrays, meta=found.meta)  # the same file: NaN in the metadata is no change
    np.testing.assert_array_equal(got["x"], x["x"])
    save_arrays(f, x, {"n": 2, "odd": float("nan")})
    with pytest.raises(CheckpointError, match="changed after its header was read"):
        load_arrays(f, found.arrays, meta=found.meta)


@pytest.mark.parametrize("claim", [GIB3, 16, 10])
def test_a_header_that_does_not_cover_the_file_is_refused(tmp_path, claim):
    f = tmp_path / "lie.safetensors"
    _raw(f, {"__metadata__": {META_KEY: "{}"}, "x": {"dtype": "F32", "shape": [claim // 4],
                                                    "data_offsets": [0, claim // 4 * 4]}}, 12)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_arrays(f)


def test_an_unreadable_dtype_is_refused(tmp_path):
    f = tmp_path / "f8.safetensors"
    _raw(f, {"__metadata__": {META_KEY: "{}"}, "x": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, 4)
    with pytest.raises(CheckpointError, match="F8_E4M3, which this library cannot read"):
        load_arrays(f)
