"""The learning-rate policies and optimizers the benchmarks compare, read from the recipes' configs.

The peers (``constant``, ``exponential``, ``plateau``, ``cosine``) and the optimizers (``sgd``, ``adamw``)
are exactly ``conf/lr_policy/<name>.yaml`` and ``conf/optimizer/<name>.yaml`` with ``trainer.max_epochs``
and ``optimizer.lr`` filled in: the benchmark invents no hyperparameters of its own.

``stablelr`` is ``lightning_stablelr.StableLR`` with the **library defaults** (that is what the benchmark
evaluates and what it chooses), plus optional overrides for sweeps. ``schedulefree`` is
``schedulefree.AdamWScheduleFree`` with the betas, eps and weight decay of ``conf/optimizer/adamw.yaml`` and
no scheduler; :class:`ScheduleFreeModes` switches it between ``train()`` and ``eval()`` around validation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from benchmarks.common import CONF_DIR

__all__ = [
    "OPTIMIZERS",
    "PEERS",
    "POLICIES",
    "Policy",
    "ScheduleFreeModes",
    "load_optimizer",
    "load_policy",
    "policies_for",
]

PEERS = ("constant", "exponential", "plateau", "cosine")
POLICIES = ("stablelr", *PEERS, "schedulefree")
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class Policy:
    """How one run sets its learning rate.

    Attributes:
        name: the policy's key in results.
        scheduler: ``functools.partial`` of a torch scheduler (called with the optimizer) or None.
        interval / monitor: Lightning's ``lr_scheduler`` config (``"epoch"``, ``"val_loss"`` for plateau).
        stablelr: StableLR keyword overrides, or None when the policy is not StableLR.
        schedule_free: the optimizer is replaced by ``AdamWScheduleFree``.
    """

    name: str
    scheduler: Callable[..., Any] | None = None
    interval: str = "epoch"
    monitor: str | None = None
    stablelr: Mapping[str, Any] | None = None
    schedule_free: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def callbacks(self) -> list[L.Callback]:
        """The callbacks this policy adds to the Trainer (StableLR, or the schedule-free mode switch)."""
        if self.stablelr is not None:
            from lightning_stablelr import StableLR

            return [StableLR(**dict(self.stablelr))]
        if self.schedule_free:
            return [ScheduleFreeModes()]
        return []


def policies_for(optimizer: str) -> tuple[str, ...]:
    """The policies compared with ``optimizer``: schedule-free AdamW only with ``adamw``."""
    return POLICIES if optimizer == "adamw" else POLICIES[:-1]


def load_policy(name: str, max_epochs: int, stablelr_overrides: Mapping[str, Any] | None = None) -> Policy:
    """The policy ``name`` for a run of ``max_epochs`` epochs (``conf/lr_policy/<name>.yaml`` for the peers)."""
    if name == "stablelr":
        overrides = {"monitor": "val_loss", **dict(stablelr_overrides or {})}
        return Policy(name, stablelr=overrides)
    if name == "schedulefree":
        return Policy(name, schedule_free=True)
    if name not in PEERS:
        raise ValueError(f"`policy` must be one of {', '.join(POLICIES)}, got {name!r}.")
    root = OmegaConf.create({"trainer": {"max_epochs": int(max_epochs)}})
    root.lr_policy = OmegaConf.load(CONF_DIR / "lr_policy" / f"{name}.yaml")
    node = root.lr_policy
    scheduler = instantiate(node.scheduler) if node.get("scheduler") is not None else None
    return Policy(name, scheduler=scheduler, interval=str(node.interval), monitor=node.get("monitor"))


def load_optimizer(name: str, lr: float, *, schedule_free: bool = False) -> Callable[..., torch.optim.Optimizer]:
    """``functools.partial`` of ``conf/optimizer/<name>.yaml`` with ``lr``; with ``schedule_free``
    (AdamW only) ``schedulefree.AdamWScheduleFree`` with that config's betas, eps and weight decay."""
    if name not in OPTIMIZERS:
        raise ValueError(f"`optimizer` must be one of {', '.join(OPTIMIZERS)}, got {name!r}.")
    node = OmegaConf.load(CONF_DIR / "optimizer" / f"{name}.yaml")
    node.lr = float(lr)
    if not schedule_free:
        return instantiate(node)
    if name != "adamw":
        raise ValueError(f"`schedule_free` needs optimizer 'adamw', got {name!r}.")
    import schedulefree

    return functools.partial(
        schedulefree.AdamWScheduleFree,
        lr=float(lr),
        betas=tuple(node.betas),
        eps=float(node.eps),
        weight_decay=float(node.weight_decay),
    )


class ScheduleFreeModes(L.Callback):
    """Schedule-free optimizers evaluate at their averaged point ``x`` (``eval()``) and train at ``y``
    (``train()``): switch to ``eval()`` for every validation and at the end of fit, back for training."""

    @staticmethod
    def _set(trainer: L.Trainer, mode: str) -> None:
        for optimizer in trainer.optimizers:
            getattr(optimizer, mode)()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set(trainer, "train")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training or trainer.state.fn == "fit":
            self._set(trainer, "eval")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set(trainer, "eval")
