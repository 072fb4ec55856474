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


@dataclass(frozen=True)
class MonitorConfig:
    """The monitor's arguments after validation; ``certificate_window``/``snapshot_window`` default to ``window``.

    Cadences (``*_every_n_*``) accept 0, which turns that probe off.
    """

    certificate_every_n_steps: int = 32
    window: int = 16
    certificate_window: int | None = None
    snapshot_window: int | None = None
    sharpness_every_n_steps: int = 500
    sharpness_iters: int = 20
    sharpness_tol: float = 1e-3
    probe_every_n_epochs: int = 1
    probe_points: int = 7
    probe_batches: int = 4
    connected_tol: float = 1e-3
    bn_recalibration_batches: int = 4
    ema_decay: float = 0.98
    val_monitor: str = "val_loss"
    max_overhead: float = 0.05
    snapshot_device: Any = "cpu"
    log_figures: bool = True

    def __post_init__(self) -> None:
        window = check_int_at_least("window", self.window, 1)
        checked: dict[str, Any] = {
            "certificate_every_n_steps": check_int_at_least(
                "certificate_every_n_steps", self.certificate_every_n_steps, 0, "Use 0 to turn certificates off."
            ),
            "window": window,
            "certificate_window": check_int_at_least(
                "certificate_window", window if self.certificate_window is None else self.certificate_window, 1
            ),
            "snapshot_window": check_int_at_least(
                "snapshot_window", window if self.snapshot_window is None else self.snapshot_window, 1
            ),
            "sharpness_every_n_steps": check_int_at_least(
                "sharpness_every_n_steps", self.sharpness_every_n_steps, 0, "Use 0 to turn sharpness off."
            ),
            "sharpness_iters": check_int_at_least("sharpness_iters", self.sharpness_iters, 1),
            "sharpness_tol": check_non_negative("sharpness_tol", self.sharpness_tol),
            "probe_every_n_epochs": check_int_at_least(
                "probe_every_n_epochs", self.probe_every_n_epochs, 0, "Use 0 to turn connectivity probes off."
            ),
            "probe_points": check_int_at_least(
                "probe_points", self.probe_points, 3, "A segment needs a point between its endpoints."
            ),
            "probe_batches": check_int_at_least("probe_batches", self.probe_batches, 1),
            "connected_tol": check_non_negative("connected_tol", self.connected_tol),
            "bn_recalibration_batches": check_int_at_least(
                "bn_recalibration_batches", self.bn_recalibration_batches, 0, "Use 0 to keep the running statistics."
            ),
            "ema_decay": check_in_range("ema_decay", self.ema_decay, 0.0, 1.0, high_inclusive=False),
            "max_overhead": _check_max_overhead(self.max_overhead),
            "snapshot_device": _check_device(self.snapshot_device),
        }
        if not isinstance(self.val_monitor, str) or not self.val_monitor:
            raise ValueError(f"`val_monitor` must be a non-empty metric name, got {self.val_monitor!r}.")
        if not isinstance(self.log_figures, bool):
            raise ValueError(f"`log_figures` must be True or False, got {self.log_figures!r}.")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """The fields as primitives (the device as a string)."""
        values = {field.name: getattr(self, field.name) for field in fields(self)}
        values["snapshot_device"] = str(values["snapshot_device"])
        return values
