"""StableLR through a real Trainer: exact lr trajectories, gap factors, conflicts, state, logging.

Unless a test is about the guard, it runs with ``check_every_n_steps=0, dense_check_steps=0``
(``NO_GUARD``): no three-point checks at all, so ``C`` stays exactly 1 and the lr is the closed form
``max(min_lr_ratio · η0, η0 · warmup · exp(-λ t) · G)``; ``CLOSED_FORM`` also sets ``gap_strength=0``
so that ``G`` stays 1 whatever the validation losses are.
"""

from __future__ import annotations

import csv
import inspect
import math
import pickle
import re
from dataclasses import fields

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_stablelr.callbacks.stable_lr import StableLR
from lightning_stablelr.collectives import RankMeanAccumulator
from lightning_stablelr.controller import StableLRConfig
from tests.helpers import TinyRegression, make_trainer, regression_loader

NO_GUARD = {"check_every_n_steps": 0, "dense_check_steps": 0, "warmup_steps": 0}  # warmup: default 10
CLOSED_FORM = {**NO_GUARD, "gap_strength": 0.0}  # and G == 1: the pure decay


class LrRecorder(Callback):
    """Records every group's lr as the optimizer sees it, right before each optimizer step."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append([float(group["lr"]) for group in optimizer.param_groups])


def _fit(
    tmp_path, model, callback, *, epochs=3, num_samples=32, batch_size=8, recorder=None, **trainer_kwargs
):
    recorder = recorder or LrRecorder()
    trainer = make_trainer(tmp_path, max_epochs=epochs, callbacks=[callback, recorder], **trainer_kwargs)
    loader = regression_loader(num_samples, batch_size)
    trainer.fit(model, loader, regression_loader(16, 8, seed=1))
    return trainer, recorder


def test_step_interval_trajectory_matches_closed_form(tmp_path):
    # 32 samples / batch 8 = 4 steps per epoch; t = step / 4.
    callback = StableLR(decay_rate=0.5, min_lr_ratio=0.0, **CLOSED_FORM)
    _, recorder = _fit(tmp_path, TinyRegression(lr=0.1), callback, epochs=3)
    expected = [0.1 * math.exp(-0.5 * step / 4) for step in range(12)]
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx(expected, rel=1e-12, abs=0)
    assert callback.controller.stability_factor == 1.0 and callback.controller.checks == 0


def test_epoch_interval_warmup_and_floor(tmp_path):
    callback = StableLR(half_life=1.0, interval="epoch", min_lr_ratio=0.2, **{**CLOSED_FORM, "warmup_steps": 3})
    _, recorder = _fit(tmp_path, TinyRegression(lr=0.5), callback, epochs=4)
    expected = [max(0.2 * 0.5, 0.5 * min(1.0, (step + 1) / 3) * 0.5 ** (step // 4)) for step in range(16)]
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx(expected, rel=1e-12, abs=0)
    # epoch 3: 0.5 * 2^-3 = 0.0625 < floor 0.1
    assert recorder.lrs[-1][0] == pytest.approx(0.1, rel=1e-12)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    # 5 batches per epoch, accumulate 2 -> steps at batches 2, 4 and the last one: 3 steps per epoch.
    callback = StableLR(decay_rate=0.3, min_lr_ratio=0.0, **CLOSED_FORM)
    _, recorder = _fit(
        tmp_path, TinyRegression(lr=0.2), callback, epochs=2, num_samples=40, accumulate_grad_batches=2
    )
    assert callback._resolved_steps_per_epoch == 3
    expected = [0.2 * math.exp(-0.3 * step / 3) for step in range(6)]
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx(expected, rel=1e-12, abs=0)


def test_param_groups_keep_their_ratios_and_get_named_metrics(tmp_path):
    callback = StableLR(decay_rate=0.4, min_lr_ratio=0.0, **CLOSED_FORM)
    model = TinyRegression(group_lrs=[0.2, 0.05], name_groups=True)
    trainer, recorder = _fit(tmp_path, model, callback, epochs=2)
    for step, (weight_lr, bias_lr) in enumerate(recorder.lrs):
        decay = math.exp(-0.4 * step / 4)
        assert weight_lr == pytest.approx(0.2 * decay, rel=1e-12)
        assert bias_lr == pytest.approx(0.05 * decay, rel=1e-12)
    assert callback.base_lrs == {"0/0": 0.2, "0/1": 0.05}
    # LearningRateMonitor's names, prefixed: lr-{optimizer class}/{group name}
    assert {"stablelr/lr-SGD/weight", "stablelr/lr-SGD/bias"} <= set(trainer.callback_metrics)
    assert "stablelr/lr-SGD" not in trainer.callback_metrics


def test_constructor_defaults_match_the_controller_config():
    signature = inspect.signature(StableLR.__init__).parameters
    for field in fields(StableLRConfig):
        assert signature[field.name].default == field.default, field.name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decay_rate": -1.0}, r"`decay_rate` must be a finite number >= 0, got -1.0"),
        ({"min_lr_ratio": 2.0}, r"`min_lr_ratio` must be a finite number in \[0, 1\], got 2.0"),
        ({"check_every_n_steps": -1}, r"`check_every_n_steps` must be an integer >= 0, got -1"),
        ({"dense_check_steps": 1.5}, r"`dense_check_steps` must be an integer >= 0, got 1.5"),
        ({"on_scheduler_conflict": "ignore"}, r"`on_scheduler_conflict` must be one of 'error', 'compose'"),
        ({"monitor": ""}, r"`monitor` must be a non-empty metric name, got ''"),
        ({"strict": "yes"}, r"`strict` must be True or False, got 'yes'"),
        ({"steps_per_epoch": 0}, r"`steps_per_epoch` must be an integer >= 1, got 0"),
        ({"decay_rate": 0.1, "half_life": 2.0}, r"`decay_rate` and `half_life` are mutually exclusive"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StableLR(**kwargs)


def test_scheduler_conflict_raises_with_both_fixes(tmp_path):
    model = TinyRegression(scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1))
    with pytest.raises(MisconfigurationException) as error:
        _fit(tmp_path, model, StableLR(**NO_GUARD), epochs=1)
    text = str(error.value)
    assert "scheduler StepLR returned by `configure_optimizers`" in text
    assert "remove StepLR from `configure_optimizers`" in text
    assert "StableLR(on_scheduler_conflict='compose')" in text


def test_picklable_also_mid_fit_with_compose_hooks(tmp_path):
    callback = StableLR(half_life=3.0, monitor="val/loss")
    clone = pickle.loads(pickle.dumps(callback))
    assert clone.monitor == "val/loss" and clone.controller.decay_rate == pytest.approx(math.log(2) / 3)

    class PickleMidFit(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.copy = pickle.loads(pickle.dumps(trainer.callbacks[0]))

    model = TinyRegression(scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1))
    composing = StableLR(on_scheduler_conflict="compose", monitor="val/loss", strict=False, **NO_GUARD)
    mid_fit = PickleMidFit()
    _fit(tmp_path, model, composing, epochs=1, recorder=mid_fit)
    # Pickled while its optimizer hooks were registered: the copy carries the state, not the handles.
    assert composing._hook_handles == []  # removed at teardown
    assert mid_fit.copy._hook_handles == [] and mid_fit.copy.base_lrs == {"0/0": 0.1}
    assert mid_fit.copy._scheduled == {0}


class MetricsAtValidation(Callback):
    """Copies StableLR's gap metrics out of ``callback_metrics`` at every real validation end."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            metrics = trainer.callback_metrics
            self.records.append({key: float(metrics[key]) for key in ("stablelr/gap_factor", "stablelr/gap")})


