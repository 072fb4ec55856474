"""What StableLR reads from the trainer: each step's training loss and the validation metric, over all ranks."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_stablelr.callbacks._lightning_access import has_val_loader, reducer
from lightning_stablelr.callbacks._nonfinite_steps import NONFINITE_TESTS
from lightning_stablelr.callbacks._optimizers import loader_steps_per_epoch
from lightning_stablelr.collectives import RankMeanAccumulator, reduce_with_flag
from lightning_stablelr.validation import check_choice, check_int_at_least

if TYPE_CHECKING:
    from lightning_stablelr.controller import StableLRController
    from lightning_stablelr.curvature import LineModel

__all__ = [
    "CONFLICT_POLICIES", "TrainerInputs", "check_bool", "check_callback_arguments", "decay_needs_epochs",
    "run_length_steps_per_epoch",
]  # fmt: skip

CONFLICT_POLICIES = ("error", "compose")


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool.

    Raises:
        ValueError: it is not (``1`` or ``"yes"`` is refused: a config typo must not pass silently).
    """
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


def check_callback_arguments(
    monitor: Any, strict: Any, skip_nonfinite: Any, on_scheduler_conflict: Any, steps_per_epoch: Any,
    nonfinite_test: Any = "loss",
) -> tuple[str, bool, bool, str, int | None, str]:
    """StableLR's own (non-controller) arguments, checked, in this order.

    Raises:
        ValueError: one is out of range (the message names it, the value received and what to pass).
    """
    if not isinstance(monitor, str) or not monitor:
        raise ValueError(f"`monitor` must be a non-empty metric name, got {monitor!r}. For example 'val_loss'.")
    conflict = check_choice(
        "on_scheduler_conflict", on_scheduler_conflict, CONFLICT_POLICIES,
        "Remove the scheduler from configure_optimizers, or compose the two.",
    )  # fmt: skip
    if steps_per_epoch is not None:
        check_int_at_least("steps_per_epoch", steps_per_epoch, 1, "Or leave it None to infer it.")
    test = check_choice(
        "nonfinite_test", nonfinite_test, NONFINITE_TESTS,
        "'loss' tests the step's loss (free); 'gradients' also every gradient element (one read of them per step).",
    )  # fmt: skip
    skip = check_bool("skip_nonfinite", skip_nonfinite)
    return monitor, check_bool("strict", strict), skip, conflict, steps_per_epoch, test


def decay_needs_epochs(controller: StableLRController) -> bool:
    """Whether ``steps_per_epoch`` matters: only for an explicit decay rate > 0 (``t`` counts epochs).

    ``decay_rate=0`` has no time term, and the run-length decay scales ``λ`` and ``t`` by the same unit
    (``λ·t = ln(1/anneal_to) · step / total``), so there any unit serves (:func:`run_length_steps_per_epoch`).
    """
    return not controller.config.run_length_decay and controller.decay_rate > 0.0


def run_length_steps_per_epoch(trainer: pl.Trainer, controller: StableLRController) -> int | None:
    """The run's length in optimizer steps as the unit of ``t`` when no epoch is known (an endless loader
    with ``max_steps``) and the decay follows the run's length; None otherwise."""
    total = float(trainer.estimated_stepping_batches)
    if controller.config.run_length_decay and math.isfinite(total) and total > 0:
        return max(1, int(total))
    return None


