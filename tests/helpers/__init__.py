"""Small, stable test models and data shared by the test files.

Other test files import these names; keep their signatures and behaviour stable.

- :func:`regression_data` / :func:`regression_loader`: a fixed linear-regression data set.
- :class:`TinyRegression`: ``Linear(in_features, 1)`` + MSE, with a controllable loss (``loss_scale``),
  scripted validation losses (``val_losses``), several param groups, an optional scheduler and
  non-finite injection at given optimizer steps.
- :class:`TinyClassifier`: ``Linear -> BatchNorm1d -> ReLU -> Dropout -> Linear`` (dropout and
  BatchNorm, so that probes can be checked for side effects).
- :func:`make_trainer`: a quiet CPU ``Trainer`` for tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["TinyClassifier", "TinyRegression", "make_trainer", "regression_data", "regression_loader"]


def regression_data(
    num_samples: int = 32, in_features: int = 4, *, seed: int = 0, noise: float = 0.1
) -> TensorDataset:
    """``y = x · w* + 0.5 + noise·ε`` with ``x, w*, ε ~ N(0, 1)`` drawn from a private generator (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, in_features, generator=generator)
    true_weight = torch.randn(in_features, 1, generator=generator)
    y = x @ true_weight + 0.5 + noise * torch.randn(num_samples, 1, generator=generator)
    return TensorDataset(x, y)


def regression_loader(
    num_samples: int = 32, batch_size: int = 8, in_features: int = 4, *, seed: int = 0, noise: float = 0.1
) -> DataLoader:
    """A DataLoader over :func:`regression_data`, unshuffled, so that batches are identical across runs."""
    return DataLoader(
        regression_data(num_samples, in_features, seed=seed, noise=noise), batch_size=batch_size
    )


