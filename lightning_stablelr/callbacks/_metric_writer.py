"""Where StableLR's metrics go: ``trainer.callback_metrics`` (every call) and the loggers (a point per log step)."""

from __future__ import annotations

import lightning.pytorch as pl
from torch import Tensor

from lightning_stablelr.callbacks._lightning_access import log_step, log_to_loggers, put_callback_metrics

__all__ = ["MetricWriter"]


class MetricWriter:
    """Writes StableLR's metrics; a log step already written is not written again unless its metrics changed.

    The point at log step ``k`` holds the lrs of optimizer step ``k``. Logging steps write the step about to run;
    validation and epoch ends write the next step's lrs, already set, with the G just updated (in a validation
    at :func:`~lightning_stablelr.callbacks._lightning_access.upcoming_log_step`: Lightning counts the batch
    that ran only after it), so a run shorter than ``log_every_n_steps`` still has every ``stablelr/*`` series,
    with a point after each G update (the last point: the lrs a further step would use).
    """

    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, Tensor]] = {}
        self._logged: tuple[int, dict[str, float]] | None = None  # the last (log step, metrics) written

    def reset(self) -> None:
        """A new fit: its log steps start again."""
        self._logged = None

    def publish(self, trainer: pl.Trainer, current: dict[str, float], logged: dict[str, float],
                step: int | None = None) -> None:
        """``current`` into ``callback_metrics``; ``logged`` to the loggers at ``step`` (default: :func:`log_step`)."""
        put_callback_metrics(trainer, current, self._cache)
        entry = (log_step(trainer) if step is None else step, logged)
        if entry != self._logged:
            self._logged = entry
            log_to_loggers(trainer, logged, every_n_steps=False, step=entry[0])
