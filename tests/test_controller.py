"""StableLRController: closed-form lrs, scripted gap sequences, the guard, state round trips, bad arguments."""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest

from lightning_stablelr.controller import GapDecision, StableLRConfig, StableLRController
from lightning_stablelr.curvature import LineModel, line_model


def test_default_config() -> None:
    config = StableLRConfig()
    assert config.resolved_decay_rate == 0.0  # defaults chosen by benchmarks/RESULTS.md
    assert (config.interval, config.warmup_steps, config.min_lr_ratio) == ("step", 10, 0.01)
    assert (config.gap_tolerance, config.gap_strength, config.min_delta, config.gap_patience) == (
        0.25,
        1.0,
        0.0,
        1,
    )
    assert (config.safety, config.recovery, config.recover_above, config.min_stability_factor) == (
        0.0625,
        1.1,
        4.0,
        1e-3,
    )
    assert StableLRController(half_life=2.0).decay_rate == math.log(2.0) / 2.0
    assert pickle.loads(pickle.dumps(StableLRController(config))).config == config


def test_epochs_elapsed() -> None:
    assert StableLRController(interval="step").epochs_elapsed(25, 10, 2) == 2.5
    assert StableLRController(interval="epoch").epochs_elapsed(25, 10, 2) == 2.0
    with pytest.raises(ValueError, match=r"^`steps_per_epoch` must be a finite number > 0, got inf\."):
        StableLRController().epochs_elapsed(3, math.inf, 0)


