"""StableLR in the setups of issue 9 that concern it: two optimizers stepped per batch (a GAN with manual
optimization), sparse embedding gradients, an endless loader, barebones, a wrong monitor name, no
validation, and a LearningRateMonitor listed before StableLR. Each test fails on the code before the fix."""

from __future__ import annotations

import csv
import math
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stablelr import StableLR
from tests.helpers import TinyRegression, make_trainer, regression_loader

BATCHES = 8  # one epoch: 32 samples in batches of 4


class TwoOptimizerGAN(L.LightningModule):
    """Manual optimization: each batch steps a "discriminator" then a "generator" (two optimizers, so
    ``global_step`` advances by 2 per batch); ``probe_loss`` makes the guard's replay possible."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.generator, self.discriminator = nn.Linear(4, 1), nn.Linear(4, 1)
        self.lrs: list[tuple[float, float]] = []

    def probe_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.generator(x) + self.discriminator(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt_d, opt_g = self.optimizers()
        self.lrs.append((opt_d.param_groups[0]["lr"], opt_g.param_groups[0]["lr"]))
        for optimizer, net in ((opt_d, self.discriminator), (opt_g, self.generator)):
            loss = nn.functional.mse_loss(net(x), y)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.discriminator.parameters(), lr=0.04), torch.optim.SGD(self.generator.parameters(), lr=0.02)]


def test_two_optimizers_per_batch_decay_by_batches_and_run_the_guard(tmp_path):
    model = TwoOptimizerGAN()
    callback = StableLR(half_life=1, warmup_steps=0, min_lr_ratio=0.0, gap_strength=0.0, check_every_n_steps=0,
                        dense_check_steps=0)  # fmt: skip
    make_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[callback]).fit(
        model, regression_loader(BATCHES * 4, 4)
    )
    # half_life = 1 epoch = 8 batches: the lr halves per epoch of *batches*, not of global_step (2 per batch).
    expected = [lr * 0.5 ** (b / BATCHES) for b in range(BATCHES) for lr in (0.04, 0.02)]
    assert [lr for pair in model.lrs for lr in pair] == pytest.approx(expected, rel=1e-12)

    model = TwoOptimizerGAN()
    guarded = StableLR(check_every_n_steps=2, dense_check_steps=0, warmup_steps=0)
    make_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[guarded]).fit(
        model, regression_loader(BATCHES * 4, 4)
    )
    # checks at batches 1, 3, 5, 7 (plus any confirmation the guard asks for): each one observed
    assert guarded.controller.checks >= 4
    assert guarded.controller.checks == guarded.line_probe.probes_run


class SparseEmbedding(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(16, 4, sparse=True)
        self.head = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        index, y = batch
        return nn.functional.mse_loss(self.head(self.embedding(index)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_sparse_embedding_gradients_are_checked_and_a_nan_in_them_is_neutralised(tmp_path):
    class NanInEmbedding(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            if trainer.global_step == 2:
                pl_module.embedding.weight.grad._values()[0, 0] = math.nan

    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 16, (32,), generator=generator), torch.randn(32, 1, generator=generator))
    model = SparseEmbedding()
    callback = StableLR(check_every_n_steps=3, dense_check_steps=0)
    # The NaN goes in after StableLR's check would have run if it came first: so StableLR comes second.
    make_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[NanInEmbedding(), callback]).fit(
        model, DataLoader(data, batch_size=4)
    )
    assert torch.isfinite(model.embedding.weight).all()
    assert callback.controller.nonfinite_steps == 1
    assert callback.controller.checks >= 2  # the guard ran on the sparse model too


def test_barebones_missing_metric_does_not_advise_self_log(tmp_path):
    trainer = make_trainer(tmp_path, barebones=True, max_epochs=1, callbacks=[StableLR()])
    trainer.enable_checkpointing = False
    with pytest.raises(RuntimeError) as raised:
        trainer.fit(_NoLogRegression(), regression_loader(16, 8), regression_loader(8, 8))
    message = str(raised.value)
    assert "barebones=True" in message and "self.trainer.callback_metrics['val_loss']" in message
    assert "(self.log)" not in message


class _NoLogRegression(TinyRegression):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.objective(batch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.objective(batch)


def test_a_wrong_monitor_name_is_reported_at_the_sanity_check_before_any_training(tmp_path):
    model = TinyRegression()
    trainer = make_trainer(tmp_path, max_epochs=2, num_sanity_val_steps=1, callbacks=[StableLR(monitor="val_los")])
    with pytest.raises(RuntimeError, match=r"`val_los` which is not available.*`val_loss`"):
        trainer.fit(model, regression_loader(32, 8), regression_loader(8, 8))
    assert trainer.global_step == 0


def test_no_validation_warns_once_that_g_cannot_act(tmp_path):
    with pytest.warns(UserWarning, match=r"runs no validation \(limit_val_batches=0.*G.*stays 1") as record:
        make_trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[StableLR()]).fit(
            TinyRegression(), regression_loader(16, 8)
        )
    assert sum("runs no validation" in str(r.message) for r in record) == 1


def test_a_learning_rate_monitor_listed_first_logs_the_lr_of_the_step(tmp_path):
    # Lightning runs callbacks in list order: StableLR sets each step's lrs already at the end of the
    # step before (and after a validation), so a LearningRateMonitor before it reads this step's lr.
    callback = StableLR(half_life=1, warmup_steps=3, min_lr_ratio=0.0, gap_strength=0.0, check_every_n_steps=0,
                        dense_check_steps=0)  # fmt: skip
    logger = CSVLogger(tmp_path, name="lrs")
    trainer = make_trainer(
        tmp_path, max_epochs=2, logger=logger, log_every_n_steps=1, callbacks=[LearningRateMonitor(), callback]
    )
    trainer.fit(TinyRegression(val_losses=[1.0]), regression_loader(32, 8), regression_loader(8, 8))
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    monitor = {int(row["step"]): float(row["lr-SGD"]) for row in rows if row.get("lr-SGD")}
    applied = {int(row["step"]): float(row["stablelr/lr-SGD"]) for row in rows if row.get("stablelr/lr-SGD")}
    assert sorted(monitor) == list(range(8)) and sorted(applied) == list(range(9))  # 8: after the last validation
    assert monitor == pytest.approx({step: applied[step] for step in monitor}, rel=1e-12)
    # warmup over 3 steps, half-life of one epoch (4 steps)
    assert monitor == pytest.approx({s: 0.1 * min(1, (s + 1) / 3) * 0.5 ** (s / 4) for s in range(8)}, rel=1e-12)


def test_a_validation_step_without_a_validation_loader_warns_that_g_cannot_act(tmp_path):
    with pytest.warns(UserWarning, match=r"runs no validation \(.*no validation loader\), so the gap factor G") as record:
        make_trainer(tmp_path, max_epochs=2, callbacks=[StableLR()]).fit(TinyRegression(), regression_loader(16, 8))
    assert sum("runs no validation" in str(r.message) for r in record) == 1

