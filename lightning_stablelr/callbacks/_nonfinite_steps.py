"""StableLR's side of :mod:`lightning_stablelr.nonfinite`: flag each optimizer step on the device, read the
count only where it is needed, then halve ``C`` once per non-finite step and warn."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_stablelr.callbacks._lightning_access import reducer
from lightning_stablelr.controller import StableLRController
from lightning_stablelr.nonfinite import NonfiniteTracker

__all__ = ["NonfiniteSteps"]


class NonfiniteSteps:
    """Per step: :meth:`protect` (device only). At logging, checks, validation: :meth:`resolve` (a host sync).

    Args:
        controller: whose ``C`` each non-finite step halves (:meth:`StableLRController.observe_nonfinite`).
        skip: neutralise such steps (``StableLR(skip_nonfinite=...)``).
    """

    def __init__(self, controller: StableLRController, skip: bool) -> None:
        self.controller = controller
        self.skip = skip
        self.tracker = NonfiniteTracker()

    def record_loss(self, loss: Tensor) -> None:
        self.tracker.record_loss(loss)

    def protect(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Flag and (``skip``) neutralise this optimizer step on the device; nothing with fp16 AMP's GradScaler,
        which already skips overflowing steps."""
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            self.tracker.forget_loss()
            return
        # Under DDP the gradients are already all-reduced (identical on every rank); the losses are not,
        # so a rank's non-finite loss is counted on every rank (at resolve) but decides nothing alone.
        self.tracker.protect(optimizer, step, skip=self.skip, loss_decides=trainer.world_size == 1)

    def resolve(self, trainer: pl.Trainer) -> int | None:
        """Count the steps flagged since the last call into the controller and warn; returns the last such
        step, or None. A host sync; under DDP a collective (every rank calls it at the same points)."""
        if trainer.world_size > 1:
            reduce = reducer(trainer)
            count, last = self.tracker.take(lambda tensor: reduce(tensor, "max"), trainer.strategy.root_device)
        else:
            count, last = self.tracker.take()
        if count == 0:
            return None
        before = self.controller.nonfinite_steps
        for _ in range(count):
            self.controller.observe_nonfinite()
        total = self.controller.nonfinite_steps
        if any(n & (n - 1) == 0 for n in range(before + 1, total + 1)):  # the 1st, 2nd, 4th, 8th... step
            action = "neutralised its update" if self.skip else "kept its update (skip_nonfinite=False)"
            where = f"at step {last}" if count == 1 else f"in {count} steps up to step {last}"
            rank_zero_warn(
                f"StableLR: non-finite loss or gradient {where}; {action} and halved the stability factor to"
                f" {self.controller.stability_factor:.3g} ({total} such steps so far; further warnings at powers"
                " of two). A fused optimizer (fused=True) skips such a step; others apply zero gradients."
            )
        return last

    def resolve_local(self) -> int:
        """Count this rank's flagged steps without a collective (for ``state_dict``, which has no trainer);
        returns how many."""
        count, _ = self.tracker.take()
        for _ in range(count):
            self.controller.observe_nonfinite()
        return count
