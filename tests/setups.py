"""The models, data and runner of ``tests/test_setups.py``: one tiny model per Lightning setup users have.

:func:`run` fits a setup with no callbacks, :class:`~lightning_stablelr.StabilityMonitor`,
:class:`~lightning_stablelr.StableLR` or both, and returns what the observer-effect check compares
(every weight, every validation loss, the outputs of validate/test/predict) and the metric names written.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_stablelr import StabilityMonitor, StableLR
from tests.helpers import make_trainer, regression_data
from tests.test_monitor_support import RecordingLogger

__all__ = ["SETUPS", "Outcome", "Setup", "run"]

MONITOR_TAGS = ("lyapunov/delta_v", "lyapunov/step_margin", "lyapunov/sharpness", "connectivity/barrier",
                "lyapunov/val_decrease", "monitor/overhead")
STABLELR_TAGS = ("stablelr/decay", "stablelr/gap_factor", "stablelr/stability_factor", "stablelr/step_margin",
                 "stablelr/gap", "stablelr/nonfinite_steps")


class Regressor(L.LightningModule):
    """``Linear(4, 8) -> Tanh -> Linear(8, 1)`` + MSE; records every validation loss it computes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)
        self.val_history: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def objective(self, batch: Any) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x).float(), y.float())

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.objective(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss = self.objective(batch)
        self.val_history.append(loss.detach().clone())
        self.log("val_loss", loss)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self.objective(batch))

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class ManualOne(Regressor):
    """Manual optimization with one optimizer (``probe_loss`` given: a manual step cannot be replayed)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def probe_loss(self, batch: Any) -> Tensor:
        return self.objective(batch)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        optimizers = self.optimizers()
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            optimizer.zero_grad()
            loss = self.objective(batch)  # a fresh loss per optimizer, as a GAN's two losses
            self.manual_backward(loss)
            optimizer.step()
        self.log("train_loss", loss)
        return loss.detach()


class ManualTwo(ManualOne):
    """Two optimizers stepped in one batch, as in a GAN: the body's, then the head's on a fresh loss."""

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.body.parameters(), lr=0.05), torch.optim.Adam(self.head.parameters(), lr=0.01)


class WithLBFGS(Regressor):
    def configure_optimizers(self) -> Any:
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=2)


class FrozenTied(Regressor):
    """A frozen input projection, and a decoder whose weight is the encoder's (tied)."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.encoder, self.decoder = nn.Linear(4, 4), nn.Linear(4, 4)
        self.decoder.weight = self.encoder.weight
        self.body = nn.Sequential(self.frozen, self.encoder, nn.Tanh(), self.decoder, nn.Linear(4, 8), nn.Tanh())


class SparseEmbedding(Regressor):
    """``Embedding(10, 8, sparse=True) -> Linear(8, 1)`` on integer inputs, trained with SGD."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Embedding(10, 8, sparse=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class EMATeacher(Regressor):
    """A frozen teacher updated in place in ``training_step`` (mean teacher / BYOL / DINO)."""

    def __init__(self) -> None:
        super().__init__()
        self.teacher = nn.Linear(8, 1)
        self.teacher.requires_grad_(False)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        features = self.body(x)
        with torch.no_grad():
            target = self.teacher(features)
        loss = nn.functional.mse_loss(self.head(features), y) + 0.1 * nn.functional.mse_loss(self.head(features), target)
        with torch.no_grad():
            for teacher, student in zip(self.teacher.parameters(), self.head.parameters()):
                teacher.mul_(0.9).add_(0.1 * student)
        self.log("train_loss", loss)
        return loss


class _Stream(IterableDataset):
    """The regression samples as a stream (no ``__len__``)."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __iter__(self):
        return iter(self.data)


def _regression(num_samples: int, seed: int) -> TensorDataset:
    return regression_data(num_samples, seed=seed)


def _indices(num_samples: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 10, (num_samples,), generator=generator)
    return TensorDataset(x, torch.randn(num_samples, 1, generator=generator))


@dataclass(frozen=True)
class Setup:
    """One Lightning setup: the model, the Trainer's options, the data and what happens after ``fit``."""

    model: Callable[[], Regressor] = Regressor
    trainer: dict[str, Any] = field(default_factory=dict)
    data: Callable[[int, int], TensorDataset] = _regression
    stream: bool = False
    after: str = ""  # "fit_twice" or "evaluate"
    stable_lr: dict[str, Any] = field(default_factory=dict)  # StableLR's arguments
    monitor_tags: tuple[str, ...] = MONITOR_TAGS
    stablelr_tags: tuple[str, ...] = STABLELR_TAGS


