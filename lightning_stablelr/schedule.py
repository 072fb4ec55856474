"""The StableLR schedule as pure functions of floats (no torch, no Lightning).

For a param group with base learning rate ``η0`` the controller sets

    η(t) = η0 · max(min_lr_ratio,  warmup(step) · exp(-λ·t) · G) · C

The floor bounds the schedule (decay and gap factor), not the guard: ``C`` may take the lr below it.

- ``t``: epochs elapsed (fractional with ``interval="step"``), ``λ``: decay rate per epoch
  (:func:`resolve_decay_rate`), ``warmup``: :func:`warmup_factor`.
- ``G``: the validation-gap factor, non-increasing (:func:`relative_gap`, :func:`update_gap_factor`).
- ``C``: the stability factor in ``[min_factor, max_lr_boost]`` (``max_lr_boost`` is 10 by default), the guard
  that reacts to instability, not to noise (:func:`update_stability_factor`):

  * every check stores the lr-normalized curvature margin ``m = (2|a|/c) · f`` of the probed step (``s_max``
    for a descent step; a step that went uphill on its batch, noise or momentum, is judged by its size);
  * ``M`` = the upper median of the last 3 ``m`` (one noisy margin never decides);
  * predicted margin ``s = M / (w · C)``, ``w`` = the next step's warmup times ``G``: ``C`` and ``G`` are two
    ceilings on the lr (stability, overfitting), the lower one binds, and the decay anneals below both (``C``
    never grows back to undo it); the band ``1/safety <= s <= recover_above`` (default ``[4, 8]``) holds ``C``;
  * below the band ``C`` is cut in proportion to the overshoot, to put ``s`` at the band's centre
    ``sqrt(recover_above/safety)`` (at most ``recovery``-fold per check); above it ``C`` grows back the
    same way, up to 1;
  * **boost**: at ``C = 1`` a margin still above the band means the base lr is too small for this loss:
    ``C`` grows past 1, at most 2x per check (:data:`BOOST_GROWTH`), only to the band's *top*
    ``s = recover_above``, and never above ``max_lr_boost`` (default 10; 1 turns the boost off); only
    once two margins measured at the full warmup agree, and while
    ``G = 1`` (the controller passes ``max_factor = 1`` otherwise, and an overfitting cut clips ``C`` to 1);
  * a NaN/Inf loss or gradient halves ``C`` at once; losses that moved less than their rounding (bf16)
    are skipped.

- With neither ``decay_rate`` nor ``half_life``, the decay follows the run's length: it holds 1 for the
  first ``1 - anneal_fraction`` of the run, then decays exponentially to ``anneal_to`` at the last step
  (:func:`run_length_decay_rate`, :func:`anneal_start`), the way warmup-stable-decay schedules anneal.

:class:`lightning_stablelr.controller.StableLRController` holds ``G`` and ``C`` and calls these.
"""

from __future__ import annotations

import math

from lightning_stablelr.validation import check_finite_positive, check_non_negative

__all__ = [
    "BOOST_GROWTH",
    "DEFAULT_DECAY_RATE",
    "GUARD_REASONS",
    "MarginWindow",
    "anneal_start",
    "anneal_window",
    "boost_ceiling",
    "decay_factor",
    "floored_lr",
    "full_lr_margin",
    "improved_on_best",
    "relative_gap",
    "resolve_decay_rate",
    "run_length_decay_rate",
    "update_gap_factor",
    "update_stability_factor",
    "warmup_factor",
]

DEFAULT_DECAY_RATE = 0.0
"""λ per epoch from the first step when neither ``decay_rate`` nor ``half_life`` is given: 0.

The default decay is the run-length cool-down instead (:func:`run_length_decay_rate`, :func:`anneal_start`),
set by ``StableLRController.set_run_length`` once the run's length is known; a decay from the first step
(0.03/epoch) cost up to 13% of final validation loss at the peers' best lrs (``benchmarks/RESULTS.md``)."""


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


def anneal_window(total_units: float, anneal_fraction: float) -> tuple[float, float] | None:
    """``(start, span)`` of the run-length cool-down, in the units the run counts (optimizer steps; epochs with
    ``interval="epoch"``), for a run of ``total_units`` units: it ends on the last unit that runs,
    ``total_units - 1``, and spans ``max(1, anneal_fraction · total_units - 1)`` units before it (at most back to
    0). None when the length is unknown (not finite) or below 2 units: nothing to anneal between."""
    if not math.isfinite(total_units) or total_units < 2:
        return None
    last = math.ceil(total_units) - 1.0  # a fractional total still runs its last, partial unit
    start = max(0.0, last - max(1.0, anneal_fraction * total_units - 1.0))
    return start, last - start