class TinyRegression(L.LightningModule):
    """``Linear(in_features, 1)`` trained with ``loss_scale · MSE``; every knob a StableLR test needs.

    Args:
        in_features: input width.
        lr: learning rate of the (first) param group.
        optimizer: ``"sgd"`` or ``"adam"``.
        loss_scale: the training and validation losses are multiplied by it (scale-invariance tests).
        val_losses: if given, ``validation_step`` logs ``val_loss = val_losses[k]`` at the k-th *real*
            validation (the sanity check does not advance ``k``); after the list is exhausted the last
            value repeats.
        sanity_val_loss: with ``val_losses``, what the sanity check logs under ``val_key`` (None: it
            logs ``sanity_val_loss = 123.0`` instead, so ``val_key`` is absent during the sanity check).
        val_key: the key under which the validation loss is logged.
        group_lrs: if given, the weight and the bias are two param groups with these lrs (``lr`` ignored);
            the groups are named ``"weight"`` and ``"bias"`` when ``name_groups`` is True.
        scheduler: optional ``optimizer -> LRScheduler`` factory (or a Lightning scheduler dict factory).
        nonfinite_steps: optimizer steps (``global_step`` values) at which the training loss becomes
            ``nonfinite_value`` (NaN by default), to test that such steps never poison the weights.
        seed: seed of the initial weights (a private generator: the global RNG is not consumed).
    """

    def __init__(
        self,
        in_features: int = 4,
        lr: float = 0.1,
        optimizer: str = "sgd",
        loss_scale: float = 1.0,
        val_losses: Sequence[float] | None = None,
        val_key: str = "val_loss",
        group_lrs: Sequence[float] | None = None,
        name_groups: bool = False,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        nonfinite_steps: Sequence[int] = (),
        nonfinite_value: float = float("nan"),
        seed: int = 0,
        sanity_val_loss: float | None = None,
    ) -> None:
        super().__init__()
        self.layer = nn.Linear(in_features, 1)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.layer.weight.copy_(torch.randn(self.layer.weight.shape, generator=generator) * 0.5)
            self.layer.bias.zero_()
        self.lr = lr
        self.optimizer_name = optimizer
        self.loss_scale = loss_scale
        self.val_losses = list(val_losses) if val_losses is not None else None
        self.val_key = val_key
        self.sanity_val_loss = sanity_val_loss
        self.group_lrs = list(group_lrs) if group_lrs is not None else None
        self.name_groups = name_groups
        self.scheduler = scheduler
        self.nonfinite_steps = set(nonfinite_steps)
        self.nonfinite_value = nonfinite_value
        self.validations_seen = 0
        self.train_losses: list[float] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)

    def objective(self, batch: Any) -> Tensor:
        """``loss_scale · mean((layer(x) - y)²)``."""
        x, y = batch
        return self.loss_scale * nn.functional.mse_loss(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.objective(batch)
        if self._trainer is not None and self.trainer.global_step in self.nonfinite_steps:
            loss = loss * self.nonfinite_value
        self.train_losses.append(float(loss.detach()))
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if self.val_losses is None:
            self.log(self.val_key, self.objective(batch))
            return
        if self.trainer.sanity_checking:
            if self.sanity_val_loss is None:
                self.log("sanity_val_loss", 123.0)
            else:
                self.log(self.val_key, float(self.sanity_val_loss))
            return
        index = min(self.validations_seen, len(self.val_losses) - 1)
        self.log(self.val_key, float(self.val_losses[index]))

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.validations_seen += 1

    def configure_optimizers(self) -> Any:
        if self.group_lrs is not None:
            weight_group: dict[str, Any] = {"params": [self.layer.weight], "lr": self.group_lrs[0]}
            bias_group: dict[str, Any] = {"params": [self.layer.bias], "lr": self.group_lrs[1]}
            if self.name_groups:
                weight_group["name"], bias_group["name"] = "weight", "bias"
            groups: Any = [weight_group, bias_group]
        else:
            groups = self.parameters()
        if self.optimizer_name == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=self.lr)
        elif self.optimizer_name == "adam":
            optimizer = torch.optim.Adam(groups, lr=self.lr)
        else:
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer_name!r}")
        if self.scheduler is None:
            return optimizer
        scheduler = self.scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class TinyClassifier(L.LightningModule):
    """``Linear(in, hidden) -> BatchNorm1d -> ReLU -> Dropout(p) -> Linear(hidden, classes)`` + cross-entropy.

    ``training_step`` logs ``train_loss`` (so tests can check that a probe silences ``self.log``) and
    counts its calls in ``training_step_calls``.
    """

    def __init__(
        self,
        in_features: int = 4,
        hidden: int = 8,
        num_classes: int = 3,
        dropout: float = 0.5,
        lr: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Linear(in_features, hidden),
                nn.BatchNorm1d(hidden),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(hidden, num_classes),
            )
        self.lr = lr
        self.training_step_calls = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.training_step_calls += 1
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    @staticmethod
    def batch(
        num_samples: int = 16, in_features: int = 4, num_classes: int = 3, seed: int = 0
    ) -> tuple[Tensor, Tensor]:
        """A fixed classification batch ``(x, y)`` from a private generator."""
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(num_samples, in_features, generator=generator)
        y = torch.randint(0, num_classes, (num_samples,), generator=generator)
        return x, y


def make_trainer(root_dir: Any, **overrides: Any) -> L.Trainer:
    """A quiet, deterministic, single-process CPU ``Trainer``; ``overrides`` win over the defaults."""
    options: dict[str, Any] = {
        "default_root_dir": str(root_dir),
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
    }
    options.update(overrides)
    return L.Trainer(**options)


def run_multiprocess_script(command: Sequence[str], cwd: Any, log: Any, timeout: float, what: str = "DDP run") -> None:
    """Run ``command`` (a script that Lightning relaunches as its other ranks) in a new session, writing its
    output to ``log``; a hang past ``timeout`` s kills every process it started and fails with the log's tail."""
    import os
    import signal
    import subprocess

    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(cwd)}
    env.pop("LOCAL_RANK", None)
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            list(command), cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise AssertionError(f"{what} hung for {timeout}s; log:\n{Path(log).read_text()[-4000:]}") from None
    assert rc == 0, f"{what} failed with {rc}; log:\n{Path(log).read_text()[-4000:]}"


def metric_series(records: Sequence[tuple[int, dict[str, float]]], prefixes: tuple[str, ...]) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of the recorded ``(step, metrics)`` whose tag starts with one of ``prefixes``."""
    result: dict[str, dict[int, float]] = {}
    for step, metrics in records:
        for tag, value in metrics.items():
            if tag.startswith(prefixes):
                result.setdefault(tag, {})[step] = value
    return result
