"""Saves touch only the files they write: other entries, modes and symlinks survive; interrupts and orphans."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from test_checkpoint import CFG, PATTERN, weights

from adalora_core import CheckpointError, load_adapter, load_arrays, save_adapter, save_arrays
from adalora_core import checkpoint as ck
from adalora_core.checkpoint import CONFIG_NAME, WEIGHTS_NAME

NEW_PATTERN = {"layers.0.q.lora_E": [True, True, True, False], "layers.1.v.lora_E": [True, False, False, False]}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _loaded(path):
    cfg, w = load_adapter(path)
    return cfg, {k: tuple(np.asarray(t) for t in trip) for k, trip in w.items()}


def _same(a, b) -> bool:
    (cfg_a, w_a), (cfg_b, w_b) = a, b
    return cfg_a == cfg_b and w_a.keys() == w_b.keys() and all(
        x.shape == y.shape and np.array_equal(x, y) for k in w_a for x, y in zip(w_a[k], w_b[k]))


# ------------------------------------------------------------------ item: only our files


def test_save_keeps_every_other_entry(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-500").mkdir(parents=True)
    (out / "checkpoint-500" / "optimizer.pt").write_bytes(b"opt")
    (out / "notes.txt").write_text("keep me")
    for seed in (0, 1):  # into an existing directory, then over an existing adapter
        save_adapter(out, CFG, weights(seed), PATTERN)
    assert (out / "checkpoint-500" / "optimizer.pt").read_bytes() == b"opt"
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, "checkpoint-500",
                                                           "notes.txt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing hidden beside it either


def test_existing_directory_and_file_modes_are_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o750)
    save_adapter(out, CFG, weights(0), PATTERN)
    os.chmod(out / WEIGHTS_NAME, 0o600)
    save_adapter(out, CFG, weights(1), PATTERN)
    assert _mode(out) == 0o750
    assert _mode(out / WEIGHTS_NAME) == 0o600


def test_new_directories_and_files_follow_the_umask_as_peft(tmp_path):
    out = tmp_path / "a" / "b"
    save_adapter(out, CFG, weights(), PATTERN)
    save_arrays(tmp_path / "c" / "s.safetensors", {"x": np.ones(2, np.float32)}, {})
    mask = _umask()
    assert _mode(out) == _mode(tmp_path / "a") == _mode(tmp_path / "c") == 0o777 & ~mask
    for f in (out / WEIGHTS_NAME, out / CONFIG_NAME, tmp_path / "c" / "s.safetensors"):
        assert _mode(f) == 0o666 & ~mask


def test_symlinked_directory_stays_a_symlink(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "other").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    save_adapter(link, CFG, weights(), PATTERN)
    save_adapter(link, CFG, weights(1), NEW_PATTERN)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert sorted(p.name for p in real.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, "other"])
    assert load_adapter(link)[0].rank_pattern == NEW_PATTERN


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        save_adapter(tmp_path / "f", CFG, weights())
    assert (tmp_path / "f").read_text() == "x"


def test_pretrained_save_keeps_checkpoint_dirs(tmp_path):
    torch = pytest.importorskip("torch")
    from adalora_core.backends.torch_nn import _parity as P

    om = P.ours(P.build("mlp"), **P.config_kwargs("mlp"))
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"older")
    om.save_pretrained(tmp_path)
    om.save_training_state(tmp_path / "state.safetensors")
    om.save_pretrained(tmp_path)
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").read_bytes() == b"older"
    assert (tmp_path / "state.safetensors").exists()
    del torch


def test_unchanged_config_is_not_rewritten(tmp_path):
    """While training only the weights change between saves: one rename, so old or new at every instant."""
    save_adapter(tmp_path, CFG, weights(0), PATTERN)
    before = os.stat(tmp_path / CONFIG_NAME).st_ino
    save_adapter(tmp_path, CFG, weights(1), PATTERN)
    assert os.stat(tmp_path / CONFIG_NAME).st_ino == before
    save_adapter(tmp_path, CFG, weights(1), NEW_PATTERN)
    assert os.stat(tmp_path / CONFIG_NAME).st_ino != before


# ------------------------------------------------------------------ item: interrupts


class Fault:
    """Raises KeyboardInterrupt at the ``at``-th call of the file operations a save uses, before or after it runs."""

    NAMES = ("open", "replace", "link", "fsync", "unlink", "mkdir")

    def __init__(self, monkeypatch, at: int, after: bool) -> None:
        self.at, self.after, self.calls, self.fired = at, after, 0, False
        for name in self.NAMES:
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))

    def _wrap(self, real):
        def call(*a, **k):
            self.calls += 1
            hit = self.calls == self.at + 1
            self.fired |= hit
            if hit and not self.after:
                raise KeyboardInterrupt
            out = real(*a, **k)  # a failing call (mkdir of an existing directory) raises its own error
            if hit:
                raise KeyboardInterrupt
            return out
        return call


@pytest.mark.parametrize("after", [False, True], ids=["before-call", "after-call"])
def test_an_interrupt_at_any_step_leaves_the_old_or_the_new_adapter(tmp_path, monkeypatch, after):
    ref_old, ref_new, d = tmp_path / "old", tmp_path / "new", tmp_path / "d"
    save_adapter(ref_old, CFG, weights(0), PATTERN)
    save_adapter(ref_new, CFG, weights(1), NEW_PATTERN)
    old, new = _loaded(ref_old), _loaded(ref_new)
    outcomes = []
    for at in range(200):
        save_adapter(d, CFG, weights(0), PATTERN)
        with monkeypatch.context() as m:
            fault = Fault(m, at, after)
            try:
                save_adapter(d, CFG, weights(1), NEW_PATTERN)
            except KeyboardInterrupt:
                pass
        got = _loaded(d)
        assert _same(got, old) or _same(got, new), f"interrupt at file operation {at} left a mixed adapter"
        outcomes.append("old" if _same(got, old) else "new")
        left = sorted(p.name for p in d.iterdir() if p.name not in (CONFIG_NAME, WEIGHTS_NAME))
        assert all(ck._OURS.fullmatch(n) for n in left), left  # at most an orphan the next save cleans
        if not fault.fired:
            break
    else:
        pytest.fail("the save never completed")
    assert "old" in outcomes and outcomes[-1] == "new"


# ------------------------------------------------------------------ item: orphans


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _ours(name: str, pid: int) -> str:
    return f".{name}.{pid}.{'ab' * 8}{ck.TMP_SUFFIX}"


def _plant(directory, files=(), dirs=()):
    for f in files:
        (directory / f).write_bytes(b"x" * 100)
    for d in dirs:
        (directory / d).mkdir()
        (directory / d / WEIGHTS_NAME).write_bytes(b"y" * 100)


def test_stale_orphans_of_our_naming_are_cleaned_and_nothing_else(tmp_path, monkeypatch):
    d = tmp_path / "ad"
    save_adapter(d, CFG, weights(), PATTERN)
    dead, alive = _dead_pid(), os.getppid()
    dead_tmp, live_tmp = _ours(WEIGHTS_NAME, dead), _ours(CONFIG_NAME, alive)
    _plant(d, files=[dead_tmp, live_tmp])
    legacy_dirs = [".ad.k3j_9xq2.tmp", ".ad.k3j_9xq2.tmp.old"]
    legacy_file = ".ad.zz00zz00.tmp"
    _plant(tmp_path, files=[legacy_file], dirs=legacy_dirs)
    decoys = [".ad.k3j_9xq2.tmp.bak", ".other.k3j_9xq2.tmp", ".ad.short.tmp", "ad.k3j_9xq2.tmp",
              f".x.{dead}.{'ab' * 8}.tmp", "notes.adalora-tmp"]
    _plant(tmp_path, files=decoys)
    (tmp_path / _ours("link", dead)).symlink_to(tmp_path / "notes.adalora-tmp")  # a symlink is never ours
    save_adapter(d, CFG, weights(1), PATTERN)
    assert not (d / dead_tmp).exists()  # its writer is gone
    assert (d / live_tmp).exists()  # its writer may still be writing it
    assert all((tmp_path / n).exists() for n in [*legacy_dirs, legacy_file])  # no pid: only age counts
    monkeypatch.setattr(ck, "STALE_AFTER_S", -1.0)  # as if they had all aged
    save_adapter(d, CFG, weights(2), PATTERN)
    assert not (d / live_tmp).exists()
    assert not any((tmp_path / n).exists() for n in [*legacy_dirs, legacy_file])
    assert all((tmp_path / n).exists() for n in decoys) and (tmp_path / _ours("link", dead)).is_symlink()
    assert sorted(p.name for p in d.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_save_arrays_cleans_its_directory_too(tmp_path, monkeypatch):
    f = tmp_path / "s.safetensors"
    dead_tmp, live_tmp, legacy = _ours(f.name, _dead_pid()), _ours(f.name, os.getppid()), ".s.safetensors.a1b2c3d4.tmp"
    _plant(tmp_path, files=[dead_tmp, live_tmp, legacy, "keep.tmp"])
    save_arrays(f, {"x": np.ones(2, np.float32)}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f.name, live_tmp, legacy, "keep.tmp"])
    monkeypatch.setattr(ck, "STALE_AFTER_S", -1.0)
    save_arrays(f, {"x": np.ones(2, np.float32)}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f.name, "keep.tmp"])
    assert load_arrays(f)[0]["x"].tolist() == [1.0, 1.0]