def run_length_decay_rate(
    total_steps: float, steps_per_epoch: float, anneal_to: float, anneal_fraction: float = 1.0
) -> float:
    """``λ`` per epoch that makes the decay fall from 1 to ``anneal_to`` over the last ``anneal_fraction``
    of a run of ``total_steps`` optimizer steps, reaching it on the last step that runs (``total_steps - 1``).

    ``λ = ln(1/anneal_to) · steps_per_epoch / span`` with ``span`` from :func:`anneal_window`; the decay starts at
    :func:`anneal_start` epochs. Returns 0 (no decay) when ``anneal_to >= 1`` or when the run's length is
    unknown or shorter than two steps. Pass epochs and ``steps_per_epoch=1`` for a run counted in epochs.
    """
    window = anneal_window(total_steps, anneal_fraction)
    if anneal_to >= 1.0 or window is None:
        return 0.0
    return math.log(1.0 / anneal_to) * steps_per_epoch / window[1]


def anneal_start(total_steps: float, steps_per_epoch: float, anneal_fraction: float) -> float:
    """Epochs before the run-length decay starts: :func:`anneal_window`'s start over ``steps_per_epoch``."""
    window = anneal_window(total_steps, anneal_fraction)
    return 0.0 if window is None else window[0] / steps_per_epoch


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


GUARD_REASONS = ("hold", "overshoot", "recovery", "boost", "nonfinite", "unresolved", "warming")
"""Why a guard check moved ``C`` or left it (logged as counters ``stablelr/guard_<reason>``):

- ``overshoot``: the robust margin says the step leaves the decrease region; ``C`` was cut.
- ``recovery``: the robust margin says the lr can grow; ``C`` grew back towards 1 (never above it).
- ``boost``: at ``C >= 1`` the robust margin is still above the band (the base lr is too small); ``C`` grew past
  1 (at most 2x per check, up to ``max_lr_boost``).
- ``nonfinite``: a NaN/Inf loss or gradient; ``C`` was halved.
- ``hold``: the robust margin is inside the band; ``C`` unchanged.
- ``unresolved``: the losses moved by less than their rounding (bf16) or not at all; no information.
- ``warming``: fewer than two margins in the window yet; no decision on one sample.
"""


BOOST_GROWTH = 2.0
"""The largest factor by which one check may raise ``C`` above 1 (a boost): slower than a recovery, because a
margin measured at a smaller lr extrapolates (``c ∝ f²``) to an lr the run has not tried. With the full
``recovery`` (10x) one regression seed went from margin 13 to a divergent lr in one check."""


def boost_ceiling(max_lr_boost: float, gap_factor: float, full_lr_margins: int, window: int) -> float:
    """The most ``C`` may become at a check: ``max_lr_boost`` once ``min(2, window)`` margins of the window were
    measured at the full warmup (``full_lr_margins``, counted since the window was last cleared) and while
    ``G = 1``; else 1. A boost must not undo the warmup or an overfitting cut, nor extrapolate from the
    warmup's first steps, where the loss is flattest."""
    if gap_factor < 1.0 or min(full_lr_margins, window) < min(2, window):
        return 1.0
    return max_lr_boost


def full_lr_margin(step_margin: float, lr_factor: float) -> float:
    """The margin the same step would have had at the full base lr: ``m = margin · f``.

    ``margin`` is the guard's curvature margin ``2|a|/c`` (``s_max`` for a descent step) and ``f`` the lr of
    the probed step as a fraction of the base lr. The line model scales as ``a ∝ f`` and ``c ∝ f²`` (the
    update ``Δθ`` is proportional to the lr for SGD, momentum and Adam), so ``2|a|/c ∝ 1/f`` and ``m`` does
    not depend on the lr the step happened to use. ``+inf`` (no positive curvature) and ``0`` (``a = 0``
    with positive curvature) pass through; NaN stays NaN.
    """
    if math.isnan(step_margin) or step_margin == 0.0 or math.isinf(step_margin):
        return step_margin
    return step_margin * lr_factor


