"""The StableLR schedule as pure functions of floats (no torch, no Lightning).

For a param group with base learning rate ``η0`` the controller sets

    η(t) = max(min_lr_ratio · η0,  η0 · warmup(step) · exp(-λ·t) · G · C)

- ``t``: epochs elapsed (fractional with ``interval="step"``), ``λ``: decay rate per epoch
  (:func:`resolve_decay_rate`), ``warmup``: :func:`warmup_factor`.
- ``G``: the validation-gap factor, non-increasing (:func:`relative_gap`, :func:`update_gap_factor`).
- ``C``: the stability factor in ``[min_factor, 1]`` (:func:`update_stability_factor`).

:class:`lightning_stablelr.controller.StableLRController` holds ``G`` and ``C`` and calls these.
"""

from __future__ import annotations

import math

from lightning_stablelr.curvature import LineModel
from lightning_stablelr.validation import check_finite_positive, check_non_negative

__all__ = [
    "DEFAULT_DECAY_RATE",
    "decay_factor",
    "floored_lr",
    "improved_on_best",
    "relative_gap",
    "resolve_decay_rate",
    "update_gap_factor",
    "update_stability_factor",
    "warmup_factor",
]

DEFAULT_DECAY_RATE = 0.0
"""λ per epoch used when neither ``decay_rate`` nor ``half_life`` is given.

0 (no time decay) by evidence: over a 3-decade lr grid a decay of 0.03/epoch cost up to 13% of final
validation loss at the peers' best lrs and more at small lrs, while the gap factor and the guard already
lower the lr where it helps (``benchmarks/RESULTS.md``, "How the defaults were chosen")."""


def resolve_decay_rate(decay_rate: float | None, half_life: float | None) -> float:
    """Return ``λ`` per epoch: ``decay_rate``, or ``ln 2 / half_life``, or :data:`DEFAULT_DECAY_RATE`.

    Raises ``ValueError`` when both are given, when ``decay_rate`` is negative or not finite, or when
    ``half_life`` is not a finite number > 0.
    """
    if decay_rate is not None and half_life is not None:
        raise ValueError(
            f"`decay_rate` and `half_life` are mutually exclusive, got decay_rate={decay_rate!r} and "
            f"half_life={half_life!r}. Pass only one of them (decay_rate = ln 2 / half_life)."
        )
    if half_life is not None:
        half_life = check_finite_positive(
            "half_life",
            half_life,
            "Pass the number of epochs after which the lr halves, or use decay_rate=0.",
        )
        return math.log(2.0) / half_life
    if decay_rate is None:
        return DEFAULT_DECAY_RATE
    return check_non_negative(
        "decay_rate", decay_rate, "Use a non-negative decay per epoch, or pass half_life instead."
    )


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup: ``min(1, (step + 1) / warmup_steps)``, and ``1`` when ``warmup_steps == 0``.

    ``step`` is the number of optimizer steps already taken, so the first step runs at ``η0 / warmup_steps``
    and step ``warmup_steps - 1`` is the first at full ``η0``.
    """
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def decay_factor(epochs_elapsed: float, decay_rate: float) -> float:
    """Exponential decay ``exp(-λ · t)`` with ``λ = decay_rate`` per epoch and ``t = epochs_elapsed``."""
    return math.exp(-decay_rate * epochs_elapsed)


def relative_gap(val_loss: float, train_loss: float, eps: float = 1e-12) -> float:
    """Scale-invariant generalization gap ``r = (L_va - L_tr) / max(|L_va|, eps)``.

    Multiplying both losses by a constant ``k > 0`` leaves ``r`` unchanged (as long as ``k·|L_va| > eps``).
    """
    return (val_loss - train_loss) / max(abs(val_loss), eps)


def improved_on_best(val_loss: float, best_val_loss: float | None, min_delta: float) -> bool:
    """True when ``best_val_loss`` is None (first validation) or ``val_loss < best_val_loss - min_delta``.

    A non-finite ``val_loss`` never improves.
    """
    if not math.isfinite(val_loss):
        return False
    return best_val_loss is None or val_loss < best_val_loss - min_delta


def update_gap_factor(
    gap_factor: float, *, gap: float, improved: bool, gap_tolerance: float, gap_strength: float
) -> float:
    """Non-increasing gap-factor update.

    ``G ← G · exp(-gap_strength · (r - gap_tolerance))`` when ``r > gap_tolerance`` and the validation loss
    did not improve; otherwise ``G`` is returned unchanged (also when ``r`` is NaN). Because the exponent is
    negative whenever it is applied, ``G`` never grows.
    """
    if improved or not (gap > gap_tolerance):
        return gap_factor
    return gap_factor * math.exp(-gap_strength * (gap - gap_tolerance))


def update_stability_factor(
    stability_factor: float,
    line: LineModel | None,
    *,
    nonfinite: bool,
    safety: float,
    recovery: float,
    min_factor: float,
    recover_above: float = 4.0,
) -> float:
    """Update the stability factor ``C`` (the curvature and divergence guard) after one check.

    With ``a``, ``c``, ``s_max`` from the line model (:mod:`lightning_stablelr.curvature`), the rule is
    evaluated top to bottom:

    1. ``nonfinite`` (a NaN/Inf loss or gradient): ``C ← C · 0.5``.
    2. ``line`` is None, or the update did not move the loss at all (``a == 0`` and ``c == 0``):
       ``C`` is unchanged (no information).
    3. The model is not finite, or the step ``s = 1`` is outside the safe decrease region, i.e.
       ``a >= 0``, or ``c > 0`` and ``1 > safety · s_max``:
       ``C ← C · shrink`` with ``shrink = clip(safety · s_max, 0.1, 0.5)`` when ``s_max`` is finite and
       ``> 0``, else ``shrink = 0.5``. With ``safety · s_max < 0.5`` this puts the next step (about
       ``shrink`` times as large) inside the safe region, and it never cuts by more than a factor of 10 at once.
    4. ``s_max > recover_above`` (comfortably inside the region): ``C ← C · recovery``.
    5. Otherwise ``C`` is unchanged.

    The result is always clipped to ``[min_factor, 1]``.
    """
    factor = stability_factor
    if nonfinite:
        factor *= 0.5
    elif line is None or (line.first_order == 0.0 and line.curvature == 0.0):
        pass
    else:
        margin = line.step_margin
        outside = not line.finite or line.first_order >= 0 or (line.curvature > 0 and safety * margin < 1.0)
        if outside:
            if math.isfinite(margin) and margin > 0:
                shrink = min(0.5, max(0.1, safety * margin))
            else:
                shrink = 0.5
            factor *= shrink
        elif margin > recover_above:
            factor *= recovery
    return min(1.0, max(min_factor, factor))


def floored_lr(base_lr: float, factor: float, min_lr_ratio: float) -> float:
    """The floored learning rate ``max(min_lr_ratio · base_lr, base_lr · factor)``.

    A NaN ``factor`` yields the floor, so a corrupted factor can never produce a NaN learning rate.
    """
    floor = min_lr_ratio * base_lr
    scaled = base_lr * factor
    if math.isnan(scaled):
        return floor
    return max(floor, scaled)
