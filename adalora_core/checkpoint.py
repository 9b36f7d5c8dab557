"""Checkpoints: safetensors for arrays, JSON for everything else.

Two layers:

* ``save_arrays`` / ``load_arrays``: one ``.safetensors`` file whose header
  metadata carries a JSON document. Written atomically (temp file, fsync,
  rename); read with validation (parse errors, expected keys, shapes, dtypes,
  finiteness), so a bad file raises ``CheckpointError`` before anything is
  changed.
* ``save_adapter`` / ``load_adapter``: PEFT's AdaLoRA directory layout
  (``adapter_model.safetensors`` + ``adapter_config.json``), rank-pattern
  slicing included, so directories move between this library and PEFT.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from ._xp import Array, to_numpy
from ._xp import host_np as np
from .config import AdaLoraConfig
from .errors import CheckpointError
from .triplet import Triplet

META_KEY = "adalora_core"
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."

Spec = Mapping[str, tuple[tuple[int, ...], str]]  # key -> (shape, dtype name)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_dir(path: Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` into directory ``path`` so a reader sees the old set or the new set.

    The new files go to a sibling temp directory which then replaces ``path``
    (other files already in ``path`` are kept).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        if path.is_dir():
            for item in path.iterdir():
                if item.name not in files and item.is_file():
                    shutil.copy2(item, tmp / item.name)
        elif path.exists():
            raise CheckpointError(f"{path} exists and is not a directory")
        for name, data in files.items():
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(tmp.name + ".old")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _to_host(arrays: Mapping[str, Array]) -> dict[str, Any]:
    host = {}
    for k, v in arrays.items():
        a = to_numpy(v)
        host[k] = np.ascontiguousarray(a)
    return host


def save_arrays(path: str | os.PathLike[str], arrays: Mapping[str, Array], meta: Mapping[str, Any]) -> None:
    """Write ``arrays`` and the JSON document ``meta`` to one file, atomically.

    Non-finite values are refused (the file would not load back).
    """
    host = _to_host(arrays)
    _check_finite(host, f"refusing to save {path}")
    try:
        text = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"metadata for {path} is not JSON-serialisable: {exc}") from exc
    _atomic_write_bytes(Path(path), _st_save(host, metadata={META_KEY: text}))


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    try:
        arrays = _st_load(data)
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupt?): {exc}") from exc
    return arrays, header.get("__metadata__", {}) or {}


def _check_finite(host: Mapping[str, Any], what: str) -> None:
    for k, a in host.items():
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise CheckpointError(f"{what}: array {k!r} has non-finite values")


def validate(host: Mapping[str, Any], expect: Spec, where: str) -> None:
    """Keys, shapes and dtypes of ``host`` against ``expect``; one error listing every problem."""
    problems = []
    missing = sorted(set(expect) - set(host))
    extra = sorted(set(host) - set(expect))
    if missing:
        problems.append(f"missing keys {missing}")
    if extra:
        problems.append(f"unexpected keys {extra}")
    for k in sorted(set(expect) & set(host)):
        shape, dtype = expect[k]
        a = host[k]
        if tuple(a.shape) != tuple(shape):
            problems.append(f"{k!r} has shape {tuple(a.shape)}, expected {tuple(shape)}")
        if dtype is not None and str(a.dtype) != dtype:
            problems.append(f"{k!r} has dtype {a.dtype}, expected {dtype}")
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))


def load_arrays(
    path: str | os.PathLike[str],
    expect: Spec | None = None,
    convert: Callable[[Any], Array] | None = None,
) -> tuple[dict[str, Array], dict[str, Any]]:
    """Read a file written by ``save_arrays``: (arrays, meta).

    ``expect`` (key -> (shape, dtype)) is checked exactly; ``convert`` moves
    each NumPy array to the caller's backend after every check has passed.
    """
    path = Path(path)
    host, header = _read_safetensors(path)
    if META_KEY not in header:
        raise CheckpointError(f"{path} has no {META_KEY!r} metadata: not written by save_arrays")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata is not valid JSON: {exc}") from exc
    if expect is not None:
        validate(host, expect, str(path))
    _check_finite(host, str(path))
    out = {k: (convert(v) if convert else v) for k, v in host.items()}
    return out, meta


# ---------------------------------------------------------------- PEFT layout


def _kept(mask: Sequence[bool]) -> list[int]:
    return [i for i, keep in enumerate(mask) if keep]


def save_adapter(
    path: str | os.PathLike[str],
    config: AdaLoraConfig,
    weights: Mapping[str, Triplet],
    rank_pattern: Mapping[str, Sequence[bool]] | None = None,
) -> None:
    """Write a PEFT-compatible AdaLoRA adapter directory.

    ``weights`` maps a module path to its triplet; ``rank_pattern``
    (``"<path>.lora_E" -> [bool] * init_r``) slices a full-rank module's A
    rows, E rows and B columns to the kept triplets, as PEFT's
    ``save_pretrained`` does; a module already at its kept rank is saved as is.
    """
    pattern = dict(rank_pattern or {})
    _check_pattern(pattern, weights, config.init_r)
    tensors = {}
    for name, (A, E, B) in weights.items():
        a, e, b = (to_numpy(t) for t in (A, E, B))
        mask = pattern.get(f"{name}.lora_E")
        if mask is not None and a.shape[0] == config.init_r:  # full rank: keep the pattern's rows
            idx = np.asarray(_kept(mask), dtype=np.int64)
            a, e, b = a[idx], e[idx], b[:, idx]
        for part, t in (("lora_A", a), ("lora_B", b), ("lora_E", e)):
            tensors[f"{PREFIX}{name}.{part}"] = np.ascontiguousarray(t)
    _check_finite(tensors, f"refusing to save {path}")
    cfg = config.replace(rank_pattern=pattern or None, inference_mode=True).to_dict()
    _atomic_write_dir(
        Path(path),
        {
            WEIGHTS_NAME: _st_save(tensors, metadata={"format": "pt"}),
            CONFIG_NAME: json.dumps(cfg, indent=2, sort_keys=True).encode(),
        },
    )


def _check_pattern(pattern: Mapping[str, Sequence[bool]], weights: Mapping[str, Triplet], init_r: int) -> None:
    for key, mask in pattern.items():
        module = key.removesuffix(".lora_E")
        if not key.endswith(".lora_E") or module not in weights:
            raise CheckpointError(f"rank_pattern key {key!r} names no adapted module (expected '<module>.lora_E')")
        if len(mask) != init_r:
            raise CheckpointError(f"rank_pattern[{key!r}] has length {len(mask)}, expected init_r={init_r}")
        r = weights[module][1].shape[0]
        if r != init_r and sum(bool(b) for b in mask) != r:
            raise CheckpointError(f"rank_pattern[{key!r}] keeps {sum(mask)} triplets but the module has rank {r}")


def read_adapter_config(path: str | os.PathLike[str]) -> AdaLoraConfig:
    cfg_path = Path(path) / CONFIG_NAME
    try:
        data = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {cfg_path}: {exc}") from exc
    try:
        return AdaLoraConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_path}: {exc}") from exc


def load_adapter(
    path: str | os.PathLike[str],
    shapes: Mapping[str, tuple[int, int]] | None = None,
    convert: Callable[[Any], Array] | None = None,
) -> tuple[AdaLoraConfig, dict[str, Triplet]]:
    """Read a PEFT AdaLoRA directory (ours or PEFT's): ``(config, {module: Triplet})``.

    Triplets come back at their saved ranks ``r_i`` (the kept count of the
    rank pattern, 0 allowed). ``shapes`` (module -> (in, out)) checks the
    tensors against the model they are meant for. Every check runs before
    ``convert`` is called, so a bad directory changes nothing.
    """
    config = read_adapter_config(path)
    host, _ = _read_safetensors(Path(path) / WEIGHTS_NAME)
    modules = sorted({k[len(PREFIX):].rsplit(".", 1)[0] for k in host if k.startswith(PREFIX)})
    if shapes is not None:
        modules = list(shapes)
    pattern = dict(config.rank_pattern or {})
    expect: dict[str, tuple[tuple[int, ...], str | None]] = {}
    for name in modules:
        mask = pattern.get(f"{name}.lora_E")
        r = config.init_r if mask is None else sum(bool(b) for b in mask)
        if shapes is not None:
            fan_in, fan_out = shapes[name]
        else:
            a = host.get(f"{PREFIX}{name}.lora_A")
            b = host.get(f"{PREFIX}{name}.lora_B")
            fan_in = a.shape[-1] if a is not None and a.ndim == 2 else -1
            fan_out = b.shape[0] if b is not None and b.ndim == 2 else -1
        expect[f"{PREFIX}{name}.lora_A"] = ((r, fan_in), None)
        expect[f"{PREFIX}{name}.lora_B"] = ((fan_out, r), None)
        expect[f"{PREFIX}{name}.lora_E"] = ((r, 1), None)
    unknown = [k for k in pattern if k.removesuffix(".lora_E") not in modules]
    if unknown:
        raise CheckpointError(f"{path}: rank_pattern names modules that have no tensors: {unknown}")
    validate(host, expect, str(Path(path) / WEIGHTS_NAME))
    dtypes = {str(a.dtype) for a in host.values()}
    if len(dtypes) > 1:
        raise CheckpointError(f"{path}: adapter tensors have mixed dtypes {sorted(dtypes)}")
    _check_finite(host, str(path))
    conv = convert or (lambda a: a)
    weights = {
        name: Triplet(
            conv(host[f"{PREFIX}{name}.lora_A"]),
            conv(host[f"{PREFIX}{name}.lora_E"]),
            conv(host[f"{PREFIX}{name}.lora_B"]),
        )
        for name in modules
    }
    return config, weights
