"""StableLR: a Lightning callback that sets every param group's learning rate before every optimizer step.

For each param group ``g`` with base lr ``η0_g`` (its ``lr`` in ``on_fit_start``; a second fit on the same
optimizer, whose groups still hold StableLR's last lrs, starts from the same ``η0_g`` again):

    η_g(t) = η0_g · max(min_lr_ratio,  warmup(step) · exp(-λ·t) · G) · C

``t = global_step / steps_per_epoch`` (``interval="step"``) or the epoch (``interval="epoch"``); ``G`` is
the validation-gap factor, ``C`` the curvature/divergence guard. The math lives in
:class:`~lightning_stablelr.controller.StableLRController`; this callback feeds it DDP-reduced
observations and applies its lrs.

.. code-block:: python

    import lightning as L
    from lightning_stablelr import StableLR

    trainer = L.Trainer(max_epochs=30, callbacks=[StableLR(half_life=10, warmup_steps=100)])
    trainer.fit(model)  # model logs "val_loss" in validation_step
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_stablelr.callbacks._inputs import (
    TrainerInputs,
    check_callback_arguments,
    decay_needs_epochs,
    run_length_steps_per_epoch,
)
from lightning_stablelr.callbacks._lightning_access import (
    is_last_training_batch,
    logs_this_step,
    schedule_step,
    upcoming_log_step,
)
from lightning_stablelr.callbacks._metric_writer import MetricWriter
from lightning_stablelr.callbacks._nonfinite_steps import NonfiniteSteps
from lightning_stablelr.callbacks._optimizers import (
    SchedulerComposition,
    base_learning_rates,
    composed_lr,
    infer_steps_per_epoch,
    param_group_lr_names,
    scheduled_optimizers,
    set_learning_rates,
)
from lightning_stablelr.callbacks._stable_lr_state import StableLRState
from lightning_stablelr.callbacks.line_probe_session import LineProbeSession, line_probe_session
from lightning_stablelr.config import CheckCadence, StableLRConfig, config_field_names
from lightning_stablelr.controller import StableLRController
from lightning_stablelr.metric_names import controller_metrics
from lightning_stablelr.nonfinite import clear_found_inf

__all__ = ["StableLR"]

_CONFIG = StableLRConfig()  # the defaults of the controller arguments: written once, in StableLRConfig
_CADENCE = CheckCadence()


class StableLR(StableLRState):
    """Controls the learning rate: exponential decay, validation-gap factor and curvature guard.

    Args:
        decay_rate, half_life, interval, warmup_steps, min_lr_ratio, gap_tolerance, gap_strength, min_delta,
            gap_patience, safety, recovery, recover_above, min_stability_factor, max_lr_boost, guard_window,
            anneal_to, anneal_fraction: the controller's settings, in :class:`~lightning_stablelr.config.StableLRConfig`.
        monitor: validation metric ``L_va`` (read from ``trainer.callback_metrics`` at validation end).
        strict: a missing ``monitor`` raises (True) or warns once and leaves ``G`` unchanged (False).
        check_every_n_steps, dense_check_steps: which optimizer steps run the three-point guard (two extra
            forward passes each; three on a verifying check, the first and every 16th, and when the training
            loss cannot stand in for L0): every step below ``dense_check_steps``, then the steps with
            ``(step + 1) % check_every_n_steps == 0``; 0 disables either. ``step`` is ``global_step``, or
            under manual optimization the batches that stepped (a batch may step several optimizers)
            (:class:`~lightning_stablelr.config.CheckCadence`, also ``StableLRScheduler.should_check``).
        skip_nonfinite: neutralise a non-finite step on the device, without a host sync: a fused optimizer
            skips it, others apply zero gradients (:mod:`lightning_stablelr.nonfinite`). Each such step
            halves ``C`` and is counted lazily (next logging step, guard check or validation).
        nonfinite_test: ``"loss"`` (the step's loss decides, O(1); guard-check steps also test every gradient)
            or ``"gradients"`` (every gradient element on every step, one fused norm: also catches a
            backward-only NaN such as ``sqrt``'s gradient at 0). Several processes: the gradients decide.
        on_scheduler_conflict: ``"error"`` raises when ``configure_optimizers`` returns a scheduler;
            ``"compose"`` uses ``min(η_s, max(min_lr_ratio · η0, η_s · f)) · C`` with ``η_s`` the
            scheduler's lr, so the scheduler keeps its own trajectory and StableLR only scales it down.
        steps_per_epoch: optimizer steps that count as one epoch of decay; default
            ``ceil(num_training_batches / accumulate_grad_batches)``. Needed for loaders without length.

    The line probe is shared with the monitor (:mod:`~lightning_stablelr.callbacks.line_probe_session`).

    Raises:
        ValueError: an argument is out of range (the message names it, the value and what to pass).
        MisconfigurationException: at fit start, with several StableLR callbacks, a scheduler driving the
            same optimizer under ``on_scheduler_conflict="error"``, duplicate param-group names, or a
            loader without length and no ``steps_per_epoch`` while an explicit ``decay_rate > 0`` needs epochs.
        RuntimeError: at validation end, when ``monitor`` is missing and ``strict=True``.
    """

    def __init__(
        self,
        decay_rate: float | None = _CONFIG.decay_rate,
        half_life: float | None = _CONFIG.half_life,
        interval: str = _CONFIG.interval,
        warmup_steps: int = _CONFIG.warmup_steps,
        min_lr_ratio: float = _CONFIG.min_lr_ratio,
        gap_tolerance: float = _CONFIG.gap_tolerance,
        gap_strength: float = _CONFIG.gap_strength,
        min_delta: float = _CONFIG.min_delta,
        gap_patience: int = _CONFIG.gap_patience,
        safety: float = _CONFIG.safety,
        recovery: float = _CONFIG.recovery,
        recover_above: float = _CONFIG.recover_above,
        min_stability_factor: float = _CONFIG.min_stability_factor,
        max_lr_boost: float = _CONFIG.max_lr_boost,
        guard_window: int = _CONFIG.guard_window,
        anneal_to: float = _CONFIG.anneal_to,
        anneal_fraction: float = _CONFIG.anneal_fraction,
        monitor: str = "val_loss",
        strict: bool = True,
        check_every_n_steps: int = _CADENCE.check_every_n_steps,
        dense_check_steps: int = _CADENCE.dense_check_steps,
        skip_nonfinite: bool = True,
        on_scheduler_conflict: str = "error",
        steps_per_epoch: int | None = None,
        nonfinite_test: str = "loss",
    ) -> None:
        super().__init__()
        arguments = locals()
        self.config = StableLRConfig(**{name: arguments[name] for name in config_field_names()})
        (self.monitor, self.strict, self.skip_nonfinite, self.on_scheduler_conflict, self.steps_per_epoch,
         self.nonfinite_test) = check_callback_arguments(
            monitor, strict, skip_nonfinite, on_scheduler_conflict, steps_per_epoch, nonfinite_test
        )  # fmt: skip
        self.cadence = CheckCadence(check_every_n_steps, dense_check_steps)
        self.controller = StableLRController(self.config)
        self.base_lrs: dict[str, float] = {}
        self.last_lrs: dict[str, float] = {}
        self._resolved_steps_per_epoch: int | None = None
        self._lr_names: dict[tuple[int, int], str] = {}
        self._scheduled: set[int] = set()
        self._composition = SchedulerComposition()
        self._rest = 1.0  # max(min_lr_ratio, warmup · decay · G) of the current step: the composed lr scales by it
        self._epochs_elapsed = 0.0
        self._check_step: int | None = None  # the schedule step of a requested guard check
        self._probe_step: int | None = None  # its global_step (the line-probe session's step id)
        self._seen_step: int | None = None  # the schedule step whose first batch started
        self._batch_global_step = 0  # trainer.global_step at the start of this batch
        self._applied: tuple[int, int] | None = None  # (step, epoch) whose lrs are set
        self._applied_lrs: dict[str, float] = {}
        self._applied_factor: float | None = None  # the factor the optimizers' lrs hold
        self._applied_epochs = 0.0
        self._next_step: int | None = None
        self._nonfinite = NonfiniteSteps(self.controller, self.skip_nonfinite, self.nonfinite_test)
        self._step_hooks: list[Any] = []
        self._inputs = TrainerInputs(self.monitor, self.strict)
        self._pending_state: dict[str, Any] | None = None
        self._writer = MetricWriter()  # callback_metrics and the loggers
        #: The line-probe session; the one of the first callback carrying one is shared by all.
        self.line_probe = LineProbeSession()
        self._session: LineProbeSession | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._session = line_probe_session(trainer)
        if stage == "fit":
            self._session.reset(exact_derivative=LineProbeSession.exact_derivative_wanted(trainer))

    def _shared_probe(self, trainer: pl.Trainer) -> LineProbeSession:
        return self._session or line_probe_session(trainer)  # hooks driven without setup: look it up

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if sum(isinstance(callback, StableLR) for callback in trainer.callbacks) > 1:
            raise MisconfigurationException(
                "Several StableLR callbacks would drive the same learning rates. Keep only one StableLR."
            )
        self._scheduled = scheduled_optimizers(trainer, self.on_scheduler_conflict)
        # A new fit re-reads everything that depends on the trainer; G and C carry over (or come from
        # a checkpoint in on_train_start).
        self._resolved_steps_per_epoch = None
        self._check_step = self._probe_step = self._seen_step = self._next_step = self._applied = None
        self._applied_factor = None
        self._writer.reset()
        self._inputs.train_loss.reset()  # a crashed fit's losses are not this fit's (a checkpoint restores its own)
        self.base_lrs = base_learning_rates(trainer.optimizers, self._scheduled)
        self._lr_names = param_group_lr_names(trainer.optimizers)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_pending_state(pl_module.device)
        if self.steps_per_epoch is not None:
            self._resolved_steps_per_epoch = self.steps_per_epoch
        elif self._resolved_steps_per_epoch is None and self.config.interval == "step":
            self._resolved_steps_per_epoch = infer_steps_per_epoch(
                trainer, type(self).__name__, required=decay_needs_epochs(self.controller)
            ) or run_length_steps_per_epoch(trainer, self.controller)
        self._inputs.apply_run_length(trainer, self.controller, self._resolved_steps_per_epoch)
        self._inputs.warn_about_setup(trainer, pl_module)
        self._nonfinite.configure(trainer)
        self._inputs.configure_loss_scale(trainer, pl_module)
        self._detach_hooks()
        self._composition.attach(trainer.optimizers, self._scheduled, self._composed_lr, self.base_lrs)
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            self._step_hooks = [opt.register_step_post_hook(clear_found_inf) for opt in trainer.optimizers]
        # The first step's lrs are set before any callback's on_train_batch_start (LearningRateMonitor).
        self._apply_lrs(trainer, schedule_step(trainer, pl_module))
        self.last_lrs, self._epochs_elapsed = self._applied_lrs, self._applied_epochs

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply_lrs(trainer, schedule_step(trainer, pl_module))  # interval="epoch": a new epoch

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_global_step = global_step = trainer.global_step
        step = global_step if pl_module.automatic_optimization else schedule_step(trainer, pl_module)
        if step == self._seen_step:  # a further micro-batch of the same optimizer step (accumulation)
            return
        self._seen_step = step
        guarding = self.controller.stability_factor < 1.0
        check = self.cadence.should_check(step, guarding) or self.controller.take_confirmation_request()
        logs = logs_this_step(trainer)
        if check or logs:  # the only steps that read the device counters (a host sync)
            self._resolve_nonfinite(trainer)
        if self._applied != (step, trainer.current_epoch) or self._scheduled:  # a scheduler may have moved
            self._apply_lrs(trainer, step)
        self.last_lrs, self._epochs_elapsed = self._applied_lrs, self._applied_epochs  # this step's, for metrics
        if check:
            self._check_step, self._probe_step = step, global_step
            self._shared_probe(trainer).request(global_step)
        if logs:
            self._publish(trainer)
        if check:  # last, just before the forward: the probe replays its random draws, its loss may be L0
            self._shared_probe(trainer).watch_forward(global_step, trainer.current_epoch, batch_idx)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._nonfinite.record_loss(loss)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        session = self._shared_probe(trainer)
        step = self._seen_step if self._seen_step is not None else trainer.global_step
        probed = session.requested(global_step := trainer.global_step)
        self._nonfinite.protect(trainer, optimizer, step, checked=probed)
        # A probed step reads the flag now (a sync, on every rank alike): a non-finite step has no probe.
        if probed:
            if self._resolve_nonfinite(trainer) == step:
                session.discard(global_step)
                self._check_step = None
            session.snapshot(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._inputs.record_train_loss(outputs)
        if (global_step := trainer.global_step) == self._batch_global_step:
            return  # no optimizer stepped in this batch (gradient accumulation)
        step = self._seen_step if self._seen_step is not None else global_step - 1
        if self._check_step == step and self._probe_step is not None:
            self._check_step = None
            session = self._shared_probe(trainer)
            result = session.result(trainer, pl_module, batch, batch_idx, step=self._probe_step, outputs=outputs)
            if result is not None and not result.failed:
                self.controller.observe_line(result.line, step, self._epochs(trainer, step))
                self._inputs.warn_if_unresolved(result.line)
        # The next step's lrs, now: a LearningRateMonitor listed before StableLR reads them at its batch start.
        self._next_step = step + 1
        self._apply_lrs(trainer, step + 1)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)
        if self._next_step is not None:  # interval="epoch": the next step is the next epoch's
            self._apply_lrs(trainer, self._next_step, self._upcoming_epoch(trainer, finished=True))
        self._publish(trainer, upcoming=True)  # after the validation's, at the same step: written once

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.sanity_checking:  # a wrongly named monitor is reported now, not after an epoch
            self._inputs.validation_value(trainer)
            return
        self._flush(trainer)
        val_loss = self._inputs.validation_value(trainer)
        if val_loss is not None:
            self.controller.observe_validation(val_loss)
        if self._next_step is not None:
            self._apply_lrs(trainer, self._next_step, self._upcoming_epoch(trainer, is_last_training_batch(trainer)))
        self._publish(trainer, upcoming=True, step=upcoming_log_step(trainer))

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach_hooks()

    def _detach_hooks(self) -> None:
        """Remove the optimizer hooks of this fit (scheduler composition, ``found_inf`` clean-up)."""
        self._composition.detach()
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks = []

    def _flush(self, trainer: pl.Trainer) -> None:
        """Read the training-loss mean (a collective) and the non-finite steps: at epoch and validation end."""
        mean = self._inputs.flush_train_loss(trainer)
        if mean is not None:
            self.controller.record_train_loss(*mean)
        self._resolve_nonfinite(trainer)

    def _epochs(self, trainer: pl.Trainer, step: int, epoch: int | None = None) -> float:
        if self._resolved_steps_per_epoch is None and self.config.interval == "step":
            return 0.0  # no epoch known and none needed (decay_needs_epochs): t has no effect
        epoch = trainer.current_epoch if epoch is None else epoch
        return self.controller.epochs_elapsed(step, self._resolved_steps_per_epoch or 1, epoch)

    def _upcoming_epoch(self, trainer: pl.Trainer, finished: bool) -> int:
        """The epoch of the next optimizer step: the next one once this epoch's batches are ``finished``."""
        return trainer.current_epoch + int(finished)

    def _apply_lrs(self, trainer: pl.Trainer, step: int, epoch: int | None = None) -> None:
        """Set ``η_g`` on every group for optimizer step ``step`` of ``epoch`` (default: the current one;
        scheduled optimizers: at the step itself, see :meth:`_compose`)."""
        self._applied = (step, epoch := trainer.current_epoch if epoch is None else epoch)
        self._applied_epochs = epochs = self._epochs(trainer, step, epoch)
        self._rest = rest = self.controller.schedule_factor(step, epochs)
        factor = rest * self.controller.stability_factor  # controller.factor(step, epochs), computed once
        if factor == self._applied_factor and not self._scheduled:
            return  # the lrs already set (the hold phase: most steps); nothing else sets them
        self._applied_factor = factor
        self._applied_lrs = set_learning_rates(trainer.optimizers, self.base_lrs, self._scheduled, self._lr_names,
                                               lambda base: base * factor, self._composed_lr)

    def _composed_lr(self, base_lr: float, scheduler_lr: float) -> float:
        guard = self.controller.stability_factor
        return composed_lr(base_lr, scheduler_lr, self._rest, self.config.min_lr_ratio, guard)

    def _resolve_nonfinite(self, trainer: pl.Trainer) -> int | None:
        if (last := self._nonfinite.resolve(trainer)) is not None:
            self._applied = None  # C changed: the lrs are set again
        return last

    def _publish(self, trainer: pl.Trainer, upcoming: bool = False, step: int | None = None) -> None:
        """This step's metrics into ``callback_metrics``; to the loggers this step's, or with ``upcoming`` the
        next step's lrs, already set (:class:`~lightning_stablelr.callbacks._metric_writer.MetricWriter`)."""
        current = self._metrics()
        logged = controller_metrics(self.controller, self._applied_lrs, self._applied_epochs) if upcoming else current
        self._writer.publish(trainer, current, logged, step)

    def _metrics(self) -> dict[str, float]:
        return controller_metrics(self.controller, self.last_lrs, self._epochs_elapsed)
