"""The monitor's connectivity probe: snapshots, losses along segments, BatchNorm recalibration.

No Lightning import: the callback passes in the probe, the cached batches and a reduction.

At every probe the newest snapshot θ_new is compared with each of the previous ``window`` snapshots
θ_i along the straight segment θ(alpha) = (1 - alpha)·θ_i + alpha·θ_new, alpha = k/(P - 1), k = 0..P-1. The loss at a
point is the mean over the cached evaluation batches of the training objective in eval mode:

    L(θ) = (1/B) Σ_b  l(θ, batch_b; BatchNorm statistics recalibrated at θ)

The endpoint losses are computed once per snapshot (when it is the newest) and reused, so a probe
costs ``1 + n_previous·(P - 2)`` point evaluations. Under DDP each rank evaluates its own batches and
the callback averages the losses across ranks with a failure flag
(:func:`~lightning_stablelr.collectives.reduce_with_flag`), so the
metrics are identical everywhere and a failure on one rank is seen by all.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_stablelr.connectivity import (
    PairwiseBarrierMatrix,
    SegmentMetrics,
    Snapshot,
    SnapshotWindow,
    equiconnectedness,
    interpolate,
    segment_metrics,
)
from lightning_stablelr.probe import ObjectiveProbe

__all__ = ["ConnectivityReport", "ConnectivityTracker", "EvalLoss", "batchnorm_modules"]


def batchnorm_modules(module: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The BatchNorm layers (any dimension, SyncBatchNorm included) that track running statistics."""
    return [
        (name, sub)
        for name, sub in module.named_modules()
        if isinstance(sub, _BatchNorm) and sub.track_running_stats and sub.running_mean is not None
    ]


@contextlib.contextmanager
def _cumulative_momentum(layers: Sequence[_BatchNorm]) -> Iterator[None]:
    """``momentum=None`` (cumulative average over the recalibration batches) for the block, then restored."""
    saved = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.momentum = None
        yield
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum


