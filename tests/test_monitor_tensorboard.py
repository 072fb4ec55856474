"""A real short training run with StabilityMonitor, read back by a real TensorBoard server and `stablelr report`.

One run (module-scoped fixture) with a TensorBoardLogger: the server must list every documented
monitor tag, serve our custom-scalars layout and return a PNG for ``connectivity/path``; ``stablelr
report`` must print exactly the values stored in the event files and write a valid dashboard PNG.
A second, tiny run with only a CSVLogger says once that figures are skipped and still logs the scalars.
"""

from __future__ import annotations

import io
import json
import logging
import math
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import matplotlib.image
import pytest
import torch
from google.protobuf import json_format
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tb_server import tensorboard_server
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.data import DataLoader, TensorDataset

from lightning_stablelr.callbacks.monitor import StabilityMonitor
from lightning_stablelr.cli import main as stablelr_main
from lightning_stablelr.tensorboard import stability_layout
from tests.helpers import TinyClassifier, make_trainer
from tests.test_monitor_support import single_thread  # noqa: F401  (autouse: one torch thread)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN = "lightning_logs/version_0"
MONITOR_TAGS = {
    "lyapunov/delta_v", "lyapunov/decrease", "lyapunov/first_order", "lyapunov/curvature",
    "lyapunov/step_margin", "lyapunov/taylor_error", "lyapunov/certified_rate", "lyapunov/ema_decrease",
    "lyapunov/val_decrease", "lyapunov/sharpness", "lyapunov/stability_threshold", "lyapunov/eos_ratio",
    "lyapunov/max_stable_lr", "connectivity/barrier", "connectivity/sublevel_excess",
    "connectivity/superlevel_dip", "connectivity/connected", "connectivity/equiconnectedness",
    "monitor/deferred_probes", "monitor/overhead",
}  # fmt: skip


def _loaders() -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(80, 4, generator=generator)
    y = torch.randint(0, 3, (80,), generator=generator)
    return (DataLoader(TensorDataset(x[:48], y[:48]), batch_size=8),
            DataLoader(TensorDataset(x[48:], y[48:]), batch_size=8))