SETUPS: dict[str, Setup] = {
    "plain": Setup(),
    "manual_one_optimizer": Setup(ManualOne),
    "manual_two_optimizers": Setup(ManualTwo),
    "lbfgs": Setup(WithLBFGS),
    "gradient_clipping": Setup(trainer={"gradient_clip_val": 0.05}),
    "accumulate_3": Setup(trainer={"accumulate_grad_batches": 3}),
    "val_check_interval_0.25": Setup(trainer={"val_check_interval": 0.25}),
    "iterable_max_steps": Setup(trainer={"max_steps": 12, "max_epochs": -1, "val_check_interval": 4}, stream=True),
    "iterable_max_steps_no_decay": Setup(trainer={"max_steps": 12, "max_epochs": -1}, stream=True,
                                         stable_lr={"decay_rate": 0.0},
                                         monitor_tags=tuple(t for t in MONITOR_TAGS if t != "lyapunov/val_decrease")),
    "frozen_and_tied": Setup(FrozenTied),
    "sparse_embedding": Setup(SparseEmbedding, data=_indices),
    "ema_teacher": Setup(EMATeacher),
    "bf16_mixed": Setup(trainer={"precision": "bf16-mixed"}),
    "bf16_true": Setup(trainer={"precision": "bf16-true"}),
    "64_true": Setup(trainer={"precision": "64-true"}),
    "fast_dev_run": Setup(trainer={"fast_dev_run": True}, monitor_tags=("lyapunov/delta_v",),
                          stablelr_tags=("stablelr/decay", "stablelr/step_margin")),
    "fit_twice": Setup(after="fit_twice"),
    "evaluate_after_fit": Setup(after="evaluate"),
}


@dataclass
class Outcome:
    weights: dict[str, Tensor]
    val_history: list[Tensor]
    evaluation: list[Any]
    tags: set[str]
    failed_probes: int  # the monitor's count of probes that raised (0 without a monitor)


def _callbacks(kind: str, stable_lr: dict[str, Any]) -> list[L.Callback]:
    monitor = StabilityMonitor(certificate_every_n_steps=1, sharpness_every_n_steps=3, sharpness_iters=4,
                               probe_every_n_epochs=1, probe_points=3, probe_batches=2, snapshot_window=2,
                               bn_recalibration_batches=0, max_overhead=math.inf, log_figures=False)
    if kind in ("stablelr", "both"):
        return [StableLR(**stable_lr), monitor][: 1 if kind == "stablelr" else 2]
    return [monitor] if kind == "monitor" else []


def run(name: str, kind: str, root: Any) -> Outcome:
    """Fit setup ``name`` with callbacks ``kind`` ("none", "monitor", "stablelr", "both") from seed 0."""
    setup = SETUPS[name]
    L.seed_everything(0, verbose=False)
    model = setup.model()
    train_data, val_data = setup.data(32, 0), setup.data(8, 1)
    train = DataLoader(_Stream(train_data) if setup.stream else train_data, batch_size=4)
    val = DataLoader(val_data, batch_size=4)
    callbacks, logger = _callbacks(kind, setup.stable_lr), RecordingLogger()
    options = {"max_epochs": 2, "logger": logger, "callbacks": callbacks, "log_every_n_steps": 1, **setup.trainer}
    trainer = make_trainer(root, **options)
    trainer.fit(model, train, val)
    evaluation: list[Any] = []
    if setup.after == "fit_twice":
        trainer = make_trainer(root, **{**options, "max_epochs": 1})
        trainer.fit(model, train, val)
    elif setup.after == "evaluate":
        evaluation = [trainer.validate(model, val, verbose=False), trainer.test(model, val, verbose=False),
                      trainer.predict(model, val)]
    tags = {tag for _, metrics in logger.records for tag in metrics} | set(trainer.callback_metrics)
    weights = {key: value.detach().clone() for key, value in model.state_dict().items()}
    failed = sum(callback.failed_probes for callback in callbacks if isinstance(callback, StabilityMonitor))
    return Outcome(weights, model.val_history, evaluation, tags, failed)
