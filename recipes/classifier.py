"""The LightningModule of the recipes: cross-entropy classification around any ``net``.

Logged metrics (scalars, every logger):

- ``train_loss`` (per step as ``train_loss_step``, epoch mean as ``train_loss_epoch``; reduced across ranks);
- ``val_loss``, ``val_acc`` (sample-weighted over the whole validation set, reduced across ranks);
- ``val_loss_best``, ``val_acc_best`` (best so far, sanity check excluded);
- ``test_loss``, ``test_acc``;
- ``lr``: the lr of param group 0 right before each optimizer step, whatever the policy, so that StableLR
  and the torch peers share one chart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, MinMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_stablelr.validation import check_choice, check_int_at_least

__all__ = ["Classifier"]

Batch = tuple[torch.Tensor, torch.Tensor]


class Classifier(L.LightningModule):
    """``net`` trained with cross-entropy; the optimizer and the scheduler come from partial configs.

    Args:
        net: any module mapping ``(batch, *image_shape)`` to ``(batch, num_classes)`` logits.
        optimizer: ``functools.partial`` of a torch optimizer (``_partial_: true`` in ``conf/optimizer``);
            called with the parameters. ``None`` for a model that is only evaluated (``recipes.eval``).
        scheduler: ``functools.partial`` of a torch LR scheduler, called with the optimizer, or ``None``
            (StableLR and the constant policy need none).
        scheduler_interval: ``"epoch"`` or ``"step"``: when Lightning steps the scheduler.
        scheduler_monitor: metric a ``ReduceLROnPlateau`` scheduler watches (``val_loss``).
        scheduler_frequency: step the scheduler every this many intervals.
        num_classes: number of classes (for the accuracy).

    ``probe_loss(batch)`` is the training objective without logging or side effects; StableLR's line probe
    and StabilityMonitor's probes evaluate it at parameters of their choosing.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str | None = "val_loss",
        scheduler_frequency: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        check_choice("scheduler_interval", scheduler_interval, ("epoch", "step"))
        check_int_at_least("scheduler_frequency", scheduler_frequency, 1)
        if optimizer is not None and not callable(optimizer):
            raise ValueError(
                f"`optimizer` must be a partial optimizer (a config with `_partial_: true`), got {optimizer!r}."
            )
        # The net, optimizer and scheduler are objects; the composed config is logged by recipes.train instead.
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_loss_mean = MeanMetric()
        self.test_loss_mean = MeanMetric()
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_loss_best = MinMetric()
        self.val_acc_best = MaxMetric()

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (``trainer=fsdp``): shard ``net`` with FSDP2, each layer that owns
        parameters as one unit, then the rest; under any other strategy, or when already sharded (Lightning
        calls this hook again for ``trainer.test``), nothing."""
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.net, FSDPModule):
            return
        dims = mesh.mesh_dim_names or ()
        if "tensor_parallel" in dims and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                f"trainer=fsdp shards the net over data-parallel ranks only, but the device mesh has"
                f" tensor_parallel_size={mesh['tensor_parallel'].size()}: those ranks would train unsynchronised"
                " copies. Set trainer.strategy.tensor_parallel_size=1 and trainer.strategy.data_parallel_size to"
                " devices x num_nodes."
            )
        mesh = mesh["data_parallel"] if "data_parallel" in dims else mesh
        for module in reversed(list(self.net.modules())):  # children before the modules that contain them
            if module is not self.net and any(True for _ in module.parameters(recurse=False)):
                fully_shard(module, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def probe_loss(self, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy of ``batch``: the objective the stability probes evaluate."""
        x, y = batch
        return F.cross_entropy(self(x), y)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.probe_loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=batch[1].numel())
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.log("lr", float(optimizer.param_groups[0]["lr"]), on_step=True, on_epoch=False, batch_size=1)

    def _evaluate(self, batch: Batch, loss_mean: MeanMetric, accuracy: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        loss_mean.update(F.cross_entropy(logits, y), weight=y.numel())
        accuracy.update(logits.argmax(dim=-1), y)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss_mean, self.val_acc)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss_mean, self.test_acc)

    def on_train_epoch_end(self) -> None:
        # Progress counters for recipes.train's summary; callback_metrics also reach the main process under
        # ddp_spawn, where the main process's trainer never advances. Not sent to the loggers.
        self.log("epochs", float(self.current_epoch + 1), logger=False)
        self.log("global_step", float(self.global_step), logger=False)

    def on_train_start(self) -> None:
        # The sanity check must not count as the best validation so far.
        self.val_loss_best.reset()
        self.val_acc_best.reset()

    def on_validation_epoch_end(self) -> None:
        # torchmetrics' compute() all-gathers the per-rank states, so loss and accuracy are sample-weighted
        # over the whole validation set and identical on every rank; sync_dist then only averages equal values.
        loss = self.val_loss_mean.compute()
        accuracy = self.val_acc.compute()
        self.val_loss_mean.reset()
        self.val_acc.reset()
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        self.log("val_acc", accuracy, prog_bar=True, sync_dist=True)
        if not self.trainer.sanity_checking:
            self.val_loss_best.update(loss)
            self.val_acc_best.update(accuracy)
            self.log("val_loss_best", self.val_loss_best.compute(), sync_dist=True)
            self.log("val_acc_best", self.val_acc_best.compute(), sync_dist=True)

    def on_test_epoch_end(self) -> None:
        loss = self.test_loss_mean.compute()
        accuracy = self.test_acc.compute()
        self.test_loss_mean.reset()
        self.test_acc.reset()
        self.log("test_loss", loss, sync_dist=True)
        self.log("test_acc", accuracy, sync_dist=True)

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError(
                "Classifier was built without `optimizer`, so it cannot be trained. Pass optimizer=<partial "
                "optimizer> (recipes.train.build_model does), or only validate/test it."
            )
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler_config: dict[str, Any] = {
            "scheduler": self.scheduler_factory(optimizer=optimizer),
            "interval": self.hparams.scheduler_interval,
            "frequency": self.hparams.scheduler_frequency,
        }
        if self.hparams.scheduler_monitor:
            scheduler_config["monitor"] = self.hparams.scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": scheduler_config}
