"""chart_tags.log10_comparison_tags: the four log10 tags together, or none."""

from __future__ import annotations

import math

import pytest

from lightning_stablelr.chart_tags import log10_comparison_tags


def test_all_four_tags_at_once():
    metrics = {"lyapunov/sharpness": 2.0, "lyapunov/stability_threshold": 1.9e4 / 0.3,
               "lyapunov/max_stable_lr": 0.3 * (1.9e4 / 0.3) / 2.0 / 1e4}
    tags = log10_comparison_tags(metrics, lr=3e-4)
    assert tags == pytest.approx({
        "lyapunov/log10_lr": math.log10(3e-4), "lyapunov/log10_max_stable_lr": math.log10(metrics["lyapunov/max_stable_lr"]),
        "lyapunov/log10_sharpness": math.log10(2.0), "lyapunov/log10_stability_threshold": math.log10(1.9e4 / 0.3)})
    # the headroom band's width in decades is -log10(eos_ratio)
    ratio = metrics["lyapunov/sharpness"] / metrics["lyapunov/stability_threshold"]
    assert tags["lyapunov/log10_stability_threshold"] - tags["lyapunov/log10_sharpness"] == pytest.approx(-math.log10(ratio))


@pytest.mark.parametrize("sharpness", [-0.5, 0.0, math.nan])
def test_none_when_a_value_cannot_be_logged(sharpness):
    metrics = {"lyapunov/sharpness": sharpness, "lyapunov/stability_threshold": 100.0, "lyapunov/max_stable_lr": 1.0}
    assert log10_comparison_tags(metrics, lr=0.01) == {}
    assert log10_comparison_tags({"lyapunov/sharpness": 2.0}, lr=0.01) == {}  # no threshold (unknown optimizer)
