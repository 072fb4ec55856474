"""StableLR from the LightningCLI command line, and StableLR through pickle (ddp_spawn, LightningCLI).

BoringModel logs no ``val_loss`` (so ``strict=false``) and returns a ``StepLR`` (so
``on_scheduler_conflict=compose``); its data module feeds 64 one-sample batches, cut to 8 here.
"""

from __future__ import annotations

import inspect
import math
import pickle
from dataclasses import fields
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

from lightning_stablelr import StableLR
from lightning_stablelr.controller import StableLRConfig

TRAIN_BATCHES = 8

# A value other than the default for every constructor argument (decay_rate and half_life exclude each
# other, so half_life gets its own instance below).
NON_DEFAULT_ARGUMENTS = {
    "decay_rate": 0.07,
    "half_life": None,
    "interval": "epoch",
    "warmup_steps": 3,
    "min_lr_ratio": 0.02,
    "gap_tolerance": 0.1,
    "gap_strength": 2.0,
    "min_delta": 0.001,
    "gap_patience": 2,
    "safety": 0.5,
    "recovery": 1.05,
    "recover_above": 5.0,
    "min_stability_factor": 0.01,
    "max_lr_boost": 3.0,
    "guard_window": 5,
    "anneal_to": 0.3,
    "anneal_fraction": 0.5,
    "monitor": "val_acc",
    "strict": False,
    "check_every_n_steps": 7,
    "dense_check_steps": 5,
    "skip_nonfinite": False,
    "on_scheduler_conflict": "compose",
    "steps_per_epoch": 11,
    "nonfinite_test": "gradients",
}
CONFIG_FIELDS = {field.name for field in fields(StableLRConfig)}


def _argument(callback: StableLR, name: str):
    """Where StableLR keeps a constructor argument: its StableLRConfig, or an attribute of the same name."""
    return getattr(callback.config, name) if name in CONFIG_FIELDS else getattr(callback, name)


def test_lightning_cli_builds_stablelr_from_the_command_line_and_decays_the_lr(tmp_path: Path) -> None:
    cli = LightningCLI(
        BoringModel,
        BoringDataModule,
        args=[
            "fit",
            "--trainer.callbacks+=lightning_stablelr.StableLR",
            "--trainer.callbacks.decay_rate=0.1",
            "--trainer.callbacks.warmup_steps=0",  # the default warmup (10 steps) would scale these 8 steps
            "--trainer.callbacks.strict=false",
            "--trainer.callbacks.on_scheduler_conflict=compose",
            "--trainer.max_epochs=1",
            f"--trainer.limit_train_batches={TRAIN_BATCHES}",
            "--trainer.limit_val_batches=2",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        save_config_kwargs={"overwrite": True},
    )
    callbacks = [callback for callback in cli.trainer.callbacks if isinstance(callback, StableLR)]
    assert len(callbacks) == 1
    callback = callbacks[0]
    assert callback.config.decay_rate == 0.1
    assert callback.strict is False
    assert callback.on_scheduler_conflict == "compose"
    assert cli.trainer.global_step == TRAIN_BATCHES

    # The last step (7) used t = 7/8 epochs: the logged decay is exp(-0.1 t) and the lr is 0.1 (BoringModel's
    # SGD, StepLR not stepped yet) times decay, G (1: no val_loss) and C (whatever the guard decided).
    metrics = {key: float(value) for key, value in cli.trainer.callback_metrics.items()}
    decay = math.exp(-0.1 * (TRAIN_BATCHES - 1) / TRAIN_BATCHES)
    assert metrics["stablelr/decay"] == pytest.approx(decay, rel=1e-6)
    assert metrics["stablelr/gap_factor"] == 1.0
    assert 0.0 < metrics["stablelr/stability_factor"] <= 1.0
    expected_lr = 0.1 * decay * metrics["stablelr/stability_factor"]
    assert metrics["stablelr/lr-SGD"] == pytest.approx(expected_lr, rel=1e-6)
    # Composed: StepLR kept its own trajectory (0.1 -> 0.01 at the epoch end); StableLR only scaled steps.
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)
    assert (tmp_path / "config.yaml").read_text().count("class_path: lightning_stablelr.StableLR") == 1


def test_pickle_keeps_every_constructor_argument() -> None:
    signature = inspect.signature(StableLR.__init__)
    assert set(signature.parameters) - {"self"} == set(NON_DEFAULT_ARGUMENTS), "update NON_DEFAULT_ARGUMENTS"
    for name, value in NON_DEFAULT_ARGUMENTS.items():
        if value is not None:
            assert value != signature.parameters[name].default, f"{name} must differ from its default"

    for arguments in (NON_DEFAULT_ARGUMENTS, {"half_life": 4.0}):
        callback = StableLR(**arguments)
        restored = pickle.loads(pickle.dumps(callback))
        assert restored.state_key == callback.state_key
        for name in signature.parameters:
            if name != "self":
                assert _argument(restored, name) == _argument(callback, name), name
        for name, value in arguments.items():
            assert _argument(restored, name) == value, name
        assert restored.controller.decay_rate == callback.controller.decay_rate
        assert restored.state_dict() == callback.state_dict()
    assert StableLR(half_life=4.0).controller.decay_rate == pytest.approx(math.log(2) / 4.0)
    # One StableLR per Trainer: the state key is the class name, not the arguments.
    assert StableLR(decay_rate=0.07).state_key == StableLR(decay_rate=0.08).state_key == "StableLR"


class _OverfittingBoringModel(BoringModel):
    """BoringModel without a scheduler, logging a ``val_loss`` that grows each epoch: G has work to do."""

    def validation_step(self, batch, batch_idx):
        loss = self.step(batch)
        self.log("val_loss", loss * (10.0 + 10.0 * self.current_epoch))
        return loss

    def configure_optimizers(self):
        import torch

        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_pickle_after_fit_keeps_the_controller_state(tmp_path: Path) -> None:
    callback = StableLR(decay_rate=0.2, gap_tolerance=0.0, check_every_n_steps=2, dense_check_steps=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=TRAIN_BATCHES,
        limit_val_batches=2,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(_OverfittingBoringModel(), datamodule=BoringDataModule())
    state = callback.state_dict()
    assert state["controller"]["gap_factor"] < 1.0, "the fit must leave a non-trivial state to pickle"
    assert state["base_lrs"] == {"0/0": 0.1}

    restored = pickle.loads(pickle.dumps(callback))
    assert restored.state_dict() == state
    assert restored.state_key == callback.state_key
    assert restored.controller.gap_factor == callback.controller.gap_factor
    assert restored.controller.stability_factor == callback.controller.stability_factor
    assert restored.controller.best_val_loss == callback.controller.best_val_loss
