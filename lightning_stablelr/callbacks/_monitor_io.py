"""The monitor's input and output: the validation batches of the connectivity probe; scalars to every logger
and ``callback_metrics``, figures to TensorBoard (rank 0).

The outputs charge their own time to the governor: logging as a kind without a share (it comes off every
share alike), figures as a kind of their own.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_stablelr.callbacks._connectivity_probe import ConnectivityReport
from lightning_stablelr.callbacks._governor import ProbeGovernor
from lightning_stablelr.callbacks._lightning_access import log_step, put_callback_metrics
from lightning_stablelr.callbacks._monitor_config import MonitorConfig
from lightning_stablelr.callbacks._validation_cache import cached_validation_batches

__all__ = [
    "figures_affordable", "has_monitor_metric", "log_monitor_metrics", "open_tensorboard", "validation_batches", "write_connectivity_figures",
]  # fmt: skip


def open_tensorboard(trainer: pl.Trainer, governor: ProbeGovernor, config: MonitorConfig) -> Any:
    """The TensorBoard writer (its custom-scalars layout written once), or None: then the figures are skipped,
    said once, and the budget is shared among the other kinds."""
    from lightning_stablelr.tensorboard import find_tensorboard_writer, write_layout_once

    writer = find_tensorboard_writer(trainer)
    if writer is not None:
        write_layout_once(writer)
    elif "figures" in (kinds := config.probe_kinds):
        governor.share_among([kind for kind in kinds if kind != "figures"])
        rank_zero_info(
            "StabilityMonitor: no TensorBoardLogger, so the figures connectivity/path and connectivity/pairwise"
            " are skipped; the scalars still go to every logger."
        )
    return writer


def validation_batches(trainer: pl.Trainer, config: MonitorConfig) -> list[Any]:
    """The first ``connectivity_batches`` validation batches (this rank's shard), copied to the snapshot device."""
    # Through Lightning's input conversion and batch hooks, without advancing the loader's own generator.
    batches = cached_validation_batches(trainer, config.connectivity_batches, config.snapshot_device)
    if not batches:
        rank_zero_info("StabilityMonitor: no validation batches; the connectivity probes use the first"
                       " training batches instead.")  # fmt: skip
    return batches


def log_monitor_metrics(trainer: pl.Trainer, governor: ProbeGovernor, metrics: dict[str, float]) -> None:
    """``metrics`` plus ``monitor/overhead`` to every logger (they write on rank 0) and into ``callback_metrics``.

    The step is the one Lightning's own logging and ``LearningRateMonitor`` use (batches that stepped), so a
    certificate of optimizer step t lands at t next to that step's ``train_loss``. ``log_every_n_steps`` is
    not applied: the probes have their own, sparser cadence.
    """
    metrics = {**metrics, "monitor/overhead": governor.overhead()}
    start = time.perf_counter()
    step = log_step(trainer)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    put_callback_metrics(trainer, metrics)
    governor.charge("logging", time.perf_counter() - start)


def write_connectivity_figures(trainer: pl.Trainer, writer: Any, governor: ProbeGovernor, report: ConnectivityReport) -> None:
    """The path figure and the pairwise heatmap of ``report``, when :func:`figures_affordable`.

    No collective: only rank 0 draws, so a skipped figure is not counted in ``monitor/deferred_probes``
    (the counts must agree across ranks).
    """
    if not figures_affordable(governor):
        return
    from lightning_stablelr.tensorboard import pairwise_heatmap, path_figure, write_figure

    start = time.perf_counter()
    step = log_step(trainer)
    write_figure(writer, "connectivity/path", path_figure(report.segments), step)
    matrix = report.matrix
    write_figure(writer, "connectivity/pairwise", pairwise_heatmap(matrix.values.numpy(), matrix.labels), step)
    governor.record("figures", time.perf_counter() - start)


def figures_affordable(governor: ProbeGovernor, now: float | None = None) -> bool:
    """Whether the figures' own share of the budget affords drawing them now (``pooled``, as an instrument's first
    probe of an epoch): the instruments' first probes of each epoch may use the whole unspent budget, so on a run
    whose probes fill it the unspent part is always about 0 and the figures, drawn last, would never fit. Their
    share (``1/kinds`` of the budget) still bounds what they cost over the run."""
    return governor.allows("figures", now=now, pooled=True)


def has_monitor_metric(trainer: pl.Trainer, key: str, warned: set[str]) -> bool:
    """Whether ``trainer.callback_metrics`` holds ``key``; warns once (``key`` joins ``warned``, the caller's
    set) when it does not, since ``lyapunov/val_decrease`` then never appears."""
    if key in trainer.callback_metrics:
        return True
    if key not in warned:
        warned.add(key)
        available = [name for name in trainer.callback_metrics if not name.startswith(("stablelr/", "lyapunov/"))]
        rank_zero_warn(
            f"StabilityMonitor: the validation metric `{key}` is not in trainer.callback_metrics (available:"
            f" {available or 'none'}), so lyapunov/val_decrease is not logged. Log it in validation_step"
            f" (self.log({key!r}, ...)) or pass StabilityMonitor(monitor=<one of the available keys>). (shown once)"
        )
    return False
