"""Tests for lightning_stablelr.tensorboard: writer lookup, custom-scalars layout, figures."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tb_server import DOCUMENTED_SCALARS
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.tensorboard import SummaryWriter

from lightning_stablelr.tensorboard import (
    HEATMAP_MIN_SCALE,
    PathSegment,
    find_tensorboard_writer,
    pairwise_heatmap,
    path_figure,
    stability_layout,
    write_figure,
    write_layout_once,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYOUT_TAG = "custom_scalars__config__"


def _accumulator(log_dir: Path) -> ea.EventAccumulator:
    accumulator = ea.EventAccumulator(str(log_dir), size_guidance={ea.TENSORS: 0, ea.IMAGES: 0})
    accumulator.Reload()
    return accumulator


def _matches(chart: layout_pb2.Chart, tag: str) -> bool:
    # TensorBoard's server applies each multiline regex with re.match; margin series name exact tags.
    if chart.WhichOneof("content") == "margin":
        return any(tag in (s.value, s.lower, s.upper) for s in chart.margin.series)
    return any(re.match(pattern, tag) for pattern in chart.multiline.tag)


def _chart(layout: layout_pb2.Layout, category: str, index: int) -> layout_pb2.Chart:
    return next(c for c in layout.category if c.title == category).chart[index]


# ---------------------------------------------------------------------------------------------- layout


def test_layout_has_four_categories_in_order_and_round_trips():
    layout = stability_layout()
    assert [category.title for category in layout.category] == [
        "Learning rate", "Stability", "Lyapunov", "Connectivity"
    ]
    assert layout_pb2.Layout.FromString(layout.SerializeToString()) == layout


def test_layout_charts_name_the_documented_tags():
    layout = stability_layout()
    lr_chart = _chart(layout, "Learning rate", 0)
    for tag in ("stablelr/lr", "stablelr/lr-0", "stablelr/lr-head"):
        assert _matches(lr_chart, tag), tag
    for tag in ("stablelr/lrx", "stablelr/decay", "stablelr/lr_monitor"):
        assert not _matches(lr_chart, tag), tag
    # one tag per chart where TensorBoard would colour several alike (it colours by run)
    factors = [[t for t in DOCUMENTED_SCALARS if _matches(_chart(layout, "Learning rate", i), t)] for i in (1, 2, 3)]
    assert factors == [["stablelr/gap_factor"], ["stablelr/stability_factor"], ["stablelr/decay"]]
    # Stability: log10 margin charts, the line the quantity and the band up to its bound
    against, sharpness = _chart(layout, "Stability", 0), _chart(layout, "Stability", 1)
    assert [(s.value, s.lower, s.upper) for s in against.margin.series] == [
        ("lyapunov/log10_lr", "lyapunov/log10_lr", "lyapunov/log10_max_stable_lr")]
    assert [(s.value, s.lower, s.upper) for s in sharpness.margin.series] == [
        ("lyapunov/log10_sharpness", "lyapunov/log10_sharpness", "lyapunov/log10_stability_threshold")]
    stability = {t for chart in next(c for c in layout.category if c.title == "Stability").chart
                 for t in DOCUMENTED_SCALARS if _matches(chart, t)}
    assert stability == {"lyapunov/log10_lr", "lyapunov/log10_max_stable_lr", "lyapunov/log10_sharpness",
                         "lyapunov/log10_stability_threshold", "lyapunov/eos_ratio", "stablelr/step_margin",
                         "lyapunov/step_margin"}
    lyapunov = [[t for t in DOCUMENTED_SCALARS if _matches(chart, t)]
                for chart in next(c for c in layout.category if c.title == "Lyapunov").chart]
    assert lyapunov == [["lyapunov/delta_v"], ["lyapunov/certified_rate"],
                        ["lyapunov/ema_decrease"], ["lyapunov/val_decrease"]]


def test_connectivity_puts_dip_and_window_barrier_first_then_a_margin_chart():
    charts = next(c for c in stability_layout().category if c.title == "Connectivity").chart
    assert [list(chart.multiline.tag) for chart in charts[:2]] == [
        ["^connectivity/superlevel_dip$"], ["^connectivity/equiconnectedness$"]
    ]
    margin = charts[2]
    assert margin.WhichOneof("content") == "margin"
    assert [(s.value, s.lower, s.upper) for s in margin.margin.series] == [
        ("connectivity/barrier", "connectivity/barrier", "connectivity/equiconnectedness")
    ]
    # Margin series name logged tags; every one of them must be a documented metric.
    assert {"connectivity/barrier", "connectivity/equiconnectedness"} <= set(DOCUMENTED_SCALARS)


def test_write_layout_once_writes_exactly_one_layout_per_writer(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path / "a"))
    assert write_layout_once(writer) is True
    assert write_layout_once(writer) is False
    writer.close()
    events = _accumulator(tmp_path / "a").Tensors(LAYOUT_TAG)
    assert len(events) == 1
    assert layout_pb2.Layout.FromString(events[0].tensor_proto.string_val[0]) == stability_layout()
    other = SummaryWriter(log_dir=str(tmp_path / "b"))
    assert write_layout_once(other) is True
    other.close()


# ------------------------------------------------------------------------------------- writer lookup


def test_find_tensorboard_writer_returns_first_tensorboard_logger_on_rank_zero_only(tmp_path):
    from lightning.fabric.loggers import TensorBoardLogger as FabricTensorBoardLogger
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    csv = CSVLogger(str(tmp_path), name="csv")
    first = TensorBoardLogger(str(tmp_path), name="tb1")
    second = TensorBoardLogger(str(tmp_path), name="tb2")
    trainer = SimpleNamespace(is_global_zero=True, loggers=[csv, first, second])
    assert find_tensorboard_writer(trainer) is first.experiment
    assert isinstance(first.experiment, SummaryWriter)
    assert find_tensorboard_writer(SimpleNamespace(is_global_zero=False, loggers=[first])) is None
    assert find_tensorboard_writer(SimpleNamespace(is_global_zero=True, loggers=[csv])) is None
    assert find_tensorboard_writer(SimpleNamespace(is_global_zero=True, loggers=[])) is None
    fabric_logger = FabricTensorBoardLogger(str(tmp_path / "fabric"))
    fabric = SimpleNamespace(is_global_zero=True, loggers=[fabric_logger])
    assert find_tensorboard_writer(fabric) is fabric_logger.experiment


def test_find_tensorboard_writer_on_a_real_trainer(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    tensorboard = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = L.Trainer(logger=[CSVLogger(str(tmp_path)), tensorboard], accelerator="cpu", devices=1,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    assert find_tensorboard_writer(trainer) is tensorboard.experiment
    no_tensorboard = L.Trainer(logger=False, accelerator="cpu", devices=1, enable_progress_bar=False,
                               enable_model_summary=False, enable_checkpointing=False)
    assert find_tensorboard_writer(no_tensorboard) is None


# --------------------------------------------------------------------------------------------- figures


def test_path_figure_plots_one_labelled_line_per_segment():
    segments = [PathSegment(0, 1, (0.0, 0.5, 1.0), (1.0, 1.25, 0.75)),
                (1, 2, [0.0, 0.5, 1.0], [0.75, 0.5, 0.5])]
    fig = path_figure(segments)
    assert fig.get_dpi() == 100 and tuple(fig.get_size_inches()) == (4.8, 3.2)
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["epoch 0 \u2192 1", "epoch 1 \u2192 2"]
    assert [list(line.get_xdata()) for line in lines] == [[0.0, 0.5, 1.0]] * 2
    assert [list(line.get_ydata()) for line in lines] == [[1.0, 1.25, 0.75], [0.75, 0.5, 0.5]]
    assert fig.axes[0].get_xlim() == (0.0, 1.0)


def test_path_figure_rejects_bad_segments_with_clear_messages():
    with pytest.raises(ValueError, match=re.escape("`segments` must hold at least one segment")):
        path_figure([])
    with pytest.raises(ValueError, match=re.escape(
            "`segments[1]` must have as many alphas as losses (at least 2), got 3 alphas and 2 losses.")):
        path_figure([(0, 1, [0, 0.5, 1], [1, 2, 3]), (1, 2, [0, 0.5, 1], [1, 2])])
    with pytest.raises(ValueError, match=re.escape("`segments[0]` must be a PathSegment or a tuple")):
        path_figure([(0, 1)])


def _pixel(fig: Figure, ax, x: float, y: float) -> tuple[int, ...]:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    px, py = ax.transData.transform((x, y))
    return tuple(int(v) for v in rgba[rgba.shape[0] - round(py), round(px)])


def test_pairwise_heatmap_leaves_nan_cells_blank_and_annotates_finite_ones():
    nan = math.nan
    matrix = [[nan, 0.25, 0.5], [nan, nan, 0.125], [nan, nan, nan]]
    fig = pairwise_heatmap(matrix, labels=[3, 4, 5])
    ax = fig.axes[0]
    shown = ax.images[0].get_array()
    assert shown.mask.tolist() == np.isnan(np.asarray(matrix)).tolist()
    assert sorted(text.get_text() for text in ax.texts) == ["0.12", "0.25", "0.5"]
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["3", "4", "5"]
    assert ax.images[0].get_clim() == (0.0, 0.5)
    # A NaN cell renders as the white figure background; a measured cell does not.
    assert _pixel(fig, ax, 0.0, 2.0)[:3] == (255, 255, 255)
    assert _pixel(fig, ax, 2.0, 0.0)[:3] != (255, 255, 255)


def test_pairwise_heatmap_keeps_float_noise_dark():
    # barriers of 2e-8 between near-identical snapshots: the scale still reaches HEATMAP_MIN_SCALE
    fig = pairwise_heatmap([[0.0, 2e-8], [1e-8, 0.0]], labels=[0, 1])
    image = fig.axes[0].images[0]
    assert image.get_clim() == (0.0, HEATMAP_MIN_SCALE)
    r, g, b, _ = image.cmap(image.norm(2e-8))
    assert (r, g, b) == pytest.approx(image.cmap(0.0)[:3], abs=1e-2)  # the colour of 0, not viridis' yellow


def test_path_figure_y_tick_labels_fit_inside_the_figure():
    fig = path_figure([(0, 1, (0.0, 0.5, 1.0), (2.30512, 2.30531, 2.30498))])
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    labels = [label for label in fig.axes[0].get_yticklabels() if label.get_text()]
    assert labels and all(label.get_window_extent(renderer).x0 >= 0 for label in labels)
    assert fig.axes[0].yaxis.get_label().get_window_extent(renderer).x0 >= 0


def test_pairwise_heatmap_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=re.escape(
            "`matrix` must have shape (3, 3) to match len(labels)=3, got shape (2, 3).")):
        pairwise_heatmap(np.zeros((2, 3)), labels=[0, 1, 2])
    with pytest.raises(ValueError, match=re.escape("`len(labels)` must be an integer >= 1, got 0.")):
        pairwise_heatmap(np.zeros((0, 0)), labels=[])


def test_write_figure_writes_a_png_image_event_caps_dpi_and_clears_the_figure(tmp_path):
    import matplotlib.pyplot as plt

    open_before = plt.get_fignums()
    writer = SummaryWriter(log_dir=str(tmp_path))
    path = path_figure([PathSegment(0, 1, (0.0, 0.5, 1.0), (1.0, 1.25, 0.75))])
    write_figure(writer, "connectivity/path", path, step=7)
    big = Figure(figsize=(2.0, 1.0), dpi=300)
    big.add_subplot().plot([0, 1], [1, 0])
    write_figure(writer, "connectivity/pairwise", big, step=9)
    accumulator = _accumulator(tmp_path)  # write_figure flushed: readable before close()
    assert accumulator.Tags()["images"] == ["connectivity/path", "connectivity/pairwise"]
    [image] = accumulator.Images("connectivity/path")
    assert (image.step, image.width, image.height) == (7, 480, 320)
    assert image.encoded_image_string.startswith(PNG_SIGNATURE)
    [capped] = accumulator.Images("connectivity/pairwise")
    assert (capped.step, capped.width, capped.height) == (9, 200, 100)
    assert path.axes == [] and big.axes == []
    assert plt.get_fignums() == open_before  # nothing registered with pyplot
    writer.close()


def test_write_figure_rejects_a_negative_step(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path))
    with pytest.raises(ValueError, match=re.escape("`step` must be an integer >= 0, got -1.")):
        write_figure(writer, "connectivity/path", Figure(), step=-1)
    writer.close()


def test_tensorboard_and_report_modules_do_not_import_lightning_or_pyplot():
    code = ("import sys, lightning_stablelr.tensorboard, lightning_stablelr.report, lightning_stablelr.cli; "
            "print(sorted(m for m in ('lightning', 'matplotlib.pyplot', 'hydra') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_learning_rate_category_shows_why_the_guard_moved_c_one_tag_per_chart():
    layout = stability_layout()
    guard_tags = ["stablelr/robust_margin", "stablelr/guard_overshoot", "stablelr/guard_recovery",
                  "stablelr/guard_boost", "stablelr/guard_nonfinite", "stablelr/guard_unresolved"]
    charts = [list(_chart(layout, "Learning rate", i).multiline.tag) for i in range(4, 10)]
    assert charts == [[f"^{tag}$"] for tag in guard_tags]
