"""Checkpoints: safetensors for arrays, JSON for everything else.

Two layers:

* ``save_arrays`` / ``load_arrays``: one ``.safetensors`` file whose header
  metadata carries a JSON document (an object); ``read_header`` gives its
  shapes and metadata without reading an array.
* ``save_adapter`` / ``load_adapter``: PEFT's AdaLoRA directory layout
  (``adapter_model.safetensors`` + ``adapter_config.json``), rank-pattern
  slicing included, so directories move between this library and PEFT.

Writing. A save touches only the files it writes; everything else in the
directory (``checkpoint-500/``, other files) is left alone, an existing
directory keeps its mode (a symlinked one stays a symlink), and a new one is
created as PEFT creates it (``mkdir -p``, honouring the umask). Each file is
written to a temp file beside it (``.<name>.<pid>.<hex>.adalora-tmp``),
fsynced, renamed over the target, and the directory is fsynced. Stale temp
files of that naming (their writer is gone, or they are older than
``STALE_AFTER_S``), and the hidden ``.<name>.XXXXXXXX.tmp[.old]`` leftovers of
the earlier whole-directory swap, are removed by the next save there; nothing
else is ever removed. The adapter's two files are written so that an
error or Ctrl-C at any point leaves the previous adapter loadable at its path
(only a hard kill between two renames cannot be covered: see
:func:`_write_adapter`).

Reading. Files are opened with ``safetensors.safe_open`` (memory-mapped),
which first checks that the header's offsets cover the file exactly; keys,
shapes and dtypes are then checked against the header before a tensor byte is
read, so a bad or huge file is refused without being loaded. Values
(finiteness) are checked after reading and before anything is returned, so a
bad file raises ``CheckpointError`` and changes nothing. bfloat16 tensors
(PEFT saves them for bf16 training) are returned as float32, which holds
every bf16 value exactly; NumPy decodes them, so torch is not needed.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as _st_save

from ._xp import Array, to_numpy
from ._xp import host_np as np
from .config import AdaLoraConfig
from .errors import CheckpointError
from .triplet import Triplet
from .validate import Problems

META_KEY = "adalora_core"
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
TMP_SUFFIX = ".adalora-tmp"
STALE_AFTER_S = 600.0  # no save keeps a temp file unchanged this long: older ones are orphans

Spec = Mapping[str, tuple[tuple[int, ...], str | None]]  # key -> (shape, dtype name or None for any)
Header = dict[str, tuple[tuple[int, ...], str]]
T = TypeVar("T")

# safetensors dtype codes -> NumPy names (bfloat16 has no NumPy dtype: it is widened to float32)
_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32",
           "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16", "BF16": "bfloat16",
           "F32": "float32", "F64": "float64"}
_FLOATS = ("float16", "bfloat16", "float32", "float64")
_OURS = re.compile(r"\..+\.(?P<pid>\d+)\.[0-9a-f]{16}" + re.escape(TMP_SUFFIX))
_LEGACY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp(\.old)?")  # tempfile.mkstemp/mkdtemp names


# ------------------------------------------------------------------ writing


def _temp_name(name: str) -> str:
    return f".{name}.{os.getpid()}.{secrets.token_hex(8)}{TMP_SUFFIX}"


def _ensure_dir(directory: Path) -> Path:
    """``directory``, created like PEFT's ``os.makedirs`` (mode ``0o777 & ~umask``) when missing."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise CheckpointError(f"cannot save into {directory}: it exists and is not a directory") from exc
    return directory


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (off POSIX this is unknown: assume it does)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by another user
        pass
    return True


def _clean_orphans(directory: Path, legacy_of: str | None = None) -> None:
    """Remove stale temp files of our naming in ``directory`` (or, with ``legacy_of``, the old naming's).

    Ours carry their writer's pid: stale when that process is gone or the
    file has not changed (ctime) for ``STALE_AFTER_S``. The old naming
    (``.<legacy_of>.XXXXXXXX.tmp`` files or directories, ``.tmp.old``
    directories) carries no pid, so only age counts. Symlinks and every other
    name are never touched; a failure to clean never fails the save.
    """
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in list(os.scandir(directory)):
            if legacy_of is None:
                ours = _OURS.fullmatch(entry.name)
                pid = int(ours["pid"]) if ours else None
                if ours is None:
                    continue
            else:
                old = _LEGACY.fullmatch(entry.name)
                pid = None
                if old is None or old["name"] != legacy_of:
                    continue
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if now - st.st_ctime <= STALE_AFTER_S and (pid is None or _alive(pid)):
                    continue
                if stat.S_ISREG(st.st_mode):
                    os.unlink(entry.path)
                elif stat.S_ISDIR(st.st_mode) and legacy_of is not None:
                    shutil.rmtree(entry.path)


