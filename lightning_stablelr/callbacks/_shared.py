"""Per-trainer coordination between the callbacks: the shared line probe and DDP-consistent reductions.

Both :class:`~lightning_stablelr.StableLR` and :class:`~lightning_stablelr.StabilityMonitor` may want
the three-point probe (:mod:`lightning_stablelr.line_probe`) of the same optimizer step. The
:class:`LineProbeSession` of a trainer computes it once and hands the cached result to the second
caller. Protocol (every rank, same order):

- ``on_train_batch_start`` (StableLR) or ``on_before_optimizer_step`` before ``snapshot`` (the monitor,
  which first asks ``session.requested(step)`` so it can certify StableLR's steps for free):
  ``session.request(trainer.global_step)`` on the steps a callback wants;
- ``on_before_optimizer_step``: ``session.snapshot(trainer, pl_module)`` (clones θ only when requested);
- ``on_train_batch_end``: ``session.result(trainer, pl_module, batch, batch_idx)`` → the result or None.

Every collective is entered by every rank: losses and a per-rank failure flag travel in one
all-reduce, so a probe that raises on one rank yields ``finite=False`` everywhere instead of a hang.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_stablelr.line_probe import LineProbeResult, three_point_losses
from lightning_stablelr.probe import ObjectiveProbe

__all__ = [
    "LineProbeSession",
    "RankMeanAccumulator",
    "all_finite",
    "any_across_ranks",
    "infer_steps_per_epoch",
    "line_probe_session",
    "log_to_loggers",
    "mean_across_ranks",
    "nonfinite_across_ranks",
    "param_group_lr_names",
    "probe_seed",
    "put_callback_metrics",
    "set_group_lr",
]

# Keyed weakly by trainer: the session dies with its trainer and never travels inside a pickled callback.
_SESSIONS: weakref.WeakKeyDictionary[pl.Trainer, LineProbeSession] = weakref.WeakKeyDictionary()

_SEED_OFFSET = 0x5EED


def probe_seed(step: int) -> int:
    """The RNG seed of the probe of optimizer step ``step``: fixed per step, equal on every rank."""
    return _SEED_OFFSET + int(step)


def mean_across_ranks(trainer: pl.Trainer, values: Tensor) -> Tensor:
    """Element-wise mean of ``values`` over all ranks (identity on one process). Every rank must call it."""
    return trainer.strategy.reduce(values, reduce_op="mean")


def any_across_ranks(trainer: pl.Trainer, flag: Tensor | bool) -> bool:
    """True if ``flag`` is true on any rank; one collective and one host sync. Every rank must call it."""
    if not isinstance(flag, Tensor):
        flag = torch.tensor(bool(flag))
    device = trainer.strategy.root_device if trainer.world_size > 1 else flag.device
    total = trainer.strategy.reduce(flag.detach().to(device=device, dtype=torch.float32), reduce_op="sum")
    return bool(total.item() > 0)


def all_finite(tensors: list[Tensor]) -> Tensor:
    """0-d bool tensor: every element of every tensor is finite. No host sync (the caller decides when).

    Uses the max-abs norm, which stays finite for any finite input (a 2-norm could overflow to inf).
    Exact but slow on CPU; :func:`nonfinite_across_ranks` calls it only when the fast test is in doubt.
    """
    if not tensors:
        return torch.tensor(True)
    device = tensors[0].device
    checks: list[Tensor] = []
    for group in _by_device_and_dtype(tensors):
        try:
            norms = torch._foreach_norm(group, ord=math.inf)
        except (RuntimeError, TypeError, NotImplementedError):  # sparse or exotic tensors
            norms = [tensor.abs().max() if tensor.numel() else tensor.new_zeros(()) for tensor in group]
        checks.append(torch.stack([norm.float() for norm in norms]).isfinite().all().to(device))
    return torch.stack(checks).all()


def _by_device_and_dtype(tensors: list[Tensor]) -> list[list[Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    return list(groups.values())


def _norm_total(tensors: list[Tensor]) -> Tensor:
    """0-d fp32 sum of the 2-norms (fused): finite if every element is finite and nothing overflows."""
    if not tensors:
        return torch.zeros(())
    device = tensors[0].device
    totals: list[Tensor] = []
    for group in _by_device_and_dtype(tensors):
        try:
            norms = torch._foreach_norm(group, 2, dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            norms = [torch.linalg.vector_norm(tensor.float()) for tensor in group]
        totals.append(torch.stack(norms).sum().to(device))
    return totals[0] if len(totals) == 1 else torch.stack(totals).sum()


def nonfinite_across_ranks(trainer: pl.Trainer, tensors: list[Tensor]) -> bool:
    """True if any element of ``tensors`` is NaN/Inf on any rank. Every rank must call it.

    The common case costs one fused 2-norm, one collective (a sum, which propagates NaN/Inf) and one
    host sync. Only when the total is not finite (a NaN/Inf somewhere, or a huge but finite gradient
    whose square overflows) do all ranks run the exact max-abs test and a second collective, so the
    answer is exact.
    """
    total = _norm_total(tensors)
    if trainer.world_size > 1:
        total = trainer.strategy.reduce(total.to(trainer.strategy.root_device), reduce_op="sum")
    if math.isfinite(float(total)):
        return False
    return any_across_ranks(trainer, ~all_finite(tensors))


class RankMeanAccumulator:
    """Running sum and count of finite scalar losses, kept on their device (no host sync per step).

    :meth:`flush` returns ``(mean, count)`` over all ranks, ``mean = Σ_ranks sum / Σ_ranks count``, and
    resets; it is a collective, so every rank must call it at the same point.
    """

    def __init__(self) -> None:
        self._sum: Tensor | None = None
        self._count: Tensor | None = None
        self._cpu_sum = 0.0
        self._cpu_count = 0.0

    def add(self, value: Tensor, scale: float = 1.0) -> None:
        """Add ``scale · value`` if it is finite (decided on device; on CPU as Python floats, which is faster)."""
        if value.device.type == "cpu":
            number = float(value) * scale
            if math.isfinite(number):
                self._cpu_sum += number
                self._cpu_count += 1.0
            return
        value = value.detach().float().reshape(()) * scale
        finite = value.isfinite()
        if self._sum is None or self._count is None or self._sum.device != value.device:
            self._sum, self._count = value.new_zeros(()), value.new_zeros(())
        self._sum = self._sum + torch.where(finite, value, torch.zeros_like(value))
        self._count = self._count + finite.float()

    def pending(self) -> tuple[float, float]:
        """This rank's ``(sum, count)`` not yet flushed (a host sync)."""
        if self._sum is None or self._count is None:
            return self._cpu_sum, self._cpu_count
        return float(self._sum) + self._cpu_sum, float(self._count) + self._cpu_count

    def flush(self, trainer: pl.Trainer) -> tuple[float, float] | None:
        """``(mean, count)`` over all ranks, or None when no rank saw a finite value; then reset."""
        local = torch.tensor([self._cpu_sum, self._cpu_count], device=trainer.strategy.root_device)
        if self._sum is not None and self._count is not None:
            local = local + torch.stack([self._sum, self._count]).to(local.device)
        self._sum = self._count = None
        self._cpu_sum = self._cpu_count = 0.0
        total, count = mean_across_ranks(trainer, local).tolist()
        if count <= 0:
            return None
        return total / count, count * trainer.world_size


