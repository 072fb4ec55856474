"""StableLR as a ``torch.optim.lr_scheduler.LRScheduler`` for plain PyTorch and Fabric (no Lightning import).

For param group ``g`` with base learning rate ``η0_g`` and ``k = last_epoch`` optimizer steps taken,

    η_g(k) = max(min_lr_ratio · η0_g,  η0_g · warmup(k) · exp(-λ·t) · G · C)

with ``t = k / steps_per_epoch`` (``interval="step"``) or ``t = k // steps_per_epoch`` (``"epoch"``).
``G`` and ``C`` come from :class:`~lightning_stablelr.controller.StableLRController`; see
:mod:`lightning_stablelr.schedule` for their rules. Every lr is recomputed from ``base_lrs`` and ``k``,
so nothing drifts, and ``state_dict()`` reproduces the trajectory exactly after a resume.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_stablelr.controller import GapDecision, StableLRConfig, StableLRController
from lightning_stablelr.curvature import LineModel, line_model
from lightning_stablelr.validation import check_int_at_least

__all__ = ["StableLRScheduler"]

_NOT_STATE = ("optimizer", "controller", "_snapshot")


class StableLRScheduler(LRScheduler):
    """Exponential decay, validation-gap factor and curvature guard, as one torch LR scheduler.

    ``η_g = max(min_lr_ratio·η0_g, η0_g · warmup(k) · exp(-λt) · G · C)`` after ``k`` optimizer steps
    (``last_epoch`` counts optimizer steps, as in ``OneCycleLR``). Call :meth:`step` once per optimizer step::

        scheduler = StableLRScheduler(optimizer, steps_per_epoch=len(loader))
        for x, y in loader:
            optimizer.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); optimizer.step()
            scheduler.observe(train_loss=loss.item()); scheduler.step()
        scheduler.observe(val_loss=evaluate(model))    # once per validation: updates G

    The curvature guard (``C``) needs the loss on the same batch at three points of the line through the
    update ``Δθ``: call :meth:`snapshot` just before ``optimizer.step()`` and :meth:`check_step` just after::

        scheduler.snapshot(); optimizer.step()
        scheduler.check_step(lambda: loss_fn(model(x), y))

    Args:
        optimizer: the wrapped optimizer; ``base_lrs`` are the groups' ``initial_lr`` (their ``lr`` at creation).
        steps_per_epoch: optimizer steps per epoch (``>= 1``): converts steps to the epochs ``t`` of the decay.
        decay_rate, half_life, interval, warmup_steps, min_lr_ratio, gap_tolerance, gap_strength, min_delta,
            gap_patience, safety, recovery, recover_above, min_stability_factor, guard_window, anneal_to,
            anneal_fraction: see
            :class:`~lightning_stablelr.controller.StableLRConfig` (same names, same defaults).
        total_steps: optimizer steps of the whole run; with neither ``decay_rate`` nor ``half_life`` the
            decay then reaches ``anneal_to`` at the last step. Without it (and without a decay) the lr
            does not decay, with one warning.
        last_epoch: optimizer steps already taken; ``-1`` starts fresh (prefer :meth:`load_state_dict` to resume).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        steps_per_epoch: int,
        decay_rate: float | None = None,
        half_life: float | None = None,
        interval: str = "step",
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.01,
        gap_tolerance: float = 0.25,
        gap_strength: float = 1.0,
        min_delta: float = 0.0,
        gap_patience: int = 1,
        safety: float = 0.25,
        recovery: float = 10.0,
        recover_above: float = 8.0,
        min_stability_factor: float = 1e-3,
        guard_window: int = 3,
        anneal_to: float = 0.01,
        anneal_fraction: float = 0.2,
        total_steps: int | None = None,
        last_epoch: int = -1,
    ) -> None:
        self.steps_per_epoch = check_int_at_least(
            "steps_per_epoch",
            steps_per_epoch,
            1,
            "Pass the number of optimizer steps per epoch, e.g. len(loader).",
        )
        config = StableLRConfig(
            decay_rate=decay_rate,
            half_life=half_life,
            interval=interval,
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
            gap_tolerance=gap_tolerance,
            gap_strength=gap_strength,
            min_delta=min_delta,
            gap_patience=gap_patience,
            safety=safety,
            recovery=recovery,
            recover_above=recover_above,
            min_stability_factor=min_stability_factor,
            guard_window=guard_window,
            anneal_to=anneal_to, anneal_fraction=anneal_fraction,
        )
        self.controller = StableLRController(config)
        if total_steps is not None:
            check_int_at_least("total_steps", total_steps, 1, "Pass the run's number of optimizer steps.")
            self.controller.set_run_length(total_steps, self.steps_per_epoch)
        elif config.run_length_decay:
            warnings.warn(
                "StableLRScheduler: no `total_steps` and no `decay_rate`/`half_life`, so the lr does not decay"
                " (the default decay follows the run's length). Pass total_steps=<optimizer steps of the"
                " run> to anneal to `anneal_to`, or decay_rate=0 to silence this.",
                UserWarning,
                stacklevel=2,
            )
        self._snapshot: list[torch.Tensor] | None = None
        super().__init__(optimizer, last_epoch)

    # ------------------------------------------------------------------ the closed form
    def get_lr(self) -> list[float]:
        """``[max(min_lr_ratio·η0_g, η0_g · controller.factor(k, t)) for each group]`` at ``k = last_epoch``."""
        step = self.last_epoch
        elapsed = self.controller.epochs_elapsed(step, self.steps_per_epoch, step // self.steps_per_epoch)
        return [self.controller.lr(float(base_lr), step, elapsed) for base_lr in self.base_lrs]

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
        non-finite one counts as a non-finite step and halves ``C`` (:meth:`observe_nonfinite`).
        ``val_loss`` triggers the gap update (``L_tr`` = that running mean) and returns its
        :class:`~lightning_stablelr.controller.GapDecision`; otherwise returns None.
        """
        if train_loss is not None:
            loss = float(train_loss)
            if math.isfinite(loss):
                self.controller.record_train_loss(loss)
            else:
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
        elapsed = self.controller.epochs_elapsed(step, self.steps_per_epoch, step // self.steps_per_epoch)
        self.controller.observe_line(line, step, elapsed)
        self._apply_lrs()
        return line

    # ------------------------------------------------------------------ the line-model guard
    def _parameters(self) -> list[torch.Tensor]:
        return [param for group in self.optimizer.param_groups for param in group["params"]]

    def snapshot(self) -> None:
        """Copy ``θ_before`` (every parameter of the optimizer); call it just before ``optimizer.step()``."""
        with torch.no_grad():
            self._snapshot = [param.detach().clone() for param in self._parameters()]

    def check_step(
        self,
        closure: Callable[[], float | torch.Tensor],
        *,
        seed: int | None = None,
        module: torch.nn.Module | None = None,
    ) -> LineModel:
        """Measure the line model of the step just taken and update ``C``; call it just after ``optimizer.step()``.

        ``closure()`` must return the loss on the current batch at the model's current parameters (it runs
        under ``torch.no_grad``). It is called at ``θ_after = θ_before + Δθ`` (``L+``), ``θ_before`` (``L0``)
        and ``θ_before - Δθ`` (``L-``), with the parameters written in place; afterwards they are restored
        bit-exactly to ``θ_after``, also when the closure raises. ``.grad`` is never touched. Each call runs
        under a forked RNG seeded with ``seed`` (default: the step count), so all three points see the same
        dropout masks and the caller's random stream is unchanged. Pass ``module=model`` when the closure
        runs the model in train mode with BatchNorm: its buffers (running statistics) are then restored
        bit-exactly too. Returns the :class:`LineModel`.
        """
        if self._snapshot is None:
            raise RuntimeError(
                "check_step() needs the parameters before the step: call scheduler.snapshot() just before "
                "optimizer.step(), then scheduler.check_step(closure) after it."
            )
        params = self._parameters()
        before, self._snapshot = self._snapshot, None
        if len(before) != len(params):
            raise RuntimeError(
                f"The optimizer has {len(params)} parameters but the snapshot holds {len(before)}: call "
                "snapshot() again after changing the param groups."
            )
        seed = self.last_epoch if seed is None else seed
        devices = sorted({param.device.index or 0 for param in params if param.device.type == "cuda"})

        def evaluate() -> float:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                return float(closure())

        buffers = list(module.buffers()) if module is not None else []
        with torch.no_grad():
            after = [param.detach().clone() for param in params]
            saved_buffers = [buffer.detach().clone() for buffer in buffers]
            try:
                loss_plus = evaluate()
                for param, start in zip(params, before):
                    param.copy_(start)
                loss_before = evaluate()
                for param, start, end in zip(params, before, after):
                    param.copy_(start - (end - start))
                loss_minus = evaluate()
            finally:
                for param, end in zip(params, after):
                    param.copy_(end)
                for buffer, saved in zip(buffers, saved_buffers):
                    buffer.copy_(saved)
        return self.observe_line(loss_before, loss_plus, loss_minus)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Torch's scheduler state (``last_epoch``, ``base_lrs``, ...) plus ``"controller"`` (primitives only)."""
        state = {key: value for key, value in self.__dict__.items() if key not in _NOT_STATE}
        state["controller"] = self.controller.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` and set the groups' lrs for the restored step (the config is kept)."""
        state = {key: value for key, value in state_dict.items() if key not in _NOT_STATE}
        self.__dict__.update(state)
        self.controller.load_state_dict(state_dict.get("controller", {}))
        self._snapshot = None
        self._apply_lrs()