def _write_temp(target: Path, data: bytes) -> Path:
    """``data`` in a new temp file beside ``target``, fsynced (an existing target's mode is kept)."""
    tmp = target.with_name(_temp_name(target.name))
    try:
        st = os.lstat(target)
        mode = stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None
    except FileNotFoundError:
        mode = None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.chmod(tmp, mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _fsync_dir(directory: Path) -> None:
    """Make the renames in ``directory`` durable (POSIX; elsewhere directories cannot be opened)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace the one file ``path`` by ``data``: a reader sees the old file or the new one."""
    directory = _ensure_dir(path.parent)
    _clean_orphans(directory)
    _clean_orphans(directory, legacy_of=path.name)
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(directory)


def _backup(path: Path) -> Path | None:
    """A hard link to ``path`` under a temp name (no copy), or None when there is none to make."""
    link = path.with_name(_temp_name(path.name))
    try:
        os.link(path, link)
    except OSError:  # no old file, or a filesystem without hard links
        return None
    return link


def _write_adapter(path: Path, weights: bytes, config: bytes) -> None:
    """Write the two files of an adapter directory so the previous adapter stays loadable until the new one is.

    Neither order of two renames is safe by itself: new weights beside the
    old config (or the reverse) do not load when the rank patterns differ.
    So: both files are complete on disk before either is renamed; the config
    is rewritten only when it changed (while training it changes only with
    the rank pattern, so most saves are one rename); when both change, the
    weights go first, a hard link keeps the old weights, and any exception
    (an error, Ctrl-C) before the config's rename puts them back. Only a
    hard kill (SIGKILL, power loss) between the two renames, microseconds
    apart, can leave new weights beside the old config: ``load_adapter``
    refuses that pair when their ranks differ (the case while training), and
    the next save repairs it.
    """
    directory = _ensure_dir(path)
    _clean_orphans(directory)
    _clean_orphans(directory.parent, legacy_of=directory.name)
    w_path, c_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    try:
        config_changed = c_path.read_bytes() != config
    except OSError:
        config_changed = True
    temps: list[Path] = []
    try:
        temps.append(w_tmp := _write_temp(w_path, weights))
        c_tmp = backup = None
        if config_changed:
            temps.append(c_tmp := _write_temp(c_path, config))
            backup = _backup(w_path)
            temps += [backup] if backup is not None else []
        try:
            os.replace(w_tmp, w_path)
            if c_tmp is not None:
                _fsync_dir(directory)  # the weights' rename is durable before the config's
                os.replace(c_tmp, c_path)
        except BaseException:
            if backup is not None and c_tmp is not None and not w_tmp.exists() and c_tmp.exists():
                os.replace(backup, w_path)  # new weights are in, the config is not: the old pair again
            raise
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    _fsync_dir(directory)


def _to_host(arrays: Mapping[str, Array]) -> dict[str, Any]:
    return {k: np.ascontiguousarray(to_numpy(v)) for k, v in arrays.items()}


def save_arrays(path: str | os.PathLike[str], arrays: Mapping[str, Array], meta: Mapping[str, Any]) -> None:
    """Write ``arrays`` and the JSON object ``meta`` to one file, atomically.

    Non-finite values are refused (the file would not load back).
    """
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"metadata for {path} must be a mapping (a JSON object), got {type(meta).__name__}")
    host = _to_host(arrays)
    _check_finite(host, f"refusing to save {path}")
    try:
        text = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"metadata for {path} is not JSON-serialisable: {exc}") from exc
    _atomic_write_bytes(Path(path), _st_save(host, metadata={META_KEY: text}))


# ------------------------------------------------------------------ reading


def _open(path: Path, framework: str = "numpy") -> Any:
    try:
        return safe_open(str(path), framework=framework)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupt?): {exc}") from exc


