"""What :meth:`StableLRScheduler.load_state_dict <lightning_stablelr.StableLRScheduler.load_state_dict>` accepts
(pure: no Lightning import; checked before anything is restored, so a refused state leaves the scheduler as it
was), and what ``check_step`` says once when the checked step moved no parameter."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Collection, Mapping
from typing import Any

__all__ = ["UNMOVED_STEP_WARNING", "StepOrder", "checked_scheduler_state"]

UNMOVED_STEP_WARNING = (
    "StableLRScheduler.check_step: snapshot() was called after optimizer.step(), so no parameter moved between"
    " snapshot() and check_step() (‖Δθ‖ = 0): the check measured nothing and left C unchanged (counted as"
    " unresolved). Call scheduler.snapshot() just before optimizer.step(), then check_step() after it. (shown once)"
)


class StepOrder:
    """Tells a ``snapshot()`` taken after ``optimizer.step()`` (the caller's mistake, said once with
    :data:`UNMOVED_STEP_WARNING`) from a checked step that moved nothing on purpose: one a GradScaler skipped
    after an overflow (``optimizer.step()`` never ran), or one ``protect()`` neutralised. An optimizer
    step post-hook notes each step; ``scheduler.step()`` closes the step, so a ``snapshot()`` with a step noted
    since the last ``scheduler.step()`` came after ``optimizer.step()``."""

    def __init__(self, optimizer: Any) -> None:
        self.stepped = False  # optimizer.step() ran since the last scheduler.step()
        self.snapshot_after_step = False
        self.warned = False
        # The hook holds the order weakly and removes itself once the scheduler is gone, so an optimizer that
        # outlives its scheduler (a rebuilt scheduler, a notebook) keeps no dead hooks.
        order = weakref.ref(self)

        def on_optimizer_step(*args: Any) -> None:
            live = order()
            if live is None:
                handle.remove()
            else:
                live.stepped = True

        handle = optimizer.register_step_post_hook(on_optimizer_step)

    def scheduler_stepped(self) -> None:
        self.stepped = False

    def snapshot_taken(self) -> None:
        self.snapshot_after_step = self.stepped

    def checked(self, norm_sq: float) -> None:
        """One check's ``‖Δθ‖²``: warn once when it is 0 because the snapshot came after the step."""
        if norm_sq == 0.0 and self.snapshot_after_step and not self.warned:
            self.warned = True
            warnings.warn(UNMOVED_STEP_WARNING, UserWarning, stacklevel=3)


def checked_scheduler_state(
    state_dict: Any, skip: Collection[str], *, groups: int, steps_per_epoch: int
) -> dict[str, Any]:
    """The entries of ``state_dict`` to restore (all but ``skip``), once it is known to fit.

    Warns when the state's ``steps_per_epoch`` replaces the scheduler's own: a resumed run keeps its decay's
    time axis.

    Raises:
        ValueError: ``state_dict`` is not a StableLRScheduler's (no ``"controller"``), or its base lrs are for
            another number of param groups than ``groups``.
    """
    if not isinstance(state_dict, Mapping) or "controller" not in state_dict:
        found = sorted(map(str, state_dict))[:8] if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise ValueError(
            f"StableLRScheduler.load_state_dict got a state without a 'controller' entry (found: {found}): it is not"
            " the state_dict() of a StableLRScheduler. Load the state a StableLRScheduler saved, or keep this"
            " scheduler as built to start over."
        )
    saved_lrs = state_dict.get("base_lrs")
    if saved_lrs is not None and len(saved_lrs) != groups:
        raise ValueError(
            f"StableLRScheduler.load_state_dict: the state holds base lrs for {len(saved_lrs)} param group(s), this"
            f" scheduler's optimizer has {groups}. Load it into a scheduler whose optimizer has the param groups"
            " (same number and order) of the one it was saved from."
        )
    saved_steps = state_dict.get("steps_per_epoch")
    if saved_steps is not None and saved_steps != steps_per_epoch:
        warnings.warn(
            f"StableLRScheduler.load_state_dict: the state's steps_per_epoch={saved_steps} replaces this scheduler's"
            f" {steps_per_epoch}, so the resumed run keeps its decay's time axis. Build the scheduler with"
            f" steps_per_epoch={saved_steps} to silence this, or do not load the state to use {steps_per_epoch}.",
            UserWarning,
            stacklevel=3,
        )
    return {key: value for key, value in state_dict.items() if key not in skip}
