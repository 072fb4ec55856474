"""When the monitor's instruments run: the governor's decisions made identical on every rank, per epoch.

:class:`MonitorPolicy` wraps the pure :class:`~lightning_stablelr.callbacks._governor.ProbeGovernor` with what
needs the trainer: a decision is reduced across ranks (``reduce_boolean_decision``, all must allow), an
instrument that has not produced a measurement in the current epoch is due at its last training batch
and may draw on the whole unspent budget, an instrument deferred for a whole epoch is named once in a
warning, and every :class:`~lightning_stablelr.callbacks._instruments.InstrumentRun` is charged from its
returned seconds.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_stablelr.callbacks._connectivity_instrument import ConnectivityInstrument
from lightning_stablelr.callbacks._governor import ProbeGovernor, StandingCost
from lightning_stablelr.callbacks._instruments import InstrumentRun
from lightning_stablelr.callbacks._lightning_access import is_last_step_of_fit, is_last_training_batch

__all__ = ["KNOBS", "MonitorPolicy"]

#: What makes each instrument cheaper, named when the governor deferred it for a whole epoch.
KNOBS = {
    "certificate": "`certificate_every_n_steps` (fewer due certificates)",
    "sharpness": "`sharpness_iters` (fewer Hessian-vector products)",
    "connectivity": "`connectivity_points`, `connectivity_batches` or `connectivity_window` (fewer forward passes)",
}


class MonitorPolicy:
    """The governor plus this epoch's bookkeeping: which instruments ran, which were deferred.

    Coverage comes first: a repeated probe of an instrument that already ran this epoch may only spend what
    is left after the reserve, the predicted cost of the smallest probe (``minimal_units``) of each
    instrument that has not run yet this epoch.

    Args:
        governor: the budget keeper (its deferred counts are the monitor's checkpointed state).
        minimal_units: the units of the smallest useful probe of each instrument.
    """

    def __init__(self, governor: ProbeGovernor, minimal_units: dict[str, float] | None = None) -> None:
        self.governor = governor
        self.minimal_units = dict(minimal_units or {})
        self.ran: set[str] = set()  # instruments that produced a measurement this epoch
        self.deferred: set[str] = set()  # instruments deferred at least once this epoch
        self.warned: set[str] = set()
        self.failed_probes = 0

    def start_epoch(self) -> None:
        """Forget which instruments ran or were deferred."""
        self.ran.clear()
        self.deferred.clear()

    def catch_up(self, trainer: pl.Trainer, kind: str, *, stepped: bool = False) -> bool:
        """Due at the epoch's last training batch, or the fit's last step (``max_steps``), when ``kind`` has not
        produced a measurement this epoch; ``stepped``: asked after the batch's optimizer step."""
        if kind in self.ran:
            return False
        return is_last_training_batch(trainer) or is_last_step_of_fit(trainer, stepped=stepped)

    def allowed(self, trainer: pl.Trainer, kind: str) -> bool:
        """The governor's decision, identical on every rank (a probe runs only if every rank allows it); an
        instrument's first probe of the epoch may use the whole unspent budget."""
        if math.isinf(self.governor.max_overhead):
            return True  # the same on every rank without a collective
        local = self.governor.allows(kind, pooled=kind not in self.ran, reserve=self.reserve(kind))
        # The collective waits for the device and the other ranks: governor.waited, not the monitor's cost.
        if self.governor.waiting(lambda: trainer.strategy.reduce_boolean_decision(local, all=True)):
            return True
        self.defer(kind)
        return False

    def reserve(self, kind: str) -> float:
        """Seconds kept for the instruments that have not run this epoch (none for a first probe of ``kind``)."""
        if kind not in self.ran:
            return 0.0
        return sum(self.governor.predicted(other, units) for other, units in self.minimal_units.items()
                   if other != kind and other not in self.ran)  # fmt: skip

    def defer(self, kind: str) -> None:
        """Count a deferred probe of ``kind``."""
        self.governor.defer(kind)
        self.deferred.add(kind)

    def sharpness_iters(self, trainer: pl.Trainer, most: int, first: int) -> int | None:
        """Hessian-vector products the budget affords for this measurement (one cost unit each), at most
        ``most``; ``first`` until their cost is measured (so a cold start cannot overshoot by a whole power
        iteration); None, counted as deferred, when not even ``first`` fit. Identical on every rank."""
        if math.isinf(self.governor.max_overhead):
            return most
        pooled = "sharpness" not in self.ran
        if "sharpness" not in self.governor.cost_per_unit:
            return min(most, first) if self.allowed(trainer, "sharpness") else None
        units = self.governor.affordable_units("sharpness", pooled=pooled, reserve=self.reserve("sharpness"))
        local = min(most, int(units)) if math.isfinite(units) else most
        local = self._reduced_min(trainer, float(local), trainer.strategy.root_device)
        if local < min(most, first):
            self.defer("sharpness")
            return None
        return local

    def connectivity_segments(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, instrument: ConnectivityInstrument
    ) -> int | None:
        """How many of the previous snapshots the budget lets this probe compare with, newest first (the
        minimum over ranks); None when deferred (and counted). The consecutive pair comes first; one probe per
        epoch at most, so it may use the whole unspent budget."""
        assert instrument.tracker is not None
        full = len(instrument.tracker.previous())
        if math.isinf(self.governor.max_overhead):
            return full
        units = self.governor.affordable_units("connectivity", pooled=True)
        segments = self._reduced_min(trainer, float(instrument.local_segments(units)), pl_module.device)
        if segments < 0 or (segments == 0 and full > 0):
            self.defer("connectivity")
            return None
        return segments

    def _reduced_min(self, trainer: pl.Trainer, value: float, device: torch.device) -> int:
        """The minimum of ``value`` over the ranks (a collective and a host sync; its time counts as waited)."""
        return self.governor.waiting(
            lambda: int(trainer.strategy.reduce(torch.tensor(value, device=device), reduce_op="min").item())
        )

    def account(self, trainer: pl.Trainer, kind: str, run: InstrumentRun) -> None:
        """Charge the run's time to the governor, count a failure and remember a measurement."""
        self.governor.record(kind, run.seconds, run.units)
        self.governor.charge(kind, run.once_seconds)
        if run.ran:
            self.ran.add(kind)
        if run.failed:
            self.failed_probes += 1
            if kind != "certificate":  # the line-probe session has warned for certificates
                rank_zero_warn(f"StabilityMonitor: the {kind} probe at step {trainer.global_step} failed on at least"
                               " one rank and was skipped on every rank; training continues.")  # fmt: skip

    def warn_deferred_epoch(self, trainer: pl.Trainer) -> None:
        """Say once per instrument when the governor deferred it for a whole epoch, naming the knobs."""
        governor = self.governor
        training = governor.training_time()
        standing = governor.spent.get(StandingCost.KIND, 0.0) / training if training > 0 else 0.0
        for kind in sorted(self.deferred - self.ran - self.warned):
            self.warned.add(kind)
            if standing >= governor.timed_budget:
                advice = (f"The monitor's per-batch cost alone (its hooks and Lightning's dispatch of them) is"
                          f" {standing:.1%} of the training time, so no knob of the {kind} probe helps: raise"
                          " `max_overhead`, or train with larger batches.")  # fmt: skip
            else:
                advice = f"Raise `max_overhead`, or make it cheaper with {KNOBS[kind]}."
            rank_zero_warn(
                f"StabilityMonitor: no {kind} in epoch {trainer.current_epoch}: the governor deferred every due"
                f" {kind} probe to keep the monitor within max_overhead={governor.max_overhead:g} of the"
                f" training time. {advice} (Said once.)"
            )
