"""The robustness benchmark's tasks: data, network and LightningModule of each, built from the recipes.

===================  =====================================================================================
``digits``           300 scikit-learn digits (``recipes.data.DigitsDataModule``, the default recipe's
                     split), ``recipes.models.MLP`` 64-512-512-10, cross-entropy. Overfits within a few
                     dozen epochs: the anti-overfitting task.
``synthetic``        the recipes' Gaussian-mixture classification (``recipes.data.SyntheticDataModule``,
                     noise 3) with 20% of the training labels randomized and 500 training samples,
                     MLP 64-256-256-10. Label noise makes late memorization visible in validation loss.
``digits_overfit``   ``conf/experiment/digits_overfit.yaml`` as the recipe composes it (100 training digits,
                     batch 32, MLP 64-512-512-10): DESIGN.md's anti-overfitting experiment. The
                     robustness benchmark runs it at that experiment's lr and epochs only.
``regression``       a seeded teacher ``y = tanh(x W1) w2`` (16 inputs, 32 hidden units, scaled to unit
                     variance) plus ``N(0, 0.5²)`` noise, 200 training points, MLP 16-256-256-1 with MSE.
                     A different loss (and scale) from the classification tasks.
===================  =====================================================================================

Every task is a :class:`Task`: tensors of its splits (fixed, independent of the run seed) and a
``make_module(optimizer, scheduler, interval, monitor)`` that returns a LightningModule logging ``val_loss``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recipes.classifier import Classifier
from recipes.data import DigitsDataModule, SyntheticDataModule
from recipes.models import MLP

__all__ = [
    "OVERFIT_TASK",
    "TASKS",
    "Regressor",
    "Task",
    "build_task",
    "overfit_experiment",
    "regression_splits",
    "task_fingerprint",
]

OVERFIT_TASK = "digits_overfit"

Splits = dict[str, tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Task:
    """One benchmark task: its splits, its network and its LightningModule.

    Attributes:
        name: key used in results files.
        splits: ``{"train": (x, y), "val": (x, y)}`` tensors (the same for every seed: seeds vary the
            initialisation and the data order only).
        make_net: ``() -> nn.Module`` (call after seeding).
        loss_fn: ``(output, target) -> scalar`` training and validation loss.
        regression: True when the module is a :class:`Regressor` (MSE) instead of a recipes ``Classifier``.
    """

    name: str
    splits: Splits
    make_net: Callable[[], nn.Module]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    regression: bool = False

    def make_module(
        self,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None,
        interval: str,
        monitor: str | None,
    ) -> L.LightningModule:
        """The LightningModule for one run (network initialised from the current global seed)."""
        cls = Regressor if self.regression else Classifier
        return cls(
            net=self.make_net(),
            optimizer=optimizer,
            scheduler=scheduler,
            scheduler_interval=interval,
            scheduler_monitor=monitor,
        )

    @torch.no_grad()
    def full_loss(self, module: L.LightningModule, split: str) -> float:
        """Loss of ``module`` (eval mode) on a whole split, as a float (may be ``inf``/``nan``)."""
        x, y = self.splits[split]
        was_training = module.training
        module.eval()
        try:
            return float(self.loss_fn(module(x), y))
        finally:
            module.train(was_training)


class Regressor(L.LightningModule):
    """``net`` trained with mean squared error; same constructor and ``val_loss`` key as ``recipes`` Classifier.

    Logs ``train_loss`` per step and ``val_loss`` (sample-weighted MSE over the validation set) per validation.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str | None = "val_loss",
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor
        self._val_sum = 0.0
        self._val_count = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def probe_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Mean squared error of ``batch``: the objective StableLR's line probe evaluates."""
        x, y = batch
        return F.mse_loss(self(x), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.probe_loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=False, batch_size=len(batch[1]))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self._val_sum += float(F.mse_loss(self(x), y, reduction="sum")) / y.shape[-1]
        self._val_count += len(y)

    def on_validation_epoch_end(self) -> None:
        loss = self._val_sum / max(self._val_count, 1)
        self._val_sum, self._val_count = 0.0, 0
        self.log("val_loss", loss)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        config: dict[str, Any] = {"scheduler": self.scheduler_factory(optimizer=optimizer),
                                  "interval": self.scheduler_interval}
        if self.scheduler_monitor:
            config["monitor"] = self.scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}


