"""What :meth:`StableLRScheduler.load_state_dict <lightning_stablelr.StableLRScheduler.load_state_dict>` accepts
(pure: no Lightning import; checked before anything is restored, so a refused state leaves the scheduler as it
was), and what ``check_step`` says once when the checked step moved no parameter."""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping
from typing import Any

__all__ = ["UNMOVED_STEP_WARNING", "UnmovedSteps", "checked_scheduler_state"]

UNMOVED_STEP_WARNING = (
    "StableLRScheduler.check_step: on two checks in a row no parameter moved between snapshot() and"
    " check_step() (‖Δθ‖ = 0), so those checks measured nothing and left C unchanged (counted as unresolved)."
    " Call scheduler.snapshot() just before optimizer.step(), not after it. (One such check alone, e.g. a step"
    " a GradScaler skipped after an overflow, is not reported.) (shown once)"
)



class UnmovedSteps:
    """Says once (:data:`UNMOVED_STEP_WARNING`) when two guard checks in a row measured ``‖Δθ‖ = 0``: the sign of
    ``snapshot()`` taken after ``optimizer.step()``. One such check alone is an ordinary skipped step (a GradScaler
    overflow), and a step ``protect()`` neutralised is expected to move nothing: neither is counted."""

    def __init__(self) -> None:
        self.in_a_row = 0
        self.warned = False

    def record(self, norm_sq: float, *, flagged: bool) -> None:
        """One check's ``‖Δθ‖²``; ``flagged``: ``protect()`` neutralised this step."""
        if norm_sq != 0.0:
            self.in_a_row = 0
        elif not flagged:
            self.in_a_row += 1
            if self.in_a_row >= 2 and not self.warned:
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
