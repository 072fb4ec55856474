"""The monitor's certificate and sharpness instruments (no Lightning import).

:class:`~lightning_stablelr.StabilityMonitor` holds one instrument per kind of measurement, as Lightning's
``ThroughputMonitor`` holds the pure ``Throughput``: each owns its state (``state_dict`` /
``load_state_dict``) and has one ``run(...) -> InstrumentRun`` that returns the metrics to log and the
seconds it took, so the callback's governor is charged from the return value, never from hidden state.
The connectivity instrument is in :mod:`~lightning_stablelr.callbacks._connectivity_instrument`.

Every ``run`` enters the same collectives on every rank (``collectives.reduce_with_flag``), so a probe
raising on one rank is reported by that rank and skipped on all of them (``InstrumentRun.failed``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_stablelr._sharded_probe import is_sharded
from lightning_stablelr.callbacks._monitor_support import detached_copy, measure_sharpness
from lightning_stablelr.certificates import CertificateWindow, LossEMA, ValidationTrend, certificate
from lightning_stablelr.collectives import Reduce, reduce_with_flag
from lightning_stablelr.line_probe import LineProbeResult
from lightning_stablelr.probe import ObjectiveProbe, probe_failure_advice
from lightning_stablelr.rng import isolated_rng, probe_seed

__all__ = ["CertificateInstrument", "InstrumentRun", "ProbeContext", "SharpnessInstrument", "warn_local_failure"]


@dataclass(frozen=True)
class ProbeContext:
    """Where a probe runs: the cross-rank ``reduce(tensor, op)``, the module's device, this rank, the step and epoch."""

    reduce: Reduce
    device: torch.device
    rank: int = 0
    step: int = 0
    epoch: int = 0


