"""The monitor's connectivity instrument (no Lightning import): snapshots within a memory budget, segment losses.

Memory: the window holds ``window + 1`` snapshots (the oldest is evicted by the next probe) stored in
``dtype`` on ``device``, so it holds ``(window + 1) · P · itemsize(dtype)`` bytes for ``P`` trainable
parameters. :meth:`ConnectivityInstrument.setup` shrinks the window to what ``budget_bytes`` holds:

    window_effective = min(window, floor(budget_bytes / snapshot_bytes) - 1)

and turns the instrument off (with a message naming ``snapshot_memory``) when not even two snapshots fit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_stablelr.callbacks._connectivity_probe import ConnectivityReport, ConnectivityTracker, EvalLoss
from lightning_stablelr.callbacks._instruments import InstrumentRun, ProbeContext, warn_local_failure
from lightning_stablelr.callbacks._monitor_config import MonitorConfig
from lightning_stablelr.callbacks._monitor_support import detached_copy
from lightning_stablelr.collectives import reduce_with_flag
from lightning_stablelr.probe import ObjectiveProbe
from lightning_stablelr.rng import CONNECTIVITY_SEED, isolated_rng

__all__ = ["ConnectivityInstrument", "snapshot_bytes"]


def snapshot_bytes(params: Mapping[str, Tensor], dtype: torch.dtype | None) -> int:
    """Bytes of one snapshot of ``params`` stored in ``dtype`` (None: each tensor's own dtype)."""
    return sum(
        t.numel() * (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size())
        for t in params.values()
    )


class ConnectivityInstrument:
    """Loss along the segments from the previous snapshots to θ, at the end of an epoch.

    Args:
        window: previous snapshots the newest is compared with (capped by the memory budget at :meth:`setup`).
        points: points per segment, endpoints included.
        batches: validation batches each point is evaluated on (cached at the first probe).
        tol: ``connected`` is ``sublevel_excess <= tol``.
        bn_recalibration_batches: training batches for BatchNorm statistics at each point.
        device, dtype: where and in which dtype snapshots are stored.
        budget_bytes: ``parameter_bytes -> budget`` (the monitor's ``snapshot_memory``).
    """

    def __init__(
        self, window: int, points: int, batches: int, tol: float, bn_recalibration_batches: int,
        device: torch.device, dtype: torch.dtype | None, budget_bytes: Callable[[int], int],
    ) -> None:  # fmt: skip
        self.window, self.points, self.batches, self.tol = window, points, batches, tol
        self.bn_recalibration_batches = bn_recalibration_batches
        self.device, self.dtype, self.budget_bytes = device, dtype, budget_bytes
        self.tracker: ConnectivityTracker | None = None
        self.eval_batches: list[Any] | None = None
        #: The latest probe (segments, pairwise barrier matrix), None before the first.
        self.last_report: ConnectivityReport | None = None
        self.runs = 0
        self.last_metrics: dict[str, float] = {}

    @classmethod
    def from_config(cls, config: MonitorConfig) -> ConnectivityInstrument:
        """The instrument of a :class:`MonitorConfig`'s ``connectivity_*``/``snapshot_*`` arguments."""
        return cls(config.connectivity_window, config.connectivity_points, config.connectivity_batches,
                   config.connected_tol, config.bn_recalibration_batches, config.snapshot_device,
                   config.snapshot_dtype, config.snapshot_budget_bytes)  # fmt: skip

    def setup(self, params: Mapping[str, Tensor]) -> str | None:
        """A fresh snapshot window for ``params`` within the budget; a message when the budget cut the window."""
        self.eval_batches = None
        self.last_report = None
        one = snapshot_bytes(params, self.dtype)
        budget = self.budget_bytes(sum(t.numel() * t.element_size() for t in params.values()))
        window = min(self.window, budget // max(one, 1) - 1)
        self.tracker = None
        if window < 1:
            smaller = "" if self.dtype == torch.float16 else " or store snapshots in `snapshot_dtype='float16'`"
            return (f"StabilityMonitor: connectivity is off: two snapshots take {2 * one} bytes and"
                    f" `snapshot_memory` allows {budget}; raise `snapshot_memory` (a float is a multiple of the"
                    f" parameters' size, e.g. 2.5; an int is bytes){smaller}.")  # fmt: skip
        self.tracker = ConnectivityTracker(window, self.points, self.tol, self.device, self.dtype)
        if window < self.window:
            return (f"StabilityMonitor: the connectivity window is {window} snapshots, not {self.window}:"
                    f" {window + 1} snapshots of {one} bytes fit in `snapshot_memory` ({budget} bytes); raise"
                    " `snapshot_memory` to compare with more of them.")  # fmt: skip
        return None

    def __getstate__(self) -> dict[str, Any]:
        # Runtime tensors (snapshots, cached batches, warm-start vectors) never travel with a pickled callback.
        state = self.__dict__.copy()
        state.update(tracker=None, eval_batches=None, last_report=None)
        return state

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the snapshots now."""
        return 0 if self.tracker is None else self.tracker.snapshots.memory_bytes

    def full_units(self) -> int:
        """Point evaluations of the next probe with every segment."""
        return 0 if self.tracker is None else self.tracker.num_evaluations()

    def local_segments(self, affordable_units: float) -> int:
        """How many of the previous snapshots fit ``affordable_units`` point evaluations, newest first; -1
        when not even the new snapshot's own loss fits. The caller takes the minimum over ranks."""
        assert self.tracker is not None
        full = len(self.tracker.previous())
        if affordable_units < 1.0:
            return -1
        if math.isinf(affordable_units):
            return full
        return min(full, int((affordable_units - 1.0) // (self.points - 2)))

    def run(
        self, probe: ObjectiveProbe, segments: int, load_batches: Callable[[], list[Any]],
        train_batches: Sequence[Any], context: ProbeContext,
    ) -> InstrumentRun:  # fmt: skip
        """Snapshot θ and measure the newest ``segments`` segments (``load_batches()`` gives the validation
        batches at the first probe; the training batches stand in when it gives none)."""
        tracker = self.tracker
        assert tracker is not None
        start = time.perf_counter()
        once = 0.0
        theta = probe.parameters()
        values = None
        try:
            with isolated_rng():  # creating a loader's iterator draws from the torch RNG
                if self.eval_batches is None:
                    cached = time.perf_counter()
                    self.eval_batches = load_batches()[: self.batches] or list(train_batches[: self.batches])
                    once = time.perf_counter() - cached  # one-time: charged, but not a cost per point
                if not self.eval_batches:
                    raise RuntimeError("no batches to evaluate the connectivity probe on")
                batches = [detached_copy(b, context.device) for b in self.eval_batches]
                recalibration = [detached_copy(b, context.device)
                                 for b in train_batches[: self.bn_recalibration_batches]]  # fmt: skip
                loss = EvalLoss(probe, batches, recalibration, seed=CONNECTIVITY_SEED)
                values = tracker.local_losses(theta, loss, segments)
        except Exception as error:
            warn_local_failure("connectivity", context, error)
        units = tracker.num_evaluations(segments)
        losses, failed = reduce_with_flag(context.reduce, values, size=units, device=context.device)
        seconds = time.perf_counter() - start - once
        if failed:
            return InstrumentRun(seconds=seconds, units=units, once_seconds=once, failed=True, ran=False)
        self.last_report = tracker.commit(theta, losses, epoch=context.epoch, step=context.step, segments=segments)
        metrics = self.last_report.metrics()
        if metrics:
            self.runs += 1
            self.last_metrics = metrics
        return InstrumentRun(metrics, seconds, units, once, ran=bool(metrics))

    def state_dict(self) -> dict[str, Any]:
        """Primitives only: the count of probes with a pair and their last metrics (snapshots are not saved)."""
        return {"runs": self.runs, "last_metrics": dict(self.last_metrics)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; missing keys keep their defaults."""
        self.runs = int(state.get("runs", 0))
        self.last_metrics = {str(k): float(v) for k, v in state.get("last_metrics", {}).items()}