class EvalLoss:
    """``θ -> L(θ)``: the mean eval-mode objective over fixed batches, BatchNorm recalibrated at θ.

    For a model with BatchNorm (and ``recalibration_batches`` non-empty), the running statistics at θ
    are re-estimated as the plain average over the recalibration batches (fresh zeros/ones buffers,
    ``momentum=None``, train-mode forward passes) into *copies*; the module's buffers never change.
    Without BatchNorm, or without recalibration batches, the module's own buffers are used.

    Args:
        probe: the :class:`ObjectiveProbe` of the module.
        batches: the evaluation batches (already on the module's device).
        recalibration_batches: training batches for the BatchNorm statistics (on the device).
        seed: the probe seed (fixes dropout during recalibration; eval mode has no randomness).
    """

    def __init__(
        self,
        probe: ObjectiveProbe,
        batches: Sequence[Any],
        recalibration_batches: Sequence[Any] = (),
        *,
        seed: int = 0,
    ) -> None:
        if not batches:
            raise ValueError("`batches` must hold at least one evaluation batch, got none.")
        self.probe = probe
        self.batches = list(batches)
        self.recalibration_batches = list(recalibration_batches)
        self.seed = seed
        self.layers = batchnorm_modules(probe.module)

    def recalibrated_buffers(self, theta: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        """BatchNorm running statistics re-estimated at ``theta`` (None without BatchNorm or batches)."""
        if not self.layers or not self.recalibration_batches:
            return None
        buffers: dict[str, Tensor] = {}
        for name, layer in self.layers:
            prefix = f"{name}." if name else ""
            buffers[prefix + "running_mean"] = torch.zeros_like(layer.running_mean)
            buffers[prefix + "running_var"] = torch.ones_like(layer.running_var)
            if layer.num_batches_tracked is not None:
                buffers[prefix + "num_batches_tracked"] = torch.zeros_like(layer.num_batches_tracked)
        with _cumulative_momentum([layer for _, layer in self.layers]):
            for index, batch in enumerate(self.recalibration_batches):
                self.probe.loss(batch, theta, batch_idx=index, seed=self.seed, buffers=buffers, training=True)
        return buffers

    def __call__(self, theta: Mapping[str, Tensor]) -> float:
        """``(1/B) Σ_b l(θ, batch_b)`` in eval mode, with recalibrated BatchNorm statistics."""
        buffers = self.recalibrated_buffers(theta)
        values = [
            self.probe.loss(batch, theta, batch_idx=index, seed=self.seed, buffers=buffers, training=False)
            for index, batch in enumerate(self.batches)
        ]
        return float(torch.stack(values).mean())


@dataclass(frozen=True)
class ConnectivityReport:
    """What one connectivity probe found.

    Attributes:
        epoch, step: where the newest snapshot was taken.
        segments: ``(epoch_a, epoch_b, alphas, losses)`` from each previous snapshot (alpha = 0) to the
            newest (alpha = 1), oldest first (the input of :func:`lightning_stablelr.tensorboard.path_figure`).
        consecutive: metrics of the segment from the previous snapshot; None at the first probe.
        equiconnectedness: largest barrier over all measured pairs in the window (NaN at the first probe).
        matrix: the pairwise barriers of the window, for the heatmap.
    """

    epoch: int
    step: int
    segments: tuple[tuple[int, int, tuple[float, ...], tuple[float, ...]], ...]
    consecutive: SegmentMetrics | None
    equiconnectedness: float
    matrix: PairwiseBarrierMatrix

    def metrics(self, prefix: str = "connectivity/") -> dict[str, float]:
        """The scalars to log; empty at the first probe (no pair yet). Barrier and equiconnectedness
        always come together (the layout's margin chart needs them at the same steps)."""
        if self.consecutive is None:
            return {}
        return {
            prefix + "barrier": self.consecutive.barrier,
            prefix + "sublevel_excess": self.consecutive.sublevel_excess,
            prefix + "superlevel_dip": self.consecutive.superlevel_dip,
            prefix + "connected": float(self.consecutive.connected),
            prefix + "equiconnectedness": self.equiconnectedness,
        }


class ConnectivityTracker:
    """The window of snapshots, their endpoint losses and the pairwise barriers.

    One probe is :meth:`previous` (which snapshots to compare with), :meth:`local_losses` (this rank's
    point losses), their mean across ranks with a failure flag, and then :meth:`commit` with the reduced losses.

    Args:
        window: how many previous snapshots the newest is compared with (>= 1).
        num_points: points per segment, endpoints included (>= 3).
        tol: absolute tolerance of ``connected`` (``sublevel_excess <= tol``), in loss units.
        device: where snapshots are kept (CPU by default).
        dtype: the dtype snapshots are stored in (None: the parameters' own); points are evaluated in the
            parameters' dtype, a stored snapshot is cast back to it.
    """

    def __init__(
        self, window: int, num_points: int, tol: float, device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        self.window = window
        self.num_points = num_points
        self.tol = tol
        self.alphas = [k / (num_points - 1) for k in range(num_points)]
        self.snapshots = SnapshotWindow(window + 1, device, dtype)
        self.endpoint_loss: dict[int, float] = {}

    def previous(self, segments: int | None = None) -> list[Snapshot]:
        """The snapshots the next one is compared with, oldest first: the newest ``window`` (the oldest of a
        full window is evicted by the next snapshot, so it is not measured), or only the newest ``segments``
        of them when the budget allows fewer (the consecutive pair always comes first)."""
        held = list(self.snapshots.snapshots)[-self.window :]
        if segments is not None:
            held = held[len(held) - segments :] if segments > 0 else []
        return held

    def num_evaluations(self, segments: int | None = None) -> int:
        """Point evaluations of the next probe: ``1 + len(previous) · (num_points - 2)``."""
        return 1 + len(self.previous(segments)) * (self.num_points - 2)

    def local_losses(
        self,
        theta: Mapping[str, Tensor],
        loss: Callable[[Mapping[str, Tensor]], float],
        segments: int | None = None,
    ) -> list[float]:
        """``[L(θ_new), L(θ(alpha)) for the interior alpha of each previous segment (oldest first)]`` on this rank."""
        values = [loss(theta)]
        interior = self.alphas[1:-1]
        for older in self.previous(segments):
            start = {
                name: tensor.to(device=theta[name].device, dtype=theta[name].dtype)
                for name, tensor in older.params.items()
            }
            values.extend(loss(interpolate(start, theta, alpha)) for alpha in interior)
        return values

    def commit(
        self, theta: Mapping[str, Tensor], losses: Sequence[float], *, epoch: int, step: int,
        segments: int | None = None,
    ) -> ConnectivityReport:
        """Add ``theta`` as the newest snapshot, record the barriers measured against the previous ones
        (``losses`` as from :meth:`local_losses` with the same ``segments``, reduced across ranks) and
        report the window. Pairs never measured stay NaN in the matrix and out of equiconnectedness."""
        previous = self.previous(segments)
        interior = len(self.alphas) - 2
        newest_loss = float(losses[0])
        snapshot = self.snapshots.add(theta, epoch=epoch, step=step)
        held = {s.index for s in self.snapshots.snapshots}
        self.endpoint_loss = {i: v for i, v in self.endpoint_loss.items() if i in held}
        self.endpoint_loss[snapshot.index] = newest_loss
        segments = []
        consecutive = None
        for n, older in enumerate(previous):
            middle = [float(v) for v in losses[1 + n * interior : 1 + (n + 1) * interior]]
            curve = (self.endpoint_loss[older.index], *middle, newest_loss)
            metrics = segment_metrics(self.alphas, curve, tol=self.tol)
            self.snapshots.record_barrier(older, snapshot, metrics.barrier)
            segments.append((older.epoch, epoch, tuple(self.alphas), curve))
            consecutive = metrics
        matrix = self.snapshots.pairwise_barrier_matrix()
        return ConnectivityReport(
            epoch=epoch,
            step=step,
            segments=tuple(segments),
            consecutive=consecutive,
            equiconnectedness=equiconnectedness(matrix) if previous else math.nan,
            matrix=matrix,
        )