@dataclass(frozen=True)
class InstrumentRun:
    """What one ``run`` produced.

    Attributes:
        metrics: scalars to log (empty when the probe produced nothing).
        seconds: the probe's own time, the basis of the governor's cost per unit.
        units: how much work ``seconds`` covered (point evaluations for connectivity, else 1).
        once_seconds: one-time work inside the run (caching batches): charged, but not a cost per unit.
        failed: the probe raised on at least one rank and was skipped on every rank.
        ran: the probe produced its measurement (False when there was nothing to measure).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    units: float = 1.0
    once_seconds: float = 0.0
    failed: bool = False
    ran: bool = True


def warn_local_failure(kind: str, context: ProbeContext, error: BaseException) -> None:
    """Warn from the failing rank (not ``rank_zero_warn``: that rank may not be rank 0, and it knows why)."""
    warnings.warn(
        f"StabilityMonitor: the {kind} probe raised on rank {context.rank} at step {context.step}"
        f" ({type(error).__name__}: {error}); it is skipped on every rank and training continues."
        f" {probe_failure_advice(error)}",
        RuntimeWarning,
        stacklevel=3,
    )


class CertificateInstrument:
    r"""Lyapunov certificates of optimizer steps, their window, the training-loss EMA and the validation trend.

    ``run`` turns the step's shared line probe ``(L0, L+, L-, ‖Δθ‖²)`` into
    :func:`~lightning_stablelr.certificates.certificate` (``delta_v = L+ - L0``, ``decrease``, ...) and
    records it in a :class:`CertificateWindow` of ``window`` certificates (``certified_rate``,
    ``ema_decrease`` of the EMA with decay ``ema_decay`` per training batch, averaged over ranks).
    """

    def __init__(self, window: int, ema_decay: float) -> None:
        self.window = CertificateWindow(window)
        self.ema = LossEMA(ema_decay)
        self.val_trend = ValidationTrend()
        self.runs = 0

    def observe_loss(self, loss: Tensor) -> None:
        """Fold one training batch's loss into the EMA (no host sync)."""
        self.ema.update(loss)

    def observe_validation(self, value: float) -> dict[str, float]:
        """``lyapunov/val_decrease`` for a new (rank-averaged) validation loss; empty at the first one."""
        decrease = self.val_trend.observe(value)
        return {} if decrease is None else {"lyapunov/val_decrease": decrease}

    def run(self, line_probe: Callable[[], LineProbeResult | None], context: ProbeContext) -> InstrumentRun:
        """Certify the step whose line probe ``line_probe()`` returns (computed by it, or cached by the session)."""
        start = time.perf_counter()
        result = line_probe()
        # The EMA is linear: the mean over ranks of (m, n) is the EMA of the rank-mean losses.
        packed = self.ema.packed()
        local = [0.0, 0.0] if packed is None else packed  # a rank without a finite loss yet sends (0, 0)
        (mean, count), _ = reduce_with_flag(context.reduce, local, size=2, device=context.device)
        seconds = time.perf_counter() - start
        if result is None:
            return InstrumentRun(seconds=seconds, ran=False)
        if result.failed:  # the session has warned, naming the error
            return InstrumentRun(seconds=seconds, failed=True, ran=False)
        if not result.update_norm_sq > 0:
            # The step did not move (lr 0, or a GradScaler-skipped fp16 step): nothing to certify.
            return InstrumentRun(seconds=seconds, ran=False)
        cert = certificate(result.loss_before, result.loss_after, result.line, result.update_norm_sq)
        self.window.record(cert.decrease, self.ema.corrected(mean, count))
        self.runs += 1
        return InstrumentRun({**cert.metrics(), **self.window.metrics()}, seconds)

    def state_dict(self) -> dict[str, Any]:
        """Primitives only: the window, the EMA, the last validation loss and the count of certificates."""
        return {"window": self.window.state_dict(), "ema": self.ema.state_dict(),
                "val_trend": self.val_trend.state_dict(), "runs": self.runs}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; missing keys keep their defaults."""
        self.window.load_state_dict(state.get("window", {}))
        self.ema.load_state_dict(state.get("ema", {}))
        self.val_trend.load_state_dict(state.get("val_trend", {}))
        self.runs = int(state.get("runs", 0))


class SharpnessInstrument:
    """λ_max of the Hessian (Adam: of ``P^-1/2 H P^-1/2``) against the optimizer's stability threshold.

    Warm-started power iteration (:func:`~lightning_stablelr.callbacks._monitor_support.measure_sharpness`)
    of at most ``iters`` Hessian-vector products (fewer when the caller's budget affords fewer), stopped at
    relative change ``tol``, on a fixed training batch; the value is averaged over ranks. Each measurement
    continues the iteration from the previous vector, so a few products per measurement converge over
    successive measurements while the Hessian changes slowly. The cost unit is one Hessian-vector product.
    The warm-start vector is runtime state (not checkpointed). Sharded (DTensor, FSDP2) parameters are not
    supported (Hessian-vector products cannot run through FSDP2's all-gathers): the instrument then says so
    once and produces nothing, on every rank alike.
    """

    #: Hessian-vector products of a measurement whose cost is not known yet, and the fewest worth running.
    FIRST_ITERS = 2

    def __init__(self, iters: int, tol: float) -> None:
        self.iters = iters
        self.tol = tol
        self.runs = 0
        self.last_value: float | None = None
        self.vector: tuple[bool, dict[str, Tensor]] | None = None
        self.unsupported = False  # sharded parameters: said once, then nothing is measured

    def run(
        self, probe: ObjectiveProbe | None, optimizer: torch.optim.Optimizer, batch: Any, context: ProbeContext,
        max_iters: int | None = None,
    ) -> InstrumentRun:
        """Measure at the module's current parameters on ``batch`` (a cached copy, moved to the device here),
        with at most ``min(iters, max_iters)`` Hessian-vector products."""
        if probe is not None and is_sharded(probe.module):  # the same on every rank: no collective needed
            if not self.unsupported and context.rank == 0:
                warnings.warn(
                    "StabilityMonitor: sharpness is not supported on sharded (DTensor, FSDP2) parameters: its"
                    " Hessian-vector products cannot run through FSDP2's all-gathers. It logs nothing in this run;"
                    " certificates and connectivity still run. Pass sharpness_every_n_steps=0 to silence this.",
                    RuntimeWarning, stacklevel=3,
                )  # fmt: skip
            self.unsupported = True
            return InstrumentRun(ran=False)
        iters = self.iters if max_iters is None else max(1, min(self.iters, max_iters))
        start = time.perf_counter()
        values: list[float] | None = None
        reading = None
        try:
            if probe is None or batch is None:
                raise RuntimeError("no cached training batch for the sharpness probe")
            init_preconditioned, init = self.vector or (False, None)
            with isolated_rng():
                reading = measure_sharpness(
                    probe, optimizer, detached_copy(batch, context.device), seed=probe_seed(context.step),
                    iters=iters, tol=self.tol, init=init, init_preconditioned=init_preconditioned,
                )  # fmt: skip
            self.vector = (reading.preconditioned, reading.vector)
            values = [reading.sharpness]
        except Exception as error:
            warn_local_failure("sharpness", context, error)
        (sharpness,), failed = reduce_with_flag(context.reduce, values, size=1, device=context.device)
        seconds = time.perf_counter() - start
        if failed or reading is None or not math.isfinite(sharpness):
            return InstrumentRun(seconds=seconds, failed=True, ran=False)
        self.runs += 1
        self.last_value = sharpness
        return InstrumentRun(reading.metrics(sharpness), seconds, units=max(1, reading.iterations))

    def __getstate__(self) -> dict[str, Any]:
        # Runtime tensors (snapshots, cached batches, warm-start vectors) never travel with a pickled callback.
        state = self.__dict__.copy()
        state["vector"] = None
        return state

    def reset(self) -> None:
        """Forget the warm-start vector (a new fit)."""
        self.vector = None

    def state_dict(self) -> dict[str, Any]:
        """Primitives only: the count of measurements and the last value (None before the first)."""
        return {"runs": self.runs, "last_value": self.last_value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; missing keys keep their defaults."""
        self.runs = int(state.get("runs", 0))
        last = state.get("last_value")
        self.last_value = None if last is None else float(last)
