"""StableLR through a real Trainer: exact lr trajectories, gap factors, conflicts, state, logging.

Unless a test is about the guard, it runs with ``check_every_n_steps=0, dense_check_steps=0``
(``NO_GUARD``): no three-point checks at all, so ``C`` stays exactly 1 and the lr is the closed form
``max(min_lr_ratio · η0, η0 · warmup · exp(-λ t) · G)``; ``CLOSED_FORM`` also sets ``gap_strength=0``
so that ``G`` stays 1 whatever the validation losses are.
"""

from __future__ import annotations

import inspect
import math
import pickle
from dataclasses import fields

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_stablelr.callbacks.stable_lr import StableLR
from lightning_stablelr.controller import StableLRConfig
from tests.helpers import TinyRegression, make_trainer, regression_loader

NO_GUARD = {"check_every_n_steps": 0, "dense_check_steps": 0}
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
    callback = StableLR(half_life=1.0, interval="epoch", warmup_steps=3, min_lr_ratio=0.2, **CLOSED_FORM)
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
    assert {"stablelr/lr-weight", "stablelr/lr-bias"} <= set(trainer.callback_metrics)
    assert "stablelr/lr" not in trainer.callback_metrics


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


def test_picklable():
    callback = StableLR(half_life=3.0, monitor="val/loss")
    clone = pickle.loads(pickle.dumps(callback))
    assert clone.monitor == "val/loss" and clone.controller.decay_rate == pytest.approx(math.log(2) / 3)
    assert isinstance(L.Callback, type) and isinstance(clone, L.Callback)
