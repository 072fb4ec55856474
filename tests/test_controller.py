"""StableLRController: closed-form lrs, scripted gap sequences, the guard, state round trips, bad arguments."""

from __future__ import annotations

import dataclasses
import math
import pickle
import random
import statistics

import pytest

from lightning_stablelr.controller import GapDecision, StableLRConfig, StableLRController
from lightning_stablelr.curvature import LineModel, line_model


def test_default_config() -> None:
    config = StableLRConfig()
    assert config.resolved_decay_rate == 0.0 and config.run_length_decay  # the decay follows the run's length
    assert (config.interval, config.warmup_steps, config.min_lr_ratio) == ("step", 20, 0.01)
    assert (config.gap_tolerance, config.gap_strength, config.min_delta, config.gap_patience) == (
        0.25,
        1.0,
        0.0,
        1,
    )
    assert (config.safety, config.recovery, config.recover_above, config.min_stability_factor) == (
        0.25,
        10.0,
        8.0,
        1e-3,
    )
    assert (config.guard_window, config.anneal_to, config.anneal_fraction) == (3, 0.1, 0.2)
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


def _margin(s_max: float) -> LineModel:
    """A line model with step margin ``s_max`` (c = 1, a = -s_max/2)."""
    return LineModel(-s_max / 2.0, 1.0, s_max, 0.0)


def _simulate(controller: StableLRController, full_lr_margins, noise) -> list[float]:
    """Feed checks of a plant whose margin at lr factor f is ``m / f`` times a noise factor; returns C after each."""
    trajectory = []
    for step, (margin, scatter) in enumerate(zip(full_lr_margins, noise)):
        probed = controller.stability_factor  # no warmup, decay or G: f = C
        controller.observe_line(_margin(margin / probed * scatter), step=1000 + step)
        trajectory.append(controller.stability_factor)
    return trajectory


def test_noisy_but_stable_margins_leave_the_stability_factor_at_one() -> None:
    # The sawtooth: margins scattering between ~10 and 50, with one low sample in eight.
    rng = random.Random(0)
    controller = StableLRController(warmup_steps=0, max_lr_boost=1.0)  # the base lr as a ceiling
    noise = [rng.uniform(10.0, 50.0) if i % 8 else rng.uniform(0.05, 0.9) for i in range(400)]
    trajectory = _simulate(controller, [1.0] * 400, noise)
    assert min(trajectory) == 1.0
    assert controller.guard_counts["overshoot"] == 0 and controller.guard_counts["hold"] == 399
    # with the band at [1, 2], edge of stability (1 <= s <= 2) is left alone too
    controller = StableLRController(warmup_steps=0, safety=1.0, recover_above=2.0, max_lr_boost=1.0)
    assert min(_simulate(controller, [1.0] * 200, [rng.uniform(1.0, 2.0) for _ in range(200)])) == 1.0
    # With the default boost (max_lr_boost=10) the same margins (10 to 50 at the base lr: above the band [4, 8]) raise the lr
    # towards the band, where their 5x scatter moves C between boosts and cuts; the noise never takes the lr
    # below the base lr.
    controller = StableLRController(warmup_steps=0, max_lr_boost=10.0)
    trajectory = _simulate(controller, [1.0] * 400, noise)
    assert min(trajectory) == 1.0 and controller.guard_counts["boost"] >= 2
    assert 1.5 <= statistics.median(trajectory) <= 6.0


def test_a_persistent_overshoot_shrinks_the_factor_in_proportion() -> None:
    controller = StableLRController(warmup_steps=0, safety=1.0, recover_above=2.0)
    # the full-lr margin is 0.3: the step at the base lr overshoots the decrease region
    trajectory = _simulate(controller, [0.3] * 12, [1.0] * 12)
    assert trajectory[0] == 1.0  # one sample never decides
    assert trajectory[1] == pytest.approx(0.3 / math.sqrt(2.0), rel=1e-12)  # straight to the band's centre
    assert trajectory[-1] == pytest.approx(0.3 / math.sqrt(2.0), rel=1e-12)  # and stays there (s = 1.41)
    assert controller.guard_counts["overshoot"] == 1 and controller.last_guard_reason == "hold"
    # a bigger overshoot: the cut is bigger but at most 10-fold per check
    controller = StableLRController(warmup_steps=0, safety=1.0, recover_above=2.0)
    trajectory = _simulate(controller, [1e-2] * 6, [1.0] * 6)
    # 10-fold cuts until the predicted margin s = 0.01 / C reaches the band [1, 2] (here its lower edge)
    assert trajectory == pytest.approx([1.0, 0.1, 0.01, 0.01, 0.01, 0.01], rel=1e-12)


