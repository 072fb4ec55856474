"""Optimizer-side helpers of the StableLR callback: lr metric names, setting a group's lr, steps per epoch."""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from lightning_stablelr.metric_names import LR_PREFIX

__all__ = [
    "BASE_LR_KEY",
    "LR_PREFIX",
    "WRITTEN_LR_KEY",
    "SchedulerComposition",
    "base_learning_rates",
    "composed_lr",
    "infer_steps_per_epoch",
    "loader_steps_per_epoch",
    "param_group_lr_names",
    "scheduled_optimizers",
    "set_group_lr",
    "set_learning_rates",
]



def param_group_lr_names(optimizers: list[torch.optim.Optimizer], prefix: str = LR_PREFIX) -> dict[tuple[int, int], str]:
    """Metric name of each ``(optimizer index, group index)``: ``prefix`` + LearningRateMonitor's name.

    ``lr-{OptimizerClass}`` for an optimizer (``-{k}`` appended for the k-th further optimizer of the
    same class); with several param groups ``/{group "name"}`` or ``/pg{j+1}``; with one named group
    ``/{name}``. So ``stablelr/lr-SGD``, ``stablelr/lr-Adam/pg1``, ``stablelr/lr-Adam/head``.

    Raises:
        MisconfigurationException: two param groups of one optimizer have the same ``"name"`` (as
            ``LearningRateMonitor`` raises).
    """
    names: dict[tuple[int, int], str] = {}
    seen: Counter[type] = Counter()
    for i, optimizer in enumerate(optimizers):
        groups = optimizer.param_groups
        labels = [group.get("name", f"pg{j}") for j, group in enumerate(groups, start=1)]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise MisconfigurationException(
                f"Optimizer {i} ({type(optimizer).__name__}) has several param groups named {duplicates}; StableLR"
                " logs one lr per group name, as LearningRateMonitor does. Give every param group a distinct"
                " `name` (or none, for `pg1`, `pg2`, ...)."
            )
        seen[type(optimizer)] += 1
        count = seen[type(optimizer)]
        base = f"{prefix}lr-{type(optimizer).__name__}" + (f"-{count - 1}" if count > 1 else "")
        for j, group in enumerate(groups):
            if len(groups) > 1:
                names[(i, j)] = f"{base}/{labels[j]}"
            else:
                names[(i, j)] = f"{base}/{group['name']}" if group.get("name") else base
    return names


def set_group_lr(group: dict[str, Any], lr: float) -> None:
    """Set a param group's lr in place, keeping a Tensor lr a Tensor (capturable/fused optimizers need it)."""
    current = group["lr"]
    if isinstance(current, Tensor):
        current.fill_(lr)
    else:
        group["lr"] = lr


def loader_steps_per_epoch(trainer: pl.Trainer) -> int | None:
    """``ceil(num_training_batches / accumulate_grad_batches)``: Lightning's epoch in optimizer steps (it also steps
    on an epoch's last, incomplete accumulation), or None for a train loader without length."""
    batches = trainer.num_training_batches
    if not (math.isfinite(batches) and batches > 0):
        return None
    return max(1, math.ceil(batches / max(1, int(trainer.accumulate_grad_batches))))


def infer_steps_per_epoch(trainer: pl.Trainer, owner: str, *, required: bool = True) -> int | None:
    """Optimizer steps per epoch: ``ceil(num_training_batches / accumulate_grad_batches)``.

    Lightning also steps on the last, incomplete accumulation of an epoch, hence the ceiling. A train
    loader without length (IterableDataset) has no epoch; then the validation interval
    (``Trainer(val_check_interval=k)``) stands in for it, and without one this raises, or returns None
    when not ``required`` (a decay that does not count epochs).
    """
    steps = loader_steps_per_epoch(trainer)
    if steps is not None:
        return steps
    accumulate = max(1, int(trainer.accumulate_grad_batches))
    val_check = trainer.val_check_batch
    if isinstance(val_check, (int, float)) and math.isfinite(val_check) and val_check > 0:
        steps = max(1, math.ceil(val_check / accumulate))
        rank_zero_info(
            f"{owner}: the train dataloader has no length, so one 'epoch' of the decay is the validation"
            f" interval: {steps} optimizer steps. Pass `steps_per_epoch` to choose another unit."
        )
        return steps
    if not required:
        return None
    raise MisconfigurationException(
        f"{owner}(interval='step') counts time in epochs, but the train dataloader has no length and there is"
        " no step-based validation interval. Pass `steps_per_epoch=N` (optimizer steps per epoch of decay),"
        " or set `Trainer(val_check_interval=N)`."
    )


def composed_lr(
    base_lr: float, scheduler_lr: float, factor: float, min_lr_ratio: float, stability_factor: float = 1.0
) -> float:
    """``min(η_s, max(min_lr_ratio · η0, η_s · f)) · C``: never above the scheduler; ``f`` (warmup, decay, G)
    floored at StableLR's floor, the guard ``C`` applied after the floor."""
    scaled = scheduler_lr * factor
    if math.isnan(scaled):
        scaled = 0.0
    return min(scheduler_lr, max(min_lr_ratio * base_lr, scaled)) * stability_factor


def scheduled_optimizers(trainer: pl.Trainer, on_conflict: str) -> set[int]:
    """Indices of the optimizers that a scheduler of ``configure_optimizers`` drives too.

    Raises:
        MisconfigurationException: such an optimizer exists and ``on_conflict == "error"``.
    """
    scheduled: set[int] = set()
    for config in trainer.lr_scheduler_configs:
        optimizer = getattr(config.scheduler, "optimizer", None)
        index = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), None)
        if index is None:
            continue
        if on_conflict == "error":
            name = type(config.scheduler).__name__
            raise MisconfigurationException(
                f"StableLR drives the learning rate of optimizer {index} ({type(optimizer).__name__}), but the"
                f" scheduler {name} returned by `configure_optimizers` drives it too. Either remove {name}"
                " from `configure_optimizers` (StableLR already decays the lr), or pass"
                " `StableLR(on_scheduler_conflict='compose')` to multiply the scheduler's lr by StableLR's factor."
            )
        scheduled.add(index)
    return scheduled


