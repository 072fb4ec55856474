"""StabilityMonitor: measures how stable training is and writes it to every logger; never changes training."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_stablelr.callbacks._connectivity_probe import ConnectivityReport, ConnectivityTracker
from lightning_stablelr.callbacks._governor import ProbeGovernor
from lightning_stablelr.callbacks._monitor_config import MonitorConfig
from lightning_stablelr.callbacks._monitor_probes import MonitorProbes
from lightning_stablelr.callbacks._monitor_support import detached_copy
from lightning_stablelr.callbacks.line_probe_session import LineProbeSession, line_probe_session
from lightning_stablelr.certificates import CertificateWindow, LossEMA, ValidationTrend
from lightning_stablelr.probe import ObjectiveProbe

__all__ = ["StabilityMonitor"]

# Rendering the two figures to PNG measured 0.2-0.8 s on a loaded CPU, often more than the probe itself;
# until measured, this prior keeps the first figures from overshooting the budget of a short run.
_FIGURES_PRIOR_SECONDS = 0.5
_RUNTIME = ("_probe", "_writer", "_eval_batches", "_tracker", "_sharpness_vector", "last_report")


class StabilityMonitor(MonitorProbes, Callback):
    r"""Observe training and log Lyapunov certificates, sharpness and connectivity; never change training.

    Every number goes to every logger, at the step Lightning's ``self.log`` uses (so the certificate of
    optimizer step t sits next to that batch's ``train_loss``), and into ``trainer.callback_metrics``;
    figures and the custom-scalars layout go only to a TensorBoard logger, on rank 0. All probes are
    evaluated at parameters of the monitor's choosing through :class:`~lightning_stablelr.ObjectiveProbe`
    (``probe_loss`` if the module defines it, else its silenced ``training_step``): weights, gradients,
    BatchNorm statistics, ``.training`` flags and the random streams are left exactly as they were.

    - **Certificates**, every ``certificate_every_n_steps`` optimizer steps, from the three-point line
      probe ``L0 = L(θ)``, ``L+ = L(θ + Δθ)``, ``L- = L(θ - Δθ)`` on the step's batch (shared with
      :class:`~lightning_stablelr.StableLR`, computed once): ``lyapunov/delta_v = L+ - L0``,
      ``decrease = [delta_v <= 0]``, ``first_order = (L+ - L-)/2``, ``curvature = (L+ + L- - 2 L0)/‖Δθ‖²``,
      ``step_margin = s_max``, ``taylor_error``; over the last ``certificate_window`` certificates
      ``certified_rate`` and ``ema_decrease`` (the training-loss EMA went down); ``val_decrease`` at
      each validation.
    - **Sharpness**, every ``sharpness_every_n_steps`` steps, on the first training batch (cached):
      ``lyapunov/sharpness`` (λ_max of the Hessian; for Adam/AdamW the preconditioned sharpness
      λ_max(P^-1/2 H P^-1/2)), ``stability_threshold`` ((2 + 2β)/lr for SGD, (2 + 2β1)/((1 - β1) lr) for
      Adam), ``eos_ratio = sharpness / threshold`` and ``max_stable_lr = lr / eos_ratio``.
    - **Connectivity**, at the end of every ``probe_every_n_epochs`` epochs: a snapshot of θ, and the
      loss along the segments to each of the previous ``snapshot_window`` snapshots, in eval mode on
      ``probe_batches`` cached validation batches, BatchNorm recalibrated at every point on
      ``bn_recalibration_batches`` training batches: ``connectivity/barrier``, ``sublevel_excess``,
      ``superlevel_dip``, ``connected`` (latest consecutive pair), ``equiconnectedness`` (largest
      barrier in the window), and the figures ``connectivity/path`` and ``connectivity/pairwise``.
    - **Governor**: a probe runs only while the monitor's time stays within ``max_overhead`` of the
      training time, each kind (certificates, sharpness, connectivity, figures) within an equal share;
      skipped probes are counted in ``monitor/deferred_probes``, and a connectivity probe that cannot
      afford every segment measures the newest ones (the consecutive pair first). ``monitor/overhead``
      is the ratio measured on this rank (rank 0's is the one written).

    Under DDP every rank calls every collective: each rank probes its own batches, the numbers are
    averaged across ranks (identical everywhere) and a probe failing on one rank is reported and
    skipped everywhere (``monitor/failed_probes``), never a hang.

    Args:
        certificate_every_n_steps: optimizer steps between certificates; 0 turns them off.
        window: default length of both windows below.
        certificate_window: certificates in ``certified_rate`` and ``ema_decrease`` (None: ``window``).
        snapshot_window: previous snapshots compared with the newest (None: ``window``).
        sharpness_every_n_steps: optimizer steps between sharpness measurements; 0 turns them off.
        sharpness_iters: most Hessian-vector products per measurement (warm-started, so few are needed).
        sharpness_tol: relative tolerance that stops the power iteration early.
        probe_every_n_epochs: epochs between connectivity probes; 0 turns them off.
        probe_points: points per segment, endpoints included (>= 3).
        probe_batches: validation batches the connectivity probes use (cached once; the first training
            batches when there is no validation loader).
        connected_tol: ``connected`` is ``sublevel_excess <= connected_tol`` (absolute, loss units).
        bn_recalibration_batches: training batches for the BatchNorm statistics at each point (0 keeps
            the module's running statistics); unused without BatchNorm.
        ema_decay: decay per training batch of the loss EMA behind ``ema_decrease``.
        val_monitor: the validation loss key in ``callback_metrics`` for ``val_decrease``.
        max_overhead: allowed probe time as a fraction of training time; ``math.inf`` runs every probe.
        snapshot_device: where snapshots and cached batches are kept.
        log_figures: write the connectivity figures (TensorBoard only).

    Example::

        trainer = L.Trainer(callbacks=[StableLR(), StabilityMonitor(sharpness_every_n_steps=200)])
    """

    def __init__(
        self,
        certificate_every_n_steps: int = 32,
        window: int = 16,
        certificate_window: int | None = None,
        snapshot_window: int | None = None,
        sharpness_every_n_steps: int = 500,
        sharpness_iters: int = 20,
        sharpness_tol: float = 1e-3,
        probe_every_n_epochs: int = 1,
        probe_points: int = 7,
        probe_batches: int = 4,
        connected_tol: float = 1e-3,
        bn_recalibration_batches: int = 4,
        ema_decay: float = 0.98,
        val_monitor: str = "val_loss",
        max_overhead: float = 0.05,
        snapshot_device: str | torch.device = "cpu",
        log_figures: bool = True,
    ) -> None:
        super().__init__()
        self.config = MonitorConfig(
            certificate_every_n_steps=certificate_every_n_steps, window=window,
            certificate_window=certificate_window, snapshot_window=snapshot_window,
            sharpness_every_n_steps=sharpness_every_n_steps, sharpness_iters=sharpness_iters,
            sharpness_tol=sharpness_tol, probe_every_n_epochs=probe_every_n_epochs, probe_points=probe_points,
            probe_batches=probe_batches, connected_tol=connected_tol,
            bn_recalibration_batches=bn_recalibration_batches, ema_decay=ema_decay, val_monitor=val_monitor,
            max_overhead=max_overhead, snapshot_device=snapshot_device, log_figures=log_figures,
        )  # fmt: skip
        config = self.config
        self._state_key = self._generate_state_key(
            certificate_every_n_steps=config.certificate_every_n_steps,
            sharpness_every_n_steps=config.sharpness_every_n_steps,
            probe_every_n_epochs=config.probe_every_n_epochs,
        )
        self._train_cache_size = self._needed_train_batches(config)
        self._window = CertificateWindow(config.certificate_window)
        self._ema = LossEMA(config.ema_decay)
        self._val_trend = ValidationTrend()
        kinds = [kind for kind, every in (("certificate", config.certificate_every_n_steps),
                                          ("sharpness", config.sharpness_every_n_steps),
                                          ("connectivity", config.probe_every_n_epochs),
                                          ("figures", config.probe_every_n_epochs and config.log_figures)) if every]
        self._governor = ProbeGovernor(config.max_overhead, kinds, prior_costs={"figures": _FIGURES_PRIOR_SECONDS})
        self.failed_probes = 0
        self._certificate_step: int | None = None
        self._last_step_seen = -1
        #: The line-probe session; the one of the first callback carrying one is shared by all.
        self.line_probe = LineProbeSession()
        self._reset_runtime()

    # ------------------------------------------------------------------ state
    @property
    @override
    def state_key(self) -> str:
        # Lightning reads this on every hook call (profiler names): computed once, the config is frozen.
        return self._state_key

    @override
    def state_dict(self) -> dict[str, Any]:
        """Primitives only: the certificate window, loss EMA, last validation loss and counters."""
        return {
            "version": 1,
            "window": self._window.state_dict(),
            "ema": self._ema.state_dict(),
            "val_trend": self._val_trend.state_dict(),
            "governor": self._governor.state_dict(),
            "failed_probes": self.failed_probes,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; missing keys keep their defaults (snapshots are not checkpointed)."""
        self._window.load_state_dict(state_dict.get("window", {}))
        self._ema.load_state_dict(state_dict.get("ema", {}))
        self._val_trend.load_state_dict(state_dict.get("val_trend", {}))
        self._governor.load_state_dict(state_dict.get("governor", {}))
        self.failed_probes = int(state_dict.get("failed_probes", 0))

    def __getstate__(self) -> dict[str, Any]:
        # Runtime caches (module references, batches, snapshots) never travel with a pickled callback.
        state = self.__dict__.copy()
        for name in _RUNTIME:
            state[name] = None
        state["_train_batches"] = []
        return state

    def _reset_runtime(self) -> None:
        self._probe: ObjectiveProbe | None = None
        self._writer: Any = None
        self._train_batches: list[Any] = []
        self._eval_batches: list[Any] | None = None
        self._tracker: ConnectivityTracker | None = None
        self._sharpness_vector: tuple[bool, dict[str, Tensor]] | None = None
        self._caching_seconds = 0.0
        #: The latest connectivity probe (segments, pairwise barrier matrix), None before the first.
        self.last_report: ConnectivityReport | None = None

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._reset_runtime()
        line_probe_session(trainer).reset()
        self._probe = ObjectiveProbe(pl_module, forward_context=trainer.precision_plugin.forward_context)
        config = self.config
        self._tracker = ConnectivityTracker(
            config.snapshot_window, config.probe_points, config.connected_tol, config.snapshot_device
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._governor.start()
        self._last_step_seen = trainer.global_step
        from lightning_stablelr.tensorboard import find_tensorboard_writer, write_layout_once

        self._writer = find_tensorboard_writer(trainer)
        if self._writer is not None:
            write_layout_once(self._writer)
        elif self.config.log_figures and self.config.probe_every_n_epochs:
            rank_zero_info(
                "StabilityMonitor: no TensorBoardLogger, so the figures connectivity/path and connectivity/pairwise"
                " are skipped; the scalars still go to every logger."
            )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Decided here, not in on_train_batch_start: every callback has made its request by now (a step that
        # StableLR probes anyway costs nothing), and with gradient accumulation this is the stepping batch.
        step = trainer.global_step
        every = self.config.certificate_every_n_steps
        if not every:
            return
        session = line_probe_session(trainer)
        if session.requested(step):
            # StableLR probes this step anyway: certify it for free (the probe is computed once).
            session.snapshot(trainer, pl_module)
            self._certificate_step = step
            return
        # Same convention as StableLR's checks (steps n-1, 2n-1, ...), so equal cadences coincide.
        if (step + 1) % every:
            return
        if self._allowed(trainer, "certificate"):
            start = time.perf_counter()
            session.request(step)
            session.snapshot(trainer, pl_module)
            self._certificate_step = step
            self._governor.charge("certificate", time.perf_counter() - start)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            # Lightning divides the loss by the accumulation; the EMA tracks the loss itself.
            accumulate = trainer.accumulate_grad_batches
            self._ema.update(loss if accumulate == 1 else loss * accumulate)
        if len(self._train_batches) < self._train_cache_size:
            self._train_batches.append(detached_copy(batch, self.config.snapshot_device))
        stepped = trainer.global_step != self._last_step_seen
        self._last_step_seen = trainer.global_step
        if stepped and self._certificate_step == trainer.global_step - 1:
            self._certificate_step = None
            self._run_certificate(trainer, pl_module, batch, batch_idx)
        every = self.config.sharpness_every_n_steps
        if stepped and every and trainer.global_step % every == 0 and self._allowed(trainer, "sharpness"):
            self._run_sharpness(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        key = self.config.val_monitor
        if trainer.state.fn != "fit" or trainer.sanity_checking or key not in trainer.callback_metrics:
            return
        value = torch.as_tensor(trainer.callback_metrics[key], dtype=torch.float64)
        value = trainer.strategy.reduce(value.to(pl_module.device), reduce_op="mean")
        decrease = self._val_trend.observe(float(value))
        if decrease is not None:
            self._log(trainer, {"lyapunov/val_decrease": decrease})

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = self.config.probe_every_n_epochs
        if every and (trainer.current_epoch + 1) % every == 0 and self._tracker is not None:
            segments = self._affordable_segments(trainer, pl_module)
            if segments is None:
                self._governor.defer("connectivity")
            else:
                units = self._tracker.num_evaluations(segments)
                self._caching_seconds = 0.0
                start = time.perf_counter()
                report = self._run_connectivity(trainer, pl_module, segments)
                once = self._caching_seconds
                self._governor.record("connectivity", time.perf_counter() - start - once, units)
                self._governor.charge("connectivity", once)
                if report is not None:
                    self._write_figures(trainer, report)
                    self._log(trainer, report.metrics())
                    return
        self._log(trainer, {})

    # ------------------------------------------------------------------ probes
    @staticmethod
    def _needed_train_batches(config: MonitorConfig) -> int:
        """Training batches kept: the sharpness batch, BatchNorm recalibration and the no-validation fallback."""
        if not (config.certificate_every_n_steps or config.sharpness_every_n_steps or config.probe_every_n_epochs):
            return 0
        needed = [1 if config.sharpness_every_n_steps else 0]
        if config.probe_every_n_epochs:
            needed += [config.bn_recalibration_batches, config.probe_batches]
        return max(needed)