def test_lr_closed_form_with_warmup_decay_and_floor() -> None:
    controller = StableLRController(decay_rate=0.5, warmup_steps=4, min_lr_ratio=0.05)
    lrs = [controller.lr(0.2, step, controller.epochs_elapsed(step, 2, step // 2)) for step in range(40)]
    expected = [
        max(0.05 * 0.2, 0.2 * (min(1.0, (step + 1) / 4) * math.exp(-0.5 * step / 2))) for step in range(40)
    ]
    assert lrs == expected
    assert lrs[0] == 0.2 * 0.25
    assert lrs[3] == 0.2 * math.exp(-0.75)
    assert lrs[-1] == pytest.approx(0.01, rel=1e-15)  # exp(-9.75) < 0.05: floored
    epoch_mode = StableLRController(decay_rate=0.5, interval="epoch", min_lr_ratio=0.0, warmup_steps=0)
    assert epoch_mode.lr(1.0, 7, epoch_mode.epochs_elapsed(7, 4, 1)) == math.exp(-0.5)


def _run_gap_script(controller: StableLRController, script) -> list[GapDecision]:
    decisions = []
    for train_losses, val_loss in script:
        for loss in train_losses:
            controller.record_train_loss(loss)
        decisions.append(controller.observe_validation(val_loss))
    return decisions


SCRIPT = [
    ([1.0, 0.8], 1.0),  # first validation: improved by definition, gap 0.1
    ([0.5, 0.3], 1.1),  # gap (1.1-0.4)/1.1 = 0.63636 > 0.25, not improved
    ([0.2, 0.2], 0.9),  # improved: no shrink
    ([0.1, 0.1, 0.1], 1.0),  # gap 0.9, not improved
    ([0.1], 1.0),  # gap 0.9, not improved
]


def test_gap_factor_follows_hand_computed_values() -> None:
    controller = StableLRController(gap_strength=2.0)
    decisions = _run_gap_script(controller, SCRIPT)
    assert [d.improved for d in decisions] == [True, False, True, False, False]
    assert [d.overfitting for d in decisions] == [False, True, False, True, True]
    assert decisions[0].gap == pytest.approx(0.1, rel=1e-12)
    assert decisions[1].gap == pytest.approx(0.7 / 1.1, rel=1e-12)
    g1 = math.exp(-2.0 * (0.7 / 1.1 - 0.25))
    g3 = g1 * math.exp(-2.0 * (0.9 - 0.25))
    g4 = g3 * math.exp(-2.0 * (0.9 - 0.25))
    assert [d.gap_factor for d in decisions] == pytest.approx([1.0, g1, g1, g3, g4], rel=1e-12)
    assert controller.best_val_loss == 0.9
    assert controller.train_loss_mean is None


def test_gap_patience_needs_consecutive_signals() -> None:
    controller = StableLRController(gap_patience=2)
    decisions = _run_gap_script(controller, SCRIPT)
    assert [d.overfit_streak for d in decisions] == [0, 1, 0, 1, 2]
    assert [d.overfitting for d in decisions] == [False, False, False, False, True]
    assert decisions[-1].gap_factor == pytest.approx(math.exp(-(0.9 - 0.25)), rel=1e-12)


def test_min_delta_turns_small_improvements_into_no_improvement() -> None:
    script = [([0.5], 1.0), ([0.5], 0.95)]  # gap at the second: 0.45/0.95
    assert _run_gap_script(StableLRController(), script)[1].gap_factor == 1.0
    controller = StableLRController(min_delta=0.1)
    decisions = _run_gap_script(controller, script)
    assert not decisions[1].improved
    assert decisions[1].gap_factor == pytest.approx(math.exp(-(0.45 / 0.95 - 0.25)), rel=1e-12)
    assert controller.best_val_loss == 1.0


def test_gap_factor_is_scale_invariant() -> None:
    scaled = [([1000.0 * loss for loss in train], 1000.0 * val) for train, val in SCRIPT]
    plain = _run_gap_script(StableLRController(), SCRIPT)
    big = _run_gap_script(StableLRController(), scaled)
    assert [d.gap_factor for d in big] == pytest.approx([d.gap_factor for d in plain], rel=1e-12)
    assert [d.overfitting for d in big] == [d.overfitting for d in plain]


def test_running_mean_is_weighted_ignores_nonfinite_and_explicit_train_loss_wins() -> None:
    controller = StableLRController()
    controller.record_train_loss(1.0, weight=3.0)
    controller.record_train_loss(math.nan)
    controller.record_train_loss(math.inf, weight=2.0)
    controller.record_train_loss(2.0, weight=1.0)
    controller.record_train_loss(100.0, weight=0.0)
    assert controller.train_loss_mean == 1.25
    decision = controller.observe_validation(2.0, train_loss=0.5)
    assert decision.gap == 0.75
    assert controller.train_loss_mean is None
    with pytest.raises(ValueError, match=r"^`weight` must be a finite number >= 0, got -1\.0\."):
        controller.record_train_loss(1.0, weight=-1.0)


def test_validation_without_train_loss_or_with_nan_leaves_gap_factor() -> None:
    controller = StableLRController()
    assert controller.observe_validation(1.0) == GapDecision(None, False, 1.0, True, 0)
    assert controller.observe_validation(math.nan, train_loss=0.1) == GapDecision(None, False, 1.0, False, 0)
    assert controller.best_val_loss == 1.0


def test_stability_factor_through_the_controller() -> None:
    controller = StableLRController(safety=0.5)
    # s_max = 2: safety * s_max = 1 is exactly on the boundary (safe), and 2 <= recover_above: unchanged
    controller.stability_factor = 0.5
    assert controller.observe_line(line_model(1.0, 0.0, 4.0)) == 0.5
    controller = StableLRController(safety=0.5)
    too_big = LineModel(-0.3, 1.0, 0.6, 0.0)  # safety * s_max = 0.3 < 1
    assert controller.observe_line(too_big) == pytest.approx(0.3, rel=1e-15)
    assert controller.last_step_margin == 0.6
    comfortable = LineModel(-5.0, 1.0, 10.0, 0.0)
    assert controller.observe_line(comfortable) == pytest.approx(0.33, rel=1e-12)
    assert controller.observe_nonfinite() == pytest.approx(0.165, rel=1e-12)
    assert (controller.checks, controller.nonfinite_steps) == (2, 1)
    for _ in range(20):
        controller.observe_nonfinite()
    assert controller.stability_factor == 1e-3
    assert controller.lr(1.0, 100, 0.0) == 0.01  # the floor wins over C
    for _ in range(200):
        controller.observe_line(comfortable)
    assert controller.stability_factor == 1.0


def test_state_dict_round_trip_gives_identical_lrs() -> None:
    config = StableLRConfig(decay_rate=0.2, warmup_steps=3, gap_patience=2)
    original = StableLRController(config)
    _run_gap_script(original, SCRIPT)
    original.observe_line(LineModel(-0.3, 1.0, 0.6, 0.0))
    original.record_train_loss(0.7)
    state = pickle.loads(pickle.dumps(original.state_dict()))
    assert state["version"] == 1
    assert all(isinstance(value, (int, float, str, type(None), dict)) for value in state.values())
    resumed = StableLRController(config)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == original.state_dict()
    for controller in (original, resumed):
        controller.record_train_loss(0.1)
    assert resumed.observe_validation(1.2) == original.observe_validation(1.2)
    assert [resumed.lr(0.1, s, s / 5) for s in range(30)] == [original.lr(0.1, s, s / 5) for s in range(30)]
    old = StableLRController(config)
    old.load_state_dict({"gap_factor": 0.5})  # an older, smaller state: defaults for the rest
    assert (old.gap_factor, old.stability_factor, old.best_val_loss) == (0.5, 1.0, None)


BAD_ARGUMENTS = [
    ({"decay_rate": -0.1}, "`decay_rate` must be a finite number >= 0, got -0.1."),
    ({"decay_rate": math.nan}, "`decay_rate` must be a finite number >= 0, got nan."),
    ({"half_life": -1.0}, "`half_life` must be a finite number > 0, got -1.0."),
    ({"decay_rate": 0.1, "half_life": 3.0}, "`decay_rate` and `half_life` are mutually exclusive"),
    ({"interval": "batch"}, "`interval` must be one of 'step', 'epoch', got 'batch'."),
    ({"warmup_steps": -1}, "`warmup_steps` must be an integer >= 0, got -1."),
    ({"warmup_steps": 2.5}, "`warmup_steps` must be an integer >= 0, got 2.5."),
    ({"min_lr_ratio": 1.5}, "`min_lr_ratio` must be a finite number in [0, 1], got 1.5."),
    ({"min_lr_ratio": math.nan}, "`min_lr_ratio` must be a finite number in [0, 1], got nan."),
    ({"gap_tolerance": -0.1}, "`gap_tolerance` must be a finite number >= 0, got -0.1."),
    ({"gap_strength": math.inf}, "`gap_strength` must be a finite number >= 0, got inf."),
    ({"min_delta": -1e-3}, "`min_delta` must be a finite number >= 0, got -0.001."),
    ({"gap_patience": 0}, "`gap_patience` must be an integer >= 1, got 0."),
    ({"safety": 0.0}, "`safety` must be a finite number in (0, 1], got 0.0."),
    ({"safety": 1.5}, "`safety` must be a finite number in (0, 1], got 1.5."),
    ({"recovery": 0.9}, "`recovery` must be a finite number in [1, inf), got 0.9."),
    ({"recover_above": 0.0}, "`recover_above` must be a finite number > 0, got 0.0."),
    ({"min_stability_factor": 0.0}, "`min_stability_factor` must be a finite number in (0, 1], got 0.0."),
    (
        {"min_stability_factor": math.nan},
        "`min_stability_factor` must be a finite number in (0, 1], got nan.",
    ),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS)
def test_bad_arguments_raise_with_clear_message(kwargs, message: str) -> None:
    with pytest.raises(ValueError) as info:
        StableLRConfig(**kwargs)
    assert str(info.value).startswith(message)
    with pytest.raises(ValueError) as info:
        StableLRController(**kwargs)
    assert str(info.value).startswith(message)


def test_config_and_overrides_are_exclusive() -> None:
    with pytest.raises(
        ValueError, match=r"^Pass either `config` or keyword overrides, got both \(overrides: \['safety'\]\)"
    ):
        StableLRController(StableLRConfig(), safety=0.3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        StableLRConfig().safety = 0.3  # type: ignore[misc]
