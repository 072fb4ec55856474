"""The monitor's cached validation batches: Lightning's input conversion, the loader's generator untouched (issue 9, 4-5)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_stablelr import StabilityMonitor
from lightning_stablelr.callbacks._validation_cache import preserved_generators
from lightning_stablelr.probe import ProbeError, probe_failure_advice
from tests.helpers import TinyRegression, make_trainer, regression_data, regression_loader
from tests.test_monitor_support import RecordingLogger, series


def _connectivity_monitor() -> StabilityMonitor:
    return StabilityMonitor(certificate_every_n_steps=0, sharpness_every_n_steps=0, probe_every_n_epochs=1,
                            snapshot_window=2, bn_recalibration_batches=0, max_overhead=math.inf)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_connectivity_probes_run_under_true_precisions(tmp_path, precision):
    monitor, logger = _connectivity_monitor(), RecordingLogger()
    trainer = make_trainer(tmp_path, max_epochs=3, precision=precision, callbacks=[monitor], logger=logger)
    trainer.fit(TinyRegression(), regression_loader(), regression_loader(num_samples=16, seed=1))
    assert monitor.failed_probes == 0
    assert len(series(logger, "connectivity/barrier")) == 2  # epochs 2 and 3 compare with the previous snapshot


def test_only_probe_errors_advise_probe_loss():
    advice = probe_failure_advice(RuntimeError("mat1 and mat2 must have the same dtype"))
    assert "Implement `probe_loss`" not in advice and "`probe_loss` would not change" in advice
    assert probe_failure_advice(ProbeError("... Implement `probe_loss` ...")) == "Its message says what to change."


def test_iterating_a_shuffled_loader_inside_preserved_generators_leaves_its_generator_as_found():
    generator = torch.Generator().manual_seed(3)
    loader = DataLoader(regression_data(), batch_size=8, shuffle=True, generator=generator)
    state = generator.get_state()
    with preserved_generators(loader):
        next(iter(loader))
    assert torch.equal(generator.get_state(), state)
    next(iter(loader))
    assert not torch.equal(generator.get_state(), state)  # iterating does consume it


class RecordedValidation(TinyRegression):
    def __init__(self) -> None:
        super().__init__()
        self.val_batches: list[torch.Tensor] = []

    def validation_step(self, batch, batch_idx):
        self.val_batches.append(batch[1].clone())
        super().validation_step(batch, batch_idx)


@pytest.mark.slow
def test_monitor_does_not_consume_the_validation_loaders_generator(tmp_path):
    def fit(callbacks):
        val = DataLoader(regression_data(16, seed=1), batch_size=4, shuffle=True,
                         generator=torch.Generator().manual_seed(7))
        logger, model = RecordingLogger(), RecordedValidation()
        trainer = make_trainer(tmp_path, max_epochs=3, callbacks=callbacks, logger=logger)
        trainer.fit(model, regression_loader(), val)
        return model, series(logger, "val_loss")

    plain, plain_val = fit([])
    monitored, monitored_val = fit([_connectivity_monitor()])
    assert len(plain_val) == 3 and monitored_val == plain_val  # bit-identical floats
    assert len(plain.val_batches) == len(monitored.val_batches) == 12
    assert all(torch.equal(a, b) for a, b in zip(plain.val_batches, monitored.val_batches))  # same batch order
