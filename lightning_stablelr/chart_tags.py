"""Derived scalars that make the custom-scalars comparisons readable at TensorBoard's default settings (pure).

TensorBoard draws every chart on a linear axis with outlier clipping, and colours lines by run, not by tag. The
two comparisons that matter span decades (lr ~1e-3 against a max stable lr ~1e-1; sharpness ~2 against a
threshold ~1e4), so the monitor also logs their base-10 logarithms, at the same step, which the layout draws as
margin charts: the line is the quantity, the shaded band reaches up to its bound. The band's width is the
headroom in decades, ``log10(max_stable_lr / lr) = -log10(eos_ratio)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["LOG10_TAGS", "log10_comparison_tags"]

#: source tag (or ``"lr"``) -> derived tag
LOG10_TAGS = {
    "lr": "lyapunov/log10_lr",
    "lyapunov/max_stable_lr": "lyapunov/log10_max_stable_lr",
    "lyapunov/sharpness": "lyapunov/log10_sharpness",
    "lyapunov/stability_threshold": "lyapunov/log10_stability_threshold",
}


def log10_comparison_tags(metrics: Mapping[str, float], lr: float) -> dict[str, float]:
    """``{LOG10_TAGS[k]: log10(value)}`` for the lr and the three sharpness tags in ``metrics``.

    All four or none: a margin chart needs its three tags at identical steps, so when any value is missing,
    non-finite or ``<= 0`` (a negative sharpness estimate) nothing is returned.
    """
    values = {"lr": lr, **{key: metrics.get(key, math.nan) for key in LOG10_TAGS if key != "lr"}}
    if not all(math.isfinite(value) and value > 0 for value in values.values()):
        return {}
    return {LOG10_TAGS[key]: math.log10(value) for key, value in values.items()}
