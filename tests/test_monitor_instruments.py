"""StabilityMonitor composed of three instruments: their state, the deprecated names, the deferral warning."""

from __future__ import annotations

import math
import re
import time
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_stablelr import StabilityMonitor
from lightning_stablelr.callbacks import monitor as monitor_module
from lightning_stablelr.callbacks._connectivity_instrument import ConnectivityInstrument
from lightning_stablelr.callbacks._instruments import CertificateInstrument, SharpnessInstrument
from lightning_stablelr.callbacks._lightning_access import is_last_training_batch
from tests.helpers import TinyClassifier, make_trainer
from tests.test_monitor_support import (
    QuadraticModule,
    RecordingLogger,
    constant_loader,
    series,
    single_thread,
)

__all__ = ["single_thread"]


def _classifier_fit(tmp_path, monitor, epochs=3):
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 4, generator=generator), torch.randint(0, 3, (96,), generator=generator)
    logger = RecordingLogger()
    trainer = make_trainer(tmp_path, max_epochs=epochs, logger=logger, callbacks=[monitor])
    trainer.fit(TinyClassifier(seed=1), DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16),
                DataLoader(TensorDataset(x[64:], y[64:]), batch_size=8))  # fmt: skip
    return logger


def test_each_instrument_counts_what_it_logged_and_round_trips_its_state(tmp_path):
    monitor = StabilityMonitor(certificate_every_n_steps=2, sharpness_every_n_steps=3, sharpness_iters=4,
                               connectivity_window=2, max_overhead=math.inf)  # fmt: skip
    logger = _classifier_fit(tmp_path, monitor)
    certificates, sharpness = series(logger, "lyapunov/delta_v"), series(logger, "lyapunov/sharpness")
    barriers = series(logger, "connectivity/barrier")
    # 12 steps: certificates at steps 1, 3, ..., 11; sharpness after 3, 6, 9, 12; pairs after epochs 2 and 3.
    assert (len(certificates), len(sharpness), len(barriers)) == (6, 4, 2)
    assert monitor.certificates.runs == 6 and monitor.sharpness.runs == 4 and monitor.connectivity.runs == 2
    assert monitor.sharpness.last_value == sharpness[max(sharpness)]
    assert monitor.connectivity.last_metrics["connectivity/barrier"] == barriers[max(barriers)]
    for instrument, fresh in (
        (monitor.certificates, CertificateInstrument(16, 0.98)),
        (monitor.sharpness, SharpnessInstrument(20, 1e-3)),
        (monitor.connectivity, ConnectivityInstrument(4, 5, 2, 1e-3, 4, torch.device("cpu"), None, int)),
    ):
        state = instrument.state_dict()
        fresh.load_state_dict(state)
        assert fresh.state_dict() == state
    restored = StabilityMonitor()
    restored.load_state_dict(monitor.state_dict())
    assert restored.state_dict() == monitor.state_dict()
    assert restored.state_dict()["certificates"]["runs"] == 6


def test_a_checkpoint_of_the_first_layout_still_loads(tmp_path):
    model = QuadraticModule(dim=5, lr=0.4, seed=3)
    monitor = StabilityMonitor(certificate_every_n_steps=1, sharpness_every_n_steps=0, connectivity_every_n_epochs=0,
                               certificate_window=4, max_overhead=math.inf)  # fmt: skip
    trainer = make_trainer(tmp_path, logger=RecordingLogger(), callbacks=[monitor], limit_val_batches=0)
    trainer.fit(model, train_dataloaders=constant_loader(6))
    certificates = monitor.certificates.state_dict()
    old = {"version": 1, "window": certificates["window"], "ema": certificates["ema"],
           "val_trend": certificates["val_trend"], "governor": {"deferred": {"sharpness": 3}}, "failed_probes": 2}
    restored = StabilityMonitor(certificate_window=4)
    restored.load_state_dict(old)
    assert restored.certificates.window.metrics() == {"lyapunov/certified_rate": 1.0, "lyapunov/ema_decrease": 1.0}
    assert restored.certificates.ema.state_dict() == certificates["ema"]
    assert (restored.failed_probes, restored.state_dict()["governor"]) == (2, {"deferred": {"sharpness": 3}})
    # The state key keeps the first release's argument names, so Lightning finds the old entry.
    assert restored.state_key == "StabilityMonitor{'certificate_every_n_steps': 32, 'sharpness_every_n_steps': 500, " \
                                 "'probe_every_n_epochs': 1}"