class SchedulerComposition:
    """Optimizer step pre/post hooks that scale a scheduler's lr only for the step itself.

    The pre-hook sets ``compose(η0, η_s)`` on every group of a scheduled optimizer and remembers ``η_s``;
    the post-hook puts ``η_s`` back, so the scheduler (chainable forms read ``group["lr"]``) never sees
    StableLR's factor. The hook handles belong to one running fit: never pickled.
    """

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self._scheduler_lrs: dict[tuple[int, int], float] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"handles": [], "_scheduler_lrs": {}}

    def attach(
        self,
        optimizers: list[torch.optim.Optimizer],
        scheduled: set[int],
        compose: Callable[[float, float], float],
        base_lrs: Mapping[str, float],
    ) -> None:
        """Register the hooks on ``optimizers[i]`` for every ``i`` in ``scheduled`` (after removing old ones)."""
        self.detach()
        for i in sorted(scheduled):
            pre = functools.partial(self._compose, i, compose, base_lrs)
            self.handles.append(optimizers[i].register_step_pre_hook(pre))
            self.handles.append(optimizers[i].register_step_post_hook(functools.partial(self._restore, i)))

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _compose(
        self, index: int, compose: Callable[[float, float], float], base_lrs: Mapping[str, float],
        optimizer: torch.optim.Optimizer, args: Any, kwargs: Any,
    ) -> None:
        for j, group in enumerate(optimizer.param_groups):
            scheduler_lr = float(group["lr"])
            self._scheduler_lrs[(index, j)] = scheduler_lr
            set_group_lr(group, compose(base_lrs.get(f"{index}/{j}", scheduler_lr), scheduler_lr))

    def _restore(self, index: int, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for j, group in enumerate(optimizer.param_groups):
            if (index, j) in self._scheduler_lrs:
                set_group_lr(group, self._scheduler_lrs.pop((index, j)))


WRITTEN_LR_KEY = "stablelr_lr"
"""Param-group key: the lr StableLR last wrote into the group (read back by :func:`base_learning_rates`)."""
BASE_LR_KEY = "stablelr_base_lr"
"""Param-group key: the base lr ``η0`` StableLR took for the group."""


def _still_written(group: dict[str, Any], current: float) -> bool:
    """Whether the group's lr ``current`` is the one StableLR last wrote (a Tensor lr up to its dtype's rounding)."""
    written = group.get(WRITTEN_LR_KEY)
    if written is None:
        return False
    lr = group["lr"]
    rounding = torch.finfo(lr.dtype).eps * abs(written) if isinstance(lr, Tensor) and lr.is_floating_point() else 0.0
    return abs(current - written) <= rounding


def base_learning_rates(optimizers: Sequence[torch.optim.Optimizer], scheduled: set[int]) -> dict[str, float]:
    """``{"i/j": η0}`` for group j of optimizer i.

    A scheduled optimizer's: its scheduler's ``initial_lr``. Any other: the group's ``lr``, unless that is still
    the lr StableLR itself last wrote there (``group["stablelr_lr"]``); then the base it used
    (``group["stablelr_base_lr"]``). So a second fit on the same optimizer object (one kept by
    ``configure_optimizers``, or a fit retried after a crash) starts from the same ``η0``, not from the first
    fit's last lr, while an lr the user set between fits (or a former scheduler's last lr) is taken as given:
    torch's own ``initial_lr`` is not read there, since a scheduler used earlier (OneCycleLR) leaves it stale;
    it is written instead (``η0``), so that a torch scheduler built on the optimizer later starts from ``η0``."""
    bases = {}
    for i, optimizer in enumerate(optimizers):
        for j, group in enumerate(optimizer.param_groups):
            if i in scheduled:
                bases[f"{i}/{j}"] = float(group.get("initial_lr", group["lr"]))
                continue
            current = float(group["lr"])  # once per fit
            if not _still_written(group, current) or BASE_LR_KEY not in group:
                group[BASE_LR_KEY] = current
            # A torch scheduler built on this optimizer later starts from η0 too (it reads initial_lr if set).
            group["initial_lr"] = bases[f"{i}/{j}"] = float(group[BASE_LR_KEY])
    return bases


def set_learning_rates(
    optimizers: Sequence[torch.optim.Optimizer],
    base_lrs: Mapping[str, float],
    scheduled: set[int],
    names: Mapping[tuple[int, int], str],
    lr: Callable[[float], float],
    composed: Callable[[float, float], float],
) -> dict[str, float]:
    """Set ``lr(η0)`` on every group of an unscheduled optimizer; a scheduled one keeps its scheduler's lr
    (composed around ``optimizer.step()``) and reports ``composed(η0, its lr)``. Returns ``{name: lr}``."""
    lrs = {}
    for i, optimizer in enumerate(optimizers):
        for j, group in enumerate(optimizer.param_groups):
            key = f"{i}/{j}"
            base = base_lrs[key] if key in base_lrs else float(group["lr"])
            if i in scheduled:
                value = composed(base, float(group["lr"]))
            else:
                value = lr(base)
                set_group_lr(group, value)
                group[WRITTEN_LR_KEY] = value  # not read back from a Tensor lr: that would be a device sync
            lrs[names[(i, j)]] = value
    return lrs
