"""The overhead governor of :class:`StabilityMonitor` (pure: no Lightning import).

It keeps the monitor's cumulative probe time under a fraction of the training wall time, with an equal
share of that budget for each kind of probe (certificates, sharpness, connectivity), so that a frequent
cheap probe cannot starve a rare informative one:

    training_time(now) = (now - start) - probe_time                   (probe_time: all kinds)
    budget(now)        = (1 - UNTIMED_ALLOWANCE) · max_overhead · training_time(now)
    budget_k(now)      = share_k · budget(now)                          share_k = 1 / (number of kinds)
    a probe of kind k covering `units` is allowed  iff  spent_k + units · cost_k ≤ budget_k(now)

with ``cost_k`` the seconds per unit of the last probe of kind k. A kind never measured has no cost
yet and its first probe always runs (and may overshoot once); a caller may give a prior instead
(the figures). Time charged to a kind without a share comes off every share alike: the monitor's
logging, and its standing cost per batch (:class:`StandingCost`: its per-step hooks outside the probes
and outside the decisions' collectives, plus Lightning's dispatch of its hooks), so that the budget
bounds what the monitor can time of itself, not only its probes. ``UNTIMED_ALLOWANCE`` (a quarter) of
``max_overhead`` is kept for what no hook can time: colder caches and allocator state after a probe,
garbage collection, the dispatch beyond its calibrated estimate. On 2 to 8 ms CPU steps those came to about
a third on top of the timed cost (whole fits x1.069 against 5.0% timed, ``benchmarks/RESULTS.md``), so that
``max_overhead`` bounds the whole fit's slowdown, not only the part the monitor sees. Summed over kinds,
``probe_time ≤ (1 - UNTIMED_ALLOWANCE) · max_overhead · training_time`` up to those first probes, the prediction error of the last probe of each
kind, and a standing cost that alone exceeds the budget (then only first probes run, and the monitor's
warning says so). A probe that is not allowed is *deferred* (skipped) and counted. :meth:`ProbeGovernor.affordable_units` tells how
much of a divisible probe (the segments of a connectivity probe) fits. ``overhead = probe_time /
training_time`` is logged as ``monitor/overhead``.

The governor only decides from its own clock. Under DDP the callback reduces the decision across
ranks (allowed only when every rank allows), so every rank runs the same probes and collectives.
"""

from __future__ import annotations

import functools
import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

__all__ = ["ProbeGovernor", "StandingCost", "timed_as_standing"]

_Hook = TypeVar("_Hook", bound=Callable[..., Any])
_T = TypeVar("_T")