def test_scripted_validation_losses_give_the_exact_gap_factors(tmp_path):
    # Validation 0 is the first (always "improved"); 1 and 2 do not improve on 5.0 and overfit; 3 improves.
    # The sanity check logs val_loss=0.01: had it counted, validation 0 would not improve and G would shrink.
    val_losses = [5.0, 6.0, 7.0, 1.0]
    model = TinyRegression(lr=0.05, val_losses=val_losses, sanity_val_loss=0.01)
    callback = StableLR(decay_rate=0.0, gap_tolerance=0.25, gap_strength=2.0, **NO_GUARD)
    seen = MetricsAtValidation()
    trainer = make_trainer(tmp_path, max_epochs=4, num_sanity_val_steps=1, callbacks=[callback, seen])
    recorder = LrRecorder()
    trainer.callbacks.append(recorder)
    trainer.fit(model, regression_loader(32, 8), regression_loader(16, 8, seed=1))

    gap_factor, best, expected = 1.0, None, []
    for epoch, val_loss in enumerate(val_losses):
        train_loss = sum(model.train_losses[4 * epoch : 4 * epoch + 4]) / 4
        gap = (val_loss - train_loss) / abs(val_loss)
        improved = best is None or val_loss < best
        if gap > 0.25 and not improved:
            gap_factor *= math.exp(-2.0 * (gap - 0.25))
        best = val_loss if improved else best
        expected.append({"stablelr/gap_factor": gap_factor, "stablelr/gap": gap})
    assert len(seen.records) == 4
    for got, want in zip(seen.records, expected):
        assert got == pytest.approx(want, rel=1e-5)
    assert expected[0]["stablelr/gap_factor"] == 1.0 and expected[2]["stablelr/gap_factor"] < 0.5
    # Each epoch's lr carries the G of the validation before it (no decay, no guard).
    epoch_lrs = [recorder.lrs[4 * epoch][0] for epoch in range(4)]
    wanted = [0.05] + [0.05 * record["stablelr/gap_factor"] for record in expected[:3]]
    assert epoch_lrs == pytest.approx(wanted, rel=1e-5)
    assert callback.controller.best_val_loss == 1.0 and callback.controller.validations == 4


