"""Train a classifier with StableLR and StabilityMonitor: ``python -m recipes.train [overrides]``.

With no arguments it trains a 64-512-512-10 MLP on 300 scikit-learn digits on the CPU (about a minute on
two cores), logs to TensorBoard under ``outputs/runs/<date>_<time>/`` and prints the ``tensorboard`` command.
See ``docs/RECIPES.md`` for GPUs, DDP, SLURM and policy comparisons.

:func:`train` is a plain function of a composed config, which tests call in-process::

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", "trainer.max_epochs=2"])
    metrics = train(cfg)
"""

from __future__ import annotations

import logging
import math
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from recipes.checks import check_config
from recipes.errors import EXIT_CONFIG_ERROR, RecipeError, build
from recipes.launch import run_job_in_child, sweep_job_needs_child
from recipes.summary import write_metrics

__all__ = ["collect_metrics", "main", "output_dir_of", "run_entry_point", "train"]

log = logging.getLogger(__name__)


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


def build_callbacks(cfg: DictConfig, output_dir: Path) -> list[L.Callback]:
    """The lr policy's callback (StableLR) first, then the monitor, then ``cfg.callbacks``; ``LrTrace`` last.

    StableLR goes before StabilityMonitor so that, at a shared step, it computes the three-point line probe
    and the monitor reuses it.
    """
    callbacks: list[L.Callback] = []
    if cfg.lr_policy.get("callback") is not None:
        callbacks.append(build(cfg.lr_policy.callback, "lr_policy.callback"))
    monitor = cfg.get("monitor")
    if isinstance(monitor, DictConfig) and "_target_" in monitor:
        callbacks.append(build(monitor, "monitor"))
    for name, node in (cfg.get("callbacks") or {}).items():
        if isinstance(node, DictConfig) and "_target_" in node:
            callbacks.append(build(node, f"callbacks.{name}"))
    if OmegaConf.select(cfg, "debug.lr_trace", default=False):
        from recipes.debug import LrTrace

        callbacks.append(LrTrace(output_dir))
    return callbacks


def build_loggers(cfg: DictConfig) -> list[Any]:
    """Every node with a ``_target_`` under ``cfg.logger`` (``logger=[tensorboard,csv]`` selects both)."""
    return [
        build(node, f"logger.{name}")
        for name, node in (cfg.get("logger") or {}).items()
        if isinstance(node, DictConfig) and "_target_" in node
    ]


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


def _tensorboard_dir(trainer: L.Trainer, output_dir: Path) -> Path:
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return Path(logger.log_dir).resolve()
    return output_dir.resolve()


def _print_summary(metrics: dict[str, Any], trainer: L.Trainer, output_dir: Path) -> None:
    def fmt(key: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"

    print(
        f"\n== recipes.train finished in {metrics['wall_time_s']:.1f} s "
        f"({int(metrics['epochs'])} epochs, {int(metrics['global_step'])} optimizer steps)\n"
        f"   val_acc {fmt('val_acc')}  val_loss {fmt('val_loss')} (best {fmt('val_loss_best')})  "
        f"test_acc {fmt('test_acc')}  lr_end {fmt('lr_end')}\n"
        f"   run dir: {output_dir.resolve()}\n"
        f"   tensorboard --logdir {_tensorboard_dir(trainer, output_dir)}",
        flush=True,
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Check ``cfg``, build everything through ``_target_``, fit, test, and return the final metrics.

    Returns a dict of floats (``val_loss``, ``val_acc``, ``val_loss_best``, ``val_acc_best``,
    ``val_loss_final_minus_best``, ``train_loss``, ``test_loss``/``test_acc`` when ``cfg.test``, ``lr_end``,
    the ``stablelr/*`` and ``lyapunov/*`` values, ``epochs``, ``global_step``, ``wall_time_s``) plus
    ``run_dir`` (str). Rank 0 also writes them to ``<run dir>/metrics.json``. Every output goes under
    ``cfg.paths.output_dir``. Raises :class:`~recipes.errors.RecipeError` for a configuration that cannot work.
    """
    output_dir = output_dir_of(cfg)
    check_config(cfg)
    if sweep_job_needs_child(cfg):
        return run_job_in_child(output_dir)
    route_lightning_logs()
    threads = torch.get_num_threads()
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    try:
        return _fit_and_test(cfg, output_dir)
    finally:
        torch.set_num_threads(threads)  # an in-process caller gets its own setting back


def _fit_and_test(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build(cfg.data, "data")
    model = build(cfg.model, "model")
    callbacks = build_callbacks(cfg, output_dir)
    loggers = build_loggers(cfg)
    trainer: L.Trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics: dict[str, Any] = collect_metrics(trainer)
    if cfg.get("test", False):
        # The final weights, not the best checkpoint: the overfitting a policy allows is part of the result.
        trainer.test(model, datamodule=datamodule, verbose=False)
        metrics.update({key: value for key, value in collect_metrics(trainer).items() if key.startswith("test_")})
    metrics["wall_time_s"] = time.perf_counter() - started
    metrics["run_dir"] = str(output_dir.resolve())
    if trainer.is_global_zero:
        write_metrics(output_dir, metrics)
        _print_summary(metrics, trainer, output_dir)
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


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """``python -m recipes.train``: see the module docstring and ``docs/RECIPES.md``."""
    return run_entry_point("recipes.train", train, cfg)


if __name__ == "__main__":
    main()