def test_recovery_returns_the_factor_once_the_instability_passes() -> None:
    controller = StableLRController(warmup_steps=0, safety=1.0, recover_above=2.0, max_lr_boost=1.0)
    trajectory = _simulate(controller, [0.05] * 6 + [20.0] * 6, [1.0] * 12)
    assert trajectory[5] == pytest.approx(0.05 / math.sqrt(2.0), rel=1e-12)
    assert trajectory[6] == trajectory[5]  # one good margin is one sample
    assert trajectory[7] == pytest.approx(min(1.0, 10 * trajectory[5]), rel=1e-12)
    assert trajectory[-1] == 1.0
    assert controller.guard_counts["recovery"] == 2


def test_an_uphill_step_is_judged_by_its_size_not_its_direction() -> None:
    # Momentum (or a noisy batch) makes some steps go uphill along their own direction (a >= 0): lowering the
    # lr cannot turn them downhill, so a small uphill step leaves C alone ...
    controller = StableLRController(warmup_steps=0, max_lr_boost=1.0)
    for step in range(6):
        controller.observe_line(line_model(1.0, 1.0 + 0.011, 1.0 - 0.009), step=step)  # a = 0.01, c = 0.002
    assert controller.stability_factor == 1.0 and controller.robust_margin == pytest.approx(10.0)
    # ... while a step that lands high on both sides of a valley (curvature dominates) is an overshoot.
    for step in range(6, 9):
        controller.observe_line(line_model(1.0, 1.6, 1.5), step=step)  # a = 0.05, c = 1.1: margin 0.09
    assert controller.stability_factor < 0.1 and controller.guard_counts["overshoot"] >= 1


def test_the_guard_caps_the_base_lr_and_the_cool_down_anneals_below_the_cap() -> None:
    # A plant whose full-lr margin is 2: the base lr is 2.8x above the band's centre sqrt(32).
    controller = StableLRController(warmup_steps=0, anneal_to=0.01, anneal_fraction=0.5)
    assert controller.set_run_length(1000, 100)  # hold for 500 steps, then exp down to 0.01
    factors = {}
    for step in range(0, 1000, 10):
        epochs = step / 100
        probed = controller.factor(step, epochs)
        controller.observe_line(_margin(2.0 / probed), step=step, epochs_elapsed=epochs)
        factors[step] = (controller.stability_factor, controller.factor(step + 1, (step + 1) / 100))
    cap = 2.0 / math.sqrt(32.0)
    # C settles at the cap and keeps it through the cool-down (judged against the whole schedule it would grow
    # back as the decay falls, and the effective lr would stay at the cap: no annealing) ...
    assert all(c == pytest.approx(cap, rel=1e-12) for step, (c, _) in factors.items() if step >= 20)
    # ... so the lr anneals 100x below the cap (the floor min_lr_ratio = 0.01 bounds the schedule, not C).
    # the cool-down runs over steps 500..999 (span 499) and reaches 0.01 on the last step that runs, 999
    assert factors[990][1] == pytest.approx(cap * max(0.01, 0.01 ** (491 / 499)), rel=1e-9)
    assert controller.guard_counts["recovery"] == 0


def test_the_gap_factor_and_the_guard_are_two_ceilings_and_the_lower_one_binds() -> None:
    # The plant of the test above, no decay: C settles at the stability cap 2/sqrt(32) = 0.354.
    controller = StableLRController(warmup_steps=0, decay_rate=0.0, gap_strength=1.0, gap_tolerance=0.0)

    def checks(first: int) -> None:
        for step in range(first, first + 30, 10):
            controller.observe_line(_margin(2.0 / controller.factor(step, 0.0)), step=step)

    checks(0)
    cap = 2.0 / math.sqrt(32.0)
    assert controller.stability_factor == pytest.approx(cap, rel=1e-12)
    # An overfitting validation with r = (L_va - L_tr)/L_va = ln 2 halves G: 0.5 is still above the cap, so
    # the lr stays at the stability cap and C grows back to 0.707
    controller.observe_validation(1.0, train_loss=0.0)
    controller.observe_validation(1.0 + 1e-9, train_loss=1.0 - math.log(2.0) * (1.0 + 1e-9))
    assert controller.gap_factor == pytest.approx(0.5, rel=1e-6)
    checks(100)
    assert controller.factor(200, 0.0) == pytest.approx(cap, rel=1e-6)
    # G falls below the cap: now G binds, C returns to 1 and the lr follows G
    controller.observe_validation(1.0 + 2e-9, train_loss=1.0 - math.log(4.0) * (1.0 + 2e-9))
    assert controller.gap_factor == pytest.approx(0.125, rel=1e-6)
    checks(300)
    assert controller.stability_factor == 1.0 and controller.factor(400, 0.0) == pytest.approx(0.125, rel=1e-6)


def test_below_the_floor_the_guard_judges_the_floored_lr() -> None:
    # G far below min_lr_ratio: the real lr is the floor 0.01 * C, not G * C. A plant whose full-lr margin is
    # 0.01 puts the floored step at margin 1 (at the edge of no decrease): C must be cut into the band.
    controller = StableLRController(warmup_steps=0, decay_rate=0.0)
    controller.gap_factor = 1e-3
    for step in range(3):
        controller.observe_line(_margin(0.01 / controller.factor(step, 0.0)), step=step)
    assert controller.guard_counts["overshoot"] >= 1
    assert 0.01 / controller.factor(10, 0.0) == pytest.approx(math.sqrt(32.0), rel=1e-9)  # the band's centre


