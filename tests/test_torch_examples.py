"""The torch examples run end to end (short runs) and say what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], check=False, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_train_torch_example():
    out = _run("train_torch.py", "--steps", "24")
    assert "bit-identical to the uninterrupted run: True" in out
    assert "reloaded" in out


def test_train_trainer_example(tmp_path):
    pytest.importorskip("accelerate")
    out = _run("train_trainer.py", "--steps", "8", "--out", str(tmp_path))
    assert "allocator calls 8" in out
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
