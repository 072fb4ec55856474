"""Side effects that a replayed step could leave behind: torchmetrics states and BatchNorm buffers."""

from __future__ import annotations

import math

import lightning as L
import torch
import torchmetrics
from torch import nn

from lightning_stablelr import StabilityMonitor, StableLR, StableLRScheduler
from lightning_stablelr.probe import ObjectiveProbe
from tests.helpers import make_trainer, regression_loader
from tests.test_monitor_support import QuadraticModule, RecordingLogger, constant_loader, series


class MeteredRegression(L.LightningModule):
    """A linear regressor whose ``training_step`` updates a torchmetrics metric, as many real modules do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.train_mae = torchmetrics.MeanAbsoluteError()
        self.step_mean = torchmetrics.MeanMetric()

    def training_step(self, batch, batch_idx):
        x, y = batch
        prediction = self.net(x).reshape(y.shape)
        self.train_mae(prediction, y)
        loss = nn.functional.mse_loss(prediction, y)
        self.step_mean.update(loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_replayed_training_step_leaves_torchmetrics_states_unchanged():
    model = MeteredRegression()
    x, y = torch.randn(8, 4), torch.randn(8)
    model.training_step((x, y), 0)
    before = (model.step_mean.mean_value.clone(), model.step_mean.weight.clone(), model.train_mae._update_count)
    params = {name: 2 * p.detach() for name, p in model.named_parameters()}
    ObjectiveProbe(model).losses((x, y), [params, params, params])
    assert torch.equal(model.step_mean.mean_value, before[0])
    assert torch.equal(model.step_mean.weight, before[1])  # 1 sample, not 4
    assert model.train_mae._update_count == before[2] == 1


def test_epoch_metric_is_the_same_with_and_without_probes(tmp_path):
    def fit(callbacks):
        L.seed_everything(0)
        model = MeteredRegression()
        trainer = make_trainer(tmp_path, max_epochs=1, callbacks=callbacks, limit_val_batches=0)
        trainer.fit(model, train_dataloaders=regression_loader(batch_size=8))
        return model.train_mae.compute(), model.step_mean.weight.clone()

    plain = fit([])
    probed = fit([StabilityMonitor(certificate_every_n_steps=1, sharpness_every_n_steps=0, probe_every_n_epochs=0,
                                   max_overhead=math.inf)])  # fmt: skip
    assert torch.equal(plain[1], probed[1])  # one sample per training step, none per probe point
    assert torch.equal(plain[0], probed[0])


def test_scheduler_check_step_restores_batchnorm_buffers_when_given_the_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = StableLRScheduler(optimizer, steps_per_epoch=10)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    nn.functional.mse_loss(model(x), y).backward()
    scheduler.snapshot()
    optimizer.step()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    scheduler.check_step(lambda: nn.functional.mse_loss(model(x), y), module=model)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    # Without module= the closure's three train-mode forward passes move the statistics.
    nn.functional.mse_loss(model(x), y).backward()
    scheduler.snapshot()
    optimizer.step()
    tracked = int(model[1].num_batches_tracked)
    scheduler.check_step(lambda: nn.functional.mse_loss(model(x), y))
    assert int(model[1].num_batches_tracked) == tracked + 3


def test_monitor_certifies_stablelr_checked_steps_for_free(tmp_path):
    # StableLR checks steps 0..3 (dense) and 9, 19 (every 10th); the monitor's own cadence (every 7th:
    # steps 6, 13) adds two. The session computes each probe once.
    logger = RecordingLogger()
    stable_lr = StableLR(strict=False, decay_rate=0.0, dense_check_steps=4, check_every_n_steps=10)
    monitor = StabilityMonitor(
        certificate_every_n_steps=7, sharpness_every_n_steps=0, probe_every_n_epochs=0, max_overhead=math.inf
    )
    trainer = make_trainer(tmp_path, max_epochs=1, logger=logger, callbacks=[stable_lr, monitor],
                           limit_val_batches=0)  # fmt: skip
    trainer.fit(QuadraticModule(dim=3, lr=0.1), train_dataloaders=constant_loader(20))
    assert sorted(series(logger, "lyapunov/delta_v")) == [0, 1, 2, 3, 6, 9, 13, 19]
    from lightning_stablelr.callbacks.line_probe_session import line_probe_session

    assert line_probe_session(trainer).probes_run == 8


def test_a_step_that_did_not_move_is_not_certified(tmp_path):
    logger = RecordingLogger()
    monitor = StabilityMonitor(
        certificate_every_n_steps=1, sharpness_every_n_steps=0, probe_every_n_epochs=0, max_overhead=math.inf
    )
    trainer = make_trainer(tmp_path, max_epochs=1, logger=logger, callbacks=[monitor], limit_val_batches=0)
    trainer.fit(QuadraticModule(dim=3, lr=0.0), train_dataloaders=constant_loader(4))
    assert series(logger, "lyapunov/delta_v") == {}
