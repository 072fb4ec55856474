"""The overhead governor of :class:`StabilityMonitor` (pure: no Lightning import).

It keeps the monitor's cumulative probe time under a fraction of the training wall time:

    training_time(now) = (now - start) - probe_time
    a probe of kind k is allowed  iff  probe_time + predicted_k ≤ max_overhead · training_time(now)
    predicted_k        = units · (seconds per unit of the last probe of kind k)   (0 before the first)

A probe that is not allowed is *deferred* (skipped) and counted. The first probe of each kind has no
measured cost, so it may overshoot the budget once; every later decision includes its predicted cost.
``overhead = probe_time / training_time`` is the number logged as ``monitor/overhead``.

The governor only decides from its own clock. Under DDP the callback reduces the decision across
ranks (allowed only when every rank allows), so every rank runs the same probes and calls the same
collectives.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["ProbeGovernor"]


class ProbeGovernor:
    """Budget keeper: cumulative probe seconds ≤ ``max_overhead`` * training seconds.

    Args:
        max_overhead: allowed ratio of probe time to training time; ``math.inf`` allows every probe.
    """

    def __init__(self, max_overhead: float) -> None:
        if isinstance(max_overhead, bool) or not isinstance(max_overhead, (int, float)) or not max_overhead > 0:
            raise ValueError(
                f"`max_overhead` must be a number > 0 (math.inf disables the governor), got {max_overhead!r}."
            )
        self.max_overhead = float(max_overhead)
        self.start_time: float | None = None
        self.probe_time = 0.0
        self.cost_per_unit: dict[str, float] = {}
        self.deferred: dict[str, int] = {}

    def start(self, now: float | None = None) -> None:
        """Start the training clock and a fresh budget (probe time 0); measured costs per unit are kept."""
        self.start_time = time.perf_counter() if now is None else now
        self.probe_time = 0.0

    def training_time(self, now: float | None = None) -> float:
        """Wall seconds since :meth:`start` minus the probe seconds (0 before :meth:`start`)."""
        if self.start_time is None:
            return 0.0
        now = time.perf_counter() if now is None else now
        return max(0.0, now - self.start_time - self.probe_time)

    def predicted(self, kind: str, units: float = 1.0) -> float:
        """Predicted seconds of a probe of ``kind`` covering ``units`` (0 for a kind never measured)."""
        return self.cost_per_unit.get(kind, 0.0) * units

    def allows(self, kind: str, units: float = 1.0, now: float | None = None) -> bool:
        """True when ``probe_time + predicted(kind, units) <= max_overhead * training_time(now)``."""
        if math.isinf(self.max_overhead):
            return True
        budget = self.max_overhead * self.training_time(now)
        return self.probe_time + self.predicted(kind, units) <= budget

    def record(self, kind: str, seconds: float, units: float = 1.0) -> None:
        """Add a probe's measured ``seconds`` and remember its cost per unit for the next prediction."""
        seconds = max(0.0, float(seconds))
        self.probe_time += seconds
        if units > 0:
            self.cost_per_unit[kind] = seconds / units

    def add_time(self, seconds: float) -> None:
        """Charge ``seconds`` of monitor work that is not a probe of its own (figures, logging)."""
        self.probe_time += max(0.0, float(seconds))

    def defer(self, kind: str) -> int:
        """Count one deferred probe of ``kind``; return the total number deferred (all kinds)."""
        self.deferred[kind] = self.deferred.get(kind, 0) + 1
        return self.total_deferred

    @property
    def total_deferred(self) -> int:
        """Deferred probes of every kind."""
        return sum(self.deferred.values())

    def overhead(self, now: float | None = None) -> float:
        """``probe_time / training_time`` (0 while the training time is 0)."""
        training = self.training_time(now)
        return self.probe_time / training if training > 0 else 0.0

    @contextlib.contextmanager
    def timed(self, kind: str, units: float = 1.0) -> Iterator[None]:
        """Measure the enclosed block with ``perf_counter`` and :meth:`record` it as ``kind``."""
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.record(kind, time.perf_counter() - begin, units)

    def state_dict(self) -> dict[str, Any]:
        """Primitives only: the deferred counts (the clocks restart with every fit)."""
        return {"deferred": dict(self.deferred)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the deferred counts, tolerating a missing key."""
        self.deferred = {str(k): int(v) for k, v in state.get("deferred", {}).items()}
