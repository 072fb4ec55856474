"""Zero observer effect: with every probe on at a high cadence, training is bit-identical to a run without.

The model has dropout and BatchNorm, the training loader shuffles (both draw from the global torch RNG,
so a probe that consumed random numbers would change the data order and the masks), and a
TensorBoard logger receives the figures. The weights must be ``torch.equal`` and the logged training
losses identical. The same holds with StableLR present, the monitor sharing its line probe.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_stablelr.callbacks.monitor import StabilityMonitor
from lightning_stablelr.callbacks.stable_lr import StableLR
from tests.helpers import TinyClassifier, make_trainer
from tests.test_monitor_support import (
    RecordingLogger,
    series,
    single_thread,  # noqa: F401  (autouse: one torch thread)
)


def _loaders() -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(96, 4, generator=generator)
    y = torch.randint(0, 3, (96,), generator=generator)
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=8)
    return train, val


def _busy_monitor() -> StabilityMonitor:
    return StabilityMonitor(
        certificate_every_n_steps=1, sharpness_every_n_steps=3, sharpness_iters=5, connectivity_every_n_epochs=1,
        connectivity_batches=2, bn_recalibration_batches=2, certificate_window=3, connectivity_window=3, max_overhead=math.inf,
    )


def _run(tmp_path, name: str, callbacks: list) -> tuple[dict[str, torch.Tensor], dict[int, float], RecordingLogger]:
    L.seed_everything(123, verbose=False)
    model = TinyClassifier(dropout=0.5, seed=5)
    recorder = RecordingLogger()
    loggers = [recorder, TensorBoardLogger(str(tmp_path / name), name="", version="")]
    trainer = make_trainer(tmp_path / name, max_epochs=3, logger=loggers, callbacks=callbacks, log_every_n_steps=1)
    train, val = _loaders()
    trainer.fit(model, train_dataloaders=train, val_dataloaders=val)
    return model.state_dict(), series(recorder, "train_loss"), recorder


def _assert_identical(reference, observed) -> None:
    weights_ref, losses_ref, _ = reference
    weights, losses, _ = observed
    assert weights.keys() == weights_ref.keys()
    for name in weights_ref:
        assert torch.equal(weights[name], weights_ref[name]), name
    assert len(losses_ref) == 12
    assert losses == losses_ref


def test_monitor_leaves_training_bit_identical(tmp_path):
    reference = _run(tmp_path, "plain", [])
    observed = _run(tmp_path, "monitored", [_busy_monitor()])
    _assert_identical(reference, observed)
    recorder = observed[2]
    # The probes did run: a certificate every step, sharpness after steps 3, 6, 9, 12, pairs after epochs 1, 2.
    assert len(series(recorder, "lyapunov/delta_v")) == 12
    assert len(series(recorder, "lyapunov/sharpness")) == 4
    assert len(series(recorder, "connectivity/barrier")) == 2
    assert set(series(recorder, "monitor/failed_probes").values()) == {0.0}


def test_monitor_next_to_stablelr_changes_nothing(tmp_path):
    reference = _run(tmp_path, "stablelr", [StableLR(check_every_n_steps=4, dense_check_steps=2)])
    monitor = _busy_monitor()
    observed = _run(tmp_path, "both", [StableLR(check_every_n_steps=4, dense_check_steps=2), monitor])
    _assert_identical(reference, observed)
    assert len(series(observed[2], "lyapunov/delta_v")) == 12
    lrs = series(reference[2], "stablelr/lr-SGD")
    assert len(lrs) == 13 and series(observed[2], "stablelr/lr-SGD") == lrs  # 12 steps, then the next step's
