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

import math
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from recipes.checks import check_ckpt_path, check_config
from recipes.errors import RecipeError, build
from recipes.launch import SpawnedGroupTeardown, finish_distributed, run_job_in_child, sweep_job_needs_child
from recipes.runner import (
    build_loggers,
    collect_metrics,
    cpu_threads,
    output_dir_of,
    prepare_job,
    run_entry_point,
    tensorboard_dir,
)
from recipes.summary import write_metrics

__all__ = ["build_callbacks", "build_model", "main", "train"]


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


def build_model(cfg: DictConfig) -> L.LightningModule:
    """``cfg.model`` with the optimizer and the lr policy's scheduler passed in (the model config names neither,
    so that ``recipes.eval`` builds the same model without them)."""
    policy = cfg.lr_policy
    return build(cfg.model, "model", optimizer=cfg.optimizer, scheduler=policy.get("scheduler"),
                 scheduler_interval=policy.get("interval", "epoch"), scheduler_monitor=policy.get("monitor"))


def _print_summary(metrics: dict[str, Any], trainer: L.Trainer, output_dir: Path) -> None:
    def fmt(key: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"

    run_dir = output_dir.resolve()
    lines = [
        f"\n== recipes.train finished in {metrics['wall_time_s']:.1f} s "
        f"({int(metrics['epochs'])} epochs, {int(metrics['global_step'])} optimizer steps)",
        f"   val_acc {fmt('val_acc')}  val_loss {fmt('val_loss')} (best {fmt('val_loss_best')})  "
        f"test_acc {fmt('test_acc')}  lr_end {fmt('lr_end')}",
        f"   run dir: {run_dir}",
    ]
    events = tensorboard_dir(trainer)
    if events is not None:
        # --logdir on the folder above the run: TensorBoard names runs after their path below the logdir,
        # so the run shows as "<date>_<time>/tensorboard" and sits next to earlier runs, not as ".".
        lines += [
            f"   what happened:  stablelr report {events}",
            f"   charts:         tensorboard --logdir {run_dir.parent}   (Custom Scalars tab)",
        ]
    print("\n".join(lines), flush=True)


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
    if cfg.get("ckpt_path") is not None:
        check_ckpt_path(
            cfg.ckpt_path,
            "Resume from a checkpoint recipes.train wrote, e.g. ckpt_path=outputs/runs/<date>_<time>/checkpoints/"
            "last.ckpt, with the same overrides as that run.",
        )
    if sweep_job_needs_child(cfg):
        return run_job_in_child(output_dir)
    prepare_job()
    with cpu_threads(cfg):
        return _fit_and_test(cfg, output_dir)


class _TrainedBatches(L.Callback):
    """Counts the training batches this fit ran: a resume from a checkpoint that already reached the run's end
    runs none."""

    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.batches += 1


def _fit_and_test(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build(cfg.data, "data")
    model = build_model(cfg)
    callbacks = build_callbacks(cfg, output_dir)
    trained = _TrainedBatches()
    callbacks += [trained, SpawnedGroupTeardown()]  # the group's teardown last: see SpawnedGroupTeardown
    loggers = build_loggers(cfg)
    trainer: L.Trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if cfg.get("ckpt_path") is not None and trained.batches == 0:  # every rank alike: no collective needed
        limits = f"trainer.max_epochs={trainer.max_epochs}, trainer.max_steps={trainer.max_steps}"
        raise RecipeError(
            f"ckpt_path={cfg.ckpt_path} had already trained to the end of this run (epoch {trainer.current_epoch},"
            f" step {trainer.global_step}; {limits}): nothing was left to train. Raise trainer.max_epochs or"
            f" trainer.max_steps to continue it, or evaluate it: python -m recipes.eval ckpt_path={cfg.ckpt_path}"
        )
    metrics: dict[str, Any] = collect_metrics(trainer)
    if cfg.get("test", False):
        # The final weights, not the best checkpoint: the overfitting a policy allows is part of the result.
        trainer.test(model, datamodule=datamodule, verbose=False)
        metrics.update({key: value for key, value in collect_metrics(trainer).items() if key.startswith("test_")})
    metrics["wall_time_s"] = time.perf_counter() - started
    metrics["run_dir"] = str(output_dir.resolve())
    finish_distributed()  # before rank 0's files: a rank that fails there cannot leave the others at a barrier
    if trainer.is_global_zero:
        write_metrics(output_dir, metrics)
        _print_summary(metrics, trainer, output_dir)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """``python -m recipes.train``: see the module docstring and ``docs/RECIPES.md``."""
    return run_entry_point("recipes.train", train, cfg)


if __name__ == "__main__":
    main()
