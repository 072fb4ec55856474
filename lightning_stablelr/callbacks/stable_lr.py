"""StableLR: a Lightning callback that sets every param group's learning rate before every optimizer step.

For each param group ``g`` with base lr ``η0_g`` (read in ``on_fit_start``):

    η_g(t) = max(min_lr_ratio · η0_g,  η0_g · warmup(step) · exp(-λ·t) · G · C)

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

import functools
import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_stablelr.callbacks._shared import (
    RankMeanAccumulator,
    infer_steps_per_epoch,
    line_probe_session,
    log_to_loggers,
    mean_across_ranks,
    nonfinite_across_ranks,
    param_group_lr_names,
    put_callback_metrics,
    set_group_lr,
)
from lightning_stablelr.controller import StableLRConfig, StableLRController
from lightning_stablelr.schedule import GUARD_REASONS
from lightning_stablelr.validation import check_choice, check_int_at_least

__all__ = ["StableLR"]

CONFLICT_POLICIES = ("error", "compose")
GUARD_ACTIONS = tuple(reason for reason in GUARD_REASONS if reason not in ("hold", "warming"))
"""Guard reasons logged as cumulative counts ``stablelr/guard_<reason>``: why C moved, and how often."""


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


class StableLR(Callback):
    """Controls the learning rate: exponential decay, validation-gap factor and curvature guard.

    Args:
        decay_rate: ``λ``, decay per epoch. With neither it nor ``half_life`` the decay follows the run's
            length (see ``anneal_to``); an endless run (unknown length) then has no decay, with one warning.
        half_life: epochs after which the decay halves the lr (``λ = ln 2 / half_life``); excludes ``decay_rate``.
        interval: ``"step"`` (``t`` fractional, smooth per step) or ``"epoch"`` (``t`` = integer epoch).
        warmup_steps: linear warmup over this many optimizer steps (default 10; 0 = none).
        min_lr_ratio: floor of the lr as a fraction of the base lr, in ``[0, 1]``.
        gap_tolerance: relative gap ``r = (L_va - L_tr)/|L_va|`` tolerated before ``G`` shrinks.
        gap_strength: ``G ← G · exp(-gap_strength · (r - gap_tolerance))`` on overfitting (0 disables ``G``).
        min_delta: the validation loss must beat its best by more than this to count as improved.
        gap_patience: consecutive overfitting validations before ``G`` shrinks.
        safety: ``C`` is cut when the robust predicted step margin ``s`` has ``safety · s < 1`` (default 1:
            only steps predicted to increase the loss; edge-of-stability margins ``1 <= s <= 2`` are healthy).
        recovery: the largest factor one check may cut or grow ``C`` by (default 10).
        recover_above: ``C`` grows back while the robust predicted margin exceeds this (default 2).
        min_stability_factor: lower bound of ``C``.
        guard_window: ``C`` follows the upper median of the last ``guard_window`` margins (default 3: one
            noisy margin never moves ``C``). The rule: :func:`lightning_stablelr.schedule.update_stability_factor`.
        anneal_to: with neither ``decay_rate`` nor ``half_life``, the decay follows the run's length
            (``trainer.estimated_stepping_batches``): it holds for the first ``1 - anneal_fraction`` of the run,
            then decays exponentially to ``anneal_to`` at the end (defaults 0.01 and 0.2).
        anneal_fraction: see ``anneal_to``.
        monitor: validation metric ``L_va`` (read from ``trainer.callback_metrics`` at validation end).
        strict: a missing ``monitor`` raises (True) or warns once and leaves ``G`` unchanged (False).
        check_every_n_steps: run the three-point guard on every n-th optimizer step (the steps with
            ``(global_step + 1) % n == 0``; three extra forward passes each); 0 disables the periodic checks.
        dense_check_steps: also check every one of the first ``dense_check_steps`` optimizer steps, where
            divergence usually happens; 0 disables them.
        skip_nonfinite: drop the gradients of a step whose gradients contain NaN/Inf on any rank, so the
            weights are never poisoned. Such a step always halves ``C`` and is counted.
        on_scheduler_conflict: ``"error"`` raises when ``configure_optimizers`` returns a scheduler;
            ``"compose"`` uses ``min(η_s, max(min_lr_ratio · η0, η_s · factor))`` with ``η_s`` the
            scheduler's lr, so the scheduler keeps its own trajectory and StableLR only scales it down.
        steps_per_epoch: optimizer steps that count as one epoch of decay; default
            ``ceil(num_training_batches / accumulate_grad_batches)``. Needed for loaders without length.
    """

    def __init__(
        self,
        decay_rate: float | None = None,
        half_life: float | None = None,
        interval: str = "step",
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.01,
        gap_tolerance: float = 0.25,
        gap_strength: float = 1.0,
        min_delta: float = 0.0,
        gap_patience: int = 1,
        safety: float = 0.25,
        recovery: float = 10.0,
        recover_above: float = 8.0,
        min_stability_factor: float = 1e-3,
        guard_window: int = 3,
        anneal_to: float = 0.01,
        anneal_fraction: float = 0.2,
        monitor: str = "val_loss",
        strict: bool = True,
        check_every_n_steps: int = 50,
        dense_check_steps: int = 20,
        skip_nonfinite: bool = True,
        on_scheduler_conflict: str = "error",
        steps_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        self.config = StableLRConfig(
            decay_rate=decay_rate, half_life=half_life, interval=interval, warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio, gap_tolerance=gap_tolerance, gap_strength=gap_strength,
            min_delta=min_delta, gap_patience=gap_patience, safety=safety, recovery=recovery,
            recover_above=recover_above, min_stability_factor=min_stability_factor,
            guard_window=guard_window, anneal_to=anneal_to, anneal_fraction=anneal_fraction,
        )  # fmt: skip
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(
                f"`monitor` must be a non-empty metric name, got {monitor!r}. For example 'val_loss'."
            )
        self.monitor = monitor
        self.strict = _check_bool("strict", strict)
        self.check_every_n_steps = check_int_at_least(
            "check_every_n_steps", check_every_n_steps, 0, "Use 0 to disable the periodic guard checks."
        )
        self.dense_check_steps = check_int_at_least(
            "dense_check_steps", dense_check_steps, 0, "Use 0 to disable the dense early checks."
        )
        self.skip_nonfinite = _check_bool("skip_nonfinite", skip_nonfinite)
        self.on_scheduler_conflict = check_choice(
            "on_scheduler_conflict", on_scheduler_conflict, CONFLICT_POLICIES,
            "Remove the scheduler from configure_optimizers, or compose the two.",
        )  # fmt: skip
        if steps_per_epoch is not None:
            check_int_at_least("steps_per_epoch", steps_per_epoch, 1, "Or leave it None to infer it.")
        self.steps_per_epoch = steps_per_epoch
        self.controller = StableLRController(self.config)
        self.base_lrs: dict[str, float] = {}
        self.last_lrs: dict[str, float] = {}
        self._resolved_steps_per_epoch: int | None = None
        self._lr_names: dict[tuple[int, int], str] = {}
        self._scheduled: set[int] = set()
        self._scheduler_lrs: dict[tuple[int, int], float] = {}
        self._factor = 1.0
        self._epochs_elapsed = 0.0
        self._check_step: int | None = None
        self._logged_step: int | None = None
        self._train_loss = RankMeanAccumulator()
        self._pending_state: dict[str, Any] | None = None
        self._hook_handles: list[Any] = []
        self._warned_missing = False
        self._warned_endless = False
        self._warned_unresolved = False
        self._metric_cache: dict[str, tuple[float, Tensor]] = {}
        self._state_key = self._make_state_key()

    # ------------------------------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._state_key

    def _make_state_key(self) -> str:
        # Cached: Lightning reads state_key on every hook call.
        return self._generate_state_key(
            monitor=self.monitor, interval=self.config.interval, decay_rate=self.controller.decay_rate
        )

    def state_dict(self) -> dict[str, Any]:
        """Primitives: version, controller state (G, C, best L_va, running mean...), base lrs, steps per epoch."""
        pending_sum, pending_count = self._train_loss.pending()
        return {
            "version": 1,
            "controller": self.controller.state_dict(),
            "base_lrs": dict(self.base_lrs),
            "steps_per_epoch": self._resolved_steps_per_epoch,
            "pending_train_loss_sum": pending_sum,
            "pending_train_loss_count": pending_count,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in on_train_start: Lightning restores callbacks before it configures the optimizers.
        self._pending_state = dict(state_dict)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_hook_handles"] = []  # optimizer hook handles belong to one running fit
        # Lightning attaches the module's log/log_dict to every callback during fit: not ours to carry.
        state.pop("log", None)
        state.pop("log_dict", None)
        return state

    # ------------------------------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if sum(isinstance(callback, StableLR) for callback in trainer.callbacks) > 1:
            raise MisconfigurationException(
                "Several StableLR callbacks would drive the same learning rates. Keep only one StableLR."
            )
        self._scheduled = self._find_scheduled_optimizers(trainer)
        # A new fit re-reads everything that depends on the trainer; G and C carry over (or come from
        # a checkpoint in on_train_start).
        self._resolved_steps_per_epoch = None
        self._check_step = self._logged_step = None
        self.base_lrs = {}
        for i, optimizer in enumerate(trainer.optimizers):
            for j, group in enumerate(optimizer.param_groups):
                base = group.get("initial_lr", group["lr"]) if i in self._scheduled else group["lr"]
                self.base_lrs[f"{i}/{j}"] = float(base)
        self._lr_names = param_group_lr_names(trainer.optimizers, "stablelr/lr")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state, self._pending_state = self._pending_state, None
        if state is not None:
            self.controller.load_state_dict(state.get("controller", {}))
            self.base_lrs.update({key: float(value) for key, value in state.get("base_lrs", {}).items()})
            self._resolved_steps_per_epoch = state.get("steps_per_epoch")
            if state.get("pending_train_loss_count", 0) > 0:
                count = float(state["pending_train_loss_count"])
                self.controller.record_train_loss(float(state["pending_train_loss_sum"]) / count, count)
        if self.steps_per_epoch is not None:
            self._resolved_steps_per_epoch = self.steps_per_epoch
        elif self._resolved_steps_per_epoch is None and self.config.interval == "step":
            self._resolved_steps_per_epoch = infer_steps_per_epoch(trainer, type(self).__name__)
        self._set_run_length(trainer)
        self._remove_hooks()
        for i in sorted(self._scheduled):
            optimizer = trainer.optimizers[i]
            self._hook_handles.append(optimizer.register_step_pre_hook(functools.partial(self._compose, i)))
            self._hook_handles.append(optimizer.register_step_post_hook(functools.partial(self._restore, i)))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self._apply_lrs(trainer, step)
        if self._is_check_step(step) or self.controller.take_confirmation_request():
            self._check_step = step
            line_probe_session(trainer).request(step)
        if step != self._logged_step:  # once per optimizer step, also under gradient accumulation
            self._logged_step = step
            metrics = self._metrics()
            put_callback_metrics(trainer, metrics, self._metric_cache)
            log_to_loggers(trainer, metrics)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None:  # with fp16 AMP the GradScaler already skips (and expects) overflowing steps
            grads = [
                p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
            ]
            if nonfinite_across_ranks(trainer, grads):
                self._drop_nonfinite_step(trainer, optimizer)
        line_probe_session(trainer).snapshot(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._record_train_loss(trainer, pl_module, outputs)
        step = trainer.global_step - 1
        if self._check_step is None or self._check_step != step:
            return
        self._check_step = None
        result = line_probe_session(trainer).result(trainer, pl_module, batch, batch_idx)
        if result is not None and not result.failed:
            self.controller.observe_line(result.line, step, self._epochs(trainer, step))
            self._warn_unresolved(result.line)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush_train_loss(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._flush_train_loss(trainer)
        val_loss = self._reduced_monitor_value(trainer)
        if val_loss is None:
            return
        self.controller.observe_validation(val_loss)
        put_callback_metrics(trainer, self._metrics(), self._metric_cache)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    # ------------------------------------------------------------------------------------------ decisions
    def _is_check_step(self, step: int) -> bool:
        """Guard checks: every step below ``dense_check_steps``, then every n-th step (``n-1, 2n-1, ...``)."""
        if step < self.dense_check_steps:
            return True
        return self.check_every_n_steps > 0 and (step + 1) % self.check_every_n_steps == 0

    def _set_run_length(self, trainer: pl.Trainer) -> None:
        if not self.config.run_length_decay:
            return
        total = float(trainer.estimated_stepping_batches)
        if self.config.interval == "epoch":
            per_epoch = 1.0
            total = float(trainer.max_epochs) if trainer.max_epochs not in (None, -1) else math.inf
        else:
            per_epoch = float(self._resolved_steps_per_epoch or math.inf)
        if not self.controller.set_run_length(total, per_epoch) and not self._warned_endless:
            self._warned_endless = True
            rank_zero_warn(
                "StableLR: the run's length is unknown (no max_steps/max_epochs or an endless loader), so the"
                " default decay, which follows the run's length, is off: the lr only follows G and C. Pass"
                " `decay_rate` or `half_life` for a time decay, or set max_steps. (shown once)"
            )

    def _warn_unresolved(self, line: Any) -> None:
        # Only a coarse (bf16/fp16) rounding is worth a warning; a step too small for fp32 is just converged.
        coarse = line.resolution > 2.0**-12 * max(abs(line.first_order), 1e-30)
        if line.finite and not line.resolved and coarse and not self._warned_unresolved:
            self._warned_unresolved = True
            rank_zero_warn(
                f"StableLR: the probe's losses are rounded to {line.resolution:.3g} (low-precision loss,"
                " e.g. precision='bf16-true'), more than a checked step moved them, so such checks are"
                " skipped and do not change C. Compute the loss in float32 (e.g. `loss.float()` in"
                " `probe_loss`, or precision='bf16-mixed') to let the guard see small overshoots. (shown once)"
            )

    def _epochs(self, trainer: pl.Trainer, step: int) -> float:
        steps_per_epoch = self._resolved_steps_per_epoch or math.inf
        return self.controller.epochs_elapsed(step, steps_per_epoch, trainer.current_epoch)

    def _apply_lrs(self, trainer: pl.Trainer, step: int) -> None:
        """Set ``η_g`` on every group (scheduled optimizers: at the step itself, see :meth:`_compose`)."""
        self._epochs_elapsed = self._epochs(trainer, step)
        self._factor = self.controller.factor(step, self._epochs_elapsed)
        for i, optimizer in enumerate(trainer.optimizers):
            for j, group in enumerate(optimizer.param_groups):
                base = self.base_lrs.get(f"{i}/{j}", float(group["lr"]))
                if i in self._scheduled:
                    lr = self._composed_lr(base, float(group["lr"]))
                else:
                    lr = self.controller.lr(base, step, self._epochs_elapsed)
                    set_group_lr(group, lr)
                self.last_lrs[self._lr_names.get((i, j), f"stablelr/lr-opt{i}-pg{j}")] = lr

    def _composed_lr(self, base_lr: float, scheduler_lr: float) -> float:
        """``min(η_s, max(min_lr_ratio · η0, η_s · factor))``: never above the scheduler, floored at our floor."""
        scaled = scheduler_lr * self._factor
        if math.isnan(scaled):
            scaled = 0.0
        return min(scheduler_lr, max(self.config.min_lr_ratio * base_lr, scaled))

    def _compose(self, index: int, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Optimizer pre-step hook: scale the scheduler's lr only for the step itself, so the scheduler
        # (chainable forms read group["lr"]) never sees our factor; _restore puts its value back.
        for j, group in enumerate(optimizer.param_groups):
            scheduler_lr = float(group["lr"])
            self._scheduler_lrs[(index, j)] = scheduler_lr
            set_group_lr(
                group, self._composed_lr(self.base_lrs.get(f"{index}/{j}", scheduler_lr), scheduler_lr)
            )

    def _restore(self, index: int, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for j, group in enumerate(optimizer.param_groups):
            if (index, j) in self._scheduler_lrs:
                set_group_lr(group, self._scheduler_lrs.pop((index, j)))

    def _remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    def _find_scheduled_optimizers(self, trainer: pl.Trainer) -> set[int]:
        scheduled: set[int] = set()
        for config in trainer.lr_scheduler_configs:
            optimizer = getattr(config.scheduler, "optimizer", None)
            index = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), None)
            if index is None:
                continue
            if self.on_scheduler_conflict == "error":
                name = type(config.scheduler).__name__
                raise MisconfigurationException(
                    f"StableLR drives the learning rate of optimizer {index} ({type(optimizer).__name__}), but the"
                    f" scheduler {name} returned by `configure_optimizers` drives it too. Either remove {name}"
                    " from `configure_optimizers` (StableLR already decays the lr), or pass"
                    " `StableLR(on_scheduler_conflict='compose')` to multiply the scheduler's lr by StableLR's factor."
                )
            scheduled.add(index)
        return scheduled

    def _drop_nonfinite_step(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step
        line_probe_session(trainer).discard(step)
        if step == self._check_step:
            self._check_step = None
        if self.skip_nonfinite:
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad = None  # torch optimizers skip parameters without a gradient
        count = self.controller.nonfinite_steps + 1
        self.controller.observe_nonfinite()
        if count & (count - 1) == 0:  # warn on the 1st, 2nd, 4th, 8th... occurrence
            action = "dropped its update" if self.skip_nonfinite else "kept its update (skip_nonfinite=False)"
            rank_zero_warn(
                f"StableLR: non-finite loss or gradient at step {step}; {action} and halved the stability"
                f" factor to {self.controller.stability_factor:.3g} ({count} such steps so far; further"
                " warnings at powers of two)."
            )

    def _record_train_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor) and loss.numel() == 1:
            # Lightning divided the loss by accumulate_grad_batches (automatic optimization only).
            scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            self._train_loss.add(loss, scale)

    def _flush_train_loss(self, trainer: pl.Trainer) -> None:
        mean = self._train_loss.flush(trainer)
        if mean is not None:
            self.controller.record_train_loss(*mean)

    def _reduced_monitor_value(self, trainer: pl.Trainer) -> float | None:
        """``L_va`` averaged over ranks, or None (strict=False) when a rank lacks the key."""
        value = trainer.callback_metrics.get(self.monitor)
        present = value is not None
        local = torch.tensor(
            [1.0, float(value)] if present else [0.0, 0.0], device=trainer.strategy.root_device
        )
        presence, mean_value = mean_across_ranks(trainer, local).tolist()
        if presence == 1.0:
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

    def _metrics(self) -> dict[str, float]:
        controller = self.controller
        metrics = dict(self.last_lrs)
        metrics["stablelr/decay"] = controller.decay(self._epochs_elapsed)
        metrics["stablelr/gap_factor"] = controller.gap_factor
        metrics["stablelr/stability_factor"] = controller.stability_factor
        metrics["stablelr/nonfinite_steps"] = float(controller.nonfinite_steps)
        if controller.last_gap is not None:
            metrics["stablelr/gap"] = controller.last_gap
        if controller.last_step_margin is not None:
            metrics["stablelr/step_margin"] = controller.last_step_margin
        if controller.robust_margin is not None:
            metrics["stablelr/robust_margin"] = controller.robust_margin
        for reason in GUARD_ACTIONS:
            metrics[f"stablelr/guard_{reason}"] = float(controller.guard_counts.get(reason, 0))
        return metrics
