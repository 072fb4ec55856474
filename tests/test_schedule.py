"""Closed-form checks of the pure schedule functions and of the argument checks."""

from __future__ import annotations

import math

import pytest

from lightning_stablelr.curvature import LineModel, line_model
from lightning_stablelr.schedule import (
    DEFAULT_DECAY_RATE,
    decay_factor,
    floored_lr,
    improved_on_best,
    relative_gap,
    resolve_decay_rate,
    update_gap_factor,
    update_stability_factor,
    warmup_factor,
)
from lightning_stablelr.validation import (
    check_choice,
    check_finite_positive,
    check_in_range,
    check_int_at_least,
    check_non_negative,
)

GUARD = {"safety": 0.5, "recovery": 1.1, "min_factor": 1e-3, "recover_above": 4.0}


def test_resolve_decay_rate() -> None:
    assert resolve_decay_rate(None, None) == DEFAULT_DECAY_RATE == 0.0
    assert resolve_decay_rate(0.2, None) == 0.2
    assert resolve_decay_rate(0, None) == 0.0
    assert resolve_decay_rate(None, 10.0) == math.log(2.0) / 10.0
    assert decay_factor(10.0, resolve_decay_rate(None, 10.0)) == pytest.approx(0.5, rel=1e-15)


@pytest.mark.parametrize(
    ("decay_rate", "half_life", "message"),
    [
        (
            -0.1,
            None,
            "`decay_rate` must be a finite number >= 0, got -0.1. Use a non-negative decay per epoch, "
            "or pass half_life instead.",
        ),
        (math.nan, None, "`decay_rate` must be a finite number >= 0, got nan."),
        (math.inf, None, "`decay_rate` must be a finite number >= 0, got inf."),
        (None, 0.0, "`half_life` must be a finite number > 0, got 0.0."),
        (None, math.nan, "`half_life` must be a finite number > 0, got nan."),
        (
            0.1,
            5.0,
            "`decay_rate` and `half_life` are mutually exclusive, got decay_rate=0.1 and half_life=5.0.",
        ),
    ],
)
def test_resolve_decay_rate_rejects(decay_rate, half_life, message: str) -> None:
    with pytest.raises(ValueError) as info:
        resolve_decay_rate(decay_rate, half_life)
    assert str(info.value).startswith(message)


