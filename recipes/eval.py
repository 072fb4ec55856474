"""Evaluate a checkpoint on the validation and test splits: ``python -m recipes.eval ckpt_path=<file>``.

Pass the same ``data=``/``model=`` overrides as for the training run (they are listed in
``<run dir>/.hydra/overrides.yaml``); the model config names no optimizer or lr policy, so evaluation needs none. Results go
to ``<eval run dir>/metrics.json`` and are printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import lightning as L
import yaml
from omegaconf import DictConfig

from recipes.checks import check_ckpt_path, check_devices, check_required_values
from recipes.errors import RecipeError, build
from recipes.launch import SpawnedGroupTeardown, finish_distributed
from recipes.runner import (
    build_loggers,
    collect_metrics,
    cpu_threads,
    output_dir_of,
    prepare_job,
    run_entry_point,
)
from recipes.summary import write_metrics

__all__ = ["evaluate", "main"]


def _training_overrides(ckpt_path: Path) -> list[str] | None:
    """The overrides of the run that wrote ``ckpt_path`` (``<run>/checkpoints/x.ckpt``), if recorded."""
    overrides = ckpt_path.resolve().parent.parent / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        return list(yaml.safe_load(overrides.read_text()) or [])
    return None


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Load ``cfg.ckpt_path`` into the configured model and return validation and test metrics as floats.

    Raises :class:`~recipes.errors.RecipeError` when ``ckpt_path`` is missing or not a file, or when the
    checkpoint's weights do not fit the configured model (the message lists the training run's overrides).
    """
    check_required_values(cfg, "recipes.eval")
    ckpt_path = check_ckpt_path(
        cfg.ckpt_path,
        "Pass a checkpoint written by recipes.train, e.g. ckpt_path=outputs/runs/<date>_<time>/checkpoints/last.ckpt.",
    )
    output_dir = output_dir_of(cfg)
    check_devices(cfg.trainer)
    prepare_job()
    with cpu_threads(cfg):
        return _validate_and_test(cfg, ckpt_path, output_dir)


def _validate_and_test(cfg: DictConfig, ckpt_path: Path, output_dir: Path) -> dict[str, Any]:
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build(cfg.data, "data")
    model = build(cfg.model, "model")
    loggers = build_loggers(cfg)
    trainer: L.Trainer = build(cfg.trainer, "trainer", callbacks=[SpawnedGroupTeardown()], logger=loggers or False)
    try:
        trainer.validate(model, datamodule=datamodule, ckpt_path=str(ckpt_path), verbose=False)
    except RuntimeError as exc:
        if "state_dict" not in str(exc):
            raise
        recorded = _training_overrides(ckpt_path)
        hint = f" The training run used: {' '.join(recorded) or '(no overrides)'}." if recorded is not None else ""
        raise RecipeError(
            f"The weights in {ckpt_path} do not fit model={cfg.model.net._target_.rsplit('.', 1)[-1]} on this data "
            f"config. Pass the same data=/model= overrides as the training run.{hint}"
        ) from None
    metrics: dict[str, Any] = collect_metrics(trainer)
    trainer.test(model, datamodule=datamodule, ckpt_path=str(ckpt_path), verbose=False)
    metrics.update({key: value for key, value in collect_metrics(trainer).items() if key.startswith("test_")})
    metrics = {key: value for key, value in metrics.items() if key.startswith(("val_", "test_"))}
    metrics["ckpt_path"] = str(ckpt_path.resolve())
    metrics["run_dir"] = str(output_dir.resolve())
    finish_distributed()  # as in recipes.train: the group ends in order, before rank 0's files
    if trainer.is_global_zero:
        write_metrics(output_dir, metrics)
        print(
            f"\n== recipes.eval {ckpt_path}\n   val_loss {metrics.get('val_loss', float('nan')):.4g}  "
            f"val_acc {metrics.get('val_acc', float('nan')):.4g}  test_loss {metrics.get('test_loss', float('nan')):.4g}"
            f"  test_acc {metrics.get('test_acc', float('nan')):.4g}\n   run dir: {output_dir.resolve()}",
            flush=True,
        )
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    """``python -m recipes.eval ckpt_path=<file> [data=... model=...]``."""
    return run_entry_point("recipes.eval", evaluate, cfg)


if __name__ == "__main__":
    main()