def _read_bf16(path: Path, header: Header) -> dict[str, Any]:
    """The bfloat16 tensors of ``path`` as float32, exactly, with NumPy alone (it has no bfloat16).

    A bf16 value is the top half of a float32's bits: each tensor's uint16
    words, read from the memory-mapped file at its header's offsets, widen as
    ``(u16 << 16)`` viewed as float32. The header is re-read here, so a file
    replaced since ``header`` was taken is refused, never misread.
    """
    keys = [k for k, (_, dtype) in header.items() if dtype == "bfloat16"]
    if not keys:
        return {}
    out = {}
    try:
        with open(path, "rb") as fh:  # the map is released with its last view, when this returns
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        start = 8 + int.from_bytes(mm[:8], "little")
        entries = json.loads(mm[8:start])
        for k in keys:
            shape, count, entry = header[k][0], math.prod(header[k][0]), entries[k]
            begin, end = entry["data_offsets"]
            if entry["dtype"] != "BF16" or tuple(entry["shape"]) != shape or end - begin != 2 * count:
                raise ValueError(f"{k!r} is not the tensor whose header was checked")
            words = np.frombuffer(mm, dtype="<u2", count=count, offset=start + begin)
            out[k] = (words.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} changed while it was being read; load it again ({exc})") from exc
    return out


def _read_safetensors(path: Path, check: Callable[[Header, Mapping[str, str], Problems], T],
                      read: bool = True) -> tuple[dict[str, Any], T]:
    """``path``'s tensors (none unless ``read``) and ``check``'s result; ``check`` sees only the header.

    ``check`` records what is wrong in the ``Problems`` it is given; any
    problem is raised before a tensor byte is read.
    """
    f = _open(path)
    with f:
        header = {}
        problems = Problems(str(path))
        for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
            info = f.get_slice(key)
            code = info.get_dtype()
            problems.require(code in _DTYPES, f"{key!r} has dtype {code}, which this library cannot read")
            header[key] = (tuple(info.get_shape()), _DTYPES.get(code, code))
        result = check(header, f.metadata() or {}, problems)
        problems.raise_if_any()
        if not read:
            return {}, result
        host = {k: f.get_tensor(k) for k, (_, dtype) in header.items() if dtype != "bfloat16"}
        host.update(_read_bf16(path, header))
    return host, result


def check_header(problems: Problems, header: Mapping[str, tuple[tuple[int, ...], str]], expect: Spec) -> None:
    """Keys, shapes and dtypes against ``expect``, every mismatch recorded."""
    for k in problems.keys(header, expect, "keys"):
        (shape, dtype), (got_shape, got_dtype) = expect[k], header[k]
        if tuple(got_shape) != tuple(shape):
            problems.add(f"{k!r} has shape {tuple(got_shape)}, expected {tuple(shape)}")
        if dtype is not None and got_dtype != dtype:
            problems.add(f"{k!r} has dtype {got_dtype}, expected {dtype}")


def _check_finite(host: Mapping[str, Any], what: str) -> None:
    for k, a in host.items():
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise CheckpointError(f"{what}: array {k!r} has non-finite values")


def _meta_doc(metadata: Mapping[str, str], problems: Problems) -> dict[str, Any]:
    """The JSON object ``save_arrays`` put in the header (``{}``, with the problem recorded, if there is none)."""
    if not problems.require(META_KEY in metadata, f"no {META_KEY!r} metadata: not written by save_arrays"):
        return {}
    try:
        doc = json.loads(metadata[META_KEY])
    except json.JSONDecodeError as exc:
        problems.add(f"metadata is not valid JSON: {exc}")
        return {}
    return dict(problems.mapping(doc, f"the {META_KEY!r} metadata"))


class ArraysHeader(NamedTuple):
    """A ``save_arrays`` file as its header describes it: (shape, dtype name) by key, and the metadata."""

    arrays: Header
    meta: dict[str, Any]


def read_header(path: str | os.PathLike[str]) -> ArraysHeader:
    """The header of a file written by ``save_arrays``; no tensor is read.

    For loaders whose expected shapes follow from the metadata or must be
    bounded first: check this, then pass the shapes it implies and its
    ``meta`` to :func:`load_arrays`, so a huge or lying file is refused
    before its bytes are read.
    """
    return _read_safetensors(Path(path), lambda header, metadata, p: ArraysHeader(header, _meta_doc(metadata, p)),
                             read=False)[1]


def load_arrays(
    path: str | os.PathLike[str],
    expect: Spec | None = None,
    convert: Callable[[Any], Array] | None = None,
    *,
    meta: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Array], dict[str, Any]]:
    """Read a file written by ``save_arrays``: (arrays, meta).

    ``expect`` (key -> (shape, dtype)) is checked exactly against the header
    before any tensor is read; the metadata must be a JSON object; ``convert``
    moves each NumPy array to the caller's backend after every check has
    passed. ``meta``: the metadata a caller took from :func:`read_header` and
    checked; the file must still hold it (else it was replaced in between).
    """
    path = Path(path)

    def check(header: Header, metadata: Mapping[str, str], problems: Problems) -> dict[str, Any]:
        if expect is not None:
            check_header(problems, header, expect)
        doc = _meta_doc(metadata, problems)
        problems.require(meta is None or json.dumps(doc, sort_keys=True) == json.dumps(meta, sort_keys=True),
                         "it changed after its header was read; load it again")
        return doc

    host, doc = _read_safetensors(path, check)
    _check_finite(host, str(path))
    out = {k: (convert(v) if convert else v) for k, v in host.items()}
    return out, doc


