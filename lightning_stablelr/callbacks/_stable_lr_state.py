"""StableLR's checkpoint state, pickling and read-only views of its settings, as a base class of
:class:`~lightning_stablelr.StableLR`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

if TYPE_CHECKING:
    from lightning_stablelr.callbacks._inputs import TrainerInputs
    from lightning_stablelr.callbacks._nonfinite_steps import NonfiniteSteps
    from lightning_stablelr.callbacks._optimizers import SchedulerComposition
    from lightning_stablelr.config import CheckCadence
    from lightning_stablelr.controller import StableLRController

__all__ = ["StableLRState"]


class StableLRState(Callback):
    """``state_dict``/``load_state_dict`` (applied in ``on_train_start`` by :meth:`_restore_pending_state`),
    the legacy state key, and pickling without the fit's transient objects."""

    controller: StableLRController
    cadence: CheckCadence
    _composition: SchedulerComposition
    base_lrs: dict[str, float]
    _resolved_steps_per_epoch: int | None
    _pending_state: dict[str, Any] | None
    _nonfinite: NonfiniteSteps
    _inputs: TrainerInputs
    _applied: tuple[int, int] | None

    @property
    def check_every_n_steps(self) -> int:
        return self.cadence.check_every_n_steps

    @property
    def dense_check_steps(self) -> int:
        return self.cadence.dense_check_steps

    @property
    def _hook_handles(self) -> list[Any]:
        return self._composition.handles

    @property
    @override
    def state_key(self) -> str:
        """``"StableLR"``: the class name, as for every singleton callback (only one StableLR per Trainer)."""
        return type(self).__name__

    @override
    def state_dict(self) -> dict[str, Any]:
        """Primitives: version, controller state (G, C, best L_va, running mean...), base lrs, steps per epoch."""
        if self._nonfinite.resolve_local():
            self._applied = None  # C changed: the next step sets the lrs again
        pending_sum, pending_count = self._inputs.train_loss.pending()
        return {
            "version": 1,
            "controller": self.controller.state_dict(),
            "base_lrs": dict(self.base_lrs),
            "steps_per_epoch": self._resolved_steps_per_epoch,
            # The training losses since the last validation: their sum and count (read by older versions), and
            # each value, so that a mid-epoch resume adds them up exactly as the uninterrupted run does.
            "pending_train_loss_sum": pending_sum,
            "pending_train_loss_count": pending_count,
            "pending_train_losses": self._inputs.train_loss.state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in on_train_start: Lightning restores callbacks before it configures the optimizers.
        self._pending_state = dict(state_dict)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_session"] = None  # possibly another callback's session: found again in setup
        # Lightning attaches the module's log/log_dict to every callback during fit: not ours to carry.
        state.pop("log", None)
        state.pop("log_dict", None)
        return state

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Checkpoints written before the state key became the class name used "StableLR{...arguments...}".
        states = checkpoint.get("callbacks", {})
        if self.state_key not in states:
            legacy = [key for key in states if isinstance(key, str) and key.startswith(self.state_key + "{")]
            if len(legacy) == 1:
                self.load_state_dict(states[legacy[0]])

    def _restore_pending_state(self, device: torch.device | str = "cpu") -> None:
        """Apply the state given to :meth:`load_state_dict`, once the optimizers exist (``device``: the
        module's, where the training losses live)."""
        state, self._pending_state = self._pending_state, None
        if state is None:
            return
        self.controller.load_state_dict(state.get("controller", {}))
        self.base_lrs.update({key: float(value) for key, value in state.get("base_lrs", {}).items()})
        self._resolved_steps_per_epoch = state.get("steps_per_epoch")
        if "pending_train_losses" in state:
            self._inputs.train_loss.load_state(state["pending_train_losses"], device)
        elif state.get("pending_train_loss_count", 0) > 0:  # a checkpoint of an older version: sum and count
            count = float(state["pending_train_loss_count"])
            self.controller.record_train_loss(float(state["pending_train_loss_sum"]) / count, count)
