"""Models, data and a recording logger shared by the StabilityMonitor tests (this module has no tests).

- :class:`RecordingLogger`: keeps every ``log_metrics`` call, on every rank (not rank-zero-only), so
  tests can read exactly what the monitor logged and at which step.
- :class:`QuadraticModule`: ``L(θ) = ½ θᵀAθ + bᵀθ`` in float64 with SGD; every certificate and the
  sharpness (the top eigenvalue of A) are known in closed form.
- :class:`BumpModule`: one parameter ``w`` that moves by exactly +1 per epoch (training loss ``-w``,
  SGD lr 1) while the probed objective is ``f(w) = 1 + w/4 + h·sin(πw)``: a bump of height h between
  the snapshots w = 0 and w = 1, a valley of depth h between w = 1 and w = 2.
- :func:`constant_loader`: a loader of ``n`` identical dummy batches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["BumpModule", "QuadraticModule", "RecordingLogger", "constant_loader", "series", "single_thread"]


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread while a test runs (tiny tensors on 2 shared cores: threads only contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RecordingLogger(Logger):
    """A Lightning logger that records ``(step, metrics)`` for every call, on every rank."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.records.append((int(step if step is not None else -1), {k: float(v) for k, v in metrics.items()}))


def series(logger: RecordingLogger, tag: str) -> dict[int, float]:
    """``{step: value}`` of one tag (the last value written at a step wins)."""
    return {step: metrics[tag] for step, metrics in logger.records if tag in metrics}


def constant_loader(num_batches: int, batch_size: int = 1, width: int = 1) -> DataLoader:
    """``num_batches`` batches of zeros: for models whose loss ignores the data."""
    data = torch.zeros(num_batches * batch_size, width, dtype=torch.float64)
    return DataLoader(TensorDataset(data), batch_size=batch_size)


class QuadraticModule(L.LightningModule):
    """``L(θ) = ½ θᵀAθ + bᵀθ`` (float64), trained with plain SGD at ``lr``; the batch is ignored.

    ``trajectory(steps)`` replays SGD in closed form: ``θ_{t+1} = θ_t - lr (Aθ_t + b)``.
    """

    def __init__(self, dim: int = 5, lr: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        root = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        self.register_buffer("hessian", root @ root.T / dim + 0.5 * torch.eye(dim, dtype=torch.float64))
        self.register_buffer("linear", torch.randn(dim, generator=generator, dtype=torch.float64))
        self.theta = nn.Parameter(torch.randn(dim, generator=generator, dtype=torch.float64))
        self.theta0 = self.theta.detach().clone()
        self.lr = lr

    def objective(self, theta: Tensor) -> Tensor:
        return 0.5 * theta @ self.hessian @ theta + self.linear @ theta

    def probe_loss(self, batch: Any) -> Tensor:
        return self.objective(self.theta)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.objective(self.theta)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def trajectory(self, steps: int) -> list[Tensor]:
        """``[θ_0, …, θ_steps]`` of SGD from the initial parameters."""
        thetas = [self.theta0.clone()]
        for _ in range(steps):
            theta = thetas[-1]
            thetas.append(theta - self.lr * (self.hessian @ theta + self.linear))
        return thetas


class BumpModule(L.LightningModule):
    """``w`` moves +1 per epoch (one batch per epoch); the probed loss is ``1 + w/4 + height·sin(πw)``."""

    def __init__(self, height: float = 0.5, start: float = -1.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(start, dtype=torch.float64))
        self.height = height

    @staticmethod
    def profile(w: float, height: float) -> float:
        """The probed objective at ``w`` (float64)."""
        return 1.0 + 0.25 * w + height * math.sin(math.pi * w)

    def probe_loss(self, batch: Any) -> Tensor:
        return 1.0 + 0.25 * self.w + self.height * torch.sin(math.pi * self.w)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return -self.w  # gradient -1: SGD with lr 1 adds exactly 1 to w

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.probe_loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)
