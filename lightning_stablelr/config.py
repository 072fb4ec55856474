"""The validated settings of StableLR: the controller's :class:`StableLRConfig` and the guard's
:class:`CheckCadence` (pure: no torch, no Lightning).

Both adapters (the :class:`~lightning_stablelr.StableLR` callback and the
:class:`~lightning_stablelr.StableLRScheduler`) take these fields as keyword arguments; the defaults
and the checks live here only. The cadence is here, not in the callback, so that a plain PyTorch loop
(and the benchmarks) check exactly the steps the callback checks: ``StableLRScheduler.should_check``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from lightning_stablelr.schedule import resolve_decay_rate
from lightning_stablelr.validation import (
    check_choice,
    check_finite_positive,
    check_in_range,
    check_int_at_least,
    check_non_negative,
)

__all__ = ["INTERVALS", "CheckCadence", "StableLRConfig", "config_field_names", "make_config"]

INTERVALS = ("step", "epoch")


@dataclass(frozen=True)
class StableLRConfig:
    """Validated settings of the StableLR controller. Every bad value raises ``ValueError`` on creation.

    Args:
        decay_rate: ``λ``, exponential decay per epoch (``>= 0``). ``None`` with ``half_life=None`` means a
            decay that follows the run's length (:meth:`StableLRController.set_run_length`): the decay
            reaches ``anneal_to`` at the last step. With an unknown length there is no decay.
        half_life: epochs after which the decay halves the lr (``> 0``); ``λ = ln 2 / half_life``.
            Mutually exclusive with ``decay_rate``.
        interval: ``"step"``: ``t = global_step / steps_per_epoch`` (smooth, fractional);
            ``"epoch"``: ``t`` is the integer epoch.
        warmup_steps: linear warmup over this many optimizer steps (``0`` = none). The default 20 gives the
            guard, which acts on two agreeing margins, several checks before the full lr is applied (SGD +
            momentum at a 1000x-too-high lr diverged in one of three seeds with 10).
        min_lr_ratio: the schedule (decay and ``G``) never takes the lr below ``min_lr_ratio · η0`` (in
            ``[0, 1]``); the guard ``C`` acts below it.
        gap_tolerance: relative gap ``r = (L_va - L_tr)/|L_va|`` tolerated before ``G`` shrinks (``>= 0``).
        gap_strength: ``G ← G · exp(-gap_strength · (r - gap_tolerance))`` when overfitting (``>= 0``).
        min_delta: a validation loss counts as improved only if it beats the best by more than this.
        gap_patience: consecutive overfitting validations needed before ``G`` shrinks (``>= 1``); one
            noisy validation then cannot cut the lr.
        safety: ``C`` is cut when the robust predicted margin ``s`` has ``safety · s < 1`` (in ``(0, 1]``).
            The default 1/4 with ``recover_above=8`` holds ``C`` while ``4 <= s <= 8``; ``safety=1,
            recover_above=2`` is the edge-of-stability band ``[1, 2]``. See
            :func:`~lightning_stablelr.schedule.update_stability_factor` and ``docs/DESIGN_NOTES.md``.
        recovery: the largest factor by which one check may cut or grow ``C`` (``> 1``, default 10).
        recover_above: ``C`` grows back when the robust predicted margin exceeds this (``>= 1/safety``).
        min_stability_factor: lower bound of ``C`` (in ``(0, 1]``).
        max_lr_boost: upper bound of ``C`` (``>= 1``, default 10). When the robust margin at ``C = 1`` is still
            above the hold band, the base lr is too small for the loss, and the guard raises it (2x per check at
            most, to the band's top), once two checks after the warmup agree and while ``G = 1``. ``1`` makes
            the base lr a hard ceiling. See ``docs/DESIGN_NOTES.md``, the guard's rule 6.
        guard_window: the robust margin is the upper median of this many last checks (``>= 1``; 3 ignores
            one outlier).
        anneal_to: with neither ``decay_rate`` nor ``half_life``, the decay factor reached at the end of a
            run of known length (in ``(0, 1]``; 1 = no decay).
        anneal_fraction: the run-length decay runs over this last fraction of the run (in ``(0, 1]``);
            before it the decay is 1 (warmup-stable-decay with an exponential cool-down).
    """

    decay_rate: float | None = None
    half_life: float | None = None
    interval: str = "step"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.01
    gap_tolerance: float = 0.25
    gap_strength: float = 1.0
    min_delta: float = 0.0
    gap_patience: int = 1
    safety: float = 0.25
    recovery: float = 10.0
    recover_above: float = 8.0
    min_stability_factor: float = 1e-3
    max_lr_boost: float = 10.0
    guard_window: int = 3
    anneal_to: float = 0.1
    anneal_fraction: float = 0.2

    def __post_init__(self) -> None:
        resolve_decay_rate(self.decay_rate, self.half_life)
        check_choice("interval", self.interval, INTERVALS)
        check_int_at_least("warmup_steps", self.warmup_steps, 0, "Use 0 to disable the warmup.")
        check_in_range(
            "min_lr_ratio",
            self.min_lr_ratio,
            0.0,
            1.0,
            hint="It is a fraction of the base lr; 0 disables the floor.",
        )
        check_non_negative("gap_tolerance", self.gap_tolerance, "It is a relative gap, e.g. 0.25 for 25%.")
        check_non_negative("gap_strength", self.gap_strength, "Use 0 to disable the gap factor.")
        check_non_negative(
            "min_delta", self.min_delta, "It is an absolute improvement of the validation loss."
        )
        check_int_at_least(
            "gap_patience", self.gap_patience, 1, "Use 1 to react to every overfitting validation."
        )
        check_in_range(
            "safety",
            self.safety,
            0.0,
            1.0,
            low_inclusive=False,
            hint="0.25 (the default) cuts the lr when a step is at more than a quarter of the margin s_max; 1"
            " cuts only steps predicted to increase the loss.",
        )
        check_in_range(
            "recovery",
            self.recovery,
            1.0,
            math.inf,
            low_inclusive=False,
            high_inclusive=False,
            hint="It is the largest factor one check may cut or grow C by, e.g. 10.",
        )
        check_finite_positive("recover_above", self.recover_above, "It is a step margin, e.g. 8 (the default band is [4, 8]).")
        if self.recover_above * self.safety < 1.0:
            raise ValueError(
                f"`recover_above` must be >= 1/safety = {1.0 / self.safety:g} so that the hold band"
                f" [1/safety, recover_above] is not empty, got recover_above={self.recover_above!r} with"
                f" safety={self.safety!r}. Raise recover_above, e.g. to {2.0 / self.safety:g}."
            )
        check_in_range(
            "max_lr_boost",
            self.max_lr_boost,
            1.0,
            math.inf,
            high_inclusive=False,
            hint="It is the most the guard may raise the lr above the base lr, e.g. 10; 1 keeps the base lr a ceiling.",
        )
        check_int_at_least("guard_window", self.guard_window, 1, "3 (the default) ignores one outlier.")
        check_in_range(
            "anneal_to",
            self.anneal_to,
            0.0,
            1.0,
            low_inclusive=False,
            hint="It is the decay factor at the end of the run, e.g. 0.01; 1 disables the run-length decay.",
        )
        check_in_range(
            "anneal_fraction",
            self.anneal_fraction,
            0.0,
            1.0,
            low_inclusive=False,
            hint="It is the last fraction of the run over which the lr anneals, e.g. 0.2.",
        )
        check_in_range(
            "min_stability_factor",
            self.min_stability_factor,
            0.0,
            1.0,
            low_inclusive=False,
            hint="It is the smallest fraction of the lr the guard may keep, e.g. 1e-3.",
        )

    @property
    def resolved_decay_rate(self) -> float:
        """``λ`` per epoch from ``decay_rate``/``half_life`` (0 when neither is given: see :attr:`run_length_decay`)."""
        return resolve_decay_rate(self.decay_rate, self.half_life)

    @property
    def run_length_decay(self) -> bool:
        """True when neither ``decay_rate`` nor ``half_life`` is given: the decay follows the run's length."""
        return self.decay_rate is None and self.half_life is None and self.anneal_to < 1.0

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (primitives only)."""
        return asdict(self)




def config_field_names() -> tuple[str, ...]:
    """Names of the :class:`StableLRConfig` fields, for adapters that forward them as keyword arguments."""
    return tuple(field.name for field in fields(StableLRConfig))


def make_config(config: StableLRConfig | None, overrides: Mapping[str, Any], owner: str) -> StableLRConfig:
    """``config``, or a :class:`StableLRConfig` built from keyword ``overrides`` (never both).

    Raises:
        TypeError: a key of ``overrides`` is not a :class:`StableLRConfig` field (the message lists them).
        ValueError: both ``config`` and ``overrides`` are given, or a value is out of range.
    """
    unknown = sorted(set(overrides) - set(config_field_names()))
    if unknown:
        raise TypeError(
            f"{owner} got unexpected keyword arguments {unknown}. Its controller settings are the"
            f" StableLRConfig fields: {', '.join(config_field_names())}."
        )
    if config is None:
        return StableLRConfig(**overrides)
    if overrides:
        raise ValueError(
            f"Pass either `config` or keyword overrides to {owner}, got both (overrides: {sorted(overrides)})."
            " Use dataclasses.replace(config, ...) to change a config."
        )
    return config


@dataclass(frozen=True)
class CheckCadence:
    """Which optimizer steps run the three-point guard: ``should_check(step, guarding)``.

    ``step`` is the optimizer step about to be taken (``global_step`` before it, 0-based):

        should_check(step, guarding) = step < dense_check_steps
                                       or  (n > 0 and (step + 1) % m == 0),   n = check_every_n_steps
        m = n while the guard rests (C = 1),  m = max(1, n // 10) while it acts (``guarding``: C < 1)

    so the periodic checks fall on steps ``n-1, 2n-1, ...`` (the n-th, 2n-th... step) on a healthy run, and
    ten times as often while C is below 1: a cut is confirmed or undone within tens of steps, not hundreds,
    and a healthy run pays for one check per ``n`` steps. 0 turns either off.

    Args:
        check_every_n_steps: check every n-th optimizer step (two or three extra forward passes each) while C = 1,
            every ``n // 10``-th while C < 1; 0: never.
        dense_check_steps: also check every one of the first ``dense_check_steps`` steps, where
            divergence usually happens; 0: none.

    Raises:
        ValueError: either value is not an integer ``>= 0``.
    """

    check_every_n_steps: int = 100
    dense_check_steps: int = 20

    def __post_init__(self) -> None:
        check_int_at_least(
            "check_every_n_steps", self.check_every_n_steps, 0, "Use 0 to disable the periodic guard checks."
        )
        check_int_at_least("dense_check_steps", self.dense_check_steps, 0, "Use 0 to disable the dense early checks.")

    def should_check(self, step: int, guarding: bool = False) -> bool:
        """Whether optimizer step ``step`` (0-based) runs the guard; ``guarding``: C < 1. See the class docstring."""
        if step < self.dense_check_steps:
            return True
        every = self.check_every_n_steps
        if every == 0:
            return False
        if guarding:
            every = max(1, every // 10)
        return (step + 1) % every == 0
