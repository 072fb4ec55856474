"""Helpers of :class:`~lightning_stablelr.StabilityMonitor` that need no Lightning import.

- :func:`detached_copy` and :func:`first_batches`: batches cached by the monitor are copies, on the snapshot device.
- :func:`measure_sharpness`: λ_max (or Adam's preconditioned sharpness) and the optimizer's threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_stablelr.chart_tags import log10_comparison_tags
from lightning_stablelr.probe import ObjectiveProbe
from lightning_stablelr.sharpness import (
    OptimizerThreshold,
    adam_preconditioner,
    optimizer_stability_threshold,
    preconditioned_sharpness,
    top_hessian_eigenvalue,
)

__all__ = [
    "SharpnessReading",
    "detached_copy",
    "first_batches",
    "measure_sharpness",
]


def detached_copy(data: Any, device: torch.device | str) -> Any:
    """A copy of every tensor in a (nested) batch, detached, on ``device``; other leaves are kept."""
    if isinstance(data, Tensor):
        return data.detach().to(device, copy=True)
    if isinstance(data, Mapping):
        return type(data)((key, detached_copy(value, device)) for key, value in data.items())  # type: ignore[call-arg]
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(detached_copy(value, device) for value in data))
    if isinstance(data, (list, tuple)):
        return type(data)(detached_copy(value, device) for value in data)
    return data


def first_batches(loaders: Any, count: int, convert: Callable[[Any], Any]) -> list[Any]:
    """``convert(batch)`` for the first ``count`` batches of the first loader in ``loaders`` (a loader, a list or
    dict of loaders, or None); fewer when it is shorter, none without a loader."""
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    elif isinstance(loaders, Mapping):
        loaders = next(iter(loaders.values()), None)
    batches: list[Any] = []
    if loaders is None:
        return batches
    for batch in loaders:
        batches.append(convert(batch))
        if len(batches) == count:
            break
    return batches


@dataclass(frozen=True)
class SharpnessReading:
    """One sharpness measurement on this rank.

    Attributes:
        sharpness: λ_max of the Hessian (SGD and unknown optimizers) or of Adam's preconditioned Hessian
            ``P^{-1/2} H P^{-1/2}`` when ``preconditioned``.
        threshold: the optimizer's stability threshold for that quantity (NaN when unknown).
        lr: the learning rate of param group 0.
        preconditioned: whether ``sharpness`` is Adam's preconditioned sharpness.
        vector: the power-iteration vector, to warm-start the next measurement.
        iterations: Hessian-vector products performed.
    """

    sharpness: float
    threshold: float
    lr: float
    preconditioned: bool
    vector: dict[str, Tensor]
    iterations: int = 0

    def metrics(self, sharpness: float) -> dict[str, float]:
        """The scalars for ``sharpness`` (the rank mean of :attr:`sharpness`): ``lyapunov/sharpness``, and with a
        known threshold ``stability_threshold``, ``eos_ratio = sharpness / threshold`` and
        ``max_stable_lr = lr / eos_ratio`` (the lr at which the ratio would be 1; only when the ratio is > 0)."""
        metrics = {"lyapunov/sharpness": sharpness}
        if math.isfinite(self.threshold):
            eos_ratio = sharpness / self.threshold
            metrics["lyapunov/stability_threshold"] = self.threshold
            metrics["lyapunov/eos_ratio"] = eos_ratio
            if eos_ratio > 0:
                metrics["lyapunov/max_stable_lr"] = self.lr / eos_ratio
        metrics.update(log10_comparison_tags(metrics, self.lr))  # chart_tags.py: the layout's log10 margin charts
        return metrics


def measure_sharpness(
    probe: ObjectiveProbe,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    *,
    seed: int,
    iters: int,
    tol: float,
    init: Mapping[str, Tensor] | None,
    init_preconditioned: bool,
) -> SharpnessReading:
    """Warm-started power iteration on the probe's Hessian at the module's current parameters.

    ``loss(θ) = probe.loss(batch, θ, seed=seed, create_graph=True)`` (fixed batch, fixed dropout masks).
    For Adam/AdamW with state, the dominant eigenvalue of ``P^{-1/2} H P^{-1/2}`` with
    ``P = sqrt(v̂) + eps`` is measured against ``(2 + 2β1)/((1 - β1)·lr)``; for SGD, λ_max(H) against
    ``(2 + 2β)/lr`` (see :func:`lightning_stablelr.sharpness.optimizer_stability_threshold`); for other
    optimizers λ_max(H) with a NaN threshold. ``init`` warm-starts only when it was measured in the same
    coordinates (``init_preconditioned`` matches).
    """
    params = probe.parameters()

    def loss_fn(theta: dict[str, Tensor]) -> Tensor:
        return probe.loss(batch, theta, seed=seed, create_graph=True)

    try:
        reading = optimizer_stability_threshold(optimizer)
    except ValueError:  # lr == 0 (e.g. the first warmup step): no threshold, the sharpness still counts
        lr = float(optimizer.param_groups[0]["lr"])
        reading = OptimizerThreshold("unknown", math.nan, lr, 0.0, preconditioned=False)
    preconditioner = None
    if reading.preconditioned:
        own = {name: p for name, p in probe.module.named_parameters() if p.requires_grad}
        preconditioner = adam_preconditioner(optimizer, own)
    preconditioned = preconditioner is not None
    start = init if init is not None and init_preconditioned == preconditioned else None
    if preconditioner is not None:
        estimate = preconditioned_sharpness(loss_fn, params, preconditioner, iters=iters, tol=tol, init=start)
        threshold = reading.threshold
    else:
        estimate = top_hessian_eigenvalue(loss_fn, params, iters=iters, tol=tol, init=start)
        threshold = math.nan if reading.preconditioned else reading.threshold
    return SharpnessReading(estimate.value, threshold, reading.lr, preconditioned, estimate.vector, estimate.iterations)
