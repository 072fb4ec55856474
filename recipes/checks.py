"""Checks of a composed config that catch impossible combinations before anything is built or trained.

Each check raises :class:`~recipes.errors.RecipeError` with the override to use instead. They run in
``recipes.train.train`` first, so a bad combination fails in a second with one paragraph instead of deep
inside ``trainer.fit`` (for ``ReduceLROnPlateau``, at the end of the first epoch).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from recipes.errors import RecipeError, build, missing_values

__all__ = ["LOGGED_METRICS", "check_config", "check_devices", "check_lr_policy", "check_required_values"]

#: Metrics that ``recipes.classifier.Classifier`` logs; a plateau scheduler may monitor any of them.
LOGGED_METRICS = ("val_loss", "val_acc", "val_loss_best", "val_acc_best", "train_loss", "train_loss_epoch")

_GPU_ACCELERATORS = ("gpu", "cuda")


def check_required_values(cfg: DictConfig, entry_point: str = "recipes.train") -> None:
    """Every ``???`` value must be set: list them all with the override syntax of ``entry_point``."""
    missing = missing_values(cfg)
    if missing:
        listed = ", ".join(missing)
        example = " ".join(f"{key}=<value>" for key in missing)
        raise RecipeError(
            f"Missing required value(s): {listed}. These are marked `???` in the config and have no default; "
            f"set them on the command line, e.g. `python -m {entry_point} {example}`."
        )


def check_ckpt_path(ckpt_path: Any, advice: str) -> Path:
    """``ckpt_path`` as a Path; raise :class:`RecipeError` (``"ckpt_path=... is not a file. " + advice``) when it is
    not a file, before anything is built."""
    path = Path(str(ckpt_path))
    if not path.is_file():
        raise RecipeError(f"ckpt_path={ckpt_path} is not a file. {advice}")
    return path


def check_devices(trainer: DictConfig, cuda_devices: int | None = None) -> None:
    """A GPU trainer needs as many CUDA devices as it asks for; point CPU-only users at the CPU options.

    ``cuda_devices`` defaults to ``torch.cuda.device_count()`` (a parameter so tests can pretend).
    """
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    if accelerator not in _GPU_ACCELERATORS:
        return
    available = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    strategy = trainer.get("strategy", "auto")
    strategy_name = strategy if isinstance(strategy, str) else str(strategy.get("_target_", "")).rsplit(".", 1)[-1]
    requested = trainer.get("devices", 1)
    if available == 0:
        raise RecipeError(
            f"trainer.accelerator={accelerator} (strategy {strategy_name}) needs a CUDA GPU, but "
            "torch.cuda.is_available() is False on this machine. Use trainer=cpu for one CPU process, or "
            "trainer=ddp_cpu (real DDP, 2 CPU processes over gloo) / trainer=ddp_sim (ddp_spawn) to test DDP "
            "without GPUs."
        )
    if isinstance(requested, int) and requested > available:
        raise RecipeError(
            f"trainer.devices={requested} asks for more GPUs than this machine has ({available}). "
            f"Set trainer.devices={available} (or trainer.devices=-1 for all of them), or run on several nodes "
            "with trainer=multinode hydra/launcher=slurm."
        )


def _target_name(node: Any) -> str:
    if isinstance(node, DictConfig):
        return str(node.get("_target_", "")).rsplit(".", 1)[-1]
    return ""


def check_lr_policy(cfg: DictConfig) -> None:
    """The lr policy must fit the optimizer and the trainer.

    - one lr driver: a policy sets either ``callback`` (StableLR) or ``scheduler`` (torch peer), not both;
    - ``interval`` is ``epoch`` or ``step``;
    - ``ReduceLROnPlateau`` monitors a metric the Classifier logs, and that metric exists when the scheduler
      steps (validation every epoch for ``interval=epoch``; never for ``interval=step``);
    - ``CosineAnnealingLR``'s ``eta_min`` lies below the optimizer's lr (else "annealing" raises the lr);
    - the optimizer and the scheduler build on a dummy parameter (catches e.g. ``nesterov`` without momentum).
    """
    policy = cfg.lr_policy
    name = policy.get("name", "?")
    callback, scheduler = policy.get("callback"), policy.get("scheduler")
    if callback is not None and scheduler is not None:
        raise RecipeError(
            f"lr_policy={name} sets both a callback ({_target_name(callback)}) and a scheduler "
            f"({_target_name(scheduler)}); two lr drivers would fight over the same param groups. Use "
            "lr_policy=stablelr for StableLR alone, or one of the peers (constant, exponential, cosine, plateau)."
        )
    interval = policy.get("interval", "epoch")
    if interval not in ("epoch", "step"):
        raise RecipeError(f"lr_policy.interval must be `epoch` or `step`, got {interval!r}.")
    if scheduler is None:
        _dry_run(cfg, None)
        return
    kind = _target_name(scheduler)
    if kind == "ReduceLROnPlateau":
        monitor = policy.get("monitor")
        if monitor not in LOGGED_METRICS:
            raise RecipeError(
                f"lr_policy={name} (ReduceLROnPlateau) monitors {monitor!r}, which the model does not log. "
                f"Set lr_policy.monitor to one of: {', '.join(LOGGED_METRICS)}."
            )
        every = cfg.trainer.get("check_val_every_n_epoch", 1)
        if str(monitor).startswith("val_") and (interval == "step" or (every or 1) != 1):
            raise RecipeError(
                f"lr_policy={name} steps ReduceLROnPlateau on {monitor!r} every {interval}, but validation runs "
                f"every {every} epoch(s), so the metric would be missing and training would stop with an error. "
                "Use lr_policy.interval=epoch with trainer.check_val_every_n_epoch=1."
            )
    if kind == "CosineAnnealingLR":
        eta_min, lr = scheduler.get("eta_min", 0.0), cfg.optimizer.get("lr")
        if isinstance(lr, (int, float)) and eta_min >= lr:
            raise RecipeError(
                f"lr_policy={name} anneals down to eta_min={eta_min}, which is not below optimizer.lr={lr}: "
                "the cosine policy would raise the lr instead of lowering it. Lower lr_policy.scheduler.eta_min "
                "(0 by default) or raise optimizer.lr."
            )
    _dry_run(cfg, scheduler)


def _dry_run(cfg: DictConfig, scheduler: DictConfig | None) -> None:
    """Build the optimizer (and the scheduler) on one dummy parameter, reporting bad arguments early."""
    make_optimizer = build(cfg.optimizer, "optimizer")
    if not callable(make_optimizer) or not cfg.optimizer.get("_partial_", False):
        raise RecipeError(
            "optimizer must be a partial config (`_partial_: true`) so the model can pass its parameters; "
            f"got a {type(make_optimizer).__name__}. Add `_partial_: true` to the optimizer config."
        )
    lr = cfg.optimizer.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise RecipeError(f"optimizer.lr must be a finite number > 0, got {lr!r}. Set e.g. optimizer.lr=0.03.")
    try:
        optimizer = make_optimizer(params=[torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as exc:
        raise RecipeError(
            f"optimizer ({_target_name(cfg.optimizer)}) rejected its configuration: {exc}. "
            "Fix the optimizer.* values or choose another option of the optimizer group."
        ) from None
    if scheduler is None:
        return
    make_scheduler = build(scheduler, "lr_policy.scheduler")
    try:
        make_scheduler(optimizer=optimizer)
    except (ValueError, TypeError) as exc:
        raise RecipeError(
            f"lr_policy={cfg.lr_policy.get('name', '?')} cannot drive optimizer={_target_name(cfg.optimizer)}: "
            f"{exc}. Choose another lr_policy or optimizer, or fix lr_policy.scheduler.*."
        ) from None


def check_config(cfg: DictConfig) -> None:
    """All checks above, in the order a user would fix them."""
    check_required_values(cfg)
    for group in ("data", "model", "optimizer", "lr_policy", "trainer"):
        if group not in cfg or not isinstance(cfg[group], DictConfig):
            raise RecipeError(f"The config has no `{group}` node; select one with `{group}=<option>`.")
    try:
        OmegaConf.to_container(cfg.trainer, resolve=True)
        OmegaConf.to_container(cfg.optimizer, resolve=True)
    except Exception as exc:  # an interpolation that cannot resolve, e.g. ${hydra:...} outside @hydra.main
        raise RecipeError(f"The config does not resolve: {exc}") from None
    check_devices(cfg.trainer)
    check_lr_policy(cfg)
