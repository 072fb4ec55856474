"""The plain-words verdict that opens ``stablelr report``: what happened to the run, backed by its numbers.

Pure (no Lightning import). :func:`diagnose` reads the :class:`~lightning_stablelr.report.RunScalars` of a run
and the monitor's budget (from the run's ``hparams.yaml``, when the recipes wrote one) and returns a
:class:`Verdict`: one ``headline`` and the ``findings`` behind it, each a sentence with its numbers.

Rules, in order of precedence for the headline:

- **diverged**: the last training or validation loss is NaN/Inf, or the final validation loss is above
  ``DIVERGED_LOSS_RATIO`` x the first one;
- **overfitting, lr cut**: the gap factor G fell below 1 (StableLR saw the validation loss stop improving
  while the gap ``r = (L_va - L_tr)/|L_va|`` exceeded its tolerance); the finding names the first step and ``1/G``;
- **lr limited by the guard**: the stability factor C ended below ``GUARD_LIMITED_BELOW``;
- **no verdict** (``no-data``): no loss was logged under any of ``LOSS_TAGS`` (a run stopped before its first
  logging step, or a module that logs its loss under another name): nothing shows the run was healthy;
- **healthy**: none of the above.

Independent findings: how many times C went down (the guard acted on a measured overshoot), the ratio of the
largest stable lr (sharpness estimate) to the final lr when it exceeds ``ROOM_RATIO``, a sharpness above the
threshold, non-finite steps, and the monitor's budget when it was lifted above the default on purpose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_MAX_OVERHEAD", "Verdict", "diagnose", "monitor_budget"]

DEFAULT_MAX_OVERHEAD = 0.05
DIVERGED_LOSS_RATIO = 2.0
#: The loss tags the verdict reads (what the recipes and Lightning's ``self.log("train_loss", ...)`` write).
LOSS_TAGS = ("train_loss_step", "train_loss", "train_loss_epoch", "loss", "val_loss")
GUARD_LIMITED_BELOW = 0.5
ROOM_RATIO = 10.0


@dataclass(frozen=True)
class Verdict:
    """``kind`` is one of ``"diverged"``, ``"overfitting"``, ``"guard-limited"``, ``"healthy"``, ``"no-data"``."""

    kind: str
    headline: str
    findings: tuple[str, ...] = field(default_factory=tuple)
    #: the step where overfitting began (first drop of G), for the dashboard's marker; None when it did not
    overfit_step: int | None = None

    def lines(self) -> list[str]:
        """``verdict: <headline>`` then one ``- finding`` line each."""
        return [f"verdict: {self.headline}", *(f"  - {finding}" for finding in self.findings)]


def _find_monitor(node: Any) -> dict[str, Any] | None:
    if isinstance(node, dict):
        if str(node.get("_target_", "")).endswith("StabilityMonitor"):
            return node
        for value in node.values():
            found = _find_monitor(value)
            if found is not None:
                return found
    return None


def monitor_budget(run_dir: Path) -> float | None:
    """``max_overhead`` of the StabilityMonitor in the run's ``hparams.yaml`` (the recipes log their config there).

    Searches ``run_dir`` and below; returns None without such a file or without a monitor in it.
    """
    import yaml

    base = run_dir if run_dir.is_dir() else run_dir.parent
    for path in sorted(base.rglob("hparams.yaml")):
        try:
            monitor = _find_monitor(yaml.safe_load(path.read_text()))
        except (OSError, yaml.YAMLError):
            continue
        if monitor is not None:
            return float(monitor.get("max_overhead", DEFAULT_MAX_OVERHEAD))
    return None


def _series(run: Any, tag: str) -> list[tuple[int, float]]:
    return list(run.scalars.get(tag, ()))


def _loss_tag(run: Any, candidates: tuple[str, ...]) -> str | None:
    return next((tag for tag in candidates if tag in run.scalars), None)


def _diverged(run: Any) -> str | None:
    for tag in LOSS_TAGS:
        last = run.last(tag)
        if last is not None and not math.isfinite(last):
            return f"the last {tag} is {last} (step {run.steps(tag)[-1]})"
    first, last = run.first("val_loss"), run.last("val_loss")
    if first is not None and last is not None and first > 0 and last > DIVERGED_LOSS_RATIO * first:
        return f"val_loss rose from {first:.4g} to {last:.4g} ({last / first:.3g}x its first value)"
    return None


def _lr_tag(run: Any) -> str | None:
    return _loss_tag(run, ("stablelr/lr", "lr")) or next((t for t in run.tags() if t.startswith("stablelr/lr-")), None)


def diagnose(run: Any, budget: float | None = None) -> Verdict:
    """The verdict on ``run`` (a ``RunScalars``); ``budget`` is the monitor's ``max_overhead`` if known."""
    findings: list[str] = []
    lr_tag = _lr_tag(run)
    # the peak, not the first value: warmup starts the lr low
    lr_start, lr_end = (max(run.values(lr_tag)), run.last(lr_tag)) if lr_tag else (None, None)

    gap_factor = _series(run, "stablelr/gap_factor")
    cuts = [(step, after) for (_, before), (step, after) in pairwise(gap_factor) if after < before]
    overfit_step = cuts[0][0] if cuts else None
    if cuts:
        final_g = gap_factor[-1][1]
        gap = run.last("stablelr/gap")
        findings.append(
            f"overfitting began at step {overfit_step}: the validation loss stopped improving while the gap "
            f"(L_va - L_tr)/|L_va| reached {gap:.3g}, so G cut the lr {1 / final_g:.3g}x in {len(cuts)} step(s) "
            f"(gap_factor {final_g:.3g})"
        )
    stability = _series(run, "stablelr/stability_factor")
    drops = sum(1 for (_, before), (_, after) in pairwise(stability) if after < before)
    # The guard's own cumulative count (stablelr/guard_overshoot) is exact; in older logs only the logged C
    # values exist, and their drops are a lower bound.
    overshoots = run.last("stablelr/guard_overshoot")
    where = "by its own count" if overshoots is not None else f"stability_factor fell {drops} time(s) in the logged points"
    drops = drops if overshoots is None else int(overshoots)
    if stability:
        low, high = min(value for _, value in stability), max(value for _, value in stability)
        boosts = run.last("stablelr/guard_boost")
        if drops:
            findings.append(f"the guard acted {drops} time(s) on a measured overshoot ({where}; lowest {low:.3g}, "
                            f"last {stability[-1][1]:.3g})")  # fmt: skip
        elif high <= 1.0:
            findings.append("the guard never had to act (stability_factor stayed at 1)")
        if high > 1.0 or boosts:  # a boost (max_lr_boost > 1): the base lr was too small for the loss
            count = f"{int(boosts)} time(s)" if boosts is not None else "in the logged points"
            findings.append(f"the guard raised a too-small base lr {count} (max_lr_boost; stability_factor up to "
                            f"{high:.3g}x, last {stability[-1][1]:.3g}): a larger base lr would start there")  # fmt: skip
    if lr_start is not None and lr_end is not None and lr_start > 0:
        findings.append(f"lr peak {lr_start:.3g} -> end {lr_end:.3g} ({lr_start / lr_end:.3g}x lower)"
                        if lr_end < lr_start else f"lr peak {lr_start:.3g} = end")
    max_stable = run.last("lyapunov/max_stable_lr")
    if max_stable is not None and lr_end and math.isfinite(max_stable) and max_stable / lr_end > ROOM_RATIO:
        findings.append(f"the lr ends {max_stable / lr_end:.3g}x below the largest stable lr ({max_stable:.3g}, "
                        "from the sharpness): the curvature would allow a larger lr"
                        + (" - G lowered it on purpose, against overfitting" if cuts else ""))
    eos = run.values("lyapunov/eos_ratio")
    if eos and max(eos) > 1.0:
        findings.append(f"sharpness exceeded the stability threshold (eos_ratio up to {max(eos):.3g} > 1)")
    nonfinite = run.values("stablelr/nonfinite_steps")
    if nonfinite and max(nonfinite) > 0:
        findings.append(f"{int(max(nonfinite))} step(s) had a NaN/Inf loss or gradient and were dropped")
    overhead = run.last("monitor/overhead")
    if budget is not None and budget > DEFAULT_MAX_OVERHEAD:
        shown = f"; it used {overhead:.0%}" if overhead is not None and math.isfinite(overhead) else ""
        findings.append(f"the monitor's budget was lifted on purpose: max_overhead={budget:g} instead of the "
                        f"default {DEFAULT_MAX_OVERHEAD:g} (probes may take that share of training time{shown})")

    diverged = _diverged(run)
    if diverged:
        return Verdict("diverged", f"diverged: {diverged}", tuple(findings), overfit_step)
    if cuts:
        final_g = gap_factor[-1][1]
        if not (lr_start and lr_end):
            return Verdict("overfitting", f"the model began to overfit at step {overfit_step}", tuple(findings),
                           overfit_step)
        # G alone would put the lr at lr_peak * G; an lr well above that is held by the floor (min_lr_ratio).
        floor = " and the lr sits at its floor (min_lr_ratio x base lr)" if lr_end > 2 * lr_start * final_g else ""
        return Verdict("overfitting", f"the lr ends {lr_start / lr_end:.3g}x below its peak because G cut it "
                       f"{1 / final_g:.3g}x after the model began to overfit at step {overfit_step}{floor}",
                       tuple(findings), overfit_step)
    if stability and stability[-1][1] < GUARD_LIMITED_BELOW:
        return Verdict("guard-limited", f"the lr is held down by the guard (stability_factor {stability[-1][1]:.3g}):"
                       " the base lr is too high for this model", tuple(findings))
    if _loss_tag(run, LOSS_TAGS) is None:
        return Verdict("no-data", "no verdict: no training or validation loss was logged (the run stopped before its"
                       f" first logging step, or its LightningModule logs none of {', '.join(LOSS_TAGS)})",
                       tuple(findings))
    return Verdict("healthy", "healthy: the loss stayed finite, no overfitting cut, the guard did not hold the lr "
                   "down", tuple(findings))
