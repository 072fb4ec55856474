"""What StableLR reads from the trainer: each step's training loss and the validation metric, over all ranks."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_stablelr.callbacks._lightning_access import reducer
from lightning_stablelr.collectives import RankMeanAccumulator, reduce_with_flag
from lightning_stablelr.validation import check_choice, check_int_at_least

if TYPE_CHECKING:
    from lightning_stablelr.controller import StableLRController
    from lightning_stablelr.curvature import LineModel

__all__ = ["CONFLICT_POLICIES", "TrainerInputs", "check_bool", "check_callback_arguments"]

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
    monitor: Any, strict: Any, skip_nonfinite: Any, on_scheduler_conflict: Any, steps_per_epoch: Any
) -> tuple[str, bool, bool, str, int | None]:
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
    return monitor, check_bool("strict", strict), check_bool("skip_nonfinite", skip_nonfinite), conflict, steps_per_epoch


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
        self._warned_missing = False
        self._warned_endless = False
        self._warned_unresolved = False

    def apply_run_length(self, trainer: pl.Trainer, controller: StableLRController, steps_per_epoch: int | None) -> None:
        """Give the controller the run's length (``trainer.estimated_stepping_batches``) for its default
        decay; warn once when the length is unknown (an endless loader without ``max_steps``)."""
        if not controller.config.run_length_decay:
            return
        if controller.config.interval == "epoch":
            epochs = trainer.max_epochs
            total, per_epoch = (float(epochs) if epochs not in (None, -1) else math.inf), 1.0
        else:
            total, per_epoch = float(trainer.estimated_stepping_batches), float(steps_per_epoch or math.inf)
        if not controller.set_run_length(total, per_epoch) and not self._warned_endless:
            self._warned_endless = True
            rank_zero_warn(
                "StableLR: the run's length is unknown (no max_steps/max_epochs, or an endless loader), so the"
                " default decay, which follows the run's length, is off: the lr follows only G and C. Pass"
                " `decay_rate` or `half_life` for a time decay, or set max_steps. (shown once)"
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

    def record_train_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> None:
        """Add the step's loss (``outputs`` or ``outputs["loss"]``) to the running mean; no host sync on GPU."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor) and loss.numel() == 1:
            # Lightning divided the loss by accumulate_grad_batches (automatic optimization only).
            scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            self.train_loss.add(loss, scale)

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
        message = (
            f"StableLR conditioned on metric `{self.monitor}` which is not available. Log it in"
            f" `validation_step` (self.log), or pass `StableLR(monitor=...)` {keys}."
            " Use `StableLR(strict=False)` to leave the gap factor unchanged instead."
        )
        if self.strict:
            raise RuntimeError(message)
        if not self._warned_missing:
            self._warned_missing = True
            rank_zero_warn(message + " (shown once)", category=RuntimeWarning)
        return None
