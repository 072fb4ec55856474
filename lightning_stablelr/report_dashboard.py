"""The one-page PNG of ``stablelr report --png``: six panels, the verdict on top, the overfitting step marked.

Pure (no Lightning import); ``matplotlib.figure.Figure`` only, so the user's pyplot backend is untouched.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from lightning_stablelr.report import (
    _LR_TAG,
    _TRAIN_LOSS_TAGS,
    _VAL_LOSS_TAGS,
    ReportError,
    RunScalars,
    _first_present,
)
from lightning_stablelr.report_verdict import diagnose, monitor_budget
from lightning_stablelr.validation import check_in_range

__all__ = ["write_dashboard"]

# Bounds and window maxima are drawn dashed so that the quantity they bound stands out.
_DASHED = frozenset({"lyapunov/max_stable_lr", "lyapunov/stability_threshold", "connectivity/equiconnectedness"})
#: Series with at most this many points are drawn with markers (a single point has no line to show).
_MARKED_UP_TO = 5


def _panel(ax: Any, run: RunScalars, tags: Sequence[str], title: str, ylabel: str, *, log_y: bool = False,
           mark: int | None = None) -> None:
    plotted = [tag for tag in tags if run.scalars.get(tag)]
    for tag in plotted:
        steps = run.steps(tag)
        # A line needs two points: a series with few (one sharpness probe, one certificate) shows its markers.
        ax.plot(steps, run.values(tag), label=tag, linewidth=1.0, linestyle="--" if tag in _DASHED else "-",
                marker="o" if len(steps) <= _MARKED_UP_TO else None, markersize=3)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("optimizer step", fontsize=7)
    ax.set_ylabel(ylabel, fontsize=7)
    ax.tick_params(labelsize=7)
    if not plotted:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        return
    values = [value for tag in plotted for value in run.values(tag) if math.isfinite(value)]
    if log_y and values and min(values) > 0:
        ax.set_yscale("log")
    if mark is not None:
        ax.axvline(mark, color="tab:red", linewidth=0.8, linestyle=":", label=f"overfitting began (step {mark})")
    ax.legend(fontsize=6, loc="best")


def write_dashboard(run: RunScalars, path: str | Path, *, dpi: int = 100) -> Path:
    """Write a one-page PNG (1200 x 760 px at 100 dpi) with the verdict and six panels; return its path.

    Top: the verdict of :func:`~lightning_stablelr.report_verdict.diagnose` (headline and findings). Panels:
    learning rate(s) with the max stable lr, gap and factors, delta_v and certified rate, barrier / dip /
    equiconnectedness, sharpness against threshold, train and validation loss; every panel has axis labels,
    and a dotted red line marks the step where overfitting began (the first cut of G) when there was one.
    Raises :class:`ReportError` when ``path`` cannot be written, ``ValueError`` when ``dpi`` is not in [10, 100].
    """
    dpi = check_in_range("dpi", dpi, 10, 100, hint="Dashboards stay small: at most 100 dpi.")
    out = Path(path)
    if not out.parent.is_dir():
        # Checked before drawing: rendering six panels is the expensive part.
        raise ReportError(f"cannot write the dashboard to '{out}': directory '{out.parent}' does not exist. "
                          "Pass --png a file path in an existing, writable directory.")
    verdict = diagnose(run, monitor_budget(run.run_dir))
    lr_tags = [tag for tag in run.tags() if _LR_TAG.match(tag)]
    train_tag = _first_present(run, _TRAIN_LOSS_TAGS)
    val_tag = _first_present(run, _VAL_LOSS_TAGS)
    # Fixed margins (constrained layout would double the rendering time), wide enough for log-scale tick
    # labels such as 1e-04 on the left and the two-line verdict on top.
    fig = Figure(figsize=(12, 7.6), dpi=dpi)
    axes = fig.subplots(2, 3, gridspec_kw={"left": 0.065, "right": 0.99, "bottom": 0.07, "top": 0.76,
                                           "wspace": 0.28, "hspace": 0.38})
    fig.text(0.01, 0.99, f"stablelr report: {run.run_dir}", fontsize=9, va="top", color="dimgrey")
    text = "\n".join([textwrap.fill(f"verdict: {verdict.headline}", 150),
                      *(textwrap.fill(f"- {finding}", 160, subsequent_indent="  ") for finding in verdict.findings)])
    fig.text(0.01, 0.965, text, fontsize=8, va="top", family="monospace")
    mark = verdict.overfit_step
    _panel(axes[0, 0], run, [*lr_tags, "lyapunov/max_stable_lr"], "learning rate vs max stable lr", "lr",
           log_y=True, mark=mark)
    _panel(axes[0, 1], run, ["stablelr/gap", "stablelr/gap_factor", "stablelr/stability_factor",
                             "stablelr/decay"], "gap and factors", "factor / relative gap", mark=mark)
    _panel(axes[0, 2], run, ["lyapunov/delta_v", "lyapunov/certified_rate"], "Lyapunov: delta_v, certified rate",
           "loss change / rate")
    _panel(axes[1, 0], run, ["connectivity/barrier", "connectivity/superlevel_dip",
                             "connectivity/equiconnectedness"], "connectivity", "loss barrier")
    _panel(axes[1, 1], run, ["lyapunov/sharpness", "lyapunov/stability_threshold"],
           "sharpness vs threshold", "eigenvalue", log_y=True)
    _panel(axes[1, 2], run, [tag for tag in (train_tag, val_tag) if tag], "loss", "loss", mark=mark)
    try:
        fig.savefig(out, format="png", dpi=dpi)
    except OSError as error:
        raise ReportError(f"cannot write the dashboard to '{out}': {error}. "
                          "Pass --png a file path in an existing, writable directory.") from None
    finally:
        fig.clear()
    return out