class MarginWindow:
    """The last ``size`` full-lr margins ``m_i`` (:func:`full_lr_margin`) and their robust value.

    :meth:`robust` is the upper median ``sorted(m)[n // 2]`` once ``n >= min(2, size)``: with ``size = 3``
    one outlier, low or high, never decides, and two samples must agree before ``C`` moves; ``size = 1``
    acts on every margin.
    """

    def __init__(self, size: int = 3) -> None:
        self.size = int(size)
        self.margins: list[float] = []

    def push(self, margin: float) -> None:
        self.margins = [*self.margins, float(margin)][-self.size :]

    def clear(self) -> None:
        self.margins = []

    def robust(self) -> float | None:
        if len(self.margins) < min(2, self.size):
            return None
        return sorted(self.margins)[len(self.margins) // 2]


def update_stability_factor(
    stability_factor: float,
    robust_margin: float | None,
    *,
    lr_factor: float,
    safety: float,
    recover_above: float,
    recovery: float,
    min_factor: float,
    max_factor: float = 1.0,
) -> tuple[float, str]:
    """One guard decision: the new stability factor ``C`` and its reason (:data:`GUARD_REASONS`).

    The rule (a proportional controller on a robust, lr-normalized margin):

    1. Each check measures the curvature margin ``2|a|/c`` of the step it probed
       (:attr:`~lightning_stablelr.curvature.LineModel.curvature_margin`: ``s_max`` for a descent step) and
       stores the full-lr margin ``m = (2|a|/c) · f`` (:func:`full_lr_margin`; ``f`` = that step's lr over
       the base lr). ``M`` = upper median of the last 3 (:class:`MarginWindow`): one noisy margin is noise.
       With fewer than two margins nothing moves (``warming``).
    2. The margin at the current ``C`` is predicted as ``s = M / (w·C)`` with ``w`` = ``lr_factor``; the
       controller passes the next step's ``warmup · G``, not the decay: ``C`` and ``G`` are two ceilings on the
       lr (the lower one binds), and a cool-down is never undone by ``C`` growing back.
    3. **Overshoot** when ``safety · s < 1`` (default ``safety = 1/4``: the step is at more than a quarter of
       ``s_max``). ``C`` is set so that the predicted margin lands at the band's centre ``s* = sqrt(recover_above /
       safety)``: ``C ← max(C / recovery, M / (s* · w))``, a cut in proportion to the measured overshoot,
       at most ``recovery``-fold (default 10) per check.
    4. **Recovery** when ``s > recover_above`` and ``C < 1``: ``C ← min(1, C · recovery, M / (s* · w))``,
       the mirror image of the cut: ``C`` comes back as readily as it goes down.
    5. **Boost** when ``s > recover_above`` and ``1 <= C < max_factor`` (``max_factor`` is ``max_lr_boost`` once
       two margins of the window were measured after the warmup, and while ``G = 1``; else 1): ``C ← min(max_factor, BOOST_GROWTH · C, M / (recover_above · w))``,
       to the band's top, 2x per check at most. A base lr far below what the loss allows is carried up to it.
    6. **Hold** inside the band ``1/safety <= s <= recover_above`` (default ``[4, 8]``; ``safety=1,
       recover_above=2`` gives the edge-of-stability band ``[1, 2]``, between the point where the model predicts
       no decrease, ``s_max = 1``, and the line minimum, ``s_max = 2``).

    A non-finite loss or gradient is handled by the caller (``C ← C/2`` at once,
    :meth:`~lightning_stablelr.controller.StableLRController.observe_nonfinite`). The result is clipped
    to ``[min_factor, max_factor]``.
    """
    factor = stability_factor
    if robust_margin is None or math.isnan(robust_margin):
        return factor, "warming"
    lr_factor = max(lr_factor, 1e-300)
    effective = lr_factor * factor
    predicted = robust_margin / effective if robust_margin != 0.0 else 0.0
    centre = math.sqrt(recover_above / safety)
    target = robust_margin / (centre * lr_factor)  # C whose predicted margin is the band's centre
    if safety * predicted < 1.0:
        factor, reason = max(factor / recovery, target), "overshoot"
    elif predicted > recover_above and factor < 1.0:
        factor, reason = min(1.0, factor * recovery, target), "recovery"
    elif predicted > recover_above and factor < max_factor:
        top = robust_margin / (recover_above * lr_factor)  # C whose predicted margin is the band's top (> C here)
        factor, reason = min(max_factor, BOOST_GROWTH * factor, top), "boost"
    else:
        return min(factor, max(max_factor, 1.0)), "hold"
    return min(max(max_factor, 1.0), max(min_factor, factor)), reason


def floored_lr(base_lr: float, factor: float, min_lr_ratio: float) -> float:
    """The floored learning rate ``max(min_lr_ratio · base_lr, base_lr · factor)``.

    A NaN ``factor`` yields the floor, so a corrupted factor can never produce a NaN learning rate.
    """
    floor = min_lr_ratio * base_lr
    scaled = base_lr * factor
    if math.isnan(scaled):
        return floor
    return max(floor, scaled)
