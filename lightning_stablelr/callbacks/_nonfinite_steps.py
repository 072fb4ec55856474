"""StableLR's side of :mod:`lightning_stablelr.nonfinite`: flag each optimizer step on the device, read the
count only where it is needed, then halve ``C`` once per non-finite step and warn."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_stablelr._sharded_probe import is_sharded
from lightning_stablelr.callbacks._lightning_access import reducer
from lightning_stablelr.controller import StableLRController
from lightning_stablelr.nonfinite import NonfiniteTracker, ReduceMax

__all__ = ["NONFINITE_TESTS", "NonfiniteSteps"]

#: ``StableLR(nonfinite_test=...)``: what decides that a step is non-finite (see :mod:`lightning_stablelr.nonfinite`).
NONFINITE_TESTS = ("loss", "gradients")


class NonfiniteSteps:
    """Per step: :meth:`protect` (device only). At logging, checks, validation: :meth:`resolve` (a host sync).

    Args:
        controller: whose ``C`` each non-finite step halves (:meth:`StableLRController.observe_nonfinite`).
        skip: neutralise such steps (``StableLR(skip_nonfinite=...)``).
        test: ``"loss"`` (the step's loss decides, O(1) per step; the gradients are tested too on guard-check
            steps, whose snapshot reads them anyway) or ``"gradients"`` (every gradient, every step: one fused
            norm). Under several processes the gradients always decide: they are identical on every rank
            after DDP's all-reduce, while each rank has its own loss.
    """

    def __init__(self, controller: StableLRController, skip: bool, test: str = "loss") -> None:
        self.controller = controller
        self.skip = skip
        self.test = test
        self.tracker = NonfiniteTracker()
        self._scaled = False  # fp16 AMP's GradScaler handles non-finite steps itself
        self._one_process = True
        self._reduce_flag: ReduceMax | None = None

    def configure(self, trainer: pl.Trainer) -> None:
        """Read what the per-step :meth:`protect` needs from the trainer once per fit (``on_train_start``)."""
        self._scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        self._one_process = trainer.world_size == 1
        # Sharded parameters (FSDP2): each rank tests only its own gradient shard, so the flag is maximised
        # over the ranks (one small all-reduce per step) for every rank to skip the same steps.
        self._reduce_flag = None
        if not self._one_process and is_sharded(trainer.lightning_module):
            reduce = reducer(trainer)
            self._reduce_flag = lambda flag: reduce(flag, "max")

    def record_loss(self, loss: Tensor) -> None:
        self.tracker.record_loss(loss)

    def protect(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, step: int, *, checked: bool) -> None:
        """Flag and (``skip``) neutralise this optimizer step on the device; nothing with fp16 AMP's GradScaler,
        which already skips overflowing steps. ``checked``: a guard-check step (its gradients are tested)."""
        if self._scaled:
            self.tracker.forget_loss()
            return
        if not checked and self._one_process and self.test == "loss" and self.tracker.loss_is_finite_now():
            return  # the common step: its one loss read on the CPU, finite (nothing to neutralise or count)
        # Under DDP the gradients are already all-reduced (identical on every rank); the losses are not,
        # so a rank's non-finite loss is counted on every rank (at resolve) but decides nothing alone.
        one_process = self._one_process
        self.tracker.protect(
            optimizer, step, skip=self.skip, loss_decides=one_process, reduce_flag=self._reduce_flag,
            test_gradients=checked or self.test == "gradients" or not one_process,
        )  # fmt: skip

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

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_reduce_flag"] = None  # holds the trainer; set again by configure() in the next fit
        return state

    def resolve_local(self) -> int:
        """Count this rank's flagged steps without a collective (for ``state_dict``, which has no trainer);
        returns how many. Under several processes nothing: a rank's own count (a non-finite loss seen by
        that rank only) would give the ranks different ``C``; it stays pending for the next collective
        :meth:`resolve`."""
        if not self._one_process:
            return 0
        count, _ = self.tracker.take()
        for _ in range(count):
            self.controller.observe_nonfinite()
        return count
