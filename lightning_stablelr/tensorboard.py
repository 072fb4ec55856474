"""TensorBoard integration: writer lookup, the custom-scalars layout and the connectivity figures.

Only rank 0 writes, and only where a TensorBoard writer exists (scalars themselves go to every
Lightning logger and are not written here). The module imports neither ``lightning`` at import time
nor ``matplotlib.pyplot``: figures are plain :class:`matplotlib.figure.Figure` objects rendered by the
Agg canvas, so writing them never changes the user's global matplotlib backend.

.. code-block:: python

    writer = find_tensorboard_writer(trainer)          # None off rank 0 or without TensorBoardLogger
    if writer is not None:
        write_layout_once(writer)
        write_figure(writer, "connectivity/path", path_figure(segments), step=trainer.global_step)
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_stablelr.validation import check_int_at_least

__all__ = [
    "HEATMAP_MIN_SCALE",
    "LAYOUT_CATEGORIES",
    "LR_TAG_REGEX",
    "MAX_FIGURE_DPI",
    "PathSegment",
    "find_tensorboard_writer",
    "layout_as_dict",
    "pairwise_heatmap",
    "path_figure",
    "stability_layout",
    "write_figure",
    "write_layout_once",
]

#: Figures are written at most at this resolution (dots per inch) to keep event files small.
MAX_FIGURE_DPI = 100

#: The pairwise heat map's colour scale reaches at least this barrier (loss units), so that float noise
#: (barriers of 1e-8 between near-identical snapshots) stays dark instead of filling the scale.
HEATMAP_MIN_SCALE = 1e-3

#: Matches ``stablelr/lr`` (one param group) and ``stablelr/lr-{name or index}`` (several groups).
#: Multiline charts take regular expressions, which the server applies with ``re.match`` (anchored
#: at the start only), hence the explicit ``$``: ``stablelr/lr`` must not also match other tags.
LR_TAG_REGEX = r"^stablelr/lr(-.+)?$"


def _exact(tag: str) -> str:
    return f"^{tag}$"


# (category title, ((chart title, "multiline", tag regexes) | (chart title, "margin", (value, lower, upper))))
# Connectivity lists the dip and the window barrier first: DESIGN.md measured that they, not the
# consecutive barrier, separate stable from unstable training.
LAYOUT_CATEGORIES: tuple[tuple[str, tuple[tuple[str, str, tuple[str, ...]], ...]], ...] = (
    (
        "Learning rate",
        (
            ("learning rate (stablelr/lr*)", "multiline", (LR_TAG_REGEX,)),
            # one chart per factor: TensorBoard colours by run, so three tags in one chart look alike
            ("gap factor G (< 1: cut against overfitting)", "multiline", (_exact("stablelr/gap_factor"),)),
            ("stability factor C (< 1: the guard cut an overshooting step; > 1: it raised a too-small lr)", "multiline",
             (_exact("stablelr/stability_factor"),)),
            ("time decay exp(-lambda t)", "multiline", (_exact("stablelr/decay"),)),
            # why C moved: the robust margin it follows, then cumulative counts per reason (the slope is how often)
            ("robust margin M: C follows it (held inside [1/safety, recover_above], default [4, 8])", "multiline",
             (_exact("stablelr/robust_margin"),)),
            ("overshoot cuts (cumulative)", "multiline", (_exact("stablelr/guard_overshoot"),)),
            ("recoveries (cumulative)", "multiline", (_exact("stablelr/guard_recovery"),)),
            ("boosts of a too-small lr (cumulative)", "multiline", (_exact("stablelr/guard_boost"),)),
            ("non-finite steps dropped (cumulative)", "multiline", (_exact("stablelr/guard_nonfinite"),)),
            ("checks skipped: losses within rounding, e.g. bf16 (cumulative)", "multiline",
             (_exact("stablelr/guard_unresolved"),)),
        ),
    ),
    (
        "Stability",
        (
            # log10 margin charts (chart_tags.py): the line is the quantity, the band reaches up to its bound,
            # readable at TensorBoard's defaults (linear axis, outliers clipped, one colour per run).
            ("log10 lr (line) and headroom band up to log10 max stable lr", "margin",
             ("lyapunov/log10_lr", "lyapunov/log10_lr", "lyapunov/log10_max_stable_lr")),
            ("log10 sharpness (line) and band up to log10 stability threshold", "margin",
             ("lyapunov/log10_sharpness", "lyapunov/log10_sharpness", "lyapunov/log10_stability_threshold")),
            ("edge-of-stability ratio: sharpness / threshold (< 1 is stable)", "multiline",
             (_exact("lyapunov/eos_ratio"),)),
            ("step margin s_max, StableLR's probe (the step taken is s = 1)", "multiline",
             (_exact("stablelr/step_margin"),)),
            ("step margin s_max, the monitor's certificate", "multiline", (_exact("lyapunov/step_margin"),)),
        ),
    ),
    (
        "Lyapunov",
        (
            ("delta_v = L+ - L0 (<= 0: the step decreased V)", "multiline", (_exact("lyapunov/delta_v"),)),
            ("certified rate over the window", "multiline", (_exact("lyapunov/certified_rate"),)),
            ("EMA decrease (1: the training-loss EMA fell over the window)", "multiline",
             (_exact("lyapunov/ema_decrease"),)),
            ("validation decrease (1: val loss fell since the last validation)", "multiline",
             (_exact("lyapunov/val_decrease"),)),
        ),
    ),
    (
        "Connectivity",
        (
            ("superlevel dip (> tol: iterates jump across a valley)", "multiline",
             (_exact("connectivity/superlevel_dip"),)),
            ("equiconnectedness: largest barrier in the window", "multiline",
             (_exact("connectivity/equiconnectedness"),)),
            # A margin series names three logged tags (no constants) whose steps must be identical,
            # or TensorBoard shows "steps mismatch" instead of the chart. barrier >= 0 by construction
            # (the segment's endpoints are sampled), so the band from the latest barrier up to the
            # window maximum is the part of [0, equiconnectedness] that carries information.
            ("consecutive barrier, band up to the window max", "margin",
             ("connectivity/barrier", "connectivity/barrier", "connectivity/equiconnectedness")),
        ),
    ),
)


def find_tensorboard_writer(trainer: Any) -> Any | None:
    """Return the ``SummaryWriter`` of the first TensorBoard logger, on global rank 0 only.

    Contract: ``trainer`` is a Lightning ``Trainer`` or ``Fabric`` (anything with ``is_global_zero``
    and ``loggers``). Returns ``logger.experiment`` of the first entry of ``trainer.loggers`` that is a
    Lightning ``TensorBoardLogger`` (PyTorch or Fabric flavour), or ``None`` when ``is_global_zero`` is
    false or no such logger exists. Lightning is imported here, not at module import.
    """
    if not getattr(trainer, "is_global_zero", False):
        return None
    from lightning.fabric.loggers import TensorBoardLogger as FabricTensorBoardLogger
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in getattr(trainer, "loggers", None) or ():
        if isinstance(logger, (TensorBoardLogger, FabricTensorBoardLogger)):
            return logger.experiment
    return None


def stability_layout() -> layout_pb2.Layout:
    """Return the custom-scalars layout proto: four categories, built from :data:`LAYOUT_CATEGORIES`.

    Categories, in order: "Learning rate", "Stability", "Lyapunov", "Connectivity". Multiline charts
    hold tag regular expressions, one tag each where TensorBoard would draw several in one colour. Margin
    charts draw a line with a band and need their three tags at identical steps: the two Stability ones use
    the log10 tags of :mod:`lightning_stablelr.chart_tags`; the Connectivity one plots
    ``connectivity/barrier`` with a band up to ``connectivity/equiconnectedness``.
    """
    layout = layout_pb2.Layout()
    for category_title, charts in LAYOUT_CATEGORIES:
        category = layout.category.add(title=category_title)
        for chart_title, kind, tags in charts:
            chart = category.chart.add(title=chart_title)
            if kind == "margin":
                value, lower, upper = tags
                chart.margin.series.add(value=value, lower=lower, upper=upper)
            else:
                chart.multiline.tag.extend(tags)
    return layout


def layout_as_dict(layout: layout_pb2.Layout) -> dict[str, dict[str, list[Any]]]:
    """Convert a layout proto to ``SummaryWriter.add_custom_scalars``'s dict format.

    ``{category: {chart: ["Multiline", [regex, ...]] | ["Margin", [value, lower, upper]]}}``; the
    writer rebuilds the identical proto from it (dicts keep insertion order). Only one series per
    margin chart and unique chart titles per category are representable, which our layout respects.
    """
    result: dict[str, dict[str, list[Any]]] = {}
    for category in layout.category:
        charts: dict[str, list[Any]] = {}
        for chart in category.chart:
            if chart.WhichOneof("content") == "margin":
                if len(chart.margin.series) != 1:
                    raise ValueError(
                        f"`layout` chart {chart.title!r} has {len(chart.margin.series)} margin series; "
                        "add_custom_scalars accepts exactly 1. Split it into one chart per series."
                    )
                series = chart.margin.series[0]
                charts[chart.title] = ["Margin", [series.value, series.lower, series.upper]]
            else:
                charts[chart.title] = ["Multiline", list(chart.multiline.tag)]
        result[category.title] = charts
    return result


# Writers that already hold the layout. Weak, so that a closed writer is not kept alive by us.
_LAYOUT_WRITTEN: weakref.WeakSet[Any] = weakref.WeakSet()


def write_layout_once(writer: Any) -> bool:
    """Write :func:`stability_layout` to ``writer`` unless it was already written to this writer.

    Returns ``True`` when it wrote (then flushes), ``False`` when this writer already had it.
    ``add_custom_scalars`` may only be called once per writer, hence the per-writer bookkeeping.
    """
    if writer in _LAYOUT_WRITTEN:
        return False
    writer.add_custom_scalars(layout_as_dict(stability_layout()))
    writer.flush()
    _LAYOUT_WRITTEN.add(writer)
    return True


@dataclass(frozen=True)
class PathSegment:
    """The loss along one straight segment between the snapshots of two epochs.

    ``losses[i]`` is L((1 - alphas[i]) * theta_a + alphas[i] * theta_b), with ``alphas`` from 0 to 1.
    """

    epoch_a: int
    epoch_b: int
    alphas: tuple[float, ...]
    losses: tuple[float, ...]


def _as_segment(segment: Any, index: int) -> PathSegment:
    if not isinstance(segment, PathSegment):
        try:
            epoch_a, epoch_b, alphas, losses = segment
        except (TypeError, ValueError):
            raise ValueError(
                f"`segments[{index}]` must be a PathSegment or a tuple (epoch_a, epoch_b, alphas, losses), "
                f"got {segment!r}."
            ) from None
        segment = PathSegment(int(epoch_a), int(epoch_b), tuple(map(float, alphas)), tuple(map(float, losses)))
    if len(segment.alphas) != len(segment.losses) or len(segment.alphas) < 2:
        raise ValueError(
            f"`segments[{index}]` must have as many alphas as losses (at least 2), got "
            f"{len(segment.alphas)} alphas and {len(segment.losses)} losses."
        )
    return segment


def path_figure(segments: Sequence[PathSegment | tuple], *, title: str = "loss along the path") -> Figure:
    """Plot the loss along each segment: x = alpha in [0, 1], one line per pair, labelled ``a -> b``.

    Contract: ``segments`` is a non-empty sequence of :class:`PathSegment` (or 4-tuples
    ``(epoch_a, epoch_b, alphas, losses)``); returns a small (4.8 x 3.2 in, 100 dpi) Figure that
    is not registered with pyplot.
    """
    parsed = [_as_segment(segment, index) for index, segment in enumerate(segments)]
    if not parsed:
        raise ValueError("`segments` must hold at least one segment, got an empty sequence.")
    # Fixed margins instead of constrained layout: figures are drawn during training, and the
    # layout solver costs as much as the drawing itself.
    fig = Figure(figsize=(4.8, 3.2), dpi=MAX_FIGURE_DPI)
    # left margin for y tick labels such as 2.305; %.4g keeps them short (no offset text above the axis)
    fig.subplots_adjust(left=0.17, right=0.97, bottom=0.15, top=0.9)
    ax = fig.add_subplot()
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.4g"))
    for segment in parsed:
        ax.plot(segment.alphas, segment.losses, marker="o", markersize=3,
                label=f"epoch {segment.epoch_a} \u2192 {segment.epoch_b}")
    ax.set_xlabel("alpha (0: older snapshot, 1: newer)")
    ax.set_ylabel("loss")
    ax.set_xlim(0.0, 1.0)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return fig


def pairwise_heatmap(matrix: Any, labels: Sequence[Any], *, title: str = "pairwise barrier") -> Figure:
    """Draw the k x k matrix of pairwise barriers; NaN cells (pairs not measured) stay blank.

    Contract: ``matrix`` is array-like of shape (k, k) with ``k == len(labels)`` >= 1; ``labels`` name
    the snapshots (e.g. epochs). Finite cells are annotated with their value when k <= 10. The colour scale
    runs from 0 to ``max(largest barrier, HEATMAP_MIN_SCALE)``.
    """
    values = np.asarray(matrix, dtype=float)
    check_int_at_least("len(labels)", len(labels), 1, "Pass one label per snapshot.")
    k = len(labels)
    if values.shape != (k, k):
        raise ValueError(
            f"`matrix` must have shape ({k}, {k}) to match len(labels)={k}, got shape {values.shape}."
        )
    fig = Figure(figsize=(4.0, 3.4), dpi=MAX_FIGURE_DPI)
    fig.subplots_adjust(left=0.12, right=0.95, bottom=0.1, top=0.9)
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(values)
    cmap = colormaps["viridis"].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    finite = values[np.isfinite(values)]
    vmax = max(float(finite.max()) if finite.size else 0.0, HEATMAP_MIN_SCALE)
    image = ax.imshow(masked, cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ticks = list(range(k))
    ax.set_xticks(ticks, [str(label) for label in labels], fontsize=7)
    ax.set_yticks(ticks, [str(label) for label in labels], fontsize=7)
    ax.set_xlabel("snapshot", fontsize=7)
    ax.set_ylabel("snapshot", fontsize=7)
    ax.set_title(title, fontsize=9)
    if k <= 10:
        for row in range(k):
            for col in range(k):
                if math.isfinite(values[row, col]):
                    ax.text(col, row, f"{values[row, col]:.2g}", ha="center", va="center", fontsize=6,
                            color="white" if values[row, col] < 0.6 * vmax else "black")
    return fig


def write_figure(writer: Any, tag: str, fig: Figure, step: int) -> None:
    """Write ``fig`` as an image event ``tag`` at ``step``, then close the figure and flush the writer.

    The figure is rendered by the Agg canvas at ``min(fig.dpi, MAX_FIGURE_DPI)`` dpi. The figure is
    cleared even when writing fails, so that a failing writer cannot leak figures.
    """
    check_int_at_least("step", step, 0, "Pass the trainer's global_step.")
    try:
        if fig.get_dpi() > MAX_FIGURE_DPI:
            fig.set_dpi(MAX_FIGURE_DPI)
        writer.add_figure(tag, fig, global_step=step, close=True)
        writer.flush()
    finally:
        fig.clear()
