"""DDP on 2 CPU processes (gloo): identical numbers on every rank, one writer, no hang when a probe fails.

The script below runs two fits with ``strategy="ddp"`` (Lightning relaunches it as the second rank).
Each rank keeps a :class:`RecordingLogger` (not rank-zero-only) and dumps what the monitor gave it:

1. every probe on, a TensorBoard logger: every certificate, sharpness and connectivity value must be
   identical on both ranks although their data shards (and so their own training losses) differ, and
   only one event file may contain the figures;
2. the connectivity probe raises on rank 1 only and the governor budget is tiny: training must finish
   on both ranks, the failure is counted on both and explained by rank 1, and the governor's
   deferrals (decided on each rank's own clock, then reduced) are identical on both ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import metric_series, run_multiprocess_script

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, math, sys, warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stablelr.callbacks.monitor import StabilityMonitor
from tests.test_monitor_support import RecordingLogger

torch.set_num_threads(1)
out = Path(sys.argv[1])


class Net(L.LightningModule):
    def __init__(self, fail_eval_on_rank=None):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        self.fail_eval_on_rank = fail_eval_on_rank

    def objective(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def probe_loss(self, batch):
        if not self.training and self.global_rank == self.fail_eval_on_rank:
            raise RuntimeError("injected eval-mode failure")
        return self.objective(batch)

    def training_step(self, batch, batch_idx):
        loss = self.objective(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.objective(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loaders():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(96, 4, generator=generator)
    y = torch.randint(0, 3, (96,), generator=generator)
    return (DataLoader(TensorDataset(x[:64], y[:64]), batch_size=8),
            DataLoader(TensorDataset(x[64:], y[64:]), batch_size=8))


def fit(phase, model, monitor, loggers):
    recorder = RecordingLogger()
    trainer = L.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=3, logger=[recorder, *loggers],
        callbacks=[monitor], deterministic=True, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, *loaders())
    dump = {
        "records": recorder.records,
        "global_step": trainer.global_step,
        "warnings": [str(w.message) for w in caught if "StabilityMonitor" in str(w.message)],
    }
    (out / f"phase{phase}_rank{trainer.global_rank}.json").write_text(json.dumps(dump))


fit(1, Net(), StabilityMonitor(
    certificate_every_n_steps=2, sharpness_every_n_steps=4, sharpness_iters=5, connectivity_every_n_epochs=1,
    certificate_window=3, connectivity_window=3, connectivity_batches=2, bn_recalibration_batches=2, max_overhead=math.inf,
), [TensorBoardLogger(str(out / "tb"), name="", version="")])
fit(2, Net(fail_eval_on_rank=1), StabilityMonitor(
    certificate_every_n_steps=0, sharpness_every_n_steps=0, connectivity_every_n_epochs=1, certificate_window=3, connectivity_window=3,
    connectivity_batches=2, bn_recalibration_batches=2, max_overhead=0.001,
), [])

from tests.scripts._exit import leave_distributed_run

leave_distributed_run()
'''

TAG_PREFIXES = ("lyapunov/", "connectivity/", "monitor/deferred_probes", "monitor/failed_probes")


def _run_script(out: Path, timeout: float = 240) -> None:
    script = out / "monitor_ddp.py"
    script.write_text(SCRIPT)
    run_multiprocess_script([sys.executable, str(script), str(out)], REPO, out / "log.txt", timeout)


def _monitor_series(dump: dict) -> dict[str, dict[int, float]]:
    return metric_series(dump["records"], TAG_PREFIXES)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_ranks_log_identical_numbers_and_survive_a_failing_probe(tmp_path: Path) -> None:
    _run_script(tmp_path)
    phase1 = [json.loads((tmp_path / f"phase1_rank{rank}.json").read_text()) for rank in (0, 1)]
    series = [_monitor_series(dump) for dump in phase1]
    assert series[0] == series[1]
    assert len(series[0]["lyapunov/delta_v"]) == 6  # steps 0, 2, ..., 10 of 12
    assert len(series[0]["lyapunov/sharpness"]) == 3  # after steps 4, 8, 12
    assert len(series[0]["connectivity/barrier"]) == 2  # pairs after epochs 1 and 2
    assert len(series[0]["connectivity/equiconnectedness"]) == 2
    # The ranks did see different shards: their own (unsynced) training losses differ.
    train_losses = [{s: m["train_loss"] for s, m in dump["records"] if "train_loss" in m} for dump in phase1]
    assert train_losses[0].keys() == train_losses[1].keys()
    assert train_losses[0] != train_losses[1]

    event_files = sorted((tmp_path / "tb").rglob("events.out.tfevents.*"))
    with_images = []
    for path in event_files:
        accumulator = EventAccumulator(str(path), size_guidance={"images": 0})
        accumulator.Reload()
        if accumulator.Tags()["images"]:
            with_images.append(sorted(accumulator.Tags()["images"]))
    assert with_images == [["connectivity/pairwise", "connectivity/path"]]

    phase2 = [json.loads((tmp_path / f"phase2_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [dump["global_step"] for dump in phase2] == [12, 12]
    series = [_monitor_series(dump) for dump in phase2]
    assert series[0] == series[1]
    assert "connectivity/barrier" not in series[0]
    # Epoch 0: the first probe (cost unknown, so allowed) fails on rank 1 and is skipped on both ranks.
    # Epochs 1 and 2: its measured cost is far above 0.1% of the training time, so both are deferred.
    failed, deferred = series[0]["monitor/failed_probes"], series[0]["monitor/deferred_probes"]
    assert (failed[max(failed)], deferred[max(deferred)]) == (1.0, 2.0)
    assert any("the connectivity probe raised on rank 1" in w and "injected eval-mode failure" in w
               for w in phase2[1]["warnings"])
    assert not any("raised on rank 0" in w for w in phase2[0]["warnings"])
