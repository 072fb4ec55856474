"""The probe runners and output of :class:`~lightning_stablelr.StabilityMonitor` (a mixin, kept apart so the
callback file holds the arguments, the state and the hooks).

Every method here is called on every rank in the same order, and every collective it calls is entered by
every rank: decisions are reduced (``reduce_boolean_decision``, a ``min``), losses are summed or averaged
across ranks together with a failure flag, so a probe raising on one rank is skipped on all of them.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_stablelr.callbacks._connectivity_probe import ConnectivityReport, ConnectivityTracker, EvalLoss
from lightning_stablelr.callbacks._lightning_access import log_step, put_callback_metrics, reducer
from lightning_stablelr.callbacks._monitor_support import detached_copy, measure_sharpness
from lightning_stablelr.callbacks._validation_cache import cached_validation_batches
from lightning_stablelr.callbacks.line_probe_session import line_probe_session
from lightning_stablelr.certificates import certificate
from lightning_stablelr.collectives import reduce_with_flag
from lightning_stablelr.probe import probe_failure_advice
from lightning_stablelr.rng import CONNECTIVITY_SEED, isolated_rng, probe_seed

if TYPE_CHECKING:
    from lightning_stablelr.callbacks._governor import ProbeGovernor
    from lightning_stablelr.callbacks._monitor_config import MonitorConfig
    from lightning_stablelr.certificates import CertificateWindow, LossEMA
    from lightning_stablelr.probe import ObjectiveProbe

__all__ = ["MonitorProbes"]


class MonitorProbes:
    """Certificates, sharpness and connectivity probes, the governor's decisions, and the output."""

    config: MonitorConfig
    failed_probes: int
    last_report: ConnectivityReport | None
    _governor: ProbeGovernor
    _window: CertificateWindow
    _ema: LossEMA
    _probe: ObjectiveProbe | None
    _tracker: ConnectivityTracker | None
    _writer: Any
    _train_batches: list[Any]
    _eval_batches: list[Any] | None
    _sharpness_vector: tuple[bool, dict[str, torch.Tensor]] | None
    _caching_seconds: float

    def _allowed(self, trainer: pl.Trainer, kind: str, units: float = 1.0) -> bool:
        """The governor's decision, identical on every rank (a probe runs only if every rank allows it)."""
        if math.isinf(self.config.max_overhead):
            return True  # the same on every rank without a collective
        allowed = trainer.strategy.reduce_boolean_decision(self._governor.allows(kind, units), all=True)
        if not allowed:
            self._governor.defer(kind)
        return allowed

    def _affordable_segments(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int | None:
        """How many of the previous snapshots the budget lets this probe compare with, newest first (the same
        on every rank: the minimum over ranks); None to defer it. The consecutive pair comes first, so the
        dip is measured every time the budget allows anything; older pairs as far as it reaches."""
        tracker = self._tracker
        assert tracker is not None
        full = len(tracker.previous())
        if math.isinf(self.config.max_overhead):
            return full
        units = self._governor.affordable_units("connectivity")
        if units < 1.0:
            local = -1  # not even the new snapshot's own loss
        elif math.isinf(units):
            local = full
        else:
            local = min(full, int((units - 1.0) // (self.config.probe_points - 2)))
        reduced = trainer.strategy.reduce(torch.tensor(float(local), device=pl_module.device), reduce_op="min")
        segments = int(reduced.item())
        if segments < 0 or (segments == 0 and full > 0):
            return None
        return segments

    def _run_certificate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        start = time.perf_counter()
        result = line_probe_session(trainer).result(trainer, pl_module, batch, batch_idx)
        # The EMA is linear: the mean over ranks of (m, n) is the EMA of the rank-mean losses.
        packed = self._ema.packed()
        local = [0.0, 0.0] if packed is None else packed  # a rank without a finite loss yet sends (0, 0)
        (mean, count), _ = reduce_with_flag(reducer(trainer), local, size=2, device=pl_module.device)
        self._governor.record("certificate", time.perf_counter() - start)
        if result is None:
            return
        if result.failed:  # the session has warned, naming the error
            self.failed_probes += 1
            self._log(trainer, {})
            return
        if not result.update_norm_sq > 0:
            # The step did not move (lr 0, or a GradScaler-skipped fp16 step): nothing to certify.
            return
        cert = certificate(result.loss_before, result.loss_after, result.line, result.update_norm_sq)
        self._window.record(cert.decrease, self._ema.corrected(mean, count))
        self._log(trainer, {**cert.metrics(), **self._window.metrics()})

    def _run_sharpness(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = time.perf_counter()
        values: list[float] | None = None
        reading = None
        try:
            if self._probe is None or not self._train_batches:
                raise RuntimeError("no cached training batch for the sharpness probe")
            init_preconditioned, init = self._sharpness_vector or (False, None)
            with isolated_rng():
                batch = detached_copy(self._train_batches[0], pl_module.device)
                reading = measure_sharpness(
                    self._probe, trainer.optimizers[0], batch, seed=probe_seed(trainer.global_step),
                    iters=self.config.sharpness_iters, tol=self.config.sharpness_tol, init=init,
                    init_preconditioned=init_preconditioned,
                )
            self._sharpness_vector = (reading.preconditioned, reading.vector)
            values = [reading.sharpness]
        except Exception as error:
            self._report_local_failure("sharpness", trainer, error)
        (sharpness,), failed = reduce_with_flag(reducer(trainer), values, size=1, device=pl_module.device)
        self._governor.record("sharpness", time.perf_counter() - start)
        if failed or reading is None or not math.isfinite(sharpness):
            self._skip_failed("sharpness", trainer)
            return
        self._log(trainer, reading.metrics(sharpness))

    def _run_connectivity(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, segments: int
    ) -> ConnectivityReport | None:
        tracker = self._tracker
        assert tracker is not None and self._probe is not None
        theta = self._probe.parameters()
        values = None
        try:
            with isolated_rng():
                device = pl_module.device
                batches = [detached_copy(b, device) for b in self._evaluation_batches(trainer)]
                recalibration = [
                    detached_copy(b, device) for b in self._train_batches[: self.config.bn_recalibration_batches]
                ]
                loss = EvalLoss(self._probe, batches, recalibration, seed=CONNECTIVITY_SEED)
                values = tracker.local_losses(theta, loss, segments)
        except Exception as error:
            self._report_local_failure("connectivity", trainer, error)
        losses, failed = reduce_with_flag(
            reducer(trainer), values, size=tracker.num_evaluations(segments), device=pl_module.device
        )
        if failed:
            self._skip_failed("connectivity", trainer)
            return None
        self.last_report = tracker.commit(
            theta, losses, epoch=trainer.current_epoch, step=trainer.global_step, segments=segments
        )
        return self.last_report

    def _evaluation_batches(self, trainer: pl.Trainer) -> list[Any]:
        """The first ``probe_batches`` validation batches (this rank's shard), cached on first use;
        the first training batches when there is no validation loader."""
        if self._eval_batches is None:
            start = time.perf_counter()
            # Called inside isolated_rng: creating the loader's iterator draws from the torch RNG.
            batches = cached_validation_batches(trainer, self.config.probe_batches, self.config.snapshot_device)
            if not batches:
                rank_zero_info("StabilityMonitor: no validation batches; the connectivity probes use the first"
                               " training batches instead.")
                batches = list(self._train_batches[: self.config.probe_batches])
            if not batches:
                raise RuntimeError("no batches to evaluate the connectivity probe on")
            self._eval_batches = batches
            # A one-time cost: charged to the budget but kept out of the cost per point evaluation.
            self._caching_seconds = time.perf_counter() - start
        return self._eval_batches

    def _skip_failed(self, kind: str, trainer: pl.Trainer) -> None:
        self.failed_probes += 1
        rank_zero_warn(f"StabilityMonitor: the {kind} probe at step {trainer.global_step} failed on at least one"
                       " rank and was skipped on every rank; training continues.")
        self._log(trainer, {})

    def _report_local_failure(self, kind: str, trainer: pl.Trainer, error: BaseException) -> None:
        # Not rank_zero_warn: the failing rank may not be rank 0, and it is the one that knows why.
        warnings.warn(
            f"StabilityMonitor: the {kind} probe raised on rank {trainer.global_rank} at step"
            f" {trainer.global_step} ({type(error).__name__}: {error}); it is skipped on every rank and"
            f" training continues. {probe_failure_advice(error)}",
            RuntimeWarning,
            stacklevel=2,
        )

    # ------------------------------------------------------------------ output
    def _log(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        """Scalars to every logger (they write on rank 0) and into ``callback_metrics``.

        The step is the one Lightning's own logging and ``LearningRateMonitor`` use (batches that
        stepped), so a certificate of optimizer step t lands at t next to that step's ``train_loss``.
        ``log_every_n_steps`` is not applied: the probes have their own, sparser cadence.
        """
        metrics = {
            **metrics,
            "monitor/deferred_probes": float(self._governor.total_deferred),
            "monitor/failed_probes": float(self.failed_probes),
            "monitor/overhead": self._governor.overhead(),
        }
        start = time.perf_counter()
        step = log_step(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        put_callback_metrics(trainer, metrics)
        self._governor.charge("logging", time.perf_counter() - start)

    def _write_figures(self, trainer: pl.Trainer, report: ConnectivityReport) -> None:
        """The path figure and the pairwise heatmap, on rank 0 with a TensorBoard writer, when the budget allows.

        Governed as a kind of its own (no collective: only rank 0 draws, and drawing calls none).
        """
        if not (self.config.log_figures and self._writer is not None and report.segments):
            return
        if not self._governor.allows("figures"):
            return  # not counted in monitor/deferred_probes: only rank 0 draws, and the counts must agree
        from lightning_stablelr.tensorboard import pairwise_heatmap, path_figure, write_figure

        start = time.perf_counter()
        step = log_step(trainer)
        write_figure(self._writer, "connectivity/path", path_figure(report.segments), step)
        matrix = report.matrix
        write_figure(self._writer, "connectivity/pairwise", pairwise_heatmap(matrix.values.numpy(), matrix.labels), step)
        self._governor.record("figures", time.perf_counter() - start)