# ---------------------------------------------------------------- PEFT layout


def _kept(mask: Sequence[bool]) -> list[int]:
    return [i for i, keep in enumerate(mask) if keep]


def save_adapter(
    path: str | os.PathLike[str],
    config: AdaLoraConfig,
    weights: Mapping[str, Triplet],
    rank_pattern: Mapping[str, Sequence[bool]] | None = None,
    extra: Mapping[str, Array] | None = None,
) -> None:
    """Write a PEFT-compatible AdaLoRA adapter directory.

    ``weights`` maps a module path to its triplet; ``rank_pattern``
    (``"<path>.lora_E" -> [bool] * init_r``) slices a full-rank module's A
    rows, E rows and B columns to the kept triplets, as PEFT's
    ``save_pretrained`` does; a module already at its kept rank is saved as is.
    ``extra`` holds the other tensors PEFT saves with an adapter (the
    ``modules_to_save`` copies, trained biases), keyed by their path in the
    model, any dtype. ``adapter_config.json`` carries every key PEFT writes.
    Only the two adapter files are written (see the module docstring).
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
    clash = sorted(k for k in extra or {} if f"{PREFIX}{k}" in tensors or _part(k) is not None)
    if clash:
        raise CheckpointError(f"refusing to save {path}: extra tensors {clash[:3]} have adapter tensor names")
    tensors.update({f"{PREFIX}{k}": v for k, v in _to_host(extra or {}).items()})
    _check_finite(tensors, f"refusing to save {path}")
    cfg = config.replace(rank_pattern=pattern or None, inference_mode=True)
    _write_adapter(Path(path), _st_save(tensors, metadata={"format": "pt"}), _config_bytes(cfg))


def _config_bytes(config: AdaLoraConfig) -> bytes:
    return json.dumps(config.to_peft_dict(), indent=2, sort_keys=True).encode()


def write_adapter_config(path: str | os.PathLike[str], config: AdaLoraConfig) -> None:
    """``adapter_config.json`` alone into directory ``path`` (atomic), as PEFT's ``config.save_pretrained``."""
    _atomic_write_bytes(Path(path) / CONFIG_NAME, _config_bytes(config))


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


def _config_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in directory ``path``'s ``adapter_config.json`` (a ``CheckpointError`` naming the file)."""
    cfg_path = Path(path) / CONFIG_NAME
    try:
        data = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {cfg_path}: {exc}") from exc
    problems = Problems(str(cfg_path))
    data = problems.mapping(data, "its content")
    problems.raise_if_any()
    return dict(data)


def read_adapter_config(path: str | os.PathLike[str]) -> AdaLoraConfig:
    """``adapter_config.json`` of directory ``path``, validated (a ``CheckpointError`` naming the file)."""
    cfg_path = Path(path) / CONFIG_NAME
    data = _config_json(path)
    try:
        return AdaLoraConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_path}: {exc}") from exc


_PARTS = ("lora_A", "lora_B", "lora_E")


def _part(key: str) -> str | None:
    """``"lora_A"``/``"lora_B"``/``"lora_E"`` when ``key`` names a triplet tensor, else None."""
    part = key.rsplit(".", 1)[-1]
    return part if part in _PARTS and "." in key else None


class AdapterContents(NamedTuple):
    """What :func:`read_adapter` returns: the config, the triplets by module, the other tensors by key."""

    config: AdaLoraConfig
    weights: dict[str, Triplet]
    extra: dict[str, Array]


