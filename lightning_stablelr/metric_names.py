"""The names of the scalars StableLR writes (pure: no Lightning import), in one place.

The lr tags are ``stablelr/`` + LearningRateMonitor's names (see
``lightning_stablelr.callbacks._optimizers.param_group_lr_names``); the report and the TensorBoard
layout match them with ``^stablelr/lr(-.+)?$``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_stablelr.controller import StableLRController

__all__ = [
    "DECAY", "GAP", "GAP_FACTOR", "GUARD_ACTIONS", "LR_PREFIX", "NONFINITE_STEPS", "ROBUST_MARGIN",
    "STABILITY_FACTOR", "STEP_MARGIN", "controller_metrics", "guard_tag",
]  # fmt: skip

LR_PREFIX = "stablelr/"
DECAY = "stablelr/decay"
GAP = "stablelr/gap"
GAP_FACTOR = "stablelr/gap_factor"
STABILITY_FACTOR = "stablelr/stability_factor"
STEP_MARGIN = "stablelr/step_margin"
NONFINITE_STEPS = "stablelr/nonfinite_steps"  # cumulative: the report takes its maximum
ROBUST_MARGIN = "stablelr/robust_margin"  # the guard's robust full-lr margin M (upper median of the window)
GUARD_ACTIONS = ("overshoot", "recovery", "boost", "nonfinite", "unresolved")
"""Why a guard check moved C (or could not judge), logged as cumulative counts ``stablelr/guard_<reason>``."""


def guard_tag(reason: str) -> str:
    """``stablelr/guard_<reason>``: the cumulative count of guard checks that ended with ``reason``."""
    return f"stablelr/guard_{reason}"


def controller_metrics(
    controller: StableLRController, lrs: Mapping[str, float], epochs_elapsed: float
) -> dict[str, float]:
    """The lrs, ``exp(-λt)``, ``G``, ``C``, the non-finite count, the guard's reason counts, and (once known)
    the gap, the step margin and the robust margin."""
    metrics = dict(lrs)
    metrics[DECAY] = controller.decay(epochs_elapsed)
    metrics[GAP_FACTOR] = controller.gap_factor
    metrics[STABILITY_FACTOR] = controller.stability_factor
    metrics[NONFINITE_STEPS] = float(controller.nonfinite_steps)
    if controller.last_gap is not None:
        metrics[GAP] = controller.last_gap
    if controller.last_step_margin is not None:
        metrics[STEP_MARGIN] = controller.last_step_margin
    if controller.robust_margin is not None:
        metrics[ROBUST_MARGIN] = controller.robust_margin
    for reason in GUARD_ACTIONS:
        metrics[guard_tag(reason)] = float(controller.guard_counts.get(reason, 0))
    return metrics
