"""Closed-form checks of the pure schedule functions and of the argument checks."""

from __future__ import annotations

import math

import pytest

from lightning_stablelr.schedule import (
    DEFAULT_DECAY_RATE,
    MarginWindow,
    anneal_window,
    decay_factor,
    floored_lr,
    full_lr_margin,
    improved_on_best,
    relative_gap,
    resolve_decay_rate,
    run_length_decay_rate,
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

GUARD = {"safety": 1.0, "recovery": 10.0, "min_factor": 1e-3, "recover_above": 2.0, "lr_factor": 1.0}


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


def _guard(factor: float, robust: float | None, **overrides: float) -> tuple[float, str]:
    return update_stability_factor(factor, robust, **{**GUARD, **overrides})


def test_guard_holds_inside_the_band_and_waits_for_two_margins() -> None:
    # band [1/safety, recover_above] = [1, 2]: edge-of-stability margins leave C alone
    for robust in (1.0, 1.2, 1.99, 2.0):
        assert _guard(1.0, robust) == (1.0, "hold")
    assert _guard(0.5, 0.75) == (0.5, "hold")  # predicted margin 0.75 / 0.5 = 1.5
    assert _guard(0.5, None) == (0.5, "warming")
    assert _guard(1.0, 5.0) == (1.0, "hold")  # C is already 1: nothing to recover


def test_guard_cuts_in_proportion_to_the_overshoot() -> None:
    centre = math.sqrt(2.0)  # sqrt(recover_above / safety)
    for robust in (0.9, 0.5, 0.2):
        factor, reason = _guard(1.0, robust)
        assert reason == "overshoot"
        assert factor == pytest.approx(robust / centre, rel=1e-15)  # puts the next margin at the centre
    assert _guard(1.0, 0.001) == (pytest.approx(0.1, rel=1e-15), "overshoot")  # at most recovery-fold
    assert _guard(1.0, 0.0) == (pytest.approx(0.1, rel=1e-15), "overshoot")  # not a descent direction
    # the rest of the lr factor (warmup, decay, G) counts: at f' = 0.5 a full-lr margin 1.2 predicts 2.4
    assert _guard(1.0, 1.2, lr_factor=0.5) == (1.0, "hold")
    assert _guard(1.0, 0.4, lr_factor=0.5) == (pytest.approx(0.4 / (centre * 0.5), rel=1e-15), "overshoot")


def test_guard_recovers_as_readily_as_it_cuts() -> None:
    centre = math.sqrt(2.0)
    cut, _ = _guard(1.0, 0.25)
    assert cut == pytest.approx(0.25 / centre)
    # the same margins seen from the cut lr: the robust full-lr margin 3.0 (the instability passed)
    factor, reason = _guard(cut, 3.0)
    assert reason == "recovery" and factor == 1.0  # min(1, C * 10, 3 / centre)
    assert _guard(0.05, 1.0) == (pytest.approx(0.5, rel=1e-15), "recovery")  # 10-fold, the mirror of a cut
    assert _guard(0.5, math.inf) == (pytest.approx(1.0), "recovery")  # concave line: no curvature limit
    assert _guard(0.5, 1.4) == (pytest.approx(1.4 / centre, rel=1e-15), "recovery")


def test_guard_bounds() -> None:
    assert _guard(1.5e-3, 1e-6) == (1e-3, "overshoot")
    factor = 1e-3
    for _ in range(10):
        factor, _ = _guard(factor, 100.0)
    assert factor == 1.0
    # the lr factor passed in is the floored schedule: at f' = 0.01 a full-lr margin 0.004 predicts 0.8 at C = 0.5
    assert _guard(0.5, 0.004, lr_factor=0.01) == (pytest.approx(0.4 / math.sqrt(2.0), rel=1e-12), "overshoot")


def test_margin_window_ignores_one_outlier_each_way() -> None:
    window = MarginWindow(3)
    window.push(30.0)
    assert window.robust() is None
    window.push(0.01)  # one noisy low margin: upper median of two is the larger
    assert window.robust() == 30.0
    window.push(25.0)
    assert window.robust() == 25.0
    window.push(0.02)
    window.push(0.03)  # two of the last three low: a persistent overshoot
    assert window.margins == [25.0, 0.02, 0.03] and window.robust() == 0.03
    single = MarginWindow(1)
    single.push(0.5)
    assert single.robust() == 0.5
    assert full_lr_margin(3.0, 0.25) == 0.75
    assert full_lr_margin(math.inf, 0.25) == math.inf and full_lr_margin(0.0, 0.25) == 0.0


def test_run_length_decay_rate_reaches_anneal_to() -> None:
    rate = run_length_decay_rate(1000, 50, 0.1)  # per epoch; the run is 20 epochs, its last step 999 (t = 19.98)
    assert decay_factor(19.98, rate) == pytest.approx(0.1, rel=1e-12)
    # the window ends on the last unit that runs and spans at least one unit; fewer than two units: none
    assert anneal_window(2000, 0.2) == (1600.0, 399.0)
    assert anneal_window(10, 0.2) == (8.0, 1.0)
    assert anneal_window(5, 0.2) == (3.0, 1.0)
    assert anneal_window(2, 0.2) == (0.0, 1.0)
    assert anneal_window(1, 0.2) is None and anneal_window(math.inf, 0.2) is None
    assert anneal_window(10.5, 0.2) == pytest.approx((8.9, 1.1))  # a fractional total still runs unit 10
    assert run_length_decay_rate(math.inf, 50, 0.1) == 0.0
    assert run_length_decay_rate(1000, 50, 1.0) == 0.0


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
