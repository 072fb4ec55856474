"""Every access to Lightning's private or trainer-internal API, in one place.

``tests/test_lightning_access.py`` pins each of them against the installed Lightning (the supported
range is ``lightning>=2.2`` in ``pyproject.toml``): when an upgrade renames one, that test fails and
names it, and this module is the only one to change. Everything else in the callbacks uses public API.

- ``trainer.fit_loop.epoch_loop._batches_that_stepped``: the step Lightning's own ``self.log`` and
  ``LearningRateMonitor`` write at (:func:`log_step`);
- ``trainer._logger_connector.should_update_logs``: ``Trainer(log_every_n_steps)`` (:func:`logs_this_step`);
- ``trainer._logger_connector._callback_metrics``: the dict behind ``trainer.callback_metrics``, whose
  public property rebuilds the logged metrics on every access (:func:`put_callback_metrics`);
- ``trainer.fit_loop.epoch_loop.batch_idx`` next to ``trainer.is_last_batch``: the epoch's last training
  batch, also under ``limit_train_batches`` (:func:`is_last_training_batch`, pinned in
  ``tests/test_monitor_instruments.py``);
- ``trainer.fit_loop.epoch_loop.val_loop._data_source.is_defined()``: whether the fit has a validation loader,
  as Lightning's own configuration check asks (:func:`has_val_loader`);
- ``lightning.pytorch.trainer.call._call_callback_hooks``' body, mirrored by :func:`dispatch_noop_hook` to time
  what Lightning's dispatch of one hook costs (the monitor's standing cost).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from lightning.pytorch.profilers import PassThroughProfiler
from torch import Tensor

from lightning_stablelr.collectives import Reduce

__all__ = [
    "dispatch_noop_hook", "has_val_loader", "is_last_step_of_fit", "is_last_training_batch", "log_step", "log_to_loggers", "logs_this_step", "put_callback_metrics", "reducer",
    "schedule_step", "upcoming_log_step",
]  # fmt: skip


def reducer(trainer: pl.Trainer) -> Reduce:
    """``reduce(tensor, op)`` over the trainer's ranks (``trainer.strategy.reduce``; identity on one process)."""

    def reduce(tensor: Tensor, op: str) -> Tensor:
        return trainer.strategy.reduce(tensor, reduce_op=op)

    return reduce


def log_step(trainer: pl.Trainer) -> int:
    """The step Lightning's own logging and ``LearningRateMonitor`` write at (batches that stepped)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def upcoming_log_step(trainer: pl.Trainer) -> int:
    """The log step of the next optimizer step, from a validation inside the training loop: Lightning counts
    the batch that just ran only after its validation, and only when it stepped (not while accumulating)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    return log_step(trainer) + (0 if epoch_loop._should_accumulate() else 1)


def schedule_step(trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
    """StableLR's warmup/decay/cadence step: optimizer steps, or under manual optimization the batches that
    stepped (a batch may step several optimizers)."""
    return trainer.global_step if pl_module.automatic_optimization else log_step(trainer)


def logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes its logs at this step (``Trainer(log_every_n_steps)``); valid from
    ``on_train_batch_start`` on, as ``LearningRateMonitor`` uses it."""
    return bool(trainer._logger_connector.should_update_logs)


def has_val_loader(trainer: pl.Trainer) -> bool:
    """Whether the fit has a validation loader (a datamodule's or ``fit``'s ``val_dataloaders``), as Lightning's
    configuration check asks before it skips the validation loop; True when the check is not available."""
    source = getattr(getattr(trainer.fit_loop.epoch_loop, "val_loop", None), "_data_source", None)
    return source.is_defined() if source is not None and hasattr(source, "is_defined") else True


def log_to_loggers(
    trainer: pl.Trainer, metrics: dict[str, float], *, every_n_steps: bool = True, step: int | None = None
) -> None:
    """Write ``metrics`` to every logger at ``step`` (default :func:`log_step`), as ``LearningRateMonitor`` does.

    ``every_n_steps``: respect ``Trainer(log_every_n_steps)`` (the logger connector's ``should_update_logs``);
    False writes now (the monitor's probes have their own, sparser cadence).
    """
    if not trainer.loggers or (every_n_steps and not logs_this_step(trainer)):
        return
    step = log_step(trainer) if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def put_callback_metrics(
    trainer: pl.Trainer, metrics: dict[str, float], cache: dict[str, tuple[float, Tensor]] | None = None
) -> None:
    """Store ``metrics`` as 0-d CPU tensors in ``trainer.callback_metrics`` (what EarlyStopping reads).

    Writes into the connector's dict directly: the public property rebuilds the logged metrics on every
    access, which is too slow for a per-step hot path. With ``cache`` (owned by the caller), a value
    that did not change reuses its tensor instead of allocating a new one.
    """
    target = getattr(trainer._logger_connector, "_callback_metrics", None)
    if target is None:
        target = trainer.callback_metrics
    for name, value in metrics.items():
        value = float(value)
        cached = cache.get(name) if cache is not None else None
        if cached is not None and (cached[0] == value or (math.isnan(value) and math.isnan(cached[0]))):
            tensor = cached[1]
        else:
            tensor = torch.tensor(value)
            if cache is not None:
                cache[name] = (value, tensor)
        target[name] = tensor


def is_last_training_batch(trainer: pl.Trainer) -> bool:
    """Whether the current training batch is the epoch's last: ``trainer.is_last_batch``, or the batch index
    reaching ``num_training_batches`` (a ``limit_train_batches`` cut that the data fetcher does not see)."""
    if trainer.is_last_batch:
        return True
    total = trainer.num_training_batches
    return math.isfinite(total) and trainer.fit_loop.epoch_loop.batch_idx + 1 >= total


def is_last_step_of_fit(trainer: pl.Trainer, *, stepped: bool) -> bool:
    """Whether the optimizer step of this batch is the fit's last by ``max_steps`` (a fit that ends mid-epoch
    never reaches the epoch's last batch); ``stepped``: asked after the step (``global_step`` counts it)."""
    max_steps = trainer.max_steps
    if max_steps is None or max_steps < 0:
        return False
    return trainer.global_step + (0 if stepped else 1) >= max_steps


def dispatch_noop_hook(trainer: pl.Trainer, callback: pl.Callback) -> None:
    """One callback-hook dispatch as ``lightning.pytorch.trainer.call._call_callback_hooks`` does it, of a hook
    that does nothing (``on_after_backward`` of the base class): what any callback costs per hook call.

    The profiler context is a pass-through one (the default profiler's): a user's ``SimpleProfiler`` report
    must not list calls that never happened. With such a profiler the real dispatch costs more than this."""
    fn = pl.Callback.on_after_backward.__get__(callback)  # bound like getattr: the base no-op, whatever a subclass overrides
    if callable(fn):
        with _PASS_THROUGH.profile(f"[Callback]{callback.state_key}.on_after_backward"):
            fn(trainer, trainer.lightning_module)


_PASS_THROUGH = PassThroughProfiler()