def _datamodule_splits(datamodule: Any) -> Splits:
    datamodule.setup("fit")
    return {split: tuple(datamodule.splits[split].tensors) for split in ("train", "val")}


def regression_splits(
    train_size: int = 200, val_size: int = 500, input_dim: int = 16, hidden: int = 32, noise: float = 0.5,
    data_seed: int = 0,
) -> Splits:
    """``y = s · tanh(x W1) w2 + noise · ε`` with ``x, W1, w2, ε ~ N(0, 1)`` and ``s`` making ``Var(signal) = 1``.

    Drawn from ``torch.Generator().manual_seed(data_seed)``; the best possible validation MSE is ``noise²``.
    """
    generator = torch.Generator().manual_seed(data_seed)
    w1 = torch.randn(input_dim, hidden, generator=generator) / math.sqrt(input_dim)
    w2 = torch.randn(hidden, 1, generator=generator)
    total = train_size + val_size
    x = torch.randn(total, input_dim, generator=generator)
    signal = torch.tanh(x @ w1) @ w2
    signal = signal / signal.std()
    y = signal + noise * torch.randn(total, 1, generator=generator)
    return {"train": (x[:train_size], y[:train_size]), "val": (x[train_size:], y[train_size:])}


def _regression_net() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))


def task_fingerprint(task: Task) -> str:
    """SHA-1 (12 hex digits) of the task's split tensors: results made on other data never count as done."""
    digest = hashlib.sha1(task.name.encode())
    for split in sorted(task.splits):
        for tensor in task.splits[split]:
            digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


@cache
def overfit_experiment() -> dict[str, Any]:
    """``conf/experiment/digits_overfit.yaml`` composed by Hydra: ``train_size``, ``val_size``, ``batch_size``,
    ``optimizer`` (config group choice), ``lr`` and ``epochs`` (``trainer.max_epochs``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from benchmarks.common import CONF_DIR

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=digits_overfit"], return_hydra_config=True)
    optimizer = cfg.hydra.runtime.choices["optimizer"]
    return {"train_size": int(cfg.data.train_size), "val_size": int(cfg.data.val_size),
            "batch_size": int(cfg.data.batch_size), "optimizer": str(optimizer), "lr": float(cfg.optimizer.lr),
            "epochs": int(cfg.trainer.max_epochs)}


def build_task(name: str) -> Task:
    """Build the task ``name`` (one of :data:`TASKS`); raises ``ValueError`` naming the choices otherwise."""
    if name == "digits":
        splits = _datamodule_splits(DigitsDataModule(train_size=300, val_size=500, split_seed=0))
        return Task(name, splits, lambda: MLP(64, (512, 512), 10), F.cross_entropy)
    if name == OVERFIT_TASK:
        experiment = overfit_experiment()
        datamodule = DigitsDataModule(train_size=experiment["train_size"], val_size=experiment["val_size"])
        return Task(name, _datamodule_splits(datamodule), lambda: MLP(64, (512, 512), 10), F.cross_entropy)
    if name == "synthetic":
        datamodule = SyntheticDataModule(train_size=500, val_size=500, test_size=1, noise=3.0, label_noise=0.2)
        return Task(name, _datamodule_splits(datamodule), lambda: MLP(64, (256, 256), 10), F.cross_entropy)
    if name == "regression":
        return Task(name, regression_splits(), _regression_net, F.mse_loss, regression=True)
    raise ValueError(f"`task` must be one of {', '.join((*TASKS, OVERFIT_TASK))}, got {name!r}.")


TASKS = ("digits", "synthetic", "regression")
"""The tasks of the lr grid (the overfitting experiment runs beside them at its own lr)."""
