"""The guard's boost (issue 8): a base lr far below what the loss allows is raised, 2x per check at most, to the
top of the hold band and never above ``max_lr_boost``; never during the warmup, never against G, dropped on a
non-finite step, and off with ``max_lr_boost=1``."""

from __future__ import annotations

import pytest

from lightning_stablelr.config import StableLRConfig
from lightning_stablelr.controller import StableLRController
from lightning_stablelr.curvature import LineModel
from lightning_stablelr.schedule import BOOST_GROWTH, update_stability_factor


def _margin(s_max: float) -> LineModel:
    """A line model with step margin ``s_max`` (c = 1, a = -s_max/2)."""
    return LineModel(-s_max / 2.0, 1.0, s_max, 0.0)


def _checks(controller: StableLRController, full_lr_margin: float, steps) -> list[float]:
    """Checks of a plant whose margin at lr factor f is ``full_lr_margin / f`` (no decay); C after each."""
    trajectory = []
    for step in steps:
        probed = controller.factor(step, 0.0)
        controller.observe_line(_margin(full_lr_margin / probed), step=step)
        trajectory.append(controller.stability_factor)
    return trajectory


def test_the_rule_grows_c_twofold_to_the_band_top() -> None:
    guard = {"safety": 0.25, "recover_above": 8.0, "recovery": 10.0, "min_factor": 1e-3}
    # Robust margin 80 at the full lr and C = 1: predicted 80 > 8, a boost of 2x (not the recovery's 10x).
    assert update_stability_factor(1.0, 80.0, lr_factor=1.0, max_factor=10.0, **guard) == (2.0, "boost")
    assert BOOST_GROWTH == 2.0
    # Never past the band's top: margin 12 at C = 1 allows 12 / 8 = 1.5.
    assert update_stability_factor(1.0, 12.0, lr_factor=1.0, max_factor=10.0, **guard) == (1.5, "boost")
    # Never past max_factor, and without it (the default 1) the base lr stays a ceiling.
    assert update_stability_factor(8.0, 800.0, lr_factor=1.0, max_factor=10.0, **guard) == (10.0, "boost")
    assert update_stability_factor(1.0, 80.0, lr_factor=1.0, **guard) == (1.0, "hold")
    # Below 1 a high margin is a recovery (10x, to the band's centre, up to 1), not a boost.
    assert update_stability_factor(0.05, 80.0, lr_factor=1.0, max_factor=10.0, **guard) == (0.5, "recovery")
    # A boosted C whose margin falls below the band is cut like any C, to the band's centre.
    factor, reason = update_stability_factor(4.0, 8.0, lr_factor=1.0, max_factor=10.0, **guard)
    assert reason == "overshoot" and factor == pytest.approx(8.0 / 32.0**0.5, rel=1e-12)


def test_a_too_small_lr_is_raised_to_the_band_top_and_held_there() -> None:
    # The loss allows 10x the base lr: the full-lr margin is 80 against the band's top 8.
    controller = StableLRController(warmup_steps=0, max_lr_boost=10.0)
    trajectory = _checks(controller, 80.0, range(100, 1000, 100))
    # one margin never decides; then 2x per check until C = 80 / 8 = 10, where the predicted margin is 8
    assert trajectory == pytest.approx([1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0, 10.0], rel=1e-12)
    assert controller.guard_counts["boost"] == 4 and controller.guard_counts["overshoot"] == 0
    # max_lr_boost bounds it, and 1 turns it off
    capped = StableLRController(warmup_steps=0, max_lr_boost=3.0)
    assert _checks(capped, 80.0, range(100, 600, 100))[-1] == 3.0
    off = StableLRController(warmup_steps=0, max_lr_boost=1.0)
    assert set(_checks(off, 80.0, range(100, 600, 100))) == {1.0}


def test_no_boost_during_the_warmup_nor_from_its_margins() -> None:
    controller = StableLRController(warmup_steps=50, max_lr_boost=10.0)
    # Checks of steps 0..47: the next step is still in the warmup, C holds at 1 whatever the margin.
    assert set(_checks(controller, 800.0, range(0, 48))) == {1.0}
    assert controller.guard_counts["boost"] == 0
    # Step 49 is the first to run at the full warmup; its margin alone does not boost (the window's other
    # margins are the warmup's) ...
    assert _checks(controller, 800.0, [49]) == [1.0]
    # ... two full-lr margins do.
    assert _checks(controller, 800.0, [50]) == [2.0]
    # A non-finite step clears the window: two fresh full-lr margins are needed again.
    controller.observe_nonfinite()
    assert _checks(controller, 800.0, [60, 61, 62])[1:] == [1.0, 2.0]


def test_an_overfitting_cut_clips_the_boost_and_stops_it() -> None:
    controller = StableLRController(warmup_steps=0, gap_tolerance=0.0, gap_strength=1.0, max_lr_boost=10.0)
    _checks(controller, 80.0, range(100, 600, 100))
    assert controller.stability_factor == 10.0
    controller.observe_validation(1.0, train_loss=0.5)  # the first validation: the best so far
    controller.observe_validation(1.1, train_loss=0.5)  # worse, with a gap: G shrinks
    assert controller.gap_factor < 1.0
    assert controller.stability_factor == 1.0  # a boost never undoes an overfitting cut
    # and it does not start again while G < 1 (the predicted margin is even larger at the lower lr)
    assert set(_checks(controller, 80.0, range(600, 1000, 100))) == {1.0}


def test_a_nonfinite_step_drops_the_boost() -> None:
    controller = StableLRController(warmup_steps=0, max_lr_boost=10.0)
    _checks(controller, 80.0, range(100, 600, 100))
    assert controller.stability_factor == 10.0
    assert controller.observe_nonfinite() == 0.5  # half of min(C, 1): the boost is gone at once
    assert controller.margins.margins == []


def test_max_lr_boost_is_validated() -> None:
    assert StableLRConfig().max_lr_boost == 10.0
    with pytest.raises(ValueError, match=r"^`max_lr_boost` must be a finite number in \[1, inf\), got 0\.5\. It is"
                                         r" the most the guard may raise the lr above the base lr"):
        StableLRConfig(max_lr_boost=0.5)
