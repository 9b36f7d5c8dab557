"""Pictures of a run: where the ranks went over training, the budget, loss curves.

A rank history is a list of ``(step, ranks)`` records, each valid from its
step until the next record. The x axis is always the optimizer step, so
records taken every ``deltaT`` steps in one phase and every step in another
are drawn to scale. ``text_heatmap`` needs nothing; the figures need
matplotlib (the optional ``plot`` extra), imported only when a figure is
drawn so that ``import adalora_core`` stays light. Figures are built with
``matplotlib.figure.Figure`` directly: no pyplot, no global backend switch.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .config import AdaLoraConfig
from .schedule import budget_schedule

__all__ = [
    "INSTALL_HINT",
    "Series",
    "allocation_figure",
    "lines",
    "phases",
    "ranks_at",
    "require",
    "save",
    "scheduled_budget",
    "text_heatmap",
]

History = Sequence[tuple[int, Sequence[int]]]
Marks = Sequence[tuple[int, str]]  # (step, what happens there), e.g. (tinit, "warm-up ends")
INSTALL_HINT = "pip install 'adalora-core[plot]'"
SHADES = " .:-=+*#%@"


def require() -> Any:
    """``matplotlib.figure.Figure``, or an ImportError that says how to install matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f"drawing a figure needs matplotlib, which is not installed: {INSTALL_HINT}") from exc
    return Figure


def phases(config: AdaLoraConfig) -> list[tuple[int, str]]:
    """Where AdaLoRA's schedule changes phase: the marks every rank picture shows."""
    return [(config.tinit, "warm-up ends"), (config.final_step, "ranks final")]


def scheduled_budget(config: AdaLoraConfig, n_modules: int) -> list[int]:
    """The budget (total triplets) the schedule asks for at every step of the run."""
    assert config.total_step is not None
    return [budget_schedule(step, init_bgt=config.init_r * n_modules, target_bgt=config.target_r * n_modules,
                            tinit=config.tinit, tfinal=config.tfinal, total_step=config.total_step,
                            deltaT=config.deltaT)[0] for step in range(config.total_step)]


def ranks_at(history: History, step: int) -> Sequence[int]:
    """The ranks in force at ``step``: those of the last record at or before it."""
    i = bisect.bisect_right([s for s, _ in history], step) - 1
    if i < 0:
        raise ValueError(f"step {step} is before the first record (step {history[0][0]})")
    return history[i][1]


def _place(row: list[str], col: int, text: str) -> None:
    """Write ``text`` into ``row`` from ``col`` (pulled left to fit) when those cells are free."""
    col = max(0, min(col, len(row) - len(text)))
    if all(c == " " for c in row[max(0, col - 1): col + len(text) + 1]):
        row[col: col + len(text)] = text