def test_gap_factor_is_scale_invariant(tmp_path):
    factors = []
    for scale in (1.0, 1000.0):
        model = TinyRegression(
            lr=0.05 / scale, loss_scale=scale, val_losses=[scale * v for v in (1.0, 3.0, 3.0)]
        )
        callback = StableLR(decay_rate=0.0, **NO_GUARD)
        _fit(tmp_path / str(scale), model, callback, epochs=3)
        factors.append(callback.controller.gap_factor)
    assert factors[0] < 1.0
    assert factors[1] == pytest.approx(factors[0], rel=1e-5)


def test_missing_monitor_strict_raises_with_the_available_keys(tmp_path):
    model = TinyRegression(val_losses=[1.0])
    with pytest.raises(RuntimeError) as error:
        _fit(tmp_path, model, StableLR(monitor="val_acc", **NO_GUARD), epochs=1)
    text = str(error.value)
    assert "StableLR conditioned on metric `val_acc` which is not available" in text
    assert "`train_loss`, `val_loss`" in text
    assert "StableLR(strict=False)" in text
    assert "stablelr/" not in text


def test_missing_monitor_non_strict_warns_once_and_keeps_g(tmp_path):
    model = TinyRegression(val_losses=[1.0, 9.0, 9.0])
    callback = StableLR(monitor="val_acc", strict=False, decay_rate=0.0, gap_tolerance=0.0, **NO_GUARD)
    with pytest.warns(RuntimeWarning, match=r"`val_acc` which is not available.*\(shown once\)") as record:
        _, recorder = _fit(tmp_path, model, callback, epochs=3)
    assert sum("val_acc" in str(warning.message) for warning in record) == 1
    message = next(str(warning.message) for warning in record if "val_acc" in str(warning.message))
    assert "With strict=False the gap factor G stays unchanged until it appears." in message
    assert "Use `StableLR(strict=False)`" not in message  # not advice to set what is set
    assert callback.controller.gap_factor == 1.0 and callback.controller.validations == 0
    assert {lrs[0] for lrs in recorder.lrs} == {0.1}


