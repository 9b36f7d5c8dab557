"""The core is written against the Array API: only _xp.py may import an array library."""

from __future__ import annotations

import re
from pathlib import Path

import adalora_core

FORBIDDEN = re.compile(r"^\s*(import|from)\s+(numpy|torch|cupy|cffi)\b", re.MULTILINE)


def test_only_xp_imports_array_libraries():
    core = Path(adalora_core.__file__).parent
    offenders = [p.name for p in core.glob("*.py") if p.name != "_xp.py" and FORBIDDEN.search(p.read_text())]
    assert offenders == []


def test_pattern_catches_an_import():
    assert FORBIDDEN.search("x = 1\n    import numpy as np\n")
    assert FORBIDDEN.search("from torch import nn")
    assert not FORBIDDEN.search("import numpyro")


def test_import_does_not_load_torch():
    import subprocess
    import sys

    code = "import sys, adalora_core; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)
