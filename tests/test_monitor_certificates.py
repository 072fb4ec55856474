"""Pure certificate math (windows, EMA, validation trend), the connectivity tracker, and argument checks."""

from __future__ import annotations

import math
import pickle
from typing import Any

import pytest
import torch

from lightning_stablelr.callbacks._connectivity_probe import ConnectivityTracker
from lightning_stablelr.callbacks.monitor import StabilityMonitor
from lightning_stablelr.certificates import CertificateWindow, LossEMA, ValidationTrend, certificate
from lightning_stablelr.collectives import reduce_with_flag
from lightning_stablelr.curvature import line_model


def test_certificate_from_three_losses():
    line = line_model(2.0, 1.5, 3.0)  # a = -0.75, c = 0.5, s_max = 3
    cert = certificate(2.0, 1.5, line, update_norm_sq=0.25)
    assert cert.metrics() == {
        "lyapunov/delta_v": -0.5,
        "lyapunov/decrease": 1.0,
        "lyapunov/first_order": -0.75,
        "lyapunov/curvature": 2.0,
        "lyapunov/step_margin": 3.0,
        "lyapunov/taylor_error": 0.0,
    }
    # A zero step has no direction: curvature is undefined and left out; a NaN loss never certifies.
    assert "lyapunov/curvature" not in certificate(2.0, 2.0, line_model(2.0, 2.0, 2.0), 0.0).metrics()
    nan_cert = certificate(2.0, math.nan, line_model(2.0, math.nan, 3.0), 1.0)
    assert nan_cert.decrease is False
    assert nan_cert.metrics() == {"lyapunov/decrease": 0.0}


def test_window_rate_and_ema_decrease():
    window = CertificateWindow(3)
    assert window.metrics() == {}
    for decrease, ema in [(True, 5.0), (False, 4.0), (True, 4.5), (True, 4.8)]:
        window.record(decrease, ema)
    # Last three flags: F, T, T; EMAs 5.0 (three certificates back) -> 4.8: decreased.
    assert window.metrics() == {"lyapunov/certified_rate": 2 / 3, "lyapunov/ema_decrease": 1.0}
    window.record(False, 5.1)  # 4.0 -> 5.1 over the window: increased
    assert window.metrics() == {"lyapunov/certified_rate": 2 / 3, "lyapunov/ema_decrease": 0.0}
    restored = CertificateWindow(3)
    restored.load_state_dict(window.state_dict())
    assert restored.metrics() == window.metrics()


def test_loss_ema_is_bias_corrected_skips_nonfinite_and_is_linear():
    ema = LossEMA(0.5)
    assert ema.value is None
    ema.update(torch.tensor(4.0))
    assert ema.value == 4.0  # (0.5 * 4) / (1 - 0.5)
    ema.update(torch.tensor(float("nan")))
    ema.update(2.0)
    assert ema.value == pytest.approx((0.25 * 4 + 0.5 * 2) / (1 - 0.25))
    # Linear: averaging the packed (m, n) of two ranks gives the EMA of the averaged losses.
    first, second, both = LossEMA(0.9), LossEMA(0.9), LossEMA(0.9)
    for a, b in [(1.0, 3.0), (2.0, 6.0), (0.5, 1.5)]:
        first.update(a), second.update(b), both.update((a + b) / 2)
    mean, count = ((first.packed() + second.packed()) / 2).tolist()
    assert both.corrected(mean, count) == pytest.approx(both.value, rel=1e-12)


def test_validation_trend():
    trend = ValidationTrend()
    assert trend.observe(1.0) is None
    assert trend.observe(0.9) == 1.0
    assert trend.observe(math.nan) is None
    assert trend.observe(0.95) == 0.0