def test_compose_multiplies_an_epoch_scheduler(tmp_path):
    model = TinyRegression(lr=0.1, scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    callback = StableLR(decay_rate=0.2, min_lr_ratio=0.0, on_scheduler_conflict="compose", **CLOSED_FORM)
    trainer, recorder = _fit(tmp_path, model, callback, epochs=3)
    expected = [0.1 * 0.5 ** (step // 4) * math.exp(-0.2 * step / 4) for step in range(12)]
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx(expected, rel=1e-12, abs=0)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.get_last_lr() == pytest.approx([0.1 * 0.5**3], rel=1e-12)  # never saw our factor
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3, rel=1e-12)
    assert float(trainer.callback_metrics["stablelr/lr-SGD"]) == pytest.approx(expected[-1], rel=1e-6)


def test_compose_with_a_chainable_step_scheduler_does_not_compound(tmp_path):
    def exponential(optimizer):
        return {"scheduler": torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9), "interval": "step"}

    model = TinyRegression(lr=0.1, scheduler=exponential)
    callback = StableLR(decay_rate=0.5, min_lr_ratio=0.3, on_scheduler_conflict="compose", **CLOSED_FORM)
    _, recorder = _fit(tmp_path, model, callback, epochs=4)
    # min(η_s, max(min_lr_ratio · η0, η_s · factor)) with η_s = 0.1 · 0.9^k
    expected = [
        min(0.1 * 0.9**step, max(0.3 * 0.1, 0.1 * 0.9**step * math.exp(-0.5 * step / 4)))
        for step in range(16)
    ]
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx(expected, rel=1e-12, abs=0)
    assert expected[8] == 0.03  # our floor binds ...
    assert expected[-1] == 0.1 * 0.9**15 < 0.03  # ... but never lifts the lr above the scheduler's own


def test_guard_step_margin_is_the_analytic_one_for_sgd_on_a_quadratic(tmp_path):
    # MSE of a linear model is exactly quadratic: with Δθ = -η g the line model is exact, and
    # s_max = -2 gᵀΔθ / ΔθᵀHΔθ = 2 ‖g‖² / (η gᵀHg), H = 2 XaᵀXa / n.
    lr = 0.4
    model = TinyRegression(lr=lr, seed=3)
    x, y = next(iter(regression_loader(32, 8)))
    xa = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    theta = torch.cat([model.layer.weight.detach().flatten(), model.layer.bias.detach()]).double()
    grad = 2 * xa.T @ (xa @ theta - y.double().flatten()) / len(x)
    hessian = 2 * xa.T @ xa / len(x)
    expected_margin = float(2 * grad @ grad / (lr * grad @ hessian @ grad))

    callback = StableLR(
        decay_rate=0.0, check_every_n_steps=0, dense_check_steps=1, gap_strength=0.0, warmup_steps=0, safety=0.5,
        recover_above=4.0, guard_window=1,
    )  # fmt: skip
    trainer, recorder = _fit(tmp_path, model, callback, epochs=1)
    assert callback.controller.checks == 1
    assert callback.controller.last_step_margin == pytest.approx(expected_margin, rel=1e-4)
    assert float(trainer.callback_metrics["stablelr/step_margin"]) == pytest.approx(expected_margin, rel=1e-4)
    # guard_window=1 acts on this one margin: below the band [2, 4] C puts it at the centre sqrt(8).
    assert 0.5 * expected_margin < 1.0
    stability = callback.controller.stability_factor
    assert stability == pytest.approx(max(0.1, expected_margin / math.sqrt(8.0)), rel=1e-4)
    assert callback.controller.guard_counts["overshoot"] == 1
    assert [lrs[0] for lrs in recorder.lrs][1:] == pytest.approx([lr * stability] * 3, rel=1e-12)


def test_guard_tames_a_diverging_learning_rate(tmp_path):
    def final_loss(callback):
        model = TinyRegression(lr=1.5, seed=2)
        callbacks = [callback] if callback is not None else []
        trainer = make_trainer(tmp_path, max_epochs=4, callbacks=callbacks)
        trainer.fit(model, regression_loader(32, 8))
        return model.train_losses

    unguarded = final_loss(None)
    guarded = final_loss(
        StableLR(decay_rate=0.0, check_every_n_steps=2, dense_check_steps=4, gap_strength=0.0)
    )
    assert not (unguarded[-1] < unguarded[0]), "the control run must diverge for this test to mean anything"
    assert all(math.isfinite(loss) for loss in guarded)
    assert guarded[-1] < 0.1 * guarded[0]


def test_failing_probe_warns_once_and_leaves_c_alone(tmp_path):
    class BrokenProbe(TinyRegression):
        def probe_loss(self, batch):
            raise RuntimeError("boom")

    callback = StableLR(decay_rate=0.0, dense_check_steps=4, check_every_n_steps=0, gap_strength=0.0)
    with pytest.warns(UserWarning, match=r"line probe failed at step 0 \(RuntimeError: boom\)") as record:
        _fit(tmp_path, BrokenProbe(lr=0.1), callback, epochs=1)
    messages = [str(warning.message) for warning in record if "line probe failed" in str(warning.message)]
    assert len(messages) == 1
    # The message says what happens: the checks are skipped and C stays (not "treated as non-finite").
    assert "leave the stability factor C unchanged" in messages[0] and "non-finite" not in messages[0]
    assert callback.controller.stability_factor == 1.0 and callback.controller.checks == 0


def test_state_dict_round_trip_and_checkpoint_resume_matches_uninterrupted(tmp_path):
    def model():
        return TinyRegression(lr=0.1, val_losses=[2.0, 3.0, 3.5, 4.0, 1.0])

    def stablelr():
        return StableLR(decay_rate=0.3, check_every_n_steps=3, dense_check_steps=2, warmup_steps=10)

    uninterrupted = stablelr()
    _, full = _fit(tmp_path / "full", model(), uninterrupted, epochs=4)

    first = stablelr()
    trainer, part_one = _fit(tmp_path / "one", model(), first, epochs=2)
    checkpoint = tmp_path / "two-epochs.ckpt"
    trainer.save_checkpoint(checkpoint)
    state = first.state_dict()
    assert state["base_lrs"] == {"0/0": 0.1} and state["steps_per_epoch"] == 4
    assert state["controller"]["gap_factor"] < 1.0 and state["controller"]["checks"] == 4
    clone = stablelr()
    clone.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert clone._pending_state == state  # applied in on_train_start, after Lightning restores optimizers

    resumed_model = model()
    resumed_model.validations_seen = 2  # the scripted losses continue where the first run stopped
    second = stablelr()
    recorder = LrRecorder()
    trainer = make_trainer(tmp_path / "two", max_epochs=4, callbacks=[second, recorder])
    trainer.fit(
        resumed_model, regression_loader(32, 8), regression_loader(16, 8, seed=1), ckpt_path=checkpoint
    )
    assert second.base_lrs == {"0/0": 0.1}  # not the decayed lr stored in the optimizer state
    assert part_one.lrs + recorder.lrs == full.lrs
    assert second.state_dict()["controller"] == uninterrupted.state_dict()["controller"]


def test_metrics_reach_callback_metrics_and_a_csv_logger(tmp_path):
    callback = StableLR(decay_rate=0.5, min_lr_ratio=0.0, **CLOSED_FORM)
    model = TinyRegression(lr=0.1)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[callback], logger=logger, log_every_n_steps=2)
    trainer.fit(model, regression_loader(32, 8), regression_loader(16, 8, seed=1))
    metrics = trainer.callback_metrics
    for key in (
        "stablelr/lr-SGD",
        "stablelr/decay",
        "stablelr/gap",
        "stablelr/gap_factor",
        "stablelr/stability_factor",
    ):
        assert isinstance(metrics[key], torch.Tensor), key
    assert float(metrics["stablelr/nonfinite_steps"]) == 0.0
    with open(logger.log_dir + "/metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("stablelr/lr-SGD")]
    # log_every_n_steps=2: steps 1, 3, 5, 7; each validation end (G updated) the next step, 4 and 8; each with the
    # lr of that step
    assert [int(row["step"]) for row in rows] == [1, 3, 4, 5, 7, 8]
    for row in rows:
        step = int(row["step"])
        assert float(row["stablelr/lr-SGD"]) == pytest.approx(0.1 * math.exp(-0.5 * step / 4), rel=1e-9)
        assert float(row["stablelr/decay"]) == pytest.approx(math.exp(-0.5 * step / 4), rel=1e-9)
        assert float(row["stablelr/gap_factor"]) == 1.0 and float(row["stablelr/stability_factor"]) == 1.0


def test_a_run_shorter_than_log_every_n_steps_still_logs_every_series_after_each_validation(tmp_path):
    # 5 epochs of 4 steps under Lightning's default log_every_n_steps=50: no logging step at all. Each validation
    # end writes the lrs of the next step, with the G it just updated (the gap-factor cuts show).
    callback = StableLR(min_delta=100.0, half_life=2.0, dense_check_steps=0, check_every_n_steps=0)
    logger = CSVLogger(tmp_path, name="short")
    trainer = make_trainer(tmp_path, max_epochs=5, callbacks=[callback], logger=logger)
    trainer.fit(TinyRegression(lr=0.1), regression_loader(32, 8), regression_loader(16, 8, seed=1))
    with open(logger.log_dir + "/metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("stablelr/gap_factor")]
    assert [int(row["step"]) for row in rows] == [4, 8, 12, 16, 20]
    assert float(rows[-1]["stablelr/gap_factor"]) == callback.controller.gap_factor < 1.0
    # the last point: the lr StableLR set for a further step (the optimizer holds it)
    assert float(rows[-1]["stablelr/lr-SGD"]) == pytest.approx(trainer.optimizers[0].param_groups[0]["lr"], rel=1e-12)


def _logged_lrs_match_the_steps(logger, recorder, trainer) -> list[int]:
    """Assert that the logged lr at log step k is the lr optimizer step k used (past the last step: the lr the
    optimizer holds for a further one); return the logged steps."""
    with open(logger.log_dir + "/metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("stablelr/lr-SGD")]
    final = float(trainer.optimizers[0].param_groups[0]["lr"])
    for row in rows:
        step = int(row["step"])
        used = recorder.lrs[step][0] if step < len(recorder.lrs) else final
        assert float(row["stablelr/lr-SGD"]) == pytest.approx(used, rel=1e-12), f"log step {step}"
    return [int(row["step"]) for row in rows]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_point_written_after_a_validation_holds_the_lr_of_its_step_also_mid_accumulation(tmp_path, accumulate):
    # 8 batches per epoch; a validation every 3 batches: with accumulate=2 the one after batch 3 falls between
    # two micro-batches of optimizer step 1, whose lr (already set) it must show at log step 1, not 2.
    callback = StableLR(min_delta=100.0, half_life=2.0, **NO_GUARD)
    logger = CSVLogger(tmp_path, name=f"acc{accumulate}")
    trainer, recorder = _fit(tmp_path, TinyRegression(lr=0.1), callback, epochs=2, num_samples=64, logger=logger,
                             accumulate_grad_batches=accumulate, val_check_interval=3, log_every_n_steps=1000)
    steps = _logged_lrs_match_the_steps(logger, recorder, trainer)
    assert len(steps) >= 4 and callback.controller.gap_factor < 1.0


def test_with_interval_epoch_a_point_at_an_epoch_end_holds_the_next_epochs_lr(tmp_path):
    callback = StableLR(half_life=1.0, interval="epoch", min_lr_ratio=0.0, **CLOSED_FORM)
    logger = CSVLogger(tmp_path, name="epochs")
    trainer, recorder = _fit(tmp_path, TinyRegression(lr=0.4), callback, epochs=3, logger=logger,
                             log_every_n_steps=1000)
    assert _logged_lrs_match_the_steps(logger, recorder, trainer) == [4, 8, 12]
    assert float(trainer.optimizers[0].param_groups[0]["lr"]) == pytest.approx(0.4 * 0.5**3, rel=1e-12)


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        while True:
            x = torch.randn(8, 4, generator=generator)
            yield x, x.sum(1, keepdim=True)


def test_loader_without_length_uses_the_validation_interval_or_asks_for_steps_per_epoch(tmp_path):
    callback = StableLR(decay_rate=1.0, min_lr_ratio=0.0, **CLOSED_FORM)
    trainer = make_trainer(tmp_path, max_steps=6, val_check_interval=3, callbacks=[callback, LrRecorder()])
    model = TinyRegression(val_losses=[1.0])
    trainer.fit(model, torch.utils.data.DataLoader(_Stream(), batch_size=None), regression_loader(8, 8))
    assert callback._resolved_steps_per_epoch == 3
    lrs = [lrs[0] for lrs in trainer.callbacks[1].lrs]
    assert lrs == pytest.approx([0.1 * math.exp(-step / 3) for step in range(6)], rel=1e-12)

    # Only a decay that counts epochs needs them: an explicit decay_rate > 0.
    with pytest.raises(MisconfigurationException, match=r"Pass `steps_per_epoch=N`"):
        make_trainer(tmp_path, max_steps=2, callbacks=[StableLR(decay_rate=0.5, **NO_GUARD)]).fit(
            TinyRegression(), torch.utils.data.DataLoader(_Stream(), batch_size=None)
        )
    explicit = StableLR(steps_per_epoch=5, **NO_GUARD)
    make_trainer(tmp_path, max_steps=2, callbacks=[explicit]).fit(
        TinyRegression(), torch.utils.data.DataLoader(_Stream(), batch_size=None)
    )
    assert explicit._resolved_steps_per_epoch == 5


def test_endless_loader_with_max_steps_needs_no_steps_per_epoch_unless_the_decay_counts_epochs(tmp_path):
    # Issue 9 (6): decay_rate=0 has no time term; the run-length default decay takes its unit from max_steps.
    stream = lambda: torch.utils.data.DataLoader(_Stream(), batch_size=None)  # noqa: E731
    flat = StableLR(decay_rate=0.0, min_lr_ratio=0.0, **CLOSED_FORM)
    trainer = make_trainer(tmp_path, max_steps=10, callbacks=[flat, LrRecorder()])
    trainer.fit(TinyRegression(), stream())
    assert [lrs[0] for lrs in trainer.callbacks[1].lrs] == [0.1] * 10

    default = StableLR(min_lr_ratio=0.0, **CLOSED_FORM)  # run-length decay: hold, then exp down to 0.1
    trainer = make_trainer(tmp_path, max_steps=10, callbacks=[default, LrRecorder()])
    trainer.fit(TinyRegression(), stream())
    assert default._resolved_steps_per_epoch == 10
    lrs = [lrs[0] for lrs in trainer.callbacks[1].lrs]
    # the last 20% of the 10 steps anneal, ending on the last step that runs: lr = 0.1 * 0.1 ** max(0, step - 8)
    assert lrs == pytest.approx([0.1 * 0.1 ** max(0, step - 8) for step in range(10)], rel=1e-12)


@pytest.mark.parametrize(("max_epochs", "max_steps", "epochs_run"), [(10, -1, 10), (5, -1, 5), (100, 20, 5)])
def test_interval_epoch_anneals_to_anneal_to_on_the_last_epoch_that_runs(tmp_path, max_epochs, max_steps, epochs_run):
    # 4 steps per epoch. The run's length comes from max_steps when it ends the fit first (before: max_epochs, so
    # max_epochs=100 with max_steps=20 never decayed), and the last epoch that runs is at anneal_to (before: the
    # anneal ended on an epoch that never ran; 10 epochs ended at 0.316, 5 never decayed).
    callback = StableLR(interval="epoch", min_lr_ratio=0.0, **CLOSED_FORM)
    _, recorder = _fit(tmp_path, TinyRegression(lr=0.1), callback, epochs=max_epochs, max_steps=max_steps)
    per_epoch = [lrs[0] for lrs in recorder.lrs][::4]
    assert len(per_epoch) == epochs_run
    assert per_epoch == pytest.approx([0.1] * (epochs_run - 1) + [0.01], rel=1e-12)


def test_an_endless_loader_without_max_steps_is_an_unknown_length_not_a_short_run(tmp_path):
    # Lightning estimates such a run's length as max_steps, -1; it once read as "fewer than two steps".
    class Four(torch.utils.data.IterableDataset):
        def __iter__(self):
            generator = torch.Generator().manual_seed(0)
            for _ in range(4):
                yield torch.randn(4, 4, generator=generator), torch.randn(4, 1, generator=generator)

    with pytest.warns(UserWarning, match=r"StableLR: the run's length is unknown \(no max_steps/max_epochs"):
        trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[StableLR(monitor="train_loss", strict=False)])
        trainer.fit(TinyRegression(), torch.utils.data.DataLoader(Four(), batch_size=None))
    assert trainer.estimated_stepping_batches == -1 and trainer.global_step == 8


class _Endless(torch.utils.data.IterableDataset):
    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(4, 4, generator=generator), torch.randn(4, 1, generator=generator)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"decay_rate": 0.5}, "interval='epoch' counts Lightning's epochs, and the training loader has no length: if it"
                              " is endless the whole run is one epoch that max_steps ends, and the decay never advances"),
        ({}, "interval='epoch' and a training loader without length leave the run's length in epochs unknown"
             " (max_epochs is not set; max_steps counts steps, not epochs), so the default decay"),
    ],
)
def test_interval_epoch_with_a_loader_without_length_says_the_decay_cannot_follow_epochs(tmp_path, arguments, message):
    callback = StableLR(interval="epoch", monitor="train_loss", strict=False, **arguments)
    with pytest.warns(UserWarning, match=re.escape(message)) as record:
        trainer = make_trainer(tmp_path, max_epochs=-1, max_steps=6, callbacks=[callback])
        trainer.fit(TinyRegression(), torch.utils.data.DataLoader(_Endless(), batch_size=None))
    assert trainer.global_step == 6 and float(trainer.callback_metrics["stablelr/decay"]) == 1.0  # never advanced
    assert not any("set max_steps." in str(w.message) for w in record)  # max_steps is set: not the advice