class TrainerInputs:
    """The training-loss running mean (on device, flushed with one collective) and the validation metric.

    Args:
        monitor: the validation metric's key in ``trainer.callback_metrics``.
        strict: a missing ``monitor`` raises (True) or warns once (False).
    """

    def __init__(self, monitor: str, strict: bool) -> None:
        self.monitor = monitor
        self.strict = strict
        self.train_loss = RankMeanAccumulator()
        self._loss_scale = 1
        self._warned_missing = False
        self._warned_endless = False
        self._warned_unresolved = False
        self._warned_no_validation = False

    def apply_run_length(self, trainer: pl.Trainer, controller: StableLRController, steps_per_epoch: int | None) -> None:
        """Give the controller the run's length (``trainer.estimated_stepping_batches``) for its default
        decay; warn once when the length is unknown (an endless loader without ``max_steps``), or when
        ``interval="epoch"`` meets a loader without length (its epoch may never end)."""
        unsized_epoch = controller.config.interval == "epoch" and loader_steps_per_epoch(trainer) is None
        if unsized_epoch and not controller.config.run_length_decay and controller.decay_rate > 0.0 and not self._warned_endless:
            self._warned_endless = True
            rank_zero_warn(
                "StableLR: interval='epoch' counts Lightning's epochs, and the training loader has no length: if it"
                " is endless the whole run is one epoch that max_steps ends, and the decay never advances. Use"
                " interval='step' with `steps_per_epoch` for a decay that follows the steps. (shown once)"
            )
        if not controller.config.run_length_decay:
            return
        # estimated_stepping_batches: the optimizer steps max_steps and max_epochs allow, whichever ends first
        total, per_epoch = float(trainer.estimated_stepping_batches), float(steps_per_epoch or math.inf)
        if total <= 0:  # an endless loader without max_steps: Lightning estimates max_steps, i.e. -1
            total = math.inf
        if controller.config.interval == "epoch":  # Lightning's epochs: the loader's length in optimizer steps
            per_epoch = float(loader_steps_per_epoch(trainer) or math.inf)
            if not math.isfinite(per_epoch):  # no epoch length: the epochs themselves, if bounded
                epochs = trainer.max_epochs
                total, per_epoch = (float(epochs) if epochs not in (None, -1) else math.inf), 1.0
        if not controller.set_run_length(total, per_epoch) and not self._warned_endless:
            self._warned_endless = True
            if math.isfinite(total):
                unit = "epochs" if controller.config.interval == "epoch" else "optimizer steps"
                reason = f"the run is too short for it (fewer than two {unit})"
            elif unsized_epoch:
                reason = ("interval='epoch' and a training loader without length leave the run's length in epochs"
                          " unknown (max_epochs is not set; max_steps counts steps, not epochs)")
            else:
                reason = "the run's length is unknown (no max_steps/max_epochs, or an endless loader)"
            rank_zero_warn(
                f"StableLR: {reason}, so the default decay, which follows the run's length, is off: the lr follows"
                " only G and C. Pass `decay_rate` or `half_life` for a time decay, or set max_steps"
                f"{' with interval=' + repr('step') if unsized_epoch else ''}. (shown once)"
            )

    def warn_about_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Warn once when the fit runs no validation: then ``G`` can never act."""
        if self._warned_no_validation:
            return
        if trainer.limit_val_batches == 0 or not is_overridden("validation_step", pl_module) or not has_val_loader(trainer):
            self._warned_no_validation = True
            rank_zero_warn(
                f"StableLR: this fit runs no validation (limit_val_batches={trainer.limit_val_batches!r}, no"
                f" `validation_step` or no validation loader), so the gap factor G, which acts on `{self.monitor}` at validation end,"
                " stays 1: only the decay and the guard C move the lr. Give the Trainer validation batches to"
                " let G act. (shown once)"
            )

    def warn_if_unresolved(self, line: LineModel) -> None:
        """Warn once when a check was skipped because bf16/fp16 rounding hid what the step did to the loss."""
        coarse = line.resolution > 2.0**-12 * max(abs(line.first_order), 1e-30)
        if line.finite and not line.resolved and coarse and not self._warned_unresolved:
            self._warned_unresolved = True
            rank_zero_warn(
                f"StableLR: the probe's losses are rounded to {line.resolution:.3g} (a low-precision loss, e.g."
                " precision='bf16-true'), more than the checked step moved them, so such checks are skipped and"
                " leave C unchanged (counted in stablelr/guard_unresolved). Return the loss in float32 (e.g."
                " `loss.float()` in `probe_loss`) or use precision='bf16-mixed' to let the guard see small"
                " overshoots. (shown once)"
            )

    def configure_loss_scale(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Once per fit: Lightning divides the loss by ``accumulate_grad_batches`` (automatic optimization)."""
        self._loss_scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1

    def record_train_loss(self, outputs: Any) -> None:
        """Add the step's loss (``outputs`` or ``outputs["loss"]``) to the running mean; no host sync on GPU."""
        loss = outputs if isinstance(outputs, Tensor) else outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor) and loss.numel() == 1:
            self.train_loss.add(loss, self._loss_scale)

    def flush_train_loss(self, trainer: pl.Trainer) -> tuple[float, float] | None:
        """``(mean, count)`` over all ranks since the last flush, or None; a collective."""
        return self.train_loss.flush(reducer(trainer), trainer.strategy.root_device, trainer.world_size)

    def validation_value(self, trainer: pl.Trainer) -> float | None:
        """``L_va`` averaged over ranks, or None (strict=False) when a rank lacks the key; a collective.

        Raises:
            RuntimeError: the key is missing on some rank and ``strict`` is True (the message lists the
                available keys).
        """
        value = trainer.callback_metrics.get(self.monitor)
        local = None if value is None else [float(value)]
        (mean_value,), missing = reduce_with_flag(
            reducer(trainer), local, size=1, device=trainer.strategy.root_device, dtype=torch.float32
        )
        if not missing:
            return mean_value
        available = [key for key in trainer.callback_metrics if not key.startswith("stablelr/")]
        keys = f"one of the available keys: `{'`, `'.join(available)}`" if available else "a metric (none is logged yet)"
        if trainer.barebones:  # self.log is refused there: the metric must be put in by hand
            how = (
                f"`Trainer(barebones=True)` turns `self.log` off, so put it there yourself at the end of"
                f" validation (`self.trainer.callback_metrics['{self.monitor}'] = mean_loss` in"
                " `on_validation_epoch_end`), or drop barebones=True"
            )
        else:
            how = f"Log it in `validation_step` (self.log), or pass `StableLR(monitor=...)` {keys}"
        message = (
            f"StableLR conditioned on metric `{self.monitor}` which is not available in `trainer.callback_metrics`. {how}."
            + (" Use `StableLR(strict=False)` to leave the gap factor unchanged instead." if self.strict else
               " With strict=False the gap factor G stays unchanged until it appears.")
        )
        if self.strict:
            raise RuntimeError(message)
        if not self._warned_missing:
            self._warned_missing = True
            rank_zero_warn(message + " (shown once)", category=RuntimeWarning)
        return None