def test_tracker_reuses_endpoint_losses_and_evicts_the_oldest_snapshot():
    tracker = ConnectivityTracker(window=2, num_points=3, tol=1e-3)
    calls: list[float] = []

    def loss(theta):
        w = float(theta["w"])
        calls.append(w)
        return (w - 1.0) ** 2

    for epoch, w in enumerate([0.0, 2.0, 4.0, 6.0]):
        theta = {"w": torch.tensor(w)}
        report = tracker.commit(theta, tracker.local_losses(theta, loss), epoch=epoch, step=epoch)
    # Each probe evaluates the new endpoint once and one midpoint per previous snapshot (at most 2).
    assert calls == [0.0, 2.0, 1.0, 4.0, 2.0, 3.0, 6.0, 4.0, 5.0]
    assert report.matrix.labels == ["e1", "e2", "e3"]
    # Segment 4 -> 6: L = 9, 16, 25, chord midpoint 17 > 16: no barrier; 2 -> 6: L = 1, 9, 25, chord 13 > 9.
    assert report.consecutive.barrier == 0.0
    assert float(report.matrix.values[0, 2]) == 0.0
    assert [segment[:2] for segment in report.segments] == [(1, 3), (2, 3)]
    # Two ranks, the second failing: the mean of [values, 0] and [NaN..., 1] flags the failure everywhere.
    size = tracker.num_evaluations()
    sent = []
    for local in ([1.0] * size, None):
        reduce_with_flag(lambda t, op: sent.append(t) or t, local, size=size, device="cpu")
    assert reduce_with_flag(lambda t, op: (sent[0] + sent[1]) / 2, [1.0] * size, size=size, device="cpu").failed
    assert sent[0].tolist() == [1.0] * size + [0.0] and sent[1][-1].item() == 1.0


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("certificate_every_n_steps", -1, r"`certificate_every_n_steps` must be an integer >= 0, got -1. Use 0 to turn"),
        ("certificate_window", 0, r"`certificate_window` must be an integer >= 1, got 0."),
        ("connectivity_window", 1.5, r"`connectivity_window` must be an integer >= 1, got 1.5."),
        ("sharpness_every_n_steps", True, r"`sharpness_every_n_steps` must be an integer >= 0, got True."),
        ("connectivity_points", 2, r"`connectivity_points` must be an integer >= 3, got 2. A segment needs a point"),
        ("connectivity_batches", 0, r"`connectivity_batches` must be an integer >= 1, got 0."),
        ("connected_tol", -1e-3, r"`connected_tol` must be a finite number >= 0, got -0.001."),
        ("ema_decay", 1.0, r"`ema_decay` must be a finite number in \[0, 1\), got 1.0."),
        ("max_overhead", 0.0, r"`max_overhead` must be a number > 0 \(a fraction of training time, e.g. 0.05;"),
        ("snapshot_device", "gpu7", r"`snapshot_device` must be a torch device such as 'cpu' or 'cuda:0', got 'gpu7'."),
        ("log_figures", "yes", r"`log_figures` must be True or False, got 'yes'."),
        ("monitor", "", r"`monitor` must be a non-empty metric name such as 'val_loss', got ''."),
    ],
)
def test_bad_arguments_raise_naming_the_argument_and_value(argument: str, value: Any, message: str):
    with pytest.raises(ValueError, match=message):
        StabilityMonitor(**{argument: value})


def test_monitor_is_picklable_and_keeps_its_configuration():
    monitor = StabilityMonitor(connectivity_window=5, certificate_window=7, max_overhead=math.inf, snapshot_device="cpu")
    clone = pickle.loads(pickle.dumps(monitor))
    assert clone.config == monitor.config
    assert (clone.config.certificate_window, clone.config.connectivity_window, clone.config.max_overhead) == (7, 5, math.inf)
    assert clone.config.snapshot_device == torch.device("cpu")
    assert clone.state_key == monitor.state_key
    assert clone.state_dict() == monitor.state_dict()


def test_tracker_measures_only_the_newest_pairs_when_the_budget_allows_fewer():
    tracker = ConnectivityTracker(window=3, num_points=3, tol=1e-3)

    def loss(theta):
        return math.sin(float(theta["w"]))  # bumps along some segments, so barriers differ by pair

    for epoch, w in enumerate([0.0, 2.0, 4.0]):
        theta = {"w": torch.tensor(w, dtype=torch.float64)}
        report = tracker.commit(theta, tracker.local_losses(theta, loss), epoch=epoch, step=epoch)
    assert tracker.num_evaluations() == 1 + 3 * 1 and tracker.num_evaluations(segments=1) == 2
    theta = {"w": torch.tensor(6.0, dtype=torch.float64)}
    losses = tracker.local_losses(theta, loss, segments=1)
    report = tracker.commit(theta, losses, epoch=3, step=3, segments=1)
    assert [segment[:2] for segment in report.segments] == [(2, 3)]  # only the consecutive pair
    values = report.matrix.values
    assert math.isnan(float(values[0, 3])) and math.isnan(float(values[1, 3]))
    # Midpoint w = 5: sin 5 = -0.959 below the chord (sin 4 + sin 6)/2 = -0.518: no barrier.
    assert float(values[2, 3]) == 0.0
    # Equiconnectedness: the largest measured barrier, here 0 -> 4 (midpoint sin 2 = 0.909 above the chord).
    chord = (math.sin(0.0) + math.sin(4.0)) / 2
    assert report.equiconnectedness == pytest.approx(math.sin(2.0) - chord, rel=1e-12)