class ProbeGovernor:
    """Budget keeper: the probe seconds of each kind stay within its share of the timed budget
    ``(1 - UNTIMED_ALLOWANCE) · max_overhead`` * training seconds.

    Args:
        max_overhead: allowed ratio of the monitor's whole cost to training time; ``math.inf`` allows every
            probe.
        kinds: the kinds of probe that share the budget equally. A kind not listed is checked against the
            whole budget and the total probe time.
    """

    UNTIMED_ALLOWANCE = 0.25
    """The fraction of ``max_overhead`` kept for the monitor's cost that no hook can time (module docstring)."""

    def __init__(
        self, max_overhead: float, kinds: Sequence[str] = (), prior_costs: Mapping[str, float] | None = None
    ) -> None:
        if isinstance(max_overhead, bool) or not isinstance(max_overhead, (int, float)) or not max_overhead > 0:
            raise ValueError(
                f"`max_overhead` must be a number > 0 (math.inf disables the governor), got {max_overhead!r}."
            )
        self.max_overhead = float(max_overhead)
        self.shares = {kind: 1.0 / len(kinds) for kind in kinds}
        self.start_time: float | None = None
        self.probe_time = 0.0
        self.spent: dict[str, float] = {}
        # A prior stands in for a kind's cost per unit until it is first measured (0 when none is given).
        self.cost_per_unit: dict[str, float] = dict(prior_costs or {})
        self.deferred: dict[str, int] = {}
        #: Seconds spent in the decisions' collectives (waiting for the device or the other ranks): time the
        #: monitor's hooks contain but do not add, left out of the standing cost.
        self.waited = 0.0

    @property
    def timed_budget(self) -> float:
        """The ratio of timed monitor seconds to training seconds the probes are fitted under:
        ``(1 - UNTIMED_ALLOWANCE) · max_overhead``."""
        return self.max_overhead * (1.0 - self.UNTIMED_ALLOWANCE)

    def start(self, now: float | None = None) -> None:
        """Start the training clock and a fresh budget (nothing spent); measured costs per unit are kept."""
        self.start_time = time.perf_counter() if now is None else now
        self.probe_time = 0.0
        self.spent = {}

    def training_time(self, now: float | None = None) -> float:
        """Wall seconds since :meth:`start` minus the probe seconds (0 before :meth:`start`)."""
        if self.start_time is None:
            return 0.0
        now = time.perf_counter() if now is None else now
        return max(0.0, now - self.start_time - self.probe_time)

    def predicted(self, kind: str, units: float = 1.0) -> float:
        """Predicted seconds of a probe of ``kind`` covering ``units`` (0 for a kind never measured)."""
        return self.cost_per_unit.get(kind, 0.0) * units

    def available(self, kind: str, now: float | None = None, *, pooled: bool = False, reserve: float = 0.0) -> float:
        """Seconds ``kind`` may still spend now (may be < 0): the smaller of its share of the budget minus what
        it spent and the whole unspent budget ``timed_budget · training_time - probe_time``.

        ``pooled``: the larger of the two instead. The monitor asks so for an instrument's first probe of an
        epoch, so that every instrument is produced once per epoch whenever the total budget affords it;
        the total probe time stays within the budget either way (up to mispredictions). ``reserve``: seconds
        of the unspent budget kept for other kinds (the monitor keeps what the instruments that have not run
        this epoch need).
        """
        if math.isinf(self.max_overhead):
            return math.inf
        budget = self.timed_budget * self.training_time(now)
        total = budget - self.probe_time - reserve
        if kind not in self.shares:
            return total
        # Time charged to kinds without a share (logging, bookkeeping) comes off every share alike.
        unshared = sum(spent for name, spent in self.spent.items() if name not in self.shares)
        share = self.shares[kind] * (budget - unshared) - self.spent.get(kind, 0.0)
        return max(share, total) if pooled else min(share, total)

    def share_among(self, kinds: Sequence[str]) -> None:
        """Split the budget equally among ``kinds`` from now on (e.g. without figures when nothing draws them)."""
        self.shares = {kind: 1.0 / len(kinds) for kind in kinds}

    def allows(
        self, kind: str, units: float = 1.0, now: float | None = None, *, pooled: bool = False, reserve: float = 0.0
    ) -> bool:
        """True when the predicted cost of ``units`` fits in :meth:`available`; always for a kind never measured
        (and without a prior), whose first probe runs whatever was spent before it."""
        if kind not in self.cost_per_unit:
            return True
        return self.predicted(kind, units) <= self.available(kind, now, pooled=pooled, reserve=reserve)

    def affordable_units(
        self, kind: str, now: float | None = None, *, pooled: bool = False, reserve: float = 0.0
    ) -> float:
        """How many units of ``kind`` fit now: ``available / cost per unit`` (inf when never measured)."""
        cost = self.cost_per_unit.get(kind, 0.0)
        available = self.available(kind, now, pooled=pooled, reserve=reserve)
        if cost <= 0.0 or math.isinf(available):
            return math.inf
        return max(0.0, available / cost)

    def waiting(self, collective: Callable[[], _T]) -> _T:
        """``collective()``, its seconds added to :attr:`waited` (a decision's collective: not monitor cost)."""
        started = time.perf_counter()
        try:
            return collective()
        finally:
            self.waited += time.perf_counter() - started

    def charge(self, kind: str, seconds: float) -> None:
        """Add ``seconds`` spent by ``kind`` without changing its measured cost per unit."""
        seconds = max(0.0, float(seconds))
        self.probe_time += seconds
        self.spent[kind] = self.spent.get(kind, 0.0) + seconds

    def record(self, kind: str, seconds: float, units: float = 1.0) -> None:
        """Charge a probe's measured ``seconds`` and remember its cost per unit for the next prediction."""
        self.charge(kind, seconds)
        if units > 0:
            self.cost_per_unit[kind] = max(0.0, float(seconds)) / units

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

    def state_dict(self) -> dict[str, Any]:
        """Primitives only: the deferred counts (the clocks restart with every fit)."""
        return {"deferred": dict(self.deferred)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the deferred counts, tolerating a missing key."""
        self.deferred = {str(k): int(v) for k, v in state.get("deferred", {}).items()}


class StandingCost:
    """What the monitor adds to every training batch outside its probes, charged to the governor as ``"standing"``.

    Per batch: ``(wall time in the timed hooks - probe time booked inside them - time waited in the
    decisions' collectives) + dispatch_per_batch``. ``dispatch_per_batch`` is Lightning's cost of calling the
    monitor's hooks, which no hook can time from inside: :meth:`calibrate` times a no-op dispatch (the
    caller passes it) once per fit. On a 2.5 ms CPU step the two come to about 1.5% of the fit; on a
    20 ms step to about 0.2%.
    """

    KIND = "standing"

    def __init__(self, governor: ProbeGovernor) -> None:
        self.governor = governor
        self.dispatch_per_batch = 0.0
        self._entered = 0.0
        self._booked = 0.0
        self._waited = 0.0
        self._pending = 0.0

    def calibrate(self, dispatch_once: Callable[[], object], hooks_per_batch: int, rounds: int = 8, calls: int = 8) -> None:
        """``dispatch_per_batch = hooks_per_batch ·`` one call of ``dispatch_once``: the median over ``rounds``
        rounds of ``calls`` calls each, garbage collection paused (one preemption or collection inside a single
        timed loop would inflate every batch's charge for the whole fit). Starts a fit: nothing pending."""
        self._pending = 0.0
        collecting = gc.isenabled()
        gc.disable()
        try:
            per_call = []
            for _ in range(rounds):
                started = time.perf_counter()
                for _ in range(calls):
                    dispatch_once()
                per_call.append((time.perf_counter() - started) / calls)
        finally:
            if collecting:
                gc.enable()
        self.dispatch_per_batch = statistics.median(per_call) * hooks_per_batch

    def enter(self) -> None:
        """A timed hook starts."""
        self._entered = time.perf_counter()
        self._booked = self.governor.probe_time
        self._waited = self.governor.waited

    def leave(self) -> None:
        """A timed hook ends: its time minus what it booked to the governor and what it waited in the
        decisions' collectives is standing cost."""
        governor = self.governor
        self._pending += (
            time.perf_counter() - self._entered - (governor.probe_time - self._booked) - (governor.waited - self._waited)
        )

    def charge_batch(self) -> None:
        """Charge this batch's standing cost (at the batch's last timed hook)."""
        self.governor.charge(self.KIND, self._pending + self.dispatch_per_batch)
        self._pending = 0.0


def timed_as_standing(*, charge_batch: bool) -> Callable[[_Hook], _Hook]:
    """Decorate a callback hook so that its time outside probes counts as standing cost (``self._standing``,
    a :class:`StandingCost`); ``charge_batch``: the batch's last timed hook, which charges the batch."""

    def decorate(hook: _Hook) -> _Hook:
        @functools.wraps(hook)
        def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
            standing = self._standing
            standing.enter()
            try:
                return hook(self, *args, **kwargs)
            finally:
                standing.leave()
                if charge_batch:
                    standing.charge_batch()

        return timed  # type: ignore[return-value]

    return decorate