def _monitor() -> StabilityMonitor:
    return StabilityMonitor(
        certificate_every_n_steps=2, sharpness_every_n_steps=3, sharpness_iters=5, connectivity_every_n_epochs=1,
        connectivity_batches=2, bn_recalibration_batches=2, certificate_window=3, connectivity_window=3, max_overhead=math.inf,
    )


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Iterator[Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on 2 shared cores: more threads only contend
    root = tmp_path_factory.mktemp("monitor_tb")
    L.seed_everything(0, verbose=False)
    logger = TensorBoardLogger(str(root), name="lightning_logs", version=0, default_hp_metric=False)
    trainer = make_trainer(root, max_epochs=3, logger=logger, callbacks=[_monitor()], log_every_n_steps=1)
    trainer.fit(TinyClassifier(seed=1), *_loaders())
    yield root
    torch.set_num_threads(threads)


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    [event_file] = run_dir.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@pytest.mark.slow
def test_tensorboard_server_serves_the_monitor_tags_layout_and_path_figure(run_root: Path):
    with tensorboard_server(run_root) as server:
        tags = server.wait_for(
            lambda s: (run := s.get_json("data/plugin/scalars/tags").get(RUN)) and set(run) >= MONITOR_TAGS and run,
            "the monitor's scalar tags",
        )
        assert set(tags) >= MONITOR_TAGS
        certified = server.get_json("data/plugin/scalars/scalars", run=RUN, tag="lyapunov/certified_rate")
        expected = _scalars(run_root / RUN)["lyapunov/certified_rate"]
        assert [(step, value) for _, step, value in certified] == expected
        assert [step for step, _ in expected] == [1, 3, 5, 7, 9, 11, 13, 15, 17]  # steps n-1, 2n-1, ...

        layout = server.wait_for(lambda s: s.get_json("data/plugin/custom_scalars/layout"), "the layout")
        assert json_format.ParseDict(layout, layout_pb2.Layout()) == stability_layout()

        image_tags = server.wait_for(lambda s: s.get_json("data/plugin/images/tags").get(RUN), "the image tags")
        assert set(image_tags) == {"connectivity/path", "connectivity/pairwise"}
        entries = server.get_json("data/plugin/images/images", run=RUN, tag="connectivity/path")
        assert [entry["step"] for entry in entries] == [12, 18]  # end of epochs 1 and 2 (6 steps per epoch)
        png = server.get("data/plugin/images/individualImage", **dict(urllib.parse.parse_qsl(entries[-1]["query"])))
        assert png[:8] == PNG_SIGNATURE
        assert matplotlib.image.imread(io.BytesIO(png), format="png").shape[:2] == (320, 480)


@pytest.mark.slow
def test_stablelr_report_prints_the_values_stored_in_the_events(run_root: Path, tmp_path: Path, capsys):
    run_dir = run_root / RUN
    scalars = _scalars(run_dir)

    def last(tag: str) -> float:
        return scalars[tag][-1][1]

    assert stablelr_main(["report", str(run_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    certified = [value for _, value in scalars["lyapunov/certified_rate"]]
    assert summary["certified_rate"] == {"last": last("lyapunov/certified_rate"),
                                         "mean": pytest.approx(sum(certified) / len(certified), rel=1e-12)}
    worst_value, worst_step = max((value, step) for step, value in scalars["connectivity/barrier"])
    assert summary["barrier"] == {"worst": worst_value, "worst_step": worst_step}
    assert summary["equiconnectedness"] == {
        "last": last("connectivity/equiconnectedness"),
        "max": max(value for _, value in scalars["connectivity/equiconnectedness"]),
    }
    assert summary["sharpness"] == {
        "last": last("lyapunov/sharpness"), "threshold": last("lyapunov/stability_threshold"),
        "max_eos_ratio": max(value for _, value in scalars["lyapunov/eos_ratio"]),
    }
    assert summary["max_stable_lr"] == {"last": last("lyapunov/max_stable_lr")}
    assert summary["overhead"] == {"last": last("monitor/overhead"), "deferred_probes": 0.0, "budget": None}
    assert summary["val_loss"] == last("val_loss")

    png = tmp_path / "dashboard.png"
    assert stablelr_main(["report", str(run_dir), "--png", str(png)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[-1] == f"dashboard written to {png}"
    lines = table.splitlines()
    rows = dict(line.split("  ", 1) for line in lines[lines.index("") + 3:-1])  # the table follows the verdict
    rows = {label.strip(): value.strip() for label, value in rows.items()}
    assert rows["certified rate (last / mean)"] == (
        f"{last('lyapunov/certified_rate'):.4g} / {sum(certified) / len(certified):.4g}")
    assert rows["sharpness vs threshold (last)"] == (
        f"{last('lyapunov/sharpness'):.4g} vs {last('lyapunov/stability_threshold'):.4g}")
    assert rows["worst consecutive barrier"] == f"{worst_value:.4g} (step {worst_step})"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    height, width = matplotlib.image.imread(png, format="png").shape[:2]
    assert height > 100 and width > 100


def test_without_tensorboard_the_figures_are_skipped_with_one_message(tmp_path: Path, caplog):
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    monitor = StabilityMonitor(certificate_every_n_steps=3, sharpness_every_n_steps=0, connectivity_every_n_epochs=1,
                               connectivity_batches=1, bn_recalibration_batches=1, max_overhead=math.inf)
    trainer = make_trainer(tmp_path, max_epochs=2, logger=logger, callbacks=[monitor], log_every_n_steps=1)
    # Other tests (Hydra, LightningCLI) may stop Lightning's loggers from propagating to the root
    # logger that caplog listens on, so listen on the rank-zero logger itself.
    rank_zero_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger=rank_zero_logger.name):
            trainer.fit(TinyClassifier(seed=1), *_loaders())
    finally:
        rank_zero_logger.removeHandler(caplog.handler)
    records = {id(record): record for record in caplog.records}.values()  # seen once per handler path
    notices = [r.getMessage() for r in records if "figures" in r.getMessage()]
    assert notices == [
        "StabilityMonitor: no TensorBoardLogger, so the figures connectivity/path and connectivity/pairwise are"
        " skipped; the scalars still go to every logger."
    ]
    header, *lines = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    columns = header.split(",")
    barrier = [line.split(",")[columns.index("connectivity/barrier")] for line in lines]
    assert [value for value in barrier if value] == [str(monitor.last_report.consecutive.barrier)]
