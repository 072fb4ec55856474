"""The validated configuration of :class:`~lightning_stablelr.StabilityMonitor` (no Lightning import).

Every field is documented in the callback's ``Args:``; here each one is checked, and a bad value raises
``ValueError("`<argument>` must be <allowed range>, got <value>. <what to do>")``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from lightning_stablelr.validation import check_in_range, check_int_at_least, check_non_negative

__all__ = ["MonitorConfig"]


def _check_max_overhead(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
        raise ValueError(
            f"`max_overhead` must be a number > 0 (a fraction of training time, e.g. 0.05; math.inf turns the "
            f"governor off), got {value!r}."
        )
    return float(value)


def _check_device(value: Any) -> torch.device:
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"`snapshot_device` must be a torch device such as 'cpu' or 'cuda:0', got {value!r}."
        ) from error


def _check_snapshot_memory(value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"`snapshot_memory` must be a float > 0 (a multiple of the parameters' size, e.g. 2.5) or an int"
            f" (bytes, e.g. 2_000_000_000), got {value!r}."
        )
    return value


def _check_dtype(value: Any) -> torch.dtype:
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"`snapshot_dtype` must be a floating torch dtype such as 'bfloat16' or 'float32', got {value!r}."
        )
    return dtype


@dataclass(frozen=True)
class MonitorConfig:
    """The monitor's arguments after validation.

    Cadences (``*_every_n_*``) accept 0, which turns that probe off. ``snapshot_memory`` is a float (a
    multiple of the trainable parameters' size) or an int (bytes); see :meth:`snapshot_budget_bytes`.

    Raises:
        ValueError: a field out of its range; the message names it, the value received and what to do.
    """

    certificate_every_n_steps: int = 32
    certificate_window: int = 16
    sharpness_every_n_steps: int = 500
    sharpness_iters: int = 20
    sharpness_tol: float = 1e-3
    connectivity_every_n_epochs: int = 1
    connectivity_window: int = 4
    connectivity_points: int = 5
    connectivity_batches: int = 2
    connected_tol: float = 1e-3
    bn_recalibration_batches: int = 4
    snapshot_memory: float = 2.5
    snapshot_dtype: Any = torch.float16
    ema_decay: float = 0.98
    monitor: str = "val_loss"
    max_overhead: float = 0.05
    snapshot_device: Any = "cpu"
    log_figures: bool = True

    def __post_init__(self) -> None:
        checked: dict[str, Any] = {
            "certificate_every_n_steps": check_int_at_least(
                "certificate_every_n_steps", self.certificate_every_n_steps, 0, "Use 0 to turn certificates off."
            ),
            "certificate_window": check_int_at_least("certificate_window", self.certificate_window, 1),
            "sharpness_every_n_steps": check_int_at_least(
                "sharpness_every_n_steps", self.sharpness_every_n_steps, 0, "Use 0 to turn sharpness off."
            ),
            "sharpness_iters": check_int_at_least("sharpness_iters", self.sharpness_iters, 1),
            "sharpness_tol": check_non_negative("sharpness_tol", self.sharpness_tol),
            "connectivity_every_n_epochs": check_int_at_least(
                "connectivity_every_n_epochs", self.connectivity_every_n_epochs, 0,
                "Use 0 to turn connectivity probes off.",
            ),
            "connectivity_window": check_int_at_least("connectivity_window", self.connectivity_window, 1),
            "connectivity_points": check_int_at_least(
                "connectivity_points", self.connectivity_points, 3, "A segment needs a point between its endpoints."
            ),
            "connectivity_batches": check_int_at_least("connectivity_batches", self.connectivity_batches, 1),
            "connected_tol": check_non_negative("connected_tol", self.connected_tol),
            "bn_recalibration_batches": check_int_at_least(
                "bn_recalibration_batches", self.bn_recalibration_batches, 0, "Use 0 to keep the running statistics."
            ),
            "snapshot_memory": _check_snapshot_memory(self.snapshot_memory),
            "snapshot_dtype": _check_dtype(self.snapshot_dtype),
            "ema_decay": check_in_range("ema_decay", self.ema_decay, 0.0, 1.0, high_inclusive=False),
            "max_overhead": _check_max_overhead(self.max_overhead),
            "snapshot_device": _check_device(self.snapshot_device),
        }
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ValueError(f"`monitor` must be a non-empty metric name such as 'val_loss', got {self.monitor!r}.")
        if not isinstance(self.log_figures, bool):
            raise ValueError(f"`log_figures` must be True or False, got {self.log_figures!r}.")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """The fields as primitives (the device as a string)."""
        values = {field.name: getattr(self, field.name) for field in fields(self)}
        values["snapshot_device"] = str(values["snapshot_device"])
        values["snapshot_dtype"] = str(values["snapshot_dtype"]).removeprefix("torch.")
        return values

    @property
    def probe_kinds(self) -> list[str]:
        """The kinds of probe that are on (each gets an equal share of the governor's budget)."""
        every = {"certificate": self.certificate_every_n_steps, "sharpness": self.sharpness_every_n_steps,
                 "connectivity": self.connectivity_every_n_epochs,
                 "figures": self.connectivity_every_n_epochs and self.log_figures}  # fmt: skip
        return [kind for kind, on in every.items() if on]

    def minimal_units(self, sharpness_iters: int) -> dict[str, float]:
        """Units of the smallest useful probe of each instrument that is on: one certificate, ``sharpness_iters``
        Hessian-vector products, the newest snapshot's loss and one segment (``connectivity_points - 1``)."""
        minimal = {"certificate": 1.0, "sharpness": float(sharpness_iters),
                   "connectivity": float(self.connectivity_points - 1)}  # fmt: skip
        return {kind: minimal[kind] for kind in self.probe_kinds if kind in minimal}

    @property
    def train_batches_needed(self) -> int:
        """Training batches the monitor keeps: the sharpness batch, BatchNorm recalibration and the
        connectivity probe's fallback when there is no validation loader."""
        needed = [1 if self.sharpness_every_n_steps else 0]
        if self.connectivity_every_n_epochs:
            needed += [self.bn_recalibration_batches, self.connectivity_batches]
        return max(needed)

    def snapshot_budget_bytes(self, parameter_bytes: int) -> int:
        """The snapshot memory budget in bytes: ``snapshot_memory`` bytes (int), or that multiple of
        ``parameter_bytes`` (float; the trainable parameters' size in their own dtype)."""
        if isinstance(self.snapshot_memory, int):
            return self.snapshot_memory
        return int(self.snapshot_memory * parameter_bytes)


#: Old argument names, documented in earlier READMEs and configs, and the names they now set.
DEPRECATED_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "val_monitor": ("monitor",),
    "probe_every_n_epochs": ("connectivity_every_n_epochs",),
    "probe_points": ("connectivity_points",),
    "probe_batches": ("connectivity_batches",),
    "snapshot_window": ("connectivity_window",),
    "window": ("certificate_window", "connectivity_window"),
}


def apply_deprecated(arguments: dict[str, Any], deprecated: dict[str, Any]) -> list[str]:
    """Move the values of deprecated names into ``arguments`` (in place); return one message per old name.

    An old name sets each new name still at its :class:`MonitorConfig` default (so ``window=5,
    certificate_window=7`` keeps 7 and sets ``connectivity_window=5``).

    Raises:
        TypeError: a name that is neither an argument nor a deprecated one.
    """
    defaults = MonitorConfig.__dataclass_fields__
    messages = []
    for old, value in deprecated.items():
        if old not in DEPRECATED_ARGUMENTS:
            raise TypeError(
                f"StabilityMonitor() got an unexpected keyword argument {old!r}; its arguments are"
                f" {', '.join(defaults)}."
            )
        new_names = DEPRECATED_ARGUMENTS[old]
        for new in new_names:
            if arguments[new] == defaults[new].default:
                arguments[new] = value
        messages.append(
            f"StabilityMonitor: `{old}` is deprecated and will be removed; use "
            + " and ".join(f"`{new}`" for new in new_names) + " instead."
        )
    return messages
