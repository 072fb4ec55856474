"""A real TensorBoard server on 127.0.0.1 serves the documented tags, our layout and a PNG figure."""

from __future__ import annotations

import io
import urllib.parse
from types import SimpleNamespace

import matplotlib.image
import pytest
from google.protobuf import json_format
from tb_server import DOCUMENTED_SCALARS, tensorboard_server, write_documented_run
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_stablelr.tensorboard import (
    PathSegment,
    find_tensorboard_writer,
    pairwise_heatmap,
    path_figure,
    stability_layout,
    write_figure,
    write_layout_once,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN = "lightning_logs/version_0"


def _frontend_regex(chart) -> str:
    # The custom-scalars frontend joins a multiline chart's regexes like this before asking the server.
    tags = list(chart.multiline.tag)
    return tags[0] if len(tags) == 1 else "|".join(f"({tag})" for tag in tags)


@pytest.mark.slow
def test_tensorboard_server_serves_documented_tags_layout_and_png(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    write_documented_run(tmp_path)
    # Figures and layout the way the monitor writes them: through the logger's writer on rank 0.
    logger = TensorBoardLogger(str(tmp_path), name="lightning_logs", version=0, default_hp_metric=False)
    writer = find_tensorboard_writer(SimpleNamespace(is_global_zero=True, loggers=[logger]))
    assert write_layout_once(writer) is True
    segments = [PathSegment(0, 1, (0.0, 0.5, 1.0), (1.0, 1.25, 0.75)),
                PathSegment(1, 2, (0.0, 0.5, 1.0), (0.75, 0.5, 0.5))]
    write_figure(writer, "connectivity/path", path_figure(segments), step=30)
    write_figure(writer, "connectivity/pairwise",
                 pairwise_heatmap([[float("nan"), 0.25], [float("nan"), float("nan")]], [1, 2]), step=30)
    writer.close()

    with tensorboard_server(tmp_path) as server:
        assert server.url == f"http://127.0.0.1:{server.port}/" and server.port > 0
        tags = server.wait_for(
            lambda s: (run := s.get_json("data/plugin/scalars/tags").get(RUN)) and set(DOCUMENTED_SCALARS) <= set(run)
            and run, "the documented scalar tags")
        assert set(tags) == set(DOCUMENTED_SCALARS)
        lr_head = server.get_json("data/plugin/scalars/scalars", run=RUN, tag="stablelr/lr-head")
        assert [(step, value) for _, step, value in lr_head] == sorted(DOCUMENTED_SCALARS["stablelr/lr-head"].items())

        listing = server.wait_for(lambda s: s.get_json("data/plugins_listing")["custom_scalars"]["enabled"] and
                                  s.get_json("data/plugins_listing"), "the custom-scalars plugin")
        assert listing["images"]["enabled"] is True
        layout = server.get_json("data/plugin/custom_scalars/layout")
        # The server prints default fields too (version 0, closed false): compare as protos.
        assert json_format.ParseDict(layout, layout_pb2.Layout()) == stability_layout()
        assert [category["title"] for category in layout["category"]] == [
            "Learning rate", "Stability", "Lyapunov", "Connectivity"]

        # The charts resolve on the server exactly as the frontend asks for them.
        categories = {category.title: category for category in stability_layout().category}
        # The log10 margin charts (lr against max stable lr, sharpness against threshold) render: same steps.
        for index in (0, 1):
            [log10] = categories["Stability"].chart[index].margin.series
            events = server.get_json("data/plugin/custom_scalars/scalars", run=RUN,
                                     tag=f"({log10.value})|({log10.upper})")["tag_to_events"]
            assert {tag: [event[1] for event in events[tag]] for tag in (log10.value, log10.upper)} == {
                log10.value: [10, 30], log10.upper: [10, 30]}
        [series] = categories["Connectivity"].chart[2].margin.series
        margin = server.get_json("data/plugin/custom_scalars/scalars", run=RUN,
                                 tag=f"({series.value})|({series.upper})")["tag_to_events"]
        # The margin chart renders only when value, lower and upper share their steps.
        steps = {tag: [event[1] for event in margin[tag]] for tag in (series.value, series.lower, series.upper)}
        assert steps == {tag: [10, 20, 30] for tag in steps}

        image_tags = server.wait_for(lambda s: s.get_json("data/plugin/images/tags").get(RUN), "the image tags")
        assert set(image_tags) == {"connectivity/path", "connectivity/pairwise"}
        [entry] = server.get_json("data/plugin/images/images", run=RUN, tag="connectivity/path")
        assert entry["step"] == 30
        png = server.get("data/plugin/images/individualImage", **dict(urllib.parse.parse_qsl(entry["query"])))
        assert png[:8] == PNG_SIGNATURE
        assert matplotlib.image.imread(io.BytesIO(png), format="png").shape[:2] == (320, 480)
    assert server.process.poll() is not None  # the server is stopped on exit