class LineProbeSession:
    """Computes the three-point probe of a requested optimizer step once per trainer and caches it.

    ``request(step)`` is idempotent; ``snapshot`` clones the trainable parameters (detached) in
    ``on_before_optimizer_step`` of a requested step only; ``result`` (in ``on_train_batch_end``, after
    the step, so ``trainer.global_step == step + 1``) probes ``L(θ)``, ``L(θ + Δθ)``, ``L(θ - Δθ)`` on
    the step's batch, all-reduces ``[L0, L+, L-, ‖Δθ‖², failed]`` with a mean, and caches the
    :class:`~lightning_stablelr.line_probe.LineProbeResult`. ``discard(step)`` cancels a step whose
    update was dropped (non-finite gradients): its result is None for every caller.
    """

    def __init__(self) -> None:
        self._requested: set[int] = set()
        self._snapshot_step: int | None = None
        self._snapshot: dict[str, Tensor] | None = None
        self._gradient: dict[str, Tensor] | None = None
        self._discarded: int | None = None
        self._cached: LineProbeResult | None = None
        self._probe: ObjectiveProbe | None = None
        self._warned = False
        self.probes_run = 0

    def request(self, step: int) -> None:
        """Ask for the probe of optimizer step ``step`` (the ``global_step`` before that step)."""
        self._requested.add(int(step))

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
        self._snapshot = {
            name: parameter.detach().clone()
            for name, parameter in pl_module.named_parameters()
            if parameter.requires_grad
        }
        # The step's own gradient g gives the exact directional derivative gᵀΔθ that the line
        # model's first-order term a is checked against (the Taylor error). With gradient
        # accumulation g averages several micro-batches while the probe replays the last one, so
        # the comparison would measure batch noise, not the model: skip it there.
        # Active dropout differs too: g saw the training mask, the probe replays a seeded one.
        self._gradient = None
        if trainer.accumulate_grad_batches == 1 and not _has_active_dropout(pl_module):
            self._gradient = {
                name: parameter.grad.detach().clone()
                for name, parameter in pl_module.named_parameters()
                if parameter.requires_grad and parameter.grad is not None
            }
        self._snapshot_step = step

    def result(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> LineProbeResult | None:
        """The probe of the step just taken, or None when it was not requested, snapshotted or was discarded."""
        step = trainer.global_step - 1
        if self._cached is not None and self._cached.step == step:
            return self._cached
        if self._snapshot is None or self._snapshot_step != step or self._discarded == step:
            return None
        theta_before, gradient = self._snapshot, self._gradient
        self._snapshot, self._gradient, self._snapshot_step = None, None, None
        self._requested = {requested for requested in self._requested if requested > step}
        self._cached = self._compute(trainer, pl_module, batch, batch_idx, step, theta_before, gradient)
        return self._cached

    def _probe_for(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ObjectiveProbe:
        if self._probe is None or self._probe.module is not pl_module:
            self._probe = ObjectiveProbe(pl_module, forward_context=trainer.precision_plugin.forward_context)
        return self._probe

    def _compute(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        step: int,
        theta_before: dict[str, Tensor],
        gradient: dict[str, Tensor] | None = None,
    ) -> LineProbeResult:
        self.probes_run += 1
        error: BaseException | None = None
        try:
            probe = self._probe_for(trainer, pl_module)
            theta_after = probe.parameters()
            values = three_point_losses(
                probe, batch, theta_before, theta_after, batch_idx=batch_idx, seed=probe_seed(step)
            )
            directional = directional_derivative(gradient, theta_before, theta_after).to(values)
            packed = torch.cat([values, directional.reshape(1), values.new_zeros(1)])
        except Exception as exc:  # any rank may fail; all must still enter the collective below
            error = exc
            packed = torch.tensor([math.nan] * 5 + [1.0], device=pl_module.device)
        reduced = mean_across_ranks(trainer, packed).tolist()
        failed = reduced[5] > 0
        if failed and not self._warned:
            self._warned = True
            reason = f"{type(error).__name__}: {error}" if error is not None else "it failed on another rank"
            rank_zero_warn(
                f"The StableLR line probe failed at step {step} ({reason}); its checks are treated as"
                " non-finite. Implement `probe_loss(self, batch) -> Tensor` on your LightningModule if"
                " `training_step` cannot be replayed. This warning is shown once.",
            )
        derivative = reduced[4] if gradient is not None else None
        return LineProbeResult.from_losses(
            step, reduced[:3], reduced[3], failed=failed, directional_derivative=derivative
        )


def _has_active_dropout(module: torch.nn.Module) -> bool:
    """True when a dropout layer with ``p > 0`` is in training mode (its mask differs between calls)."""
    return any(
        isinstance(layer, torch.nn.modules.dropout._DropoutNd) and layer.training and layer.p > 0
        for layer in module.modules()
    )


def directional_derivative(
    gradient: dict[str, Tensor] | None, theta_before: dict[str, Tensor], theta_after: dict[str, Tensor]
) -> Tensor:
    """``gᵀΔθ = Σ_p ⟨g_p, θ_after,p - θ_before,p⟩`` in fp32 (NaN when no gradient was kept)."""
    device = next(iter(theta_after.values())).device if theta_after else torch.device("cpu")
    if not gradient:
        return torch.tensor(math.nan, device=device)
    terms = [
        (grad.float() * (theta_after[name].float() - theta_before[name].float())).sum()
        for name, grad in gradient.items()
    ]
    return torch.stack(terms).sum().to(device)


def line_probe_session(trainer: pl.Trainer) -> LineProbeSession:
    """The one :class:`LineProbeSession` of ``trainer`` (created on first use)."""
    session = _SESSIONS.get(trainer)
    if session is None:
        session = LineProbeSession()
        _SESSIONS[trainer] = session
    return session


# ---------------------------------------------------------------------------------------------------- trainer glue
def log_to_loggers(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Write ``metrics`` to every logger at the global step, as ``LearningRateMonitor`` does.

    Respects ``Trainer(log_every_n_steps)`` through the logger connector's ``should_update_logs``.
    """
    if not trainer.loggers or not trainer._logger_connector.should_update_logs:
        return
    step = trainer.fit_loop.epoch_loop._batches_that_stepped
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def put_callback_metrics(
    trainer: pl.Trainer, metrics: dict[str, float], cache: dict[str, tuple[float, Tensor]] | None = None
) -> None:
    """Store ``metrics`` as 0-d CPU tensors in ``trainer.callback_metrics`` (what EarlyStopping reads).

    Writes into the connector's dict directly: the public property rebuilds the logged metrics on every
    access, which is too slow for a per-step hot path. With ``cache`` (owned by the caller), a value
    that did not change reuses its tensor instead of allocating a new one.
    """
    target = getattr(trainer._logger_connector, "_callback_metrics", None)
    if target is None:
        target = trainer.callback_metrics
    for name, value in metrics.items():
        value = float(value)
        cached = cache.get(name) if cache is not None else None
        if cached is not None and (cached[0] == value or (math.isnan(value) and math.isnan(cached[0]))):
            tensor = cached[1]
        else:
            tensor = torch.tensor(value)
            if cache is not None:
                cache[name] = (value, tensor)
        target[name] = tensor


def param_group_lr_names(optimizers: list[torch.optim.Optimizer], prefix: str) -> dict[tuple[int, int], str]:
    """Metric name of each ``(optimizer index, group index)``.

    One group in total: ``{prefix}``. Several: ``{prefix}-{name}`` with the group's ``"name"`` key or
    ``pg{j}``, and ``{prefix}-opt{i}-...`` when there are several optimizers. Duplicated names fall
    back to the index.
    """
    keys = [(i, j) for i, optimizer in enumerate(optimizers) for j in range(len(optimizer.param_groups))]
    if len(keys) == 1:
        return {keys[0]: prefix}
    labels = {(i, j): optimizers[i].param_groups[j].get("name") or f"pg{j}" for i, j in keys}
    counts: dict[tuple[int, str], int] = {}
    for (i, _), label in labels.items():
        counts[(i, label)] = counts.get((i, label), 0) + 1
    names = {}
    for (i, j), label in labels.items():
        if counts[(i, label)] > 1:
            label = f"pg{j}"
        names[(i, j)] = f"{prefix}-opt{i}-{label}" if len(optimizers) > 1 else f"{prefix}-{label}"
    return names


def set_group_lr(group: dict[str, Any], lr: float) -> None:
    """Set a param group's lr in place, keeping a Tensor lr a Tensor (capturable/fused optimizers need it)."""
    current = group["lr"]
    if isinstance(current, Tensor):
        current.fill_(lr)
    else:
        group["lr"] = lr


def infer_steps_per_epoch(trainer: pl.Trainer, owner: str) -> int:
    """Optimizer steps per epoch: ``ceil(num_training_batches / accumulate_grad_batches)``.

    Lightning also steps on the last, incomplete accumulation of an epoch, hence the ceiling. A train
    loader without length (IterableDataset) has no epoch; then the validation interval
    (``Trainer(val_check_interval=k)``) stands in for it, and without one this raises.
    """
    accumulate = max(1, int(trainer.accumulate_grad_batches))
    batches = trainer.num_training_batches
    if math.isfinite(batches) and batches > 0:
        return max(1, math.ceil(batches / accumulate))
    val_check = trainer.val_check_batch
    if isinstance(val_check, (int, float)) and math.isfinite(val_check) and val_check > 0:
        steps = max(1, math.ceil(val_check / accumulate))
        rank_zero_info(
            f"{owner}: the train dataloader has no length, so one 'epoch' of the decay is the validation"
            f" interval: {steps} optimizer steps. Pass `steps_per_epoch` to choose another unit."
        )
        return steps
    raise MisconfigurationException(
        f"{owner}(interval='step') counts time in epochs, but the train dataloader has no length and there is"
        " no step-based validation interval. Pass `steps_per_epoch=N` (optimizer steps per epoch of decay),"
        " or set `Trainer(val_check_interval=N)`."
    )