def read_adapter(
    path: str | os.PathLike[str],
    shapes: Mapping[str, tuple[int, int]] | None = None,
    convert: Callable[[Any], Array] | None = None,
    extra: Mapping[str, tuple[int, ...]] | None = None,
    skip: Sequence[str] = (),
) -> AdapterContents:
    """Read a PEFT AdaLoRA directory (ours or PEFT's): config, triplets, and the other tensors.

    Triplets come back at their saved ranks ``r_i`` (the kept count of the
    rank pattern, 0 allowed), float32 for a bfloat16 file. ``shapes``
    (module -> (in, out)) checks the tensors against the model they are meant
    for. ``extra`` (key -> shape, keys without PEFT's ``base_model.model.``)
    lists the other tensors the directory must hold (``modules_to_save``
    copies, biases), any dtype; keys under a ``skip`` prefix are ignored; any
    other tensor is an error. Every check runs before ``convert`` is called,
    so a bad directory changes nothing; shapes and dtypes are checked before
    any tensor is read.
    """
    config = read_adapter_config(path)
    pattern = dict(config.rank_pattern or {})
    wanted = dict(extra or {})

    def check(header: Header, metadata: Mapping[str, str], problems: Problems) -> list[str]:
        header = {k: v for k, v in header.items() if not k[len(PREFIX):].startswith(tuple(skip))}
        triplet_keys = {k: v for k, v in header.items() if k.startswith(PREFIX) and _part(k) is not None
                        and k[len(PREFIX):] not in wanted}
        modules = list(shapes) if shapes is not None else \
            sorted({k[len(PREFIX):].rsplit(".", 1)[0] for k in triplet_keys})
        expect: dict[str, tuple[tuple[int, ...], str | None]] = {}
        for name in modules:
            mask = pattern.get(f"{name}.lora_E")
            r = config.init_r if mask is None else sum(bool(b) for b in mask)
            if shapes is not None:
                fan_in, fan_out = shapes[name]
            else:
                a_shape = header.get(f"{PREFIX}{name}.lora_A", ((),))[0]
                b_shape = header.get(f"{PREFIX}{name}.lora_B", ((),))[0]
                fan_in = a_shape[-1] if len(a_shape) == 2 else -1
                fan_out = b_shape[0] if len(b_shape) == 2 else -1
            expect[f"{PREFIX}{name}.lora_A"] = ((r, fan_in), None)
            expect[f"{PREFIX}{name}.lora_B"] = ((fan_out, r), None)
            expect[f"{PREFIX}{name}.lora_E"] = ((r, 1), None)
        unknown = [k for k in pattern if k.removesuffix(".lora_E") not in modules]
        problems.require(not unknown, f"the rank_pattern of {CONFIG_NAME} names modules that have no tensors: "
                                      f"{unknown}")
        expect.update({f"{PREFIX}{k}": (tuple(shape), None) for k, shape in wanted.items()})
        check_header(problems, header, expect)
        dtypes = sorted({header[k][1] for k in expect if k in header and k[len(PREFIX):] not in wanted})
        problems.require(len(dtypes) <= 1, f"adapter tensors have mixed dtypes {dtypes}")
        problems.require(set(dtypes) <= set(_FLOATS), f"adapter tensors must be floating, got {dtypes}")
        return modules

    host, modules = _read_safetensors(Path(path) / WEIGHTS_NAME, check)
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
    return AdapterContents(config, weights, {k: conv(host[f"{PREFIX}{k}"]) for k in wanted})


def load_adapter(
    path: str | os.PathLike[str],
    shapes: Mapping[str, tuple[int, int]] | None = None,
    convert: Callable[[Any], Array] | None = None,
) -> tuple[AdaLoraConfig, dict[str, Triplet]]:
    """``(config, {module: Triplet})`` of an adapter directory with no other tensors: see :func:`read_adapter`."""
    config, weights, _ = read_adapter(path, shapes, convert)
    return config, weights


# ---------------------------------------------------------------- any PEFT method


def save_peft_dir(path: str | os.PathLike[str], tensors: Mapping[str, Array], config: Mapping[str, Any]) -> None:
    """A PEFT adapter directory of any method: ``tensors`` under their full keys, ``config`` as the JSON.

    Written as :func:`save_adapter` writes (the two files, atomically); non-finite values are refused.
    """
    host = _to_host(tensors)
    _check_finite(host, f"refusing to save {path}")
    _write_adapter(Path(path), _st_save(host, metadata={"format": "pt"}),
                   json.dumps(dict(config), indent=2, sort_keys=True).encode())


def read_peft_dir(path: str | os.PathLike[str],
                  check: Callable[[Mapping[str, Any], Header, Problems], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config, tensors)`` of a PEFT adapter directory of any method, as NumPy arrays (bf16 as float32).

    ``check(config, header, problems)`` sees the config and the tensors'
    keys, shapes and dtypes before any tensor is read; any problem it records
    raises one ``CheckpointError``, as does a non-finite value.
    """
    config = _config_json(path)
    host, _ = _read_safetensors(Path(path) / WEIGHTS_NAME, lambda header, _meta, p: check(config, header, p))
    _check_finite(host, str(path))
    return config, host
