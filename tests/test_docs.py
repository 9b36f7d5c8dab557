"""Every code block of README.md and docs/*.md runs as written.

``python`` blocks run each in a fresh interpreter in an empty temporary
directory. ``bash`` blocks run under ``set -euo pipefail`` in a temporary
directory that links every top-level entry of the repository, so the paths
they name resolve and the files they write at the top level stay out of the
tree. A block that cannot run in a test (it installs packages, needs GPUs,
runs for minutes) carries a mark on the line before it,
``<!-- not run: <why> -->``; it is reported as skipped with that reason, so a
skip is always visible and deliberate. An unmarked block that would install
packages fails without running: the test never changes the environment.
Fences of other languages (``text``, ``json``, or none: listings, trees,
output) hold no code and are not run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNERS = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
MARK = re.compile(r"^\s*<!--\s*not run(?::\s*(?P<why>.*?))?\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
INSTALLS = re.compile(r"\b(pip|uv pip|conda|apt-get)\s+(install|uninstall)\b")
TIMEOUT_S = 120  # a guard against hangs: blocks too slow for the suite are marked instead


@dataclass(frozen=True)
class Block:
    where: str  # "page:line" of the opening fence
    lang: str  # the fence's language, lower case ("" when none)
    code: str
    not_run: str | None  # the reason given in the mark before the block, or None


def parse(text: str, page: str) -> list[Block]:
    """The fenced blocks of a markdown text, each with the ``not run`` mark before it, if any.

    Raises ValueError for a mark without a reason, a mark that no code block
    follows, or an unclosed fence: each would silently skip or mangle a block.
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    mark: tuple[int, str] | None = None  # (line, reason) of a mark waiting for its block
    i = 0
    while i < len(lines):
        line = lines[i]
        m = MARK.match(line)
        if m:
            if not (m["why"] or "").strip():
                raise ValueError(f"{page}:{i + 1}: a 'not run' mark must give its reason: <!-- not run: why -->")
            mark = (i + 1, m["why"].strip())
            i += 1
            continue
        f = FENCE.match(line)
        if f is None:
            if line.strip() and mark is not None:
                raise ValueError(f"{page}:{mark[0]}: a 'not run' mark must come right before a code block")
            i += 1
            continue
        close = re.compile(rf"^\s*{re.escape(f['fence'][0])}{{{len(f['fence'])},}}\s*$")
        end = next((j for j in range(i + 1, len(lines)) if close.match(lines[j])), None)
        if end is None:
            raise ValueError(f"{page}:{i + 1}: the code block opened here is never closed")
        body = "\n".join(ln.removeprefix(f["indent"]) for ln in lines[i + 1:end])
        lang = f["lang"].lower()
        if mark is not None and lang not in RUNNERS:
            raise ValueError(f"{page}:{mark[0]}: a 'not run' mark before a {lang or 'plain'} block, which never runs")
        blocks.append(Block(f"{page}:{i + 1}", lang, body + "\n", mark[1] if mark else None))
        mark = None
        i = end + 1
    if mark is not None:
        raise ValueError(f"{page}:{mark[0]}: a 'not run' mark must come right before a code block")
    return blocks


def _all_blocks() -> list[Block]:
    return [b for page in PAGES for b in parse(page.read_text(encoding="utf-8"), page.relative_to(ROOT).as_posix())]


CODE = [b for b in _all_blocks() if b.lang in RUNNERS]


def test_the_pages_have_code_blocks():
    found = {b.where.split(":")[0] for b in CODE}
    assert {"README.md", "docs/reliability.md"} <= found
    assert sum(b.lang == "python" and b.not_run is None for b in CODE) >= 5


@pytest.mark.parametrize("block", CODE, ids=[b.where for b in CODE])
def test_block_runs(block: Block, tmp_path: Path) -> None:
    if block.not_run is not None:
        pytest.skip(f"{block.where} not run: {block.not_run}")
    if RUNNERS[block.lang] == "python":
        cmd = [sys.executable, "-c", block.code]
    else:
        if INSTALLS.search(block.code):
            pytest.fail(f"{block.where} installs packages: mark it <!-- not run: installs packages -->")
        for entry in ROOT.iterdir():
            if entry.name != ".git":
                (tmp_path / entry.name).symlink_to(entry)
        cmd = ["bash", "-euo", "pipefail", "-c", block.code]
    returncode, stderr = _run(cmd, tmp_path)
    if returncode is None:
        pytest.fail(f"{block.where} ran past {TIMEOUT_S} s: shorten it or mark it <!-- not run: why -->")
    assert returncode == 0, f"{block.where} failed (exit {returncode}):\n{stderr[-4000:]}"


def _run(cmd: list[str], cwd: Path) -> tuple[int | None, str]:
    """``(exit status, stderr)``; ``(None, stderr)`` after killing the whole process group at the timeout,
    so that no child of a bash block (a long run that would write its results later) outlives the test."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return None, proc.communicate()[1]
    return proc.returncode, stderr


SAMPLE = """\
Text.

```python
print(1)
```
<!-- not run: needs 2 GPUs -->
```bash
torchrun --nproc-per-node 2 train.py
```

* a list item:

  ```python
  x = 1
  ```
```
a tree, no language
```
"""


def test_a_block_past_the_timeout_is_killed_with_its_children(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "TIMEOUT_S", 1)
    returncode, _ = _run(["bash", "-c", "(sleep 2; touch late) & wait"], tmp_path)
    assert returncode is None
    time.sleep(2)
    assert not (tmp_path / "late").exists()


def test_parse_reads_languages_marks_and_indented_blocks():
    blocks = parse(SAMPLE, "sample.md")
    assert [(b.where, b.lang, b.not_run) for b in blocks] == [
        ("sample.md:3", "python", None), ("sample.md:7", "bash", "needs 2 GPUs"),
        ("sample.md:13", "python", None), ("sample.md:16", "", None)]
    assert blocks[2].code == "x = 1\n"


def test_a_block_that_installs_packages_fails_unless_marked(tmp_path):
    block = parse("```bash\npip install -e . && python -m adalora_core demo\n```\n", "sample.md")[0]
    with pytest.raises(pytest.fail.Exception, match="installs packages"):
        test_block_runs(block, tmp_path)


@pytest.mark.parametrize("text, error", [
    ("<!-- not run -->\n```bash\nls\n```\n", "must give its reason"),
    ("<!-- not run: slow -->\nSome text.\n```bash\nls\n```\n", "right before a code block"),
    ("Text.\n<!-- not run: slow -->\n", "right before a code block"),
    ("<!-- not run: slow -->\n```text\nout\n```\n", "which never runs"),
    ("```python\nprint(1)\n", "never closed"),
])
def test_parse_refuses_marks_that_would_hide_a_block(text, error):
    with pytest.raises(ValueError, match=error):
        parse(text, "sample.md")