def test_warmup_and_decay_closed_form() -> None:
    assert [warmup_factor(step, 4) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
    assert decay_factor(0.0, 0.3) == 1.0
    assert decay_factor(2.5, 0.3) == math.exp(-0.75)


def test_floored_lr() -> None:
    assert floored_lr(0.1, 0.5, 0.01) == 0.05
    assert floored_lr(0.1, 1e-5, 0.01) == pytest.approx(1e-3, rel=1e-15)
    assert floored_lr(0.1, math.nan, 0.01) == pytest.approx(1e-3, rel=1e-15)
    assert floored_lr(0.1, 0.0, 0.0) == 0.0


def test_relative_gap_is_scale_invariant() -> None:
    assert relative_gap(2.0, 1.0) == 0.5
    assert relative_gap(-2.0, -3.0) == 0.5
    assert relative_gap(2000.0, 1000.0) == 0.5
    assert relative_gap(0.0, 1.0) == -1e12


def test_improved_on_best() -> None:
    assert improved_on_best(5.0, None, 0.1)
    assert improved_on_best(0.85, 1.0, 0.1)
    assert not improved_on_best(0.9, 1.0, 0.1)
    assert not improved_on_best(math.nan, None, 0.0)


def test_update_gap_factor() -> None:
    kwargs = {"gap_tolerance": 0.25, "gap_strength": 2.0}
    assert update_gap_factor(0.8, gap=0.75, improved=False, **kwargs) == 0.8 * math.exp(-2.0 * 0.5)
    assert update_gap_factor(0.8, gap=0.75, improved=True, **kwargs) == 0.8
    assert update_gap_factor(0.8, gap=0.25, improved=False, **kwargs) == 0.8
    assert update_gap_factor(0.8, gap=-3.0, improved=False, **kwargs) == 0.8
    assert update_gap_factor(0.8, gap=math.nan, improved=False, **kwargs) == 0.8


def test_stability_factor_shrinks_to_put_next_step_inside_region() -> None:
    # s_max = 1.6 -> safety * s_max = 0.8 < 1: shrink by clip(0.8, 0.1, 0.5) = 0.5
    line = LineModel(-0.8, 1.0, 1.6, 0.0)
    assert update_stability_factor(1.0, line, nonfinite=False, **GUARD) == 0.5
    # s_max = 0.6 -> shrink 0.3
    line = LineModel(-0.3, 1.0, 0.6, 0.0)
    assert update_stability_factor(1.0, line, nonfinite=False, **GUARD) == pytest.approx(0.3, rel=1e-15)
    # s_max = 0.02 -> shrink clipped at 0.1
    line = LineModel(-0.01, 1.0, 0.02, 0.0)
    assert update_stability_factor(0.5, line, nonfinite=False, **GUARD) == pytest.approx(0.05, rel=1e-15)
    # ascent direction: s_max = 0 -> shrink 0.5
    assert update_stability_factor(0.5, line_model(1.0, 2.0, 0.5), nonfinite=False, **GUARD) == 0.25
    # non-finite model -> shrink 0.5
    assert update_stability_factor(0.5, line_model(1.0, math.inf, 0.5), nonfinite=False, **GUARD) == 0.25


def test_stability_factor_recovers_only_when_comfortably_inside() -> None:
    inside = LineModel(-2.5, 1.0, 5.0, 0.0)  # s_max = 5 > 4
    assert update_stability_factor(0.5, inside, nonfinite=False, **GUARD) == 0.5 * 1.1
    assert update_stability_factor(0.95, inside, nonfinite=False, **GUARD) == 1.0
    assert update_stability_factor(1.0, inside, nonfinite=False, **GUARD) == 1.0
    concave = line_model(1.0, 0.0, 1.0)  # s_max = inf
    assert update_stability_factor(0.5, concave, nonfinite=False, **GUARD) == 0.5 * 1.1
    middle = LineModel(-1.5, 1.0, 3.0, 0.0)  # safe (1.5 >= 1) but not comfortably: unchanged
    assert update_stability_factor(0.5, middle, nonfinite=False, **GUARD) == 0.5
    assert update_stability_factor(0.5, None, nonfinite=False, **GUARD) == 0.5
    still = line_model(1.0, 1.0, 1.0)  # the update did not move the loss: no information
    assert update_stability_factor(0.5, still, nonfinite=False, **GUARD) == 0.5


def test_stability_factor_bounds_and_nonfinite_halving() -> None:
    factor = 1.0
    trajectory = []
    for _ in range(12):
        factor = update_stability_factor(factor, None, nonfinite=True, **GUARD)
        trajectory.append(factor)
    assert trajectory[:3] == [0.5, 0.25, 0.125]
    assert trajectory[-1] == 1e-3
    assert min(trajectory) == 1e-3
    bad = LineModel(-0.01, 1.0, 0.02, 0.0)
    assert update_stability_factor(1.5e-3, bad, nonfinite=False, **GUARD) == 1e-3
    inside = LineModel(-2.5, 1.0, 5.0, 0.0)
    factor = 1e-3
    for _ in range(200):
        factor = update_stability_factor(factor, inside, nonfinite=False, **GUARD)
        assert factor <= 1.0
    assert factor == 1.0


def test_validation_messages() -> None:
    with pytest.raises(ValueError, match=r"^`lr` must be a finite number > 0, got 0\.$"):
        check_finite_positive("lr", 0)
    with pytest.raises(ValueError, match=r"^`lr` must be a finite number > 0, got True\.$"):
        check_finite_positive("lr", True)
    with pytest.raises(ValueError, match=r"^`x` must be a finite number >= 0, got nan\. Fix it\.$"):
        check_non_negative("x", math.nan, "Fix it.")
    with pytest.raises(ValueError, match=r"^`ratio` must be a finite number in \[0, 1\], got 1\.5\.$"):
        check_in_range("ratio", 1.5, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"^`safety` must be a finite number in \(0, 1\], got 0\.0\.$"):
        check_in_range("safety", 0.0, 0.0, 1.0, low_inclusive=False)
    with pytest.raises(ValueError, match=r"^`r` must be a finite number in \[1, inf\), got inf\.$"):
        check_in_range("r", math.inf, 1.0, math.inf, high_inclusive=False)
    with pytest.raises(ValueError, match=r"^`n` must be an integer >= 1, got 2\.0\.$"):
        check_int_at_least("n", 2.0, 1)
    with pytest.raises(ValueError, match=r"^`mode` must be one of 'a', 'b', got 'c'\.$"):
        check_choice("mode", "c", ("a", "b"))
    assert check_in_range("ratio", 1, 0.0, 1.0) == 1.0
    assert check_int_at_least("n", 3, 0) == 3
    assert check_choice("mode", "b", ["a", "b"]) == "b"
