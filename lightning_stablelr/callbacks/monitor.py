"""StabilityMonitor: measures how stable training is and writes it to every logger; never changes training.

The callback holds three instruments (certificates, sharpness, connectivity), each with its own state and
one ``run``, as Lightning's ``ThroughputMonitor`` holds the pure ``Throughput``; its hooks only decide
what is due, ask the governor, dispatch, and log what the instrument returned.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_deprecation, rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_stablelr.callbacks._connectivity_instrument import ConnectivityInstrument
from lightning_stablelr.callbacks._governor import ProbeGovernor, StandingCost, timed_as_standing
from lightning_stablelr.callbacks._instruments import (
    CertificateInstrument,
    InstrumentRun,
    ProbeContext,
    SharpnessInstrument,
)
from lightning_stablelr.callbacks._lightning_access import dispatch_noop_hook, reducer
from lightning_stablelr.callbacks._monitor_config import MonitorConfig, apply_deprecated
from lightning_stablelr.callbacks._monitor_io import (
    has_monitor_metric,
    log_monitor_metrics,
    open_tensorboard,
    validation_batches,
    write_connectivity_figures,
)
from lightning_stablelr.callbacks._monitor_policy import MonitorPolicy
from lightning_stablelr.callbacks._monitor_state import MonitorState
from lightning_stablelr.callbacks._monitor_support import detached_copy
from lightning_stablelr.callbacks.line_probe_session import LineProbeSession, line_probe_session
from lightning_stablelr.probe import ObjectiveProbe

__all__ = ["StabilityMonitor"]

# Drawing both figures measured 0.2-0.8 s on a loaded CPU: a cost prior until the first is measured.
_FIGURES_PRIOR_SECONDS = 0.5
# Callback hooks Lightning calls per training batch: batch start and end, before and after backward, before
# the optimizer step and before zero_grad (automatic optimization; a non-stepping accumulation batch has 4, a
# few µs less). Each dispatch costs the same for every callback (standing cost).
_HOOKS_PER_BATCH = 6
_WARNED_DEPRECATIONS: set[str] = set()


class StabilityMonitor(MonitorState, Callback):
    r"""Observe training and log Lyapunov certificates, sharpness and connectivity; never change training.

    Scalars go to every logger at the step Lightning's ``self.log`` uses, and into ``callback_metrics``;
    figures and the custom-scalars layout to a TensorBoard logger, on rank 0. Probes evaluate the loss at
    parameters of the monitor's choosing through :class:`~lightning_stablelr.ObjectiveProbe`: weights,
    gradients, BatchNorm statistics, ``.training`` flags and the random streams are left as they were.

    - **Certificates** (:attr:`certificates`), every ``certificate_every_n_steps`` optimizer steps, from
      the three-point line probe ``L0 = L(θ)``, ``L+ = L(θ + Δθ)``, ``L- = L(θ - Δθ)`` on the step's batch
      (shared with :class:`~lightning_stablelr.StableLR`, computed once): ``lyapunov/delta_v = L+ - L0``,
      ``decrease = [delta_v <= 0]``, ``first_order = (L+ - L-)/2``, ``curvature = (L+ + L- - 2 L0)/‖Δθ‖²``,
      ``step_margin = s_max``, ``taylor_error``; over the last ``certificate_window`` certificates
      ``certified_rate`` and ``ema_decrease``; ``val_decrease`` at each validation.
    - **Sharpness** (:attr:`sharpness`), every ``sharpness_every_n_steps`` steps, on the first training
      batch (cached): ``lyapunov/sharpness`` (λ_max of the Hessian; for Adam/AdamW λ_max(P^-1/2 H P^-1/2)),
      ``stability_threshold``, ``eos_ratio = sharpness / threshold`` and ``max_stable_lr = lr / eos_ratio``.
    - **Connectivity** (:attr:`connectivity`), at the end of every ``connectivity_every_n_epochs`` epochs:
      a snapshot of θ (in ``snapshot_dtype``, within ``snapshot_memory``), and the loss along the segments
      to each of the previous ``connectivity_window`` snapshots, in eval mode on ``connectivity_batches``
      cached validation batches, BatchNorm recalibrated on ``bn_recalibration_batches`` training batches:
      ``connectivity/barrier``, ``sublevel_excess``, ``superlevel_dip``, ``connected``,
      ``equiconnectedness``, and the figures ``connectivity/path`` and ``connectivity/pairwise``.
    - **Budget**: a probe runs only while the monitor's time (probes, logging, and per batch its hooks and
      Lightning's dispatch of them) stays within ``max_overhead`` of the training time (:class:`~lightning_stablelr.callbacks._monitor_policy.MonitorPolicy`): each instrument runs at
      least once per epoch when the budget affords it (a certificate or sharpness probe not yet run is due
      at the epoch's last batch), skipped probes are counted in ``monitor/deferred_probes``, an instrument
      skipped for a whole epoch is named once in a warning, and ``monitor/overhead`` is the measured ratio.

    Under DDP every rank calls every collective: the numbers are averaged across ranks (identical
    everywhere) and a probe failing on one rank is skipped everywhere (``monitor/failed_probes``).

    Args:
        certificate_every_n_steps: optimizer steps between certificates; 0 turns them off.
        certificate_window: certificates in ``certified_rate`` and ``ema_decrease``.
        sharpness_every_n_steps: optimizer steps between sharpness measurements; 0 turns them off.
        sharpness_iters: most Hessian-vector products per measurement (warm-started, so few are needed).
        sharpness_tol: relative tolerance that stops the power iteration early.
        connectivity_every_n_epochs: epochs between connectivity probes; 0 turns them off.
        connectivity_window: previous snapshots compared with the newest (4 float16 snapshots of fp32
            parameters, and the newest, are the default ``snapshot_memory``).
        connectivity_points: points per segment, endpoints included (>= 3).
        connectivity_batches: validation batches each point is evaluated on (cached once; the first
            training batches when there is no validation loader).
        connected_tol: ``connected`` is ``sublevel_excess <= connected_tol`` (absolute, loss units).
        bn_recalibration_batches: training batches for the BatchNorm statistics at each point (0 keeps
            the module's running statistics); unused without BatchNorm.
        snapshot_memory: the most memory the snapshots take: a float is a multiple of the trainable
            parameters' size, an int is bytes. The window shrinks to fit it (said once).
        snapshot_dtype: the dtype snapshots are stored in: float16 halves fp32 snapshots and kept every
            connectivity metric within 0.2% of fp32 (bfloat16 was up to 2% off; ``tests/test_monitor_memory.py``);
            a tensor beyond float16's range stays in its own dtype; ``"float32"`` for exact.
        ema_decay: decay per training batch of the loss EMA behind ``ema_decrease``.
        monitor: the validation loss key in ``callback_metrics`` for ``val_decrease``.
        max_overhead: the monitor's time (probes, logging, hooks) as a fraction of training time; ``math.inf``
            runs every probe.
        snapshot_device: where snapshots and cached batches are kept.
        log_figures: write the connectivity figures (TensorBoard only).
        **deprecated: ``val_monitor`` (now ``monitor``), ``probe_every_n_epochs``, ``probe_points``,
            ``probe_batches``, ``snapshot_window`` (now ``connectivity_*``) and ``window`` (both windows);
            each warns once.

    Raises:
        ValueError: an argument out of its range (the message names it, the value and what to do).
        TypeError: an unknown keyword argument.

    Example::

        trainer = L.Trainer(callbacks=[StableLR(), StabilityMonitor(sharpness_every_n_steps=200)])
    """

    reports_taylor_error = True  # the shared line probe keeps g for gᵀΔθ (LineProbeSession.exact_derivative_wanted)

    def __init__(
        self,
        certificate_every_n_steps: int = 32,
        certificate_window: int = 16,
        sharpness_every_n_steps: int = 500,
        sharpness_iters: int = 20,
        sharpness_tol: float = 1e-3,
        connectivity_every_n_epochs: int = 1,
        connectivity_window: int = 4,
        connectivity_points: int = 5,
        connectivity_batches: int = 2,
        connected_tol: float = 1e-3,
        bn_recalibration_batches: int = 4,
        snapshot_memory: float | int = 2.5,
        snapshot_dtype: str | torch.dtype = "float16",
        ema_decay: float = 0.98,
        monitor: str = "val_loss",
        max_overhead: float = 0.05,
        snapshot_device: str | torch.device = "cpu",
        log_figures: bool = True,
        **deprecated: Any,
    ) -> None:
        super().__init__()
        arguments = {name: value for name, value in locals().items() if name in MonitorConfig.__dataclass_fields__}
        for message in set(apply_deprecated(arguments, deprecated)) - _WARNED_DEPRECATIONS:
            _WARNED_DEPRECATIONS.add(message)
            rank_zero_deprecation(message)
        self.config = config = MonitorConfig(**arguments)
        # The key names of the first release, so that checkpoints written by it still load.
        self._state_key = self._generate_state_key(
            certificate_every_n_steps=config.certificate_every_n_steps,
            sharpness_every_n_steps=config.sharpness_every_n_steps,
            probe_every_n_epochs=config.connectivity_every_n_epochs,
        )
        self.certificates = CertificateInstrument(config.certificate_window, config.ema_decay)
        self.sharpness = SharpnessInstrument(config.sharpness_iters, config.sharpness_tol)
        self.connectivity = ConnectivityInstrument.from_config(config)
        self._governor = ProbeGovernor(config.max_overhead, config.probe_kinds, prior_costs={"figures": _FIGURES_PRIOR_SECONDS})
        self._policy = MonitorPolicy(self._governor, config.minimal_units(self.sharpness.FIRST_ITERS))
        self._standing = StandingCost(self._governor)
        self._certificate_step: int | None = None
        self._last_step_seen = -1
        #: The line-probe session; the one of the first callback carrying one is shared by all.
        self.line_probe = LineProbeSession()
        self._reset_runtime()

    @property
    def failed_probes(self) -> int:
        """Probes that raised on some rank and were skipped on every rank."""
        return self._policy.failed_probes

    @property
    def last_report(self) -> Any:
        """The latest connectivity probe (``ConnectivityReport``), None before the first."""
        return self.connectivity.last_report

    # ------------------------------------------------------------------ state
    @property
    @override
    def state_key(self) -> str:
        # Lightning reads this on every hook call (profiler names): computed once, the config is frozen.
        return self._state_key

    def _reset_runtime(self) -> None:
        self._probe: ObjectiveProbe | None = None
        self._writer: Any = None
        self._train_batches: list[Any] = []  # the sharpness batch and BatchNorm recalibration batches
        self._warned: set[str] = set()  # missing validation metrics already warned about

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._reset_runtime()
        self.sharpness.reset()
        line_probe_session(trainer).reset(exact_derivative=LineProbeSession.exact_derivative_wanted(trainer))
        self._probe = ObjectiveProbe(pl_module, forward_context=trainer.precision_plugin.forward_context)
        if self.config.connectivity_every_n_epochs:
            message = self.connectivity.setup(self._probe.parameters())
            if message is not None:  # the window shrank to the budget (info), or connectivity is off (warning)
                (rank_zero_warn if self.connectivity.tracker is None else rank_zero_info)(message)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._governor.start()
        self._standing.calibrate(lambda: dispatch_noop_hook(trainer, self), _HOOKS_PER_BATCH)
        self._last_step_seen = trainer.global_step
        self._writer = open_tensorboard(trainer, self._governor, self.config)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._policy.start_epoch()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        # A step due for a certificate: its probe replays this forward's random draws and reuses its loss as L0.
        # Not timed as standing cost on every batch: the watch, on due steps only, is the certificate's (like its copy of θ).
        step = trainer.global_step
        if self._certificate_due(step) and trainer.accumulate_grad_batches == 1:
            start = time.perf_counter()
            line_probe_session(trainer).watch_forward(step, trainer.current_epoch, idx)
            self._governor.charge("certificate", time.perf_counter() - start)

    @override
    @timed_as_standing(charge_batch=False)
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Decided here, not in on_train_batch_start: every callback has made its request by now (a step that
        # StableLR probes anyway costs nothing), and with gradient accumulation this is the stepping batch.
        step = trainer.global_step
        every = self.config.certificate_every_n_steps
        # One certificate per batch, of its first step (a batch may step several optimizers).
        if not every or (self._certificate_step is not None and self._certificate_step >= self._last_step_seen):
            return
        session = line_probe_session(trainer)
        if session.requested(step):
            # StableLR probes this step anyway: certify it for free (the probe is computed once).
            session.snapshot(trainer, pl_module)
            self._certificate_step = step
            return
        if not self._certificate_due(step) and not self._policy.catch_up(trainer, "certificate"):
            return
        if self._policy.allowed(trainer, "certificate"):
            start = time.perf_counter()  # copying θ (and g) is the certificate's too
            session.request(step)
            session.snapshot(trainer, pl_module)
            self._governor.charge("certificate", time.perf_counter() - start)
            self._certificate_step = step

    @override
    @timed_as_standing(charge_batch=True)
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            # Lightning divides the loss by the accumulation; the EMA tracks the loss itself.
            accumulate = trainer.accumulate_grad_batches
            self.certificates.observe_loss(loss if accumulate == 1 else loss * accumulate)
        if len(self._train_batches) < self.config.train_batches_needed:
            self._train_batches.append(detached_copy(batch, self.config.snapshot_device))
        first, self._last_step_seen = self._last_step_seen, trainer.global_step  # this batch's first step
        stepped = trainer.global_step != first
        if stepped and self._certificate_step is not None and self._certificate_step >= first:
            step, self._certificate_step, session = self._certificate_step, None, line_probe_session(trainer)
            run = self.certificates.run(
                lambda: session.result(trainer, pl_module, batch, batch_idx, step=step, outputs=outputs),
                self._context(trainer, pl_module),
            )
            self._account(trainer, "certificate", run)
        every = self.config.sharpness_every_n_steps
        due = stepped and every and (trainer.global_step % every == 0 or self._policy.catch_up(trainer, "sharpness", stepped=True))
        iters = self._policy.sharpness_iters(trainer, self.config.sharpness_iters, self.sharpness.FIRST_ITERS) if due else None
        if iters is not None:
            batch = self._train_batches[0] if self._train_batches else None
            run = self.sharpness.run(self._probe, trainer.optimizers[0], batch, self._context(trainer, pl_module), iters)
            self._account(trainer, "sharpness", run)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        key = self.config.monitor
        if trainer.state.fn != "fit" or trainer.sanity_checking or not has_monitor_metric(trainer, key, self._warned):
            return
        value = torch.as_tensor(trainer.callback_metrics[key], dtype=torch.float64)
        value = trainer.strategy.reduce(value.to(pl_module.device), reduce_op="mean")
        metrics = self.certificates.observe_validation(float(value))
        if metrics:
            self._log(trainer, metrics)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        config = self.config
        every = config.connectivity_every_n_epochs
        metrics: dict[str, float] = {}
        if every and (trainer.current_epoch + 1) % every == 0 and self.connectivity.tracker is not None:
            segments = self._policy.connectivity_segments(trainer, pl_module, self.connectivity)
            if segments is not None:  # None: deferred
                assert self._probe is not None
                run = self.connectivity.run(self._probe, segments, lambda: validation_batches(trainer, config),
                                            self._train_batches, self._context(trainer, pl_module))  # fmt: skip
                self._policy.account(trainer, "connectivity", run)
                if run.ran:
                    self._write_figures(trainer)
                metrics = run.metrics
        self._policy.warn_deferred_epoch(trainer)
        self._log(trainer, metrics)

    # ------------------------------------------------------------------ helpers
    def _certificate_due(self, step: int) -> bool:
        """Steps n-1, 2n-1, ... (``n = certificate_every_n_steps``): StableLR's check convention, so that equal
        cadences coincide; never with certificates off."""
        every = self.config.certificate_every_n_steps
        return bool(every) and (step + 1) % every == 0

    def _context(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ProbeContext:
        return ProbeContext(reducer(trainer), pl_module.device, trainer.global_rank, trainer.global_step,
                            trainer.current_epoch)  # fmt: skip

    def _account(self, trainer: pl.Trainer, kind: str, run: InstrumentRun) -> None:
        self._policy.account(trainer, kind, run)
        if run.ran or run.failed:  # a failure still logs the counters
            self._log(trainer, run.metrics)

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        counters = {"monitor/deferred_probes": float(self._governor.total_deferred),
                    "monitor/failed_probes": float(self.failed_probes)}  # fmt: skip
        log_monitor_metrics(trainer, self._governor, {**metrics, **counters})

    def _write_figures(self, trainer: pl.Trainer) -> None:
        report = self.connectivity.last_report
        if self.config.log_figures and self._writer is not None and report is not None and report.segments:
            write_connectivity_figures(trainer, self._writer, self._governor, report)
