"""The StableLR state machine shared by the Lightning callback and the torch scheduler (pure: no torch).

For a param group with base learning rate ``η0`` after ``step`` optimizer steps and ``t`` epochs,

    η = max(min_lr_ratio · η0,  η0 · warmup(step) · exp(-λ·t) · G · C)

The controller owns the state that is not a function of the step count: the gap factor ``G``, the
stability factor ``C``, the best validation loss and the running mean of the training loss since the
last validation. Everything it decides comes from :mod:`lightning_stablelr.schedule`, so the callback
(:class:`lightning_stablelr.StableLR`) and the scheduler (:class:`lightning_stablelr.StableLRScheduler`)
produce the same learning rates from the same observations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# StableLRConfig lives in config.py (with the check cadence); re-exported here, where it was defined first.
from lightning_stablelr.config import StableLRConfig, config_field_names
from lightning_stablelr.curvature import LineModel
from lightning_stablelr.schedule import (
    decay_factor,
    floored_lr,
    improved_on_best,
    relative_gap,
    update_gap_factor,
    update_stability_factor,
    warmup_factor,
)
from lightning_stablelr.validation import check_finite_positive, check_non_negative

__all__ = ["GapDecision", "StableLRConfig", "StableLRController", "config_field_names"]


@dataclass(frozen=True)
class GapDecision:
    """What one validation did to the gap factor.

    Attributes:
        gap: the relative gap ``r``, or None when no finite training or validation loss was available.
        overfitting: True when ``G`` shrank at this validation (``r > gap_tolerance``, no improvement, for
            ``gap_patience`` consecutive validations).
        gap_factor: ``G`` after this validation.
        improved: the validation loss beat the best so far by more than ``min_delta`` (always True the
            first time).
        overfit_streak: consecutive validations with ``r > gap_tolerance`` and no improvement, this one included.
    """

    gap: float | None
    overfitting: bool
    gap_factor: float
    improved: bool
    overfit_streak: int = 0


class StableLRController:
    """State machine of StableLR: ``η = max(min_lr_ratio·η0, η0 · warmup · exp(-λt) · G · C)``.

    Args:
        config: the settings; ``None`` builds a :class:`StableLRConfig` from ``overrides``.
        **overrides: :class:`StableLRConfig` fields (only when ``config`` is None).

    ``G`` (gap factor) changes only in :meth:`observe_validation`, ``C`` (stability factor) only in
    :meth:`observe_line` and :meth:`observe_nonfinite`; the rest is a closed form of the step count, so
    restoring :meth:`state_dict` reproduces the learning-rate trajectory exactly.
    """

    VERSION = 1

    def __init__(self, config: StableLRConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = StableLRConfig(**overrides)
        elif overrides:
            raise ValueError(
                f"Pass either `config` or keyword overrides, got both (overrides: {sorted(overrides)}). "
                "Use dataclasses.replace(config, ...) to change a config."
            )
        self.config = config
        self.decay_rate = config.resolved_decay_rate
        self.version = self.VERSION
        self.gap_factor = 1.0
        self.stability_factor = 1.0
        self.best_val_loss: float | None = None
        self.last_gap: float | None = None
        self.last_step_margin: float | None = None
        self.overfit_streak = 0
        self.nonfinite_steps = 0
        self.checks = 0
        self.validations = 0
        self._train_loss_sum = 0.0
        self._train_loss_weight = 0.0

    # ------------------------------------------------------------------ closed form of the step count
    def epochs_elapsed(self, global_step: int, steps_per_epoch: float, epoch: int) -> float:
        """``t``: ``global_step / steps_per_epoch`` with ``interval="step"``, ``float(epoch)`` with ``"epoch"``."""
        if self.config.interval == "epoch":
            return float(epoch)
        steps_per_epoch = check_finite_positive(
            "steps_per_epoch",
            steps_per_epoch,
            "With interval='step' the number of optimizer steps per epoch is needed.",
        )
        return global_step / steps_per_epoch

    def decay(self, epochs_elapsed: float) -> float:
        """``exp(-λ · t)``."""
        return decay_factor(epochs_elapsed, self.decay_rate)

    def factor(self, global_step: int, epochs_elapsed: float) -> float:
        """``warmup(global_step) · exp(-λ · t) · G · C`` (before the floor)."""
        return (
            warmup_factor(global_step, self.config.warmup_steps)
            * self.decay(epochs_elapsed)
            * self.gap_factor
            * self.stability_factor
        )

    def lr(self, base_lr: float, global_step: int, epochs_elapsed: float) -> float:
        """``max(min_lr_ratio · base_lr, base_lr · factor)``: the lr of the optimizer step ``global_step``."""
        return floored_lr(base_lr, self.factor(global_step, epochs_elapsed), self.config.min_lr_ratio)

    # ------------------------------------------------------------------ observations
    def record_train_loss(self, loss: float, weight: float = 1.0) -> None:
        """Add ``loss`` with ``weight`` to the running mean since the last validation; non-finite losses are ignored."""
        weight = check_non_negative(
            "weight", weight, "It is the number of samples or steps the loss stands for."
        )
        loss = float(loss)
        if weight == 0.0 or not math.isfinite(loss):
            return
        self._train_loss_sum += weight * loss
        self._train_loss_weight += weight

    @property
    def train_loss_mean(self) -> float | None:
        """Weighted mean of the finite training losses recorded since the last validation, or None."""
        if self._train_loss_weight <= 0.0:
            return None
        return self._train_loss_sum / self._train_loss_weight

    def reset_train_loss(self) -> None:
        """Forget the running mean (done by :meth:`observe_validation`)."""
        self._train_loss_sum = 0.0
        self._train_loss_weight = 0.0

    def observe_validation(self, val_loss: float, train_loss: float | None = None) -> GapDecision:
        """Update the best validation loss and ``G`` from one real validation, then reset the running mean.

        ``L_tr`` is ``train_loss`` or, when None, the running mean of :meth:`record_train_loss`.
        ``r = (L_va - L_tr) / max(|L_va|, eps)``; the validation *signals* overfitting when
        ``r > gap_tolerance`` and ``L_va >= best - min_delta``. After ``gap_patience`` consecutive signals,
        each further signal applies ``G ← G · exp(-gap_strength · (r - gap_tolerance))``. An improvement
        updates ``best``. A non-finite ``L_va`` or a missing ``L_tr`` leaves ``G`` unchanged and resets the streak.
        """
        mean = self.train_loss_mean
        train = mean if train_loss is None else float(train_loss)
        self.reset_train_loss()
        self.validations += 1
        val_loss = float(val_loss)
        improved = improved_on_best(val_loss, self.best_val_loss, self.config.min_delta)
        if improved:
            self.best_val_loss = val_loss
        if not math.isfinite(val_loss) or train is None or not math.isfinite(train):
            self.overfit_streak = 0
            self.last_gap = None
            return GapDecision(None, False, self.gap_factor, improved, 0)

        gap = relative_gap(val_loss, train)
        self.last_gap = gap
        signal = gap > self.config.gap_tolerance and not improved
        self.overfit_streak = self.overfit_streak + 1 if signal else 0
        overfitting = signal and self.overfit_streak >= self.config.gap_patience
        if overfitting:
            self.gap_factor = update_gap_factor(
                self.gap_factor,
                gap=gap,
                improved=False,
                gap_tolerance=self.config.gap_tolerance,
                gap_strength=self.config.gap_strength,
            )
        return GapDecision(gap, overfitting, self.gap_factor, improved, self.overfit_streak)

    def observe_line(self, line: LineModel) -> float:
        """Apply :func:`~lightning_stablelr.schedule.update_stability_factor` to one line model; return ``C``."""
        self.checks += 1
        self.last_step_margin = line.step_margin
        self.stability_factor = self._update_stability(line, nonfinite=False)
        return self.stability_factor

    def observe_nonfinite(self) -> float:
        """Count a step with a NaN/Inf loss or gradient and halve ``C`` (not below ``min_stability_factor``)."""
        self.nonfinite_steps += 1
        self.stability_factor = self._update_stability(None, nonfinite=True)
        return self.stability_factor

    def _update_stability(self, line: LineModel | None, *, nonfinite: bool) -> float:
        config = self.config
        return update_stability_factor(
            self.stability_factor,
            line,
            nonfinite=nonfinite,
            safety=config.safety,
            recovery=config.recovery,
            min_factor=config.min_stability_factor,
            recover_above=config.recover_above,
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The mutable state as primitives (floats, ints, None), with a ``version`` key and the config."""
        return {
            "version": self.version,
            "config": self.config.to_dict(),
            "gap_factor": self.gap_factor,
            "stability_factor": self.stability_factor,
            "best_val_loss": self.best_val_loss,
            "last_gap": self.last_gap,
            "last_step_margin": self.last_step_margin,
            "overfit_streak": self.overfit_streak,
            "nonfinite_steps": self.nonfinite_steps,
            "checks": self.checks,
            "validations": self.validations,
            "train_loss_sum": self._train_loss_sum,
            "train_loss_weight": self._train_loss_weight,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; missing keys (older versions) keep fresh defaults.

        The stored ``config`` is informational: the controller keeps the config it was built with.
        """
        self.gap_factor = float(state.get("gap_factor", 1.0))
        self.stability_factor = float(state.get("stability_factor", 1.0))
        best = state.get("best_val_loss")
        self.best_val_loss = None if best is None else float(best)
        gap = state.get("last_gap")
        self.last_gap = None if gap is None else float(gap)
        margin = state.get("last_step_margin")
        self.last_step_margin = None if margin is None else float(margin)
        self.overfit_streak = int(state.get("overfit_streak", 0))
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.checks = int(state.get("checks", 0))
        self.validations = int(state.get("validations", 0))
        self._train_loss_sum = float(state.get("train_loss_sum", 0.0))
        self._train_loss_weight = float(state.get("train_loss_weight", 0.0))
