from __future__ import annotations

import sys

import pytest

from adalora_core import demo
from adalora_core.__main__ import main


def test_demo_recovers_planted_ranks():
    res = demo.run(seed=1, log=None)
    assert res.spearman >= 0.8, (res.planted, res.final)
    assert sum(res.final) == 4 * len(res.planted)  # the target budget
    assert res.loss_end < res.loss_start / 100


def test_spearman():
    assert demo.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert demo.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert demo.spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)


def test_cli_demo_info_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["demo", "--steps", "100", "--plot", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    assert "Spearman" in out and "planted" in out
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["info"]) == 0
    assert "numpy" in capsys.readouterr().out


def test_cli_plot_without_matplotlib_exits_non_zero(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--steps", "100", "--plot", str(tmp_path / "h.png")])
    assert exc.value.code != 0
    captured = capsys.readouterr()
    assert "matplotlib" in captured.err and "pip install" in captured.err
    assert captured.out == ""  # refused before the run
    assert not (tmp_path / "h.png").exists()


def test_history_starts_with_the_warm_up_and_follows_the_steps():
    res = demo.run(steps=100, log=None)
    cfg = res.config
    steps = [s for s, _ in res.history]
    assert res.history[0] == (0, [cfg.init_r] * len(res.planted))  # the warm-up is recorded
    assert steps == [*range(0, cfg.final_step, cfg.deltaT), *range(cfg.final_step, 100)]


def test_cli_text_heatmap_has_a_step_axis(capsys):
    assert main(["demo", "--steps", "100"]) == 0
    out = capsys.readouterr().out
    assert "x: optimizer step 0..99" in out and "20: warm-up ends, 80: ranks final" in out


def test_cli_rejects_too_few_steps():
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "3"])


def test_demo_runs_on_array_api_strict():
    res = demo.run(backend="array_api_strict", steps=60, log=None)
    assert len(res.final) == len(res.planted)
