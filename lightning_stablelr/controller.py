"""The StableLR state machine shared by the Lightning callback and the torch scheduler (pure: no torch).

For a param group with base learning rate ``η0`` after ``step`` optimizer steps and ``t`` epochs,

    η = η0 · max(min_lr_ratio,  warmup(step) · exp(-λ·t) · G) · C

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
    GUARD_REASONS,
    MarginWindow,
    anneal_start,
    boost_ceiling,
    decay_factor,
    floored_lr,
    full_lr_margin,
    improved_on_best,
    relative_gap,
    run_length_decay_rate,
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
    """State machine of StableLR: ``η = η0 · max(min_lr_ratio, warmup · exp(-λt) · G) · C``.

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
        self.total_steps: float | None = None
        self.decay_start = 0.0
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
        self.margins = MarginWindow(config.guard_window)
        #: margins pushed since the window was last cleared that were measured at the full warmup (a boost
        #: extrapolates only from those: the warmup's first steps see the flattest part of the loss)
        self.full_lr_margins = 0
        self.guard_counts: dict[str, int] = dict.fromkeys(GUARD_REASONS, 0)
        self.last_guard_reason: str | None = None
        self.confirm_pending = False
        self._train_loss_sum = 0.0
        self._train_loss_weight = 0.0

    def set_run_length(self, total_steps: float, steps_per_epoch: float) -> bool:
        """Tell the controller how many optimizer steps the run has; returns whether the decay follows it.

        With neither ``decay_rate`` nor ``half_life`` given, the decay holds at 1, then falls exponentially to
        ``anneal_to`` over the last ``anneal_fraction`` of the run and reaches it on the last step that runs
        (:func:`~lightning_stablelr.schedule.run_length_decay_rate`, :func:`~lightning_stablelr.schedule.anneal_window`).
        With ``interval="epoch"`` the run counts ``ceil(total_steps / steps_per_epoch)`` epochs and the window is
        whole epochs: the last epoch runs at ``anneal_to``. An unknown length (``inf``, e.g. an endless stream)
        leaves ``λ = 0`` and returns False; so do an explicit decay and a run of fewer than two steps (epochs).
        """
        if not self.config.run_length_decay:
            return False
        self.total_steps = float(total_steps)
        units, per_epoch = float(total_steps), float(steps_per_epoch)
        if self.config.interval == "epoch":  # count whole epochs: t is the integer epoch
            units = math.ceil(units / per_epoch) if math.isfinite(units) and math.isfinite(per_epoch) else math.inf
            per_epoch = 1.0
        fraction = self.config.anneal_fraction
        self.decay_rate = run_length_decay_rate(units, per_epoch, self.config.anneal_to, fraction)
        self.decay_start = anneal_start(units, per_epoch, fraction) if self.decay_rate else 0.0
        return self.decay_rate > 0.0

    # ------------------------------------------------------------------ closed form of the step count
    def epochs_elapsed(self, global_step: int, steps_per_epoch: float, epoch: int) -> float:
        """``t``: ``global_step / steps_per_epoch`` with ``interval="step"``, ``float(epoch)`` with ``"epoch"``."""
        if self.config.interval == "epoch":
            return float(epoch)
        if type(steps_per_epoch) is int and steps_per_epoch > 0:  # the per-step call: no validation cost
            return global_step / steps_per_epoch
        steps_per_epoch = check_finite_positive(
            "steps_per_epoch",
            steps_per_epoch,
            "With interval='step' the number of optimizer steps per epoch is needed.",
        )
        return global_step / steps_per_epoch

    def decay(self, epochs_elapsed: float) -> float:
        """``exp(-λ · max(0, t - t0))``; ``t0`` is 0 except for the run-length decay (:meth:`set_run_length`)."""
        return decay_factor(max(0.0, epochs_elapsed - self.decay_start), self.decay_rate)

    def schedule_factor(self, global_step: int, epochs_elapsed: float) -> float:
        """``max(min_lr_ratio, warmup(global_step) · exp(-λ · t) · G)``: the floored schedule, without ``C``."""
        return self._floored_schedule(global_step, self.decay(epochs_elapsed))

    def _floored_schedule(self, global_step: int, decay: float) -> float:
        """``max(min_lr_ratio, warmup(global_step) · decay · G)``; the guard passes ``decay = 1``."""
        rest = warmup_factor(global_step, self.config.warmup_steps) * decay * self.gap_factor
        return floored_lr(1.0, rest, self.config.min_lr_ratio)

    def factor(self, global_step: int, epochs_elapsed: float) -> float:
        """``max(min_lr_ratio, warmup · exp(-λ · t) · G) · C``: the lr as a fraction of the base lr."""
        return self.schedule_factor(global_step, epochs_elapsed) * self.stability_factor

    def lr(self, base_lr: float, global_step: int, epochs_elapsed: float) -> float:
        """``base_lr · max(min_lr_ratio, warmup · exp(-λt) · G) · C``: the lr of the optimizer step ``global_step``.

        The floor bounds the schedule (decay and ``G``), not the guard: ``C`` can take the lr below
        ``min_lr_ratio · base_lr`` (down to ``min_stability_factor`` of it) when the run needs it to stay finite.
        """
        return base_lr * self.factor(global_step, epochs_elapsed)

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
            self.stability_factor = min(self.stability_factor, 1.0)  # a boost never undoes an overfitting cut
        return GapDecision(gap, overfitting, self.gap_factor, improved, self.overfit_streak)

    def observe_line(self, line: LineModel, step: int | None = None, epochs_elapsed: float = 0.0) -> float:
        """One guard check of the step ``step`` (its lr factor is recomputed in closed form); returns ``C``.

        The rule is :func:`~lightning_stablelr.schedule.update_stability_factor`: the step's curvature margin
        (:attr:`~lightning_stablelr.curvature.LineModel.curvature_margin`) is normalized to the full lr, pushed
        into the window, and ``C`` moves only when the window's robust margin, at the next step's floored
        ``warmup · G`` (not the decay), leaves the hold band. A non-finite line model counts as a non-finite step
        (:meth:`observe_nonfinite`); an unresolved one (losses within their rounding) changes nothing.
        Without ``step`` the probed lr factor is taken as ``C`` alone (no warmup, decay or ``G``).
        """
        self.checks += 1
        self.last_step_margin = line.curvature_margin  # what the guard reads (s_max for a descent step)
        if not line.finite:
            return self._cut_nonfinite()
        if not line.resolved:
            return self._decided(self.stability_factor, "unresolved", confirm=False)
        rest = 1.0 if step is None else self.schedule_factor(step, epochs_elapsed)
        margin = full_lr_margin(line.curvature_margin, rest * self.stability_factor)
        self.margins.push(margin)
        if step is None or step + 1 >= self.config.warmup_steps:
            self.full_lr_margins += 1
        # C and G are two ceilings on the lr (stability, overfitting) and the cool-down anneals below both: C's
        # decisions see the floored warmup · G, not the decay (judged against the decay, C would grow back as
        # it falls). The floor stays: below it the real lr is min_lr_ratio · η0 · C, higher than warmup · G says.
        following = 1.0 if step is None else self._floored_schedule(step + 1, 1.0)
        factor, reason = update_stability_factor(
            self.stability_factor,
            self.robust_margin,
            lr_factor=following,
            safety=self.config.safety,
            recover_above=self.config.recover_above,
            recovery=self.config.recovery,
            min_factor=self.config.min_stability_factor,
            max_factor=boost_ceiling(self.config.max_lr_boost, self.gap_factor, self.full_lr_margins, self.margins.size),
        )
        # A margin below the band asks for a confirmation check at the next step, so that a real
        # instability is acted on two steps later instead of one check period later.
        low = self.config.safety * line.curvature_margin < 1.0
        return self._decided(factor, reason, confirm=low and reason != "overshoot")

    def observe_nonfinite(self) -> float:
        """Count a step with a NaN/Inf loss or gradient and halve ``C`` (not below ``min_stability_factor``)."""
        self.nonfinite_steps += 1
        return self._cut_nonfinite()

    @property
    def robust_margin(self) -> float | None:
        """``M``: the robust full-lr margin C follows (:meth:`MarginWindow.robust`), None until enough checks."""
        return self.margins.robust()

    def take_confirmation_request(self) -> bool:
        """True once after a check asked for a confirmation check at the next optimizer step."""
        pending, self.confirm_pending = self.confirm_pending, False
        return pending

    def _cut_nonfinite(self) -> float:
        # Margins measured before a blow-up say nothing about the state after it: recover on fresh evidence.
        self.margins.clear()
        self.full_lr_margins = 0
        # A boost is dropped at once: half of min(C, 1).
        factor = max(self.config.min_stability_factor, min(1.0, self.stability_factor) * 0.5)
        return self._decided(factor, "nonfinite", confirm=True)

    def _decided(self, factor: float, reason: str, *, confirm: bool) -> float:
        self.stability_factor = factor
        self.last_guard_reason = reason
        self.guard_counts[reason] = self.guard_counts.get(reason, 0) + 1
        self.confirm_pending = confirm
        return factor

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
            "margins": list(self.margins.margins),
            "full_lr_margins": self.full_lr_margins,
            "guard_counts": dict(self.guard_counts),
            "last_guard_reason": self.last_guard_reason,
            "confirm_pending": self.confirm_pending,
            "decay_rate": self.decay_rate,
            "decay_start": self.decay_start,
            "total_steps": self.total_steps,
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
        self.margins.clear()
        for margin in state.get("margins", []):
            self.margins.push(float(margin))
        self.full_lr_margins = int(state.get("full_lr_margins", len(self.margins.margins)))
        self.guard_counts = dict.fromkeys(GUARD_REASONS, 0)
        self.guard_counts.update({str(k): int(v) for k, v in state.get("guard_counts", {}).items()})
        self.last_guard_reason = state.get("last_guard_reason")
        self.confirm_pending = bool(state.get("confirm_pending", False))
        if self.config.run_length_decay and state.get("total_steps") is not None:
            self.total_steps = float(state["total_steps"])
            self.decay_rate = float(state.get("decay_rate", self.decay_rate))
            self.decay_start = float(state.get("decay_start", 0.0))
        self._train_loss_sum = float(state.get("train_loss_sum", 0.0))
        self._train_loss_weight = float(state.get("train_loss_weight", 0.0))