def test_state_key_and_duplicate_callbacks(tmp_path):
    # One StableLR per Trainer: its state key is the class name, whatever the arguments (issue 9, point 8).
    assert StableLR().state_key == StableLR(monitor="a", decay_rate=0.1, interval="epoch").state_key == "StableLR"
    # Lightning itself refuses two stateful callbacks with one key, before StableLR's own fit-start check.
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `StableLR`"):
        _fit(tmp_path, TinyRegression(), StableLR(monitor="a", **NO_GUARD), recorder=StableLR(monitor="b"))


def test_a_checkpoint_with_the_old_argument_state_key_still_loads():
    callback = StableLR()
    state = {"version": 1, "controller": {"gap_factor": 0.5}, "base_lrs": {"0/0": 0.3}}
    legacy = "StableLR{'monitor': 'val_loss', 'interval': 'step', 'decay_rate': 0.0}"
    callback.on_load_checkpoint(None, None, {"callbacks": {legacy: state}})
    assert callback._pending_state == state


def test_bf16_mixed_probes_run_under_the_precision_context(tmp_path):
    margins = {}
    for precision in ("32-true", "bf16-mixed"):
        callback = StableLR(
            decay_rate=0.0, check_every_n_steps=0, dense_check_steps=4, gap_strength=0.0, warmup_steps=0, safety=0.5
        )
        trainer = make_trainer(tmp_path / precision, max_epochs=1, precision=precision, callbacks=[callback])
        trainer.fit(TinyRegression(lr=0.1), regression_loader(32, 8))
        assert callback.controller.checks == 4
        margins[precision] = callback.controller.last_step_margin
    # bf16 autocast rounds the three losses: the margin is close to, not equal to, the fp32 one.
    assert margins["bf16-mixed"] == pytest.approx(margins["32-true"], rel=0.1)
    assert margins["bf16-mixed"] != margins["32-true"]


def test_rank_mean_accumulator_ignores_non_finite_and_resets():
    accumulator = RankMeanAccumulator()
    for value in (1.0, math.nan, 3.0, math.inf):
        accumulator.add(torch.tensor(value), scale=2.0)
    assert accumulator.pending() == (8.0, 2.0)
    one_process = lambda tensor, op: tensor  # noqa: E731
    assert accumulator.flush(one_process, "cpu", world_size=1) == (4.0, 2.0)
    assert accumulator.pending() == (0.0, 0.0) and accumulator.flush(one_process, "cpu", world_size=1) is None


def test_rank_mean_accumulator_folds_mixed_shapes_and_graph_tensors():
    accumulator = RankMeanAccumulator()
    leaf = torch.tensor(2.0, requires_grad=True)
    for value in (torch.tensor(1.0), torch.tensor([3.0]), leaf * 2.5, torch.tensor([math.nan])):
        accumulator.add(value)
    assert not any(value.requires_grad for value in accumulator._values)  # no graph kept alive until the fold
    assert accumulator.pending() == (9.0, 3.0)