def text_heatmap(history: History, init_r: int, *, total_steps: int, marks: Marks = (),
                 labels: Sequence[str] | None = None, width: int = 60) -> str:
    """Kept triplets per module (rows) over optimizer steps (columns), as shaded characters.

    Column ``c`` shows the ranks in force at its first step, so equal widths
    are equal numbers of steps whatever the recording rate.
    """
    if not history:
        return "(no ranks recorded)"
    first = history[0][0]
    span = max(1, total_steps - first)
    width = max(1, min(width, span))
    starts = [first + span * c // width for c in range(width)]
    cols = [ranks_at(history, s) for s in starts]
    n = len(history[0][1])
    labels = list(labels) if labels is not None else [f"layer {i}" for i in range(n)]
    pad = max(len(s) for s in labels)

    def col_of(step: int) -> int:
        return min(width - 1, max(0, (step - first) * width // span))

    ticks, arrows = [" "] * width, [" "] * width
    for step in (first, *(s for s, _ in marks), total_steps - 1):
        _place(ticks, col_of(step), str(step))
    for step, _ in marks:
        arrows[col_of(step)] = "^"
    rows = [f"{'step':<{pad}}  {''.join(ticks)}"]
    for i, label in enumerate(labels):
        cells = "".join(SHADES[min(9, round(r[i] / init_r * 9))] for r in cols)
        rows.append(f"{label:<{pad}} |{cells}| {history[-1][1][i]}")
    if marks:
        rows.append(f"{'':<{pad}}  {''.join(arrows).rstrip()}")
    notes = [f"{step}: {what}" for step, what in marks]
    rows.append(f"x: optimizer step {first}..{total_steps - 1}, one column = {span / width:g} steps"
                + ("; ^ " + ", ".join(notes) if notes else ""))
    rows.append(f"shade: 0 '{SHADES[0]}' .. {init_r} '{SHADES[-1]}'")
    return "\n".join(rows)


@dataclass(frozen=True)
class Series:
    """One line of a line plot, with an optional band (``low``..``high``)."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    low: Sequence[float] | None = None
    high: Sequence[float] | None = None
    style: str = "-"
    color: str | None = None  # default: the next colour of the cycle

    @classmethod
    def over_runs(cls, label: str, x: Sequence[float], runs: Sequence[Sequence[float]], style: str = "-",
                  color: str | None = None) -> Series:
        """The mean of several runs (say seeds) with their min..max as the band."""
        cols = list(zip(*runs))
        return cls(label, x, [sum(c) / len(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols],
                   style, color)


def _marks(ax: Any, marks: Marks, text: bool = True) -> None:
    for step, what in marks:
        ax.axvline(step, color="0.35", lw=0.9, ls="--")
        if text:
            ax.annotate(f" {what}", (step, 1.0), xycoords=("data", "axes fraction"), va="bottom",
                        fontsize=8, color="0.25", annotation_clip=False)


def lines(ax: Any, series: Sequence[Series], *, xlabel: str, ylabel: str, title: str = "",
          logx: bool = False, logy: bool = False, marks: Marks = (), below: bool = False) -> None:
    """Draw ``series`` (bands as shaded areas) on ``ax``; ``below`` puts the legend under the axes
    (for busy plots where no corner is free)."""
    for k, s in enumerate(series):
        color = s.color or f"C{k}"
        ax.plot(s.x, s.y, s.style, color=color, label=s.label, lw=1.6)
        if s.low is not None and s.high is not None:
            ax.fill_between(s.x, s.low, s.high, color=color, alpha=0.18, lw=0)
    for on, axis, scale in ((logx, ax.xaxis, ax.set_xscale), (logy, ax.yaxis, ax.set_yscale)):
        if on:
            scale("log")
            _plain_log_labels(axis)
    _marks(ax, marks)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, pad=14 if marks else 6)
    ax.grid(alpha=0.3)
    if below:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    else:
        ax.legend(fontsize=8)


def _plain_log_labels(axis: Any) -> None:
    """Log-axis labels as plain numbers (0.3, 10, not 3x10^-1); minor ticks labelled on short spans only."""
    from matplotlib.ticker import FuncFormatter

    def label(v: float, minor: bool) -> str:
        lo, hi = axis.get_view_interval()
        return "" if minor and hi > 30 * lo else f"{v:g}"

    axis.set_major_formatter(FuncFormatter(lambda v, _: label(v, False)))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: label(v, True)))


def _rank_mesh(ax: Any, history: History, total_steps: int, init_r: int) -> Any:
    """The heatmap: column ``i`` spans ``[step_i, step_{i+1})``, the last one up to ``total_steps``."""
    steps = [s for s, _ in history]
    edges = [*steps, max(total_steps, steps[-1] + 1)]
    n = len(history[0][1])
    grid = [[r[i] for _, r in history] for i in range(n)]
    return ax.pcolormesh(edges, [i - 0.5 for i in range(n + 1)], grid, cmap="viridis", vmin=0, vmax=init_r,
                         shading="flat")


def _planted_panel(ax: Any, planted: Sequence[int], final: Sequence[int], init_r: int) -> None:
    """Two columns, planted and final rank, in the heatmap's colours with the numbers written in."""
    n = len(planted)
    grid = [[p, f] for p, f in zip(planted, final)]
    ax.pcolormesh([0, 1, 2], [i - 0.5 for i in range(n + 1)], grid, cmap="viridis", vmin=0, vmax=init_r)
    for i, (p, f) in enumerate(zip(planted, final)):
        for j, v in enumerate((p, f)):
            ax.text(j + 0.5, i, str(v), ha="center", va="center", fontsize=8,
                    color="white" if v < 0.6 * init_r else "black")
    ax.xaxis.tick_top()
    ax.set_xticks([0.5, 1.5], ["planted", "final"], fontsize=8)
    ax.tick_params(axis="x", top=False, pad=1)
    ax.tick_params(axis="y", left=False, labelleft=False)


def allocation_figure(history: History, *, total_steps: int, init_r: int, labels: Sequence[str],
                      planted: Sequence[int] | None = None, schedule: Sequence[int] | None = None,
                      marks: Marks = (), title: str = "") -> Any:
    """Kept triplets per module over training (with the planted and final ranks beside it when
    given), and below it the total kept against the scheduled budget (``schedule[step]``)."""
    Figure = require()
    n = len(labels)
    fig = Figure(figsize=(10, 2.6 + 0.26 * n), layout="constrained")
    gs = fig.add_gridspec(2, 2, width_ratios=[14, 1.6], height_ratios=[max(2.0, 0.26 * n), 1.5])
    ax = fig.add_subplot(gs[0, 0])
    mesh = _rank_mesh(ax, history, total_steps, init_r)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(history[0][0], total_steps)
    ax.tick_params(labelbottom=False)
    _marks(ax, marks)
    if title:
        ax.set_title(title, pad=14)
    if planted is not None:
        side = fig.add_subplot(gs[0, 1], sharey=ax)
        _planted_panel(side, planted, history[-1][1], init_r)
    fig.colorbar(mesh, ax=ax if planted is None else [ax, side], label="kept triplets (rank)",
                 fraction=0.04, pad=0.01)
    bax = fig.add_subplot(gs[1, 0], sharex=ax)
    steps = [s for s, _ in history]
    kept = [sum(r) for _, r in history]
    bax.step([*steps, total_steps], [*kept, kept[-1]], where="post", color="C1", label="kept (sum of ranks)")
    if schedule is not None:
        bax.plot(range(len(schedule)), schedule, color="0.3", lw=1, ls=":", label="scheduled budget")
    _marks(bax, marks, text=False)
    bax.set_xlabel("optimizer step")
    bax.set_ylabel("budget")
    bax.grid(alpha=0.3)
    bax.legend(fontsize=8, loc="upper right")
    return fig


def save(fig: Any, path: str, dpi: int = 110) -> None:
    """Write ``fig`` as a PNG (or whatever the extension of ``path`` says)."""
    fig.savefig(path, dpi=dpi)