def test_nonfinite_checks_and_steps_halve_and_ask_for_confirmation() -> None:
    controller = StableLRController(warmup_steps=0, safety=1.0, recover_above=2.0)
    assert controller.observe_nonfinite() == 0.5
    assert controller.take_confirmation_request() and not controller.take_confirmation_request()
    assert controller.observe_line(line_model(1.0, math.nan, 1.0)) == 0.25  # a NaN loss in the probe
    assert (controller.nonfinite_steps, controller.guard_counts["nonfinite"]) == (1, 2)
    for _ in range(20):
        controller.observe_nonfinite()
    assert controller.stability_factor == 1e-3
    assert controller.lr(1.0, 100, 0.0) == 1e-3  # the floor bounds the schedule, not the guard
    # one low margin asks for a confirmation check; the window then decides on two samples
    controller = StableLRController(warmup_steps=0, safety=1.0, recover_above=2.0)
    controller.observe_line(_margin(0.5), step=0)
    assert controller.take_confirmation_request() and controller.stability_factor == 1.0


def test_unresolved_bf16_losses_change_nothing() -> None:
    controller = StableLRController(warmup_steps=0)
    quantized = line_model(2.3125, 2.3125, 2.328125)  # bf16 values one ulp apart: rounding, not curvature
    assert quantized.resolution == 2.0**-6 and not quantized.resolved
    for _ in range(5):
        controller.observe_line(quantized, step=0)
    assert controller.stability_factor == 1.0 and controller.guard_counts["unresolved"] == 5
    assert controller.margins.margins == []


def test_run_length_decay_follows_the_run() -> None:
    controller = StableLRController(warmup_steps=0, anneal_to=0.1, anneal_fraction=0.5)
    assert controller.decay_rate == 0.0
    assert controller.set_run_length(1000, 100)  # 10 epochs: hold for 5, then exp down to 0.1 at the last step, 999
    assert controller.decay_start == 5.0
    halfway = 5.0 + 4.99 / 2
    assert [controller.decay(t) for t in (0.0, 5.0, halfway, 9.99)] == pytest.approx([1, 1, 0.1**0.5, 0.1], rel=1e-12)
    assert controller.lr(1.0, 999, 9.99) == pytest.approx(0.1, rel=1e-12)
    # interval="epoch": whole epochs, the last one (epoch 9 of 10) runs at anneal_to
    epochs = StableLRController(warmup_steps=0, interval="epoch", anneal_to=0.1, anneal_fraction=0.2)
    assert epochs.set_run_length(1000, 100) and epochs.decay_start == 8.0
    assert [epochs.lr(1.0, 100 * t, float(t)) for t in range(10)] == pytest.approx([1.0] * 9 + [0.1], rel=1e-12)
    assert epochs.set_run_length(450, 100)  # 5 epochs (the last one partial): epoch 4 runs at 0.1
    assert [epochs.lr(1.0, 100 * t, float(t)) for t in range(5)] == pytest.approx([1.0] * 4 + [0.1], rel=1e-12)
    assert not epochs.set_run_length(100, 100) and epochs.decay_rate == 0.0  # one epoch: nothing to anneal
    assert not controller.set_run_length(math.inf, 100) and controller.decay_rate == 0.0
    explicit = StableLRController(decay_rate=0.05)
    assert not explicit.set_run_length(1000, 100) and explicit.decay_rate == 0.05


def test_state_dict_round_trip_gives_identical_lrs() -> None:
    config = StableLRConfig(decay_rate=0.2, warmup_steps=3, gap_patience=2)
    original = StableLRController(config)
    _run_gap_script(original, SCRIPT)
    for step in range(3):
        original.observe_line(LineModel(-0.3, 1.0, 0.6, 0.0), step=step)
    original.set_run_length(500, 5)
    original.record_train_loss(0.7)
    state = pickle.loads(pickle.dumps(original.state_dict()))
    assert state["version"] == 1
    assert all(isinstance(value, (int, float, str, type(None), dict, list)) for value in state.values())
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
    ({"recovery": 0.9}, "`recovery` must be a finite number in (1, inf), got 0.9."),
    ({"recovery": 1.0}, "`recovery` must be a finite number in (1, inf), got 1.0."),
    ({"recover_above": 0.0}, "`recover_above` must be a finite number > 0, got 0.0."),
    (
        {"recover_above": 1.5, "safety": 0.5},
        "`recover_above` must be >= 1/safety = 2 so that the hold band [1/safety, recover_above] is not empty,"
        " got recover_above=1.5 with safety=0.5. Raise recover_above, e.g. to 4.",
    ),
    ({"guard_window": 0}, "`guard_window` must be an integer >= 1, got 0."),
    ({"anneal_to": 0.0}, "`anneal_to` must be a finite number in (0, 1], got 0.0."),
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
