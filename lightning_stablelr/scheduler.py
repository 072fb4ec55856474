"""StableLR as a ``torch.optim.lr_scheduler.LRScheduler`` for plain PyTorch and Fabric (no Lightning import).

For param group ``g`` with base learning rate ``η0_g`` and ``k = last_epoch`` optimizer steps taken,

    η_g(k) = η0_g · max(min_lr_ratio,  warmup(k) · exp(-λ·t) · G) · C

with ``t = k / steps_per_epoch`` (``interval="step"``) or ``t = k // steps_per_epoch`` (``"epoch"``).
``G`` and ``C`` come from :class:`~lightning_stablelr.controller.StableLRController`; see
:mod:`lightning_stablelr.schedule` for their rules. Every lr is recomputed from ``base_lrs`` and ``k``,
so nothing drifts, and ``state_dict()`` reproduces the trajectory exactly after a resume.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_stablelr._process_group import all_reduce, check_step_training_loss, world_size
from lightning_stablelr._scheduler_state import StepOrder, checked_scheduler_state
from lightning_stablelr._sharded_probe import reshard, restored_in_place
from lightning_stablelr.config import CheckCadence, StableLRConfig, make_config
from lightning_stablelr.controller import GapDecision, StableLRController
from lightning_stablelr.curvature import LineModel, line_model
from lightning_stablelr.line_probe import TrainingLossReuse, line_losses
from lightning_stablelr.nonfinite import NonfiniteTracker
from lightning_stablelr.rng import isolated_rng
from lightning_stablelr.validation import check_int_at_least

__all__ = ["StableLRScheduler"]

_NOT_STATE = ("optimizer", "controller", "_snapshot", "cadence", "_nonfinite", "loss_reuse", "_order")


_CADENCE = CheckCadence()


class StableLRScheduler(LRScheduler):
    """Exponential decay, validation-gap factor and curvature guard, as one torch LR scheduler.

    ``η_g = η0_g · max(min_lr_ratio, warmup(k) · exp(-λt) · G) · C`` after ``k`` optimizer steps
    (``last_epoch`` counts optimizer steps, as in ``OneCycleLR``). Call :meth:`step` once per optimizer step::

        scheduler = StableLRScheduler(optimizer, steps_per_epoch=len(loader))
        for x, y in loader:
            optimizer.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); optimizer.step()
            scheduler.observe(train_loss=loss.item()); scheduler.step()
        scheduler.observe(val_loss=evaluate(model))    # once per validation: updates G

    The curvature guard (``C``) needs the loss on the same batch at three points of the line through the
    update ``Δθ``: call :meth:`snapshot` just before ``optimizer.step()`` and :meth:`check_step` just after::

        if scheduler.should_check():    # the callback's cadence: dense early, then every n-th step
            scheduler.snapshot()
        optimizer.step()
        if scheduler.should_check():
            scheduler.check_step(lambda: loss_fn(model(x), y))

    NaN/Inf protection: call :meth:`protect` between ``loss.backward()`` and ``optimizer.step()``.

    Under ``torch.distributed`` (DDP, or FSDP2's ``fully_shard`` with sharded ``DTensor`` parameters) every
    rank takes the same decisions: :meth:`check_step` averages the three losses over the ranks and writes
    the probe points into each rank's local shards (the same ``Δθ`` everywhere), and :meth:`protect`
    takes the maximum of the non-finite flag over the ranks; so every rank keeps the same lr.

    Args:
        optimizer: the wrapped optimizer; ``base_lrs`` are the groups' ``initial_lr`` (their ``lr`` at creation).
        steps_per_epoch: optimizer steps per epoch (``>= 1``): converts steps to the epochs ``t`` of the decay.
        config: a :class:`~lightning_stablelr.config.StableLRConfig`; or pass its fields as keyword
            ``**overrides`` (``decay_rate=``, ``half_life=``, ...; the same names and defaults as the callback).
        check_every_n_steps, dense_check_steps: the guard's cadence, read by :meth:`should_check` (see
            :class:`~lightning_stablelr.config.CheckCadence`; the callback's defaults).
        total_steps: optimizer steps of the whole run; with neither ``decay_rate`` nor ``half_life`` the
            decay then holds, and cools down exponentially to ``anneal_to`` over the last
            ``anneal_fraction`` of the run. Without it (and without a decay) the lr does not decay, with
            one warning.
        last_epoch: optimizer steps already taken; ``-1`` starts fresh (prefer :meth:`load_state_dict` to resume).

    Raises:
        TypeError: a keyword argument is not a :class:`~lightning_stablelr.config.StableLRConfig` field.
        ValueError: a value is out of its range (the message names it), or both ``config`` and overrides are given.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        steps_per_epoch: int,
        config: StableLRConfig | None = None,
        check_every_n_steps: int = _CADENCE.check_every_n_steps,
        dense_check_steps: int = _CADENCE.dense_check_steps,
        total_steps: int | None = None,
        last_epoch: int = -1,
        **overrides: Any,
    ) -> None:
        self.steps_per_epoch = check_int_at_least(
            "steps_per_epoch",
            steps_per_epoch,
            1,
            "Pass the number of optimizer steps per epoch, e.g. len(loader).",
        )
        self.cadence = CheckCadence(check_every_n_steps, dense_check_steps)
        self.controller = StableLRController(make_config(config, overrides, type(self).__name__))
        if total_steps is not None:
            check_int_at_least("total_steps", total_steps, 1, "Pass the run's number of optimizer steps.")
            self.controller.set_run_length(total_steps, self.steps_per_epoch)
        elif self.controller.config.run_length_decay:
            warnings.warn(
                "StableLRScheduler: no `total_steps` and no `decay_rate`/`half_life`, so the lr does not decay"
                " (the default decay follows the run's length). Pass total_steps=<optimizer steps of the"
                " run> to anneal to `anneal_to`, or decay_rate=0 to silence this.",
                UserWarning,
                stacklevel=2,
            )
        self._snapshot: list[torch.Tensor] | None = None
        self._nonfinite = NonfiniteTracker()
        self._last_flagged_step: int | None = None  # the last step protect() flagged and C counted
        #: When ``check_step(..., loss=)`` lets the step's training loss stand in for L0 (verified, see there).
        self.loss_reuse = TrainingLossReuse()
        self._order = StepOrder(optimizer)  # check_step's warning when snapshot() is taken after the step
        super().__init__(optimizer, last_epoch)

    def step(self, epoch: int | None = None) -> None:
        """torch's ``LRScheduler.step``; it also closes the optimizer step for :meth:`check_step`'s order check."""
        super().step(epoch)
        self._order.scheduler_stepped()

    def should_check(self, step: int | None = None) -> bool:
        """Whether optimizer step ``step`` (default: the next one, ``last_epoch``) runs the guard, by the
        same rule as the :class:`~lightning_stablelr.StableLR` callback (:class:`~lightning_stablelr.config.CheckCadence`),
        plus the confirmation check the guard asks for after a low margin."""
        step = self.last_epoch if step is None else step
        scheduled = self.cadence.should_check(step, self.controller.stability_factor < 1.0)
        if scheduled:  # a check step reads the non-finite steps counted on the device so far
            self._resolve_nonfinite()
        # A low margin asks for a confirmation check at the next step (cleared by that check).
        return scheduled or self.controller.confirm_pending

    def protect(self, loss: torch.Tensor | None = None) -> None:
        """Neutralise this step if ``loss`` or a gradient is NaN/Inf (on any rank); call it between
        ``loss.backward()`` and ``optimizer.step()``.

        Decided on the device without a host sync (:class:`~lightning_stablelr.nonfinite.NonfiniteTracker`):
        a fused optimizer skips the step, any other applies zero gradients (sharded gradients: their local
        shards). Under ``torch.distributed`` the flag is maximised over the ranks (one small all-reduce).
        Such steps are counted, and halve ``C``, at the next check step, :meth:`observe` or :meth:`state_dict`.
        """
        if loss is not None:
            self._nonfinite.record_loss(loss)
        reduce_flag = (lambda flag: all_reduce(flag, "max")) if world_size() > 1 else None
        self._nonfinite.protect(self.optimizer, max(self.last_epoch, 0), reduce_flag=reduce_flag)

    def _resolve_nonfinite(self) -> None:
        """Count the steps protect() flagged since the last call into ``C``; remember the last such step."""
        count, last = self._nonfinite.take()  # flags already maximised over the ranks: no collective here
        if count:
            self._last_flagged_step = last
            for _ in range(count):
                self.controller.observe_nonfinite()
            self._apply_lrs()

    # ------------------------------------------------------------------ the closed form
    def get_lr(self) -> list[float]:
        """``[η0_g · controller.factor(k, t) for each group]`` at ``k = last_epoch`` (the floor is inside the factor)."""
        step = self.last_epoch
        elapsed = self._epochs(step)
        return [self.controller.lr(float(base_lr), step, elapsed) for base_lr in self.base_lrs]

    def _epochs(self, step: int) -> float:
        """``t`` of optimizer step ``step``: fractional epochs, or the integer epoch with ``interval="epoch"``."""
        return self.controller.epochs_elapsed(step, self.steps_per_epoch, step // self.steps_per_epoch)

    _get_closed_form_lr = get_lr

    def _apply_lrs(self) -> None:
        # G or C changed between two steps: the next optimizer step must already use the new lr.
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = [float(group["lr"]) for group in self.optimizer.param_groups]

    # ------------------------------------------------------------------ observations
    def observe(
        self, train_loss: float | torch.Tensor | None = None, val_loss: float | torch.Tensor | None = None
    ) -> GapDecision | None:
        """Feed the losses; the new lr applies from the next optimizer step.

        ``train_loss`` (one optimizer step's loss) joins the running mean since the last validation; a
        non-finite one counts as a non-finite step and halves ``C`` (:meth:`observe_nonfinite`), once: a step
        that :meth:`protect` already flagged is not counted again.
        ``val_loss`` triggers the gap update (``L_tr`` = that running mean) and returns its
        :class:`~lightning_stablelr.controller.GapDecision`; otherwise returns None.
        """
        loss = None if train_loss is None else float(train_loss)
        if loss is not None and math.isfinite(loss):
            self.controller.record_train_loss(loss)
        self._resolve_nonfinite()
        # A non-finite loss counts once: not again when protect() flagged this step (counted here, or already by
        # should_check() or state_dict() since).
        if loss is not None and not math.isfinite(loss) and self._last_flagged_step != max(self.last_epoch, 0):
            self.controller.observe_nonfinite()
        decision = None
        if val_loss is not None:
            decision = self.controller.observe_validation(float(val_loss))
        self._apply_lrs()
        return decision

    def observe_nonfinite(self) -> float:
        """Report a step with a NaN/Inf loss or gradient: ``C ← max(min_stability_factor, C/2)``; returns ``C``."""
        factor = self.controller.observe_nonfinite()
        self._apply_lrs()
        return factor

    def observe_line(self, l0: float, l_plus: float, l_minus: float) -> LineModel:
        """Update ``C`` from ``L0 = L(θ)``, ``L+ = L(θ+Δθ)``, ``L- = L(θ-Δθ)`` measured by the caller."""
        line = line_model(l0, l_plus, l_minus)
        step = max(self.last_epoch, 0)
        self.controller.observe_line(line, step, self._epochs(step))
        self._apply_lrs()
        return line

    # ------------------------------------------------------------------ the line-model guard
    def _parameters(self) -> list[torch.Tensor]:
        return [param for group in self.optimizer.param_groups for param in group["params"]]

    def snapshot(self) -> None:
        """Copy ``θ_before`` (every parameter of the optimizer); call it just before ``optimizer.step()``."""
        with torch.no_grad():
            self._snapshot = [param.detach().clone() for param in self._parameters()]
        self._order.snapshot_taken()

    def check_step(
        self,
        closure: Callable[[], float | torch.Tensor],
        *,
        seed: int | None = None,
        module: torch.nn.Module | None = None,
        loss: torch.Tensor | None = None,
    ) -> LineModel:
        """Measure the line model of the step just taken and update ``C``; call it just after ``optimizer.step()``.

        ``closure()`` must return the loss on the current batch at the model's current parameters (it runs
        under ``torch.no_grad``). It is called at ``θ_after = θ_before + Δθ`` (``L+``), ``θ_before`` (``L0``)
        and ``θ_before - Δθ`` (``L-``), in that order, with the parameters written in place; afterwards they are restored
        bit-exactly to ``θ_after``, also when the closure raises. ``.grad`` is never touched. The three points
        are those of the callbacks' probe (:func:`~lightning_stablelr.line_probe.line_losses`) and run inside
        :func:`~lightning_stablelr.rng.isolated_rng`, re-seeded with ``seed`` (default: the step count;
        the callbacks use :func:`~lightning_stablelr.rng.probe_seed`) before each, so all three see the
        same dropout masks and the caller's random streams are unchanged. Pass ``module=model`` when the closure
        runs the model in train mode with BatchNorm: its buffers (running statistics) are then restored
        bit-exactly too; with FSDP2 pass it always: its units are resharded after each point, so that no
        forward reuses parameters gathered at another point. Returns the :class:`LineModel`.

        ``loss``: the loss this step's ``backward`` used (the closure's loss at ``θ_before``, without gradient
        accumulation). It then stands in for ``L0``, two closure calls instead of three, once a replay has
        reproduced it bit for bit: the first such check, and every 16th after it, replays ``L0`` anyway and
        compares; one mismatch (dropout or other random draws in the closure, which the seeded replay draws
        differently; a closure that is not the trained loss) ends the reuse (:attr:`loss_reuse`,
        :class:`~lightning_stablelr.line_probe.TrainingLossReuse`).

        Raises:
            RuntimeError: :meth:`snapshot` was not called before the step, or the param groups changed since.
        """
        if self._snapshot is None:
            raise RuntimeError(
                "check_step() needs the parameters before the step: call scheduler.snapshot() just before "
                "optimizer.step(), then scheduler.check_step(closure) after it."
            )
        params = self._parameters()
        training = check_step_training_loss(loss, params[0].device)  # checked before the snapshot is used
        before, self._snapshot = self._snapshot, None
        if len(before) != len(params):
            raise RuntimeError(
                f"The optimizer has {len(params)} parameters but the snapshot holds {len(before)}: call "
                "snapshot() again after changing the param groups."
            )
        seed = self.last_epoch if seed is None else seed
        buffers = list(module.buffers()) if module is not None else []
        keys = [str(index) for index in range(len(params))]
        verify, known = self.loss_reuse.plan(training)

        def evaluate(points: Sequence[Mapping[str, torch.Tensor]]) -> list[torch.Tensor]:
            losses: dict[int, torch.Tensor] = {}
            # θ_after first, at the parameters as the step left them: points are [L0, L+, L-] or [L+, L-]
            order = (1, 0, 2) if len(points) == 3 else (0, 1)
            with isolated_rng() as reseed:
                for index in order:
                    for param, key in zip(params, keys):
                        param.copy_(points[index][key])
                    reseed(seed)
                    try:
                        value = closure()  # a Python float is a double: keep it one
                    finally:
                        if module is not None:  # FSDP2: the next point must gather the shards just written
                            reshard(module)
                    losses[index] = value if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float64)
            return [losses[index] for index in range(len(points))]

        with restored_in_place(params, buffers, module) as (after, _):
            values = line_losses(evaluate, dict(zip(keys, before)), dict(zip(keys, after)), loss_before=known)
        flags = TrainingLossReuse.flags(values[0], training, verify)
        values = torch.cat([values, flags])
        if world_size() > 1:  # every rank probes its own batch: the decision uses the mean over ranks
            values = all_reduce(values, "mean")
        loss_before, loss_plus, loss_minus, norm_sq, mismatch, inconclusive = values.tolist()
        self._order.checked(norm_sq)
        self.loss_reuse.record(training is not None, mismatch, inconclusive, reused=known is not None)
        return self.observe_line(loss_before, loss_plus, loss_minus)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Torch's scheduler state (``last_epoch``, ``base_lrs``, ...) plus ``"controller"`` (primitives only)."""
        self._resolve_nonfinite()
        state = {key: value for key, value in self.__dict__.items() if key not in _NOT_STATE}
        state["controller"] = self.controller.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` and set the groups' lrs for the restored step (the config is kept; a
        foreign state or one of another number of param groups raises ValueError before anything changes)."""
        groups = len(self.optimizer.param_groups)
        self.__dict__.update(checked_scheduler_state(state_dict, _NOT_STATE, groups=groups, steps_per_epoch=self.steps_per_epoch))
        self.controller.load_state_dict(state_dict.get("controller", {}))
        if self.controller.total_steps is not None:  # the cool-down by this version's formula, not the saved one
            self.controller.set_run_length(self.controller.total_steps, self.steps_per_epoch)
        self._snapshot = None
        self._nonfinite = NonfiniteTracker()
        self._last_flagged_step = None
        self.loss_reuse = TrainingLossReuse()  # verified again after a resume
        self._apply_lrs()
