"""The rank pictures put each record at its true step; figures need matplotlib only when drawn."""

from __future__ import annotations

import subprocess
import sys

import pytest

from adalora_core import plot
from adalora_core.config import AdaLoraConfig


def _two_rate_history() -> list[tuple[int, list[int]]]:
    """Recorded every 10 steps up to 50, then every step (as the allocator's phases do); rank 8 -> 4 at 50."""
    return [(s, [8 if s < 50 else 4]) for s in [*range(0, 50, 10), *range(50, 100)]]


def test_ranks_at_holds_the_last_record():
    h = _two_rate_history()
    assert plot.ranks_at(h, 0) == [8]
    assert plot.ranks_at(h, 49) == [8]
    assert plot.ranks_at(h, 50) == [4]
    with pytest.raises(ValueError, match="before the first record"):
        plot.ranks_at(h[1:], 5)


def test_text_heatmap_columns_are_steps():
    text = plot.text_heatmap(_two_rate_history(), 8, total_steps=100, width=100)
    row = next(line for line in text.splitlines() if line.startswith("layer 0"))
    cells = row.split("|")[1]
    assert cells == "@" * 50 + "=" * 50  # the change at step 50 sits half way, not at record 5 of 55
    assert "one column = 1 steps" in text


def test_text_heatmap_marks_and_ticks():
    text = plot.text_heatmap(_two_rate_history(), 8, total_steps=100, width=50, marks=[(50, "final")])
    lines = text.splitlines()
    ticks, arrows = lines[0], lines[2]
    offset = len("layer 0 |")
    assert arrows.index("^") - offset == 25  # step 50 of 100 over 50 columns
    assert ticks[offset:].split() == ["0", "50", "99"]
    assert "50: final" in lines[3]


def test_series_over_runs():
    s = plot.Series.over_runs("loss", [0, 1], [[1.0, 4.0], [3.0, 2.0]])
    assert s.y == [2.0, 3.0] and s.low == [1.0, 2.0] and s.high == [3.0, 4.0]


def test_scheduled_budget_and_phases():
    cfg = AdaLoraConfig(total_step=100, init_r=8, target_r=4, tinit=10, tfinal=20, deltaT=5)
    b = plot.scheduled_budget(cfg, 3)
    assert len(b) == 100 and b[0] == b[10] == 24 and b[81] == b[-1] == 12
    assert b == sorted(b, reverse=True)
    assert plot.phases(cfg) == [(10, "warm-up ends"), (80, "ranks final")]


def test_allocation_figure_puts_columns_at_their_steps(tmp_path):
    pytest.importorskip("matplotlib")
    h = _two_rate_history()
    fig = plot.allocation_figure(h, total_steps=100, init_r=8, labels=["m"], planted=[4], schedule=[8] * 100,
                                 marks=[(50, "final")])
    heat = fig.axes[0]
    edges = heat.collections[0].get_coordinates()[0, :, 0].tolist()
    assert edges == [s for s, _ in h] + [100]
    assert heat.get_xlim() == (0.0, 100.0)  # the warm-up is on the picture
    plot.save(fig, str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_lines_figure(tmp_path):
    Figure = pytest.importorskip("matplotlib.figure").Figure
    fig = Figure()
    ax = fig.subplots()
    plot.lines(ax, [plot.Series.over_runs("a", [1, 2], [[1.0, 2.0], [3.0, 1.0]])], xlabel="x", ylabel="y",
               logy=True, marks=[(1, "here")])
    assert ax.get_yscale() == "log" and ax.get_legend().get_texts()[0].get_text() == "a"
    plot.save(fig, str(tmp_path / "l.png"))


def test_require_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'adalora-core\[plot\]'"):
        plot.require()


def test_importing_plot_does_not_import_matplotlib():
    code = "import sys, adalora_core.plot; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
