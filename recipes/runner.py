"""What ``recipes.train`` and ``recipes.eval`` share: run directory, logging, loggers, metrics, threads and the
entry-point wrapper that turns a :class:`~recipes.errors.RecipeError` into a short message and exit code 2.

A job is ``run_entry_point(name, job, cfg)`` where ``job(cfg) -> metrics`` builds everything through
``_target_`` (:func:`~recipes.errors.build`); :func:`prepare_job` does the set-up every job needs first.
"""

from __future__ import annotations

import logging
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from recipes.errors import EXIT_CONFIG_ERROR, RecipeError, build
from recipes.quiet import quiet_third_party

__all__ = [
    "build_loggers",
    "collect_metrics",
    "cpu_threads",
    "objective",
    "output_dir_of",
    "prepare_job",
    "report_recipe_error",
    "route_lightning_logs",
    "run_entry_point",
    "tensorboard_dir",
]


def output_dir_of(cfg: DictConfig) -> Path:
    """The run directory: ``cfg.paths.output_dir`` (``${hydra:runtime.output_dir}`` under ``@hydra.main``)."""
    try:
        value = OmegaConf.select(cfg, "paths.output_dir", throw_on_missing=True)
    except Exception as exc:  # ${hydra:...} does not resolve outside @hydra.main
        raise RecipeError(
            "paths.output_dir does not resolve outside `@hydra.main` (it defaults to ${hydra:runtime.output_dir}). "
            "When calling train(cfg) yourself, compose with the override paths.output_dir=<directory>."
        ) from exc
    if not value:
        raise RecipeError("paths.output_dir is empty; set paths.output_dir=<directory>.")
    return Path(str(value))


def route_lightning_logs() -> None:
    """Send Lightning's log records through the root logger that Hydra configured (console + the job's log file).

    ``lightning.pytorch`` attaches its own stream handler and stops propagation when it is imported before
    any logging is configured (always, here), so its messages would miss the run's log file. Only under
    ``@hydra.main``: a caller of ``train(cfg)`` (a test session, a notebook) keeps its own logging setup.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


def prepare_job() -> None:
    """Set-up shared by every job: Lightning's logs into the run's log file, known third-party noise off."""
    route_lightning_logs()
    quiet_third_party()


@contextmanager
def cpu_threads(cfg: DictConfig) -> Iterator[None]:
    """``torch.set_num_threads(cfg.cpu_threads)`` inside the block (null: torch's default); restored after."""
    threads = torch.get_num_threads()
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    try:
        yield
    finally:
        torch.set_num_threads(threads)  # an in-process caller gets its own setting back


def build_loggers(cfg: DictConfig) -> list[Any]:
    """Every node with a ``_target_`` under ``cfg.logger`` (``logger=[tensorboard,csv]`` selects both)."""
    return [
        build(node, f"logger.{name}")
        for name, node in (cfg.get("logger") or {}).items()
        if isinstance(node, DictConfig) and "_target_" in node
    ]


def tensorboard_dir(trainer: L.Trainer) -> Path | None:
    """The event-file directory of the first TensorBoard logger, or None without one."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return Path(logger.log_dir).resolve()
    return None


def collect_metrics(trainer: L.Trainer) -> dict[str, float]:
    """Every scalar of ``trainer.callback_metrics`` as a float, plus derived values.

    Derived: ``lr_end`` (the ``lr`` of the last optimizer step), ``val_loss_final_minus_best`` (the
    anti-overfitting figure of merit), ``epochs`` and ``global_step``.
    """
    metrics: dict[str, float] = {}
    for key, value in trainer.callback_metrics.items():
        if (isinstance(value, torch.Tensor) and value.numel() == 1) or isinstance(value, (int, float)):
            metrics[key] = float(value)
    if "lr" in metrics:
        metrics["lr_end"] = metrics["lr"]
    if "val_loss" in metrics and "val_loss_best" in metrics:
        metrics["val_loss_final_minus_best"] = metrics["val_loss"] - metrics["val_loss_best"]
    # Under ddp_spawn the main process's trainer never advances: the Classifier's logged counters did.
    metrics.setdefault("epochs", float(trainer.current_epoch))
    metrics.setdefault("global_step", float(trainer.global_step))
    return metrics


def objective(metrics: dict[str, Any], cfg: DictConfig) -> float | None:
    """The value ``@hydra.main`` returns for sweepers such as Optuna: ``metrics[cfg.optimized_metric]``."""
    key = cfg.get("optimized_metric")
    if not key:
        return None
    if key not in metrics:
        raise RecipeError(
            f"optimized_metric={key!r} is not among the final metrics ({', '.join(sorted(metrics))}). "
            "Set optimized_metric to one of them, or optimized_metric=null."
        )
    return float(metrics[key])


def report_recipe_error(entry_point: str, error: RecipeError) -> None:
    """Print ``error`` as one wrapped paragraph on stderr (no traceback)."""
    body = textwrap.fill(str(error), width=100, break_long_words=False, break_on_hyphens=False)
    print(f"\n{entry_point}: configuration error\n{body}\n", file=sys.stderr, flush=True)


def run_entry_point(entry_point: str, function: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig) -> Any:
    """Call ``function(cfg)``; a ``RecipeError`` becomes a short message and exit code 2."""
    try:
        return objective(function(cfg), cfg)
    except RecipeError as error:
        report_recipe_error(entry_point, error)
        sys.exit(EXIT_CONFIG_ERROR)