def test_deprecated_names_map_to_the_new_ones_and_warn_once(monkeypatch):
    monkeypatch.setattr(monitor_module, "_WARNED_DEPRECATIONS", set())
    with pytest.warns(DeprecationWarning) as caught:
        monitor = StabilityMonitor(val_monitor="val_acc", probe_every_n_epochs=2, probe_points=9, probe_batches=3,
                                   window=5, certificate_window=7)  # fmt: skip
    config = monitor.config
    assert (config.monitor, config.connectivity_every_n_epochs, config.connectivity_points) == ("val_acc", 2, 9)
    assert (config.connectivity_batches, config.certificate_window, config.connectivity_window) == (3, 7, 5)
    messages = sorted(str(w.message) for w in caught)
    assert "StabilityMonitor: `val_monitor` is deprecated and will be removed; use `monitor` instead." in messages
    assert ("StabilityMonitor: `window` is deprecated and will be removed; use `certificate_window` and"
            " `connectivity_window` instead.") in messages  # fmt: skip
    assert len(messages) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert StabilityMonitor(val_monitor="val_acc").config.monitor == "val_acc"  # said once already: silent


def test_deprecated_snapshot_window_warns(monkeypatch):
    monkeypatch.setattr(monitor_module, "_WARNED_DEPRECATIONS", set())
    with pytest.warns(DeprecationWarning, match="`snapshot_window` is deprecated .* use `connectivity_window`"):
        assert StabilityMonitor(snapshot_window=3).config.connectivity_window == 3


def test_an_unknown_argument_raises_type_error_listing_the_arguments():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'probe_window'; its arguments are "
                                        r"certificate_every_n_steps, certificate_window,"):  # fmt: skip
        StabilityMonitor(probe_window=3)


def test_an_instrument_deferred_for_a_whole_epoch_is_named_once_with_its_knob(tmp_path):
    monitor = StabilityMonitor(certificate_every_n_steps=1, sharpness_every_n_steps=0, connectivity_every_n_epochs=1,
                               max_overhead=1e-9, log_figures=False)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = _classifier_fit(tmp_path, monitor, epochs=4)
    said = [re.sub(r"is [0-9.]+% of", "is X% of", str(w.message)) for w in caught if "deferred every due" in str(w.message)]
    # Epoch 0: the first probes run (their cost is unknown). Epoch 1: a budget of ~1e-9 s defers everything,
    # and each instrument is named once, however many epochs follow. At such a budget the monitor's per-batch
    # cost alone exceeds it, so the warning says that no knob of the probe helps.
    alone = ("The monitor's per-batch cost alone (its hooks and Lightning's dispatch of them) is X% of the training"
             " time, so no knob of the {} probe helps: raise `max_overhead`, or train with larger batches. (Said once.)")
    assert said == [
        "StabilityMonitor: no certificate in epoch 1: the governor deferred every due certificate probe to keep the"
        " monitor within max_overhead=1e-09 of the training time. " + alone.format("certificate"),
        "StabilityMonitor: no connectivity in epoch 1: the governor deferred every due connectivity probe to keep"
        " the monitor within max_overhead=1e-09 of the training time. " + alone.format("connectivity"),
    ]
    assert len(series(logger, "lyapunov/delta_v")) == 1
    assert monitor._governor.deferred == {"certificate": 15, "connectivity": 3}


