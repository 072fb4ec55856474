"""The line probe shared by StableLR and StabilityMonitor: computed once per optimizer step.

Both :class:`~lightning_stablelr.StableLR` and :class:`~lightning_stablelr.StabilityMonitor` may want
the three-point probe (:mod:`lightning_stablelr.line_probe`) of the same optimizer step. Each of them
carries a :class:`LineProbeSession` (``callback.line_probe``), and both use the same one:
:func:`line_probe_session` returns the session of the *first* callback in ``trainer.callbacks`` that
carries one, whatever order the hooks run in, so there is no registry and no order rule. A custom
callback takes part by carrying its own ``line_probe = LineProbeSession()``.

Protocol (every rank, same order):

- ``on_train_batch_start`` (StableLR) or ``on_before_optimizer_step`` before ``snapshot`` (the monitor,
  which first asks ``session.requested(step)`` so it can certify StableLR's steps for free):
  ``session.request(trainer.global_step)`` on the steps a callback wants;
- ``on_before_optimizer_step``: ``session.snapshot(trainer, pl_module)`` (clones θ only when requested);
- ``on_train_batch_end``: ``session.result(trainer, pl_module, batch, batch_idx, outputs=outputs)`` → the result
  or None.

**The training step's own draws, and two passes instead of three.** StableLR (on its check steps) and the
monitor (on steps due for a certificate) call ``watch_forward(step, epoch, batch_idx)`` as the last thing of
``on_train_batch_start``, before the forward: it copies the random streams' states
(:func:`~lightning_stablelr.rng.rng_states`, ~40 µs). With ``accumulate_grad_batches == 1``, automatic
optimization and unsharded parameters, every probe point then starts from those states instead of
:func:`~lightning_stablelr.rng.probe_seed`: the replay draws exactly what the training step drew (its dropout
masks), so it measures the loss whose gradient the optimizer followed, and ``L0`` is the loss the training step
already computed. That loss (``outputs``) stands in for the replayed ``L0`` once the probe has *reproduced*
it bit for bit, which it checks on the first such check of a fit and again every
:attr:`~lightning_stablelr.line_probe.TrainingLossReuse.REVERIFY_EVERY` (16) of them; a mismatch (a ``probe_loss`` other than the training loss, a
loss that depends on ``global_step``, random draws between the batch start and the forward) turns the reuse
off for the rest of the fit. The line model is the same as with three passes, one forward pass cheaper
(:class:`~lightning_stablelr.line_probe.TrainingLossReuse`). The verification's flags travel in the probe's
all-reduce, so every rank runs the same passes; FSDP2 keeps ``probe_seed`` and three passes.

Losses and a per-rank failure flag travel in one all-reduce
(:func:`~lightning_stablelr.collectives.reduce_with_flag`), so a probe that raises on one rank yields
``failed=True`` everywhere instead of a hang.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_stablelr.callbacks._lightning_access import reducer
from lightning_stablelr.collectives import reduce_with_flag
from lightning_stablelr.line_probe import (
    LineProbeResult,
    TrainingLossReuse,
    directional_derivative,
    has_active_dropout,
    three_point_losses,
)
from lightning_stablelr.probe import ObjectiveProbe
from lightning_stablelr.rng import ProbeSeed, RngStates, probe_seed, rng_states

__all__ = ["LineProbeSession", "line_probe_session"]


def line_probe_session(trainer: pl.Trainer) -> LineProbeSession:
    """The session shared by every callback of ``trainer``: that of the first callback carrying one.

    Raises:
        MisconfigurationException: no callback of ``trainer`` carries a ``line_probe`` session.
    """
    for callback in trainer.callbacks:
        session = getattr(callback, "line_probe", None)
        if isinstance(session, LineProbeSession):
            return session
    raise MisconfigurationException(
        "No callback of this Trainer carries a LineProbeSession (`callback.line_probe`). Add StableLR or"
        " StabilityMonitor, or give your callback `self.line_probe = LineProbeSession()`."
    )


class LineProbeSession:
    """Computes the three-point probe of a requested optimizer step once and caches it.

    ``request(step)`` is idempotent; ``snapshot`` clones the trainable parameters (detached) in
    ``on_before_optimizer_step`` of a requested step only; ``result`` (in ``on_train_batch_end``, after
    the step, so ``trainer.global_step == step + 1``) probes ``L(θ)``, ``L(θ + Δθ)``, ``L(θ - Δθ)`` on
    the step's batch, all-reduces ``[L0, L+, L-, ‖Δθ‖², gᵀΔθ, mismatch, inconclusive]`` with a mean and a failure flag, and
    caches the :class:`~lightning_stablelr.line_probe.LineProbeResult`. ``discard(step)`` cancels a step
    whose update was dropped (non-finite gradients): its result is None for every caller.

    With :attr:`exact_derivative` (set at each fit's start from :meth:`exact_derivative_wanted`: a
    :class:`~lightning_stablelr.StabilityMonitor`, whose certificates report it), ``snapshot`` also keeps the step's
    gradient g (when ``accumulate_grad_batches == 1``, and either no dropout is active or the probe replays the
    watched step's own masks), and the result's line model compares its first-order term with the exact ``gᵀΔθ``
    (the Taylor error). StableLR's guard reads only the step margin, so alone it skips that copy and the
    two passes of ``gᵀΔθ``. The probe seed is :func:`~lightning_stablelr.rng.probe_seed`, or on watched steps the
    training step's own random states (module docstring).
    """

    def __init__(self) -> None:
        #: Keep g and compute ``gᵀΔθ`` for the Taylor error (set per fit by ``reset(exact_derivative=...)``).
        self.exact_derivative = False
        self.reset()
        self._warned = False

    @staticmethod
    def exact_derivative_wanted(trainer: pl.Trainer) -> bool:
        """Whether a callback of ``trainer`` reports the Taylor error against ``gᵀΔθ`` (class attribute
        ``reports_taylor_error``, True on StabilityMonitor): the session then keeps each probed step's g."""
        return any(getattr(callback, "reports_taylor_error", False) for callback in trainer.callbacks)

    def reset(self, exact_derivative: bool | None = None) -> None:
        """Forget every request, snapshot and cached result (each callback calls it when a fit starts);
        ``exact_derivative=True``: from now on keep g for the Taylor error (:attr:`exact_derivative`)."""
        if exact_derivative is not None:
            self.exact_derivative = exact_derivative
        self._requested: set[int] = set()
        self._snapshot_step: int | None = None
        self._snapshot: dict[str, Tensor] | None = None
        self._gradient: dict[str, Tensor] | None = None
        self._discarded: int | None = None
        self._cached: LineProbeResult | None = None
        self._probe: ObjectiveProbe | None = None
        self._watched: tuple[tuple[int, int, int], RngStates] | None = None
        #: When the training loss stands in for L0 (:class:`~lightning_stablelr.line_probe.TrainingLossReuse`).
        self.reuse = TrainingLossReuse()
        self.probes_run = 0

    def __getstate__(self) -> dict[str, Any]:
        # Snapshots, gradients and the module reference belong to one running fit.
        state = self.__dict__.copy()
        state.update(_snapshot=None, _gradient=None, _probe=None, _cached=None, _snapshot_step=None, _watched=None)
        return state

    def request(self, step: int) -> None:
        """Ask for the probe of optimizer step ``step`` (the ``global_step`` before that step)."""
        self._requested.add(int(step))

    def watch_forward(self, step: int, epoch: int = 0, batch_idx: int = 0) -> None:
        """Before the forward pass of requested step ``step`` (``on_train_batch_start``): copy the random
        streams' states, so that the probe can replay the training step's own draws and its loss can stand in
        for ``L0`` (module docstring). About 40 µs; on check steps only."""
        self._watched = ((int(step), int(epoch), int(batch_idx)), rng_states())

    def requested(self, step: int) -> bool:
        """Whether some callback asked for ``step``."""
        return int(step) in self._requested

    def discard(self, step: int) -> None:
        """The update of ``step`` was dropped: release the snapshot and give no result for it."""
        self._discarded = int(step)
        if self._snapshot_step == step:
            self._snapshot, self._snapshot_step = None, None

    def snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Clone θ before the optimizer step if this step was requested (first caller only)."""
        step = trainer.global_step
        if step not in self._requested or self._snapshot_step == step or self._discarded == step:
            return
        trainable = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]
        self._snapshot = {name: parameter.detach().clone() for name, parameter in trainable}
        # With gradient accumulation g averages several micro-batches while the probe replays the last
        # one, and active dropout draws another mask than a probe seeded with probe_seed: the comparison would
        # measure noise, not the model, so g is kept only without either, or when the probe replays this
        # step's own draws (a watched step: the masks g was computed with).
        self._gradient = None
        if self.exact_derivative and trainer.accumulate_grad_batches == 1 and (
            not has_active_dropout(pl_module) or self._watched_states(trainer, pl_module, step) is not None
        ):
            self._gradient = {name: p.grad.detach().clone() for name, p in trainable if p.grad is not None}
        self._snapshot_step = step

    def _objective_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ObjectiveProbe:
        if self._probe is None or self._probe.module is not pl_module:
            self._probe = ObjectiveProbe(pl_module, forward_context=trainer.precision_plugin.forward_context)
        return self._probe

    def _watched_states(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, batch_idx: int | None = None
    ) -> RngStates | None:
        """The random states watched before the forward of ``step`` (and of batch ``batch_idx`` when given), if the
        probe of ``step`` replays them, else None: with gradient accumulation it replays the last micro-batch
        only, manual optimization has no single forward, and under FSDP2 every forward all-gathers, so a rank
        whose outputs lacked a loss (three passes) would hang the others (two): these keep ``probe_seed``."""
        if self._watched is None or trainer.accumulate_grad_batches != 1 or not pl_module.automatic_optimization:
            return None
        (watched_step, epoch, watched_batch), states = self._watched
        # (step, epoch, batch_idx): not a watch left by a batch that never stepped (on_train_batch_start -> -1)
        if (watched_step, epoch) != (step, trainer.current_epoch) or batch_idx not in (None, watched_batch):
            return None
        return None if self._objective_probe(trainer, pl_module).sharded else states

    def result(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        step: int | None = None,
        *,
        outputs: Any = None,
    ) -> LineProbeResult | None:
        """The probe of ``step`` (default: the step just taken, ``global_step - 1``), or None when it was not
        requested, snapshotted or was discarded. Pass the ``global_step`` the batch started at when one batch
        steps several optimizers (manual optimization): the probe then covers the whole batch's update.
        ``outputs``: the ``on_train_batch_end`` outputs, whose loss may stand in for ``L0`` (module docstring)."""
        step = trainer.global_step - 1 if step is None else int(step)
        if self._cached is not None and self._cached.step == step:
            return self._cached
        if self._snapshot is None or self._snapshot_step != step or self._discarded == step:
            return None
        theta_before, gradient = self._snapshot, self._gradient
        self._snapshot, self._gradient, self._snapshot_step = None, None, None
        self._requested = {requested for requested in self._requested if requested > step}
        states = self._watched_states(trainer, pl_module, step, batch_idx)
        self._watched = None
        # Every point starts from the watched states (the training step's own draws), else from probe_seed; then
        # the training step's loss may stand in for L0.
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        usable = states is not None and isinstance(loss, Tensor) and loss.numel() == 1
        seed = probe_seed(step) if states is None else states
        self._cached = self._compute(
            trainer, pl_module, batch, batch_idx, step, theta_before, gradient, seed, loss.detach() if usable else None
        )
        return self._cached

    def _compute(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        step: int,
        theta_before: dict[str, Tensor],
        gradient: dict[str, Tensor] | None,
        seed: ProbeSeed,
        training_loss: Tensor | None = None,
    ) -> LineProbeResult:
        self.probes_run += 1
        error: BaseException | None = None
        values: Tensor | None = None
        known: Tensor | None = None
        try:
            probe = self._objective_probe(trainer, pl_module)
            verify, known = self.reuse.plan(training_loss)
            theta_after = probe.parameters()
            losses = three_point_losses(
                probe, batch, theta_before, theta_after, batch_idx=batch_idx, seed=seed, loss_before=known,
            )  # fmt: skip
            derivative = directional_derivative(gradient, theta_before, theta_after).to(losses)
            flags = self.reuse.flags(losses[0], training_loss, verify)
            values = torch.cat([losses, derivative.reshape(1), flags])
        except Exception as exc:  # any rank may fail; all must still enter the collective below
            error = exc
        # fp32 on every rank, also on one that failed: the collective needs the same dtype everywhere.
        reduced, failed = reduce_with_flag(
            reducer(trainer), values, size=7, device=pl_module.device, dtype=torch.float32
        )
        if not failed:  # the flags were reduced: every rank decides alike, so all run the same passes
            self.reuse.record(training_loss is not None, reduced[5], reduced[6], reused=known is not None)
        if failed and not self._warned:
            self._warned = True
            reason = f"{type(error).__name__}: {error}" if error is not None else "it failed on another rank"
            rank_zero_warn(
                f"The StableLR line probe failed at step {step} ({reason}); such checks are skipped: they"
                " leave the stability factor C unchanged, so the guard does not act on them. Implement `probe_loss(self, batch) -> Tensor` on your LightningModule if"
                " `training_step` cannot be replayed. This warning is shown once.",
            )
        derivative_value = reduced[4] if gradient is not None else None
        return LineProbeResult.from_losses(
            step, reduced[:3], reduced[3], failed=failed, directional_derivative=derivative_value
        )