def test_a_deferred_instrument_within_a_budget_its_standing_cost_fits_is_named_with_its_knob():
    from types import SimpleNamespace

    from lightning_stablelr.callbacks._governor import ProbeGovernor
    from lightning_stablelr.callbacks._monitor_policy import MonitorPolicy

    governor = ProbeGovernor(0.05, ("certificate", "connectivity"))
    governor.start(now=time.perf_counter() - 10.0)  # 10 s of training
    governor.charge("standing", 0.1)  # 1%: the probes had room, they were just too costly
    policy = MonitorPolicy(governor)
    policy.defer("connectivity")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy.warn_deferred_epoch(SimpleNamespace(current_epoch=3))
        policy.warn_deferred_epoch(SimpleNamespace(current_epoch=4))  # said once
    assert [str(w.message) for w in caught] == [
        "StabilityMonitor: no connectivity in epoch 3: the governor deferred every due connectivity probe to keep"
        " the monitor within max_overhead=0.05 of the training time. Raise `max_overhead`, or make it cheaper with"
        " `connectivity_points`, `connectivity_batches` or `connectivity_window` (fewer forward passes). (Said once.)"
    ]


@pytest.mark.parametrize("limit", [None, 3])
def test_is_last_training_batch_marks_each_epochs_last_batch(tmp_path, limit):
    seen = []

    class Recorder(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(("step", trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx,
                         is_last_training_batch(trainer)))  # fmt: skip

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(("end", trainer.current_epoch, batch_idx, is_last_training_batch(trainer)))

    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[Recorder()], limit_train_batches=limit)
    trainer.fit(QuadraticModule(dim=2, lr=0.1), train_dataloaders=constant_loader(5))
    last = (limit or 5) - 1
    assert [(hook, epoch, index) for hook, epoch, index, is_last in seen if is_last] == [
        (hook, epoch, last) for epoch in (0, 1) for hook in ("step", "end")]
    assert len(seen) == 2 * 2 * (last + 1)


def test_a_fit_that_max_steps_ends_mid_epoch_still_measures_each_instrument_once(tmp_path):
    # 20 batches per epoch, max_steps=7: the epoch's last batch never comes, so the catch-up is due at the fit's
    # last step. Before, such a fit logged no certificate and no sharpness at all, and said nothing.
    logger = RecordingLogger()
    monitor = StabilityMonitor(certificate_every_n_steps=50, sharpness_every_n_steps=50, sharpness_iters=3,
                               connectivity_every_n_epochs=0, max_overhead=0.05)  # fmt: skip
    trainer = make_trainer(tmp_path, max_epochs=3, max_steps=7, logger=logger, callbacks=[monitor],
                           limit_val_batches=0)  # fmt: skip
    trainer.fit(QuadraticModule(dim=3, lr=0.05), train_dataloaders=constant_loader(20))
    assert trainer.global_step == 7
    assert sorted(series(logger, "lyapunov/delta_v")) == [6]  # the certificate of the last step (step 6 -> 7)
    assert sorted(series(logger, "lyapunov/sharpness")) == [6]  # measured after it, logged at the same batch


def test_a_missing_validation_metric_is_said_once(tmp_path):
    # Issue 9 (7): the monitor used to skip lyapunov/val_decrease silently when its metric was missing.
    import warnings

    from lightning_stablelr import StabilityMonitor
    from tests.helpers import TinyRegression, make_trainer, regression_loader

    monitor = StabilityMonitor(monitor="val/loss", certificate_every_n_steps=0, sharpness_every_n_steps=0,
                               connectivity_every_n_epochs=0)  # fmt: skip
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyRegression(), regression_loader(), regression_loader())
    messages = [str(w.message) for w in caught if "is not in trainer.callback_metrics" in str(w.message)]
    assert len(messages) == 1
    assert messages[0].startswith("StabilityMonitor: the validation metric `val/loss` is not in")
    assert "'val_loss'" in messages[0] and "monitor=<one of the available keys>" in messages[0]
