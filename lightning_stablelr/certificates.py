"""Lyapunov-decrease certificates from the three-point line probe (pure: no Lightning import).

With V(θ) = L(θ) as the Lyapunov candidate and the losses of the shared line probe on one batch,

    L0 = L(θ_t),   L+ = L(θ_t + Δθ),   L- = L(θ_t - Δθ),

one optimizer step is *certified* when it decreased V on its batch:

    delta_v   = L+ - L0                 (≤ 0: the step decreased the batch loss)
    decrease  = 1 if delta_v ≤ 0 else 0
    curvature = c / ‖Δθ‖²               (c = L+ + L- - 2·L0: the Rayleigh quotient ΔθᵀHΔθ / ΔθᵀΔθ)

A single minibatch step may increase the loss in healthy training, so the certificates that matter
are windowed over the last ``window`` certificates (:class:`CertificateWindow`):

    certified_rate = (# certificates with decrease = 1) / (# certificates in the window)
    ema_decrease   = 1 if EMA(L_train) now < EMA(L_train) at the oldest certificate in the window else 0

and, between validations (:class:`ValidationTrend`), ``val_decrease = 1 if L_val(now) < L_val(previous)``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_stablelr.curvature import LineModel
from lightning_stablelr.validation import check_in_range, check_int_at_least

__all__ = ["Certificate", "CertificateWindow", "LossEMA", "ValidationTrend", "certificate"]


@dataclass(frozen=True)
class Certificate:
    """One step's Lyapunov certificate (see the module docstring for the formulas).

    Attributes:
        delta_v: ``L+ - L0``, the change of the batch loss made by the step.
        decrease: True when ``delta_v <= 0`` (False when any loss is not finite).
        first_order: ``a = (L+ - L-)/2 ≈ gᵀΔθ``.
        curvature: ``c / ‖Δθ‖²``; NaN when the step was zero (no direction to measure along).
        step_margin: ``s_max`` of the line model (``-2a/c``, ``+inf`` or ``0``).
        taylor_error: ``|a - gᵀΔθ| / |gᵀΔθ|`` with g the step's own gradient (third-order terms the quadratic
            line model misses); the three-point consistency check (≈ 0) under gradient accumulation.
    """

    delta_v: float
    decrease: bool
    first_order: float
    curvature: float
    step_margin: float
    taylor_error: float

    def metrics(self, prefix: str = "lyapunov/") -> dict[str, float]:
        """The certificate as ``{prefix + name: value}``, leaving out values that are NaN."""
        values = {
            "delta_v": self.delta_v,
            "decrease": float(self.decrease),
            "first_order": self.first_order,
            "curvature": self.curvature,
            "step_margin": self.step_margin,
            "taylor_error": self.taylor_error,
        }
        return {prefix + name: value for name, value in values.items() if not math.isnan(value)}


def certificate(loss_before: float, loss_after: float, line: LineModel, update_norm_sq: float) -> Certificate:
    """Build the :class:`Certificate` of one step from the line probe's numbers.

    ``delta_v = loss_after - loss_before``; ``decrease = delta_v <= 0`` (False if not finite);
    ``curvature = line.curvature / update_norm_sq`` (NaN when ``update_norm_sq <= 0`` or not finite).
    """
    delta_v = float(loss_after) - float(loss_before)
    decrease = math.isfinite(delta_v) and delta_v <= 0.0
    norm_sq = float(update_norm_sq)
    curvature = line.curvature / norm_sq if norm_sq > 0.0 and math.isfinite(norm_sq) else math.nan
    return Certificate(
        delta_v=delta_v,
        decrease=decrease,
        first_order=float(line.first_order),
        curvature=float(curvature),
        step_margin=float(line.step_margin),
        taylor_error=float(line.taylor_error),
    )


class LossEMA:
    """Bias-corrected exponential moving average of the training loss, kept on the loss's device.

    ``m_n = decay·m_{n-1} + (1 - decay)·x_n`` with ``m_0 = 0`` and the reported value ``m_n / (1 - decayⁿ)``
    (Adam's correction, so the first values are not pulled towards 0). Non-finite losses are skipped.

    :meth:`update` only appends the loss tensor (no arithmetic, no host synchronisation: it runs every
    step); the pending losses are folded in one vectorised step when the value is needed, every
    ``fold_every`` updates, or by :meth:`packed`. For pending finite losses ``x_1..x_k`` (non-finite ones
    carry weight 0 and do not count), ``m ← decayᵏ·m + (1 - decay)·Σ_i decay^(finite losses after i)·x_i``.
    The average is linear in the losses, so the mean over DDP ranks of ``(m, n)`` gives the EMA of the
    rank-mean losses (:meth:`corrected` turns the mean into the value).
    """

    def __init__(self, decay: float, fold_every: int = 256) -> None:
        self.decay = check_in_range("decay", decay, 0.0, 1.0, high_inclusive=False)
        self.fold_every = check_int_at_least("fold_every", fold_every, 1)
        self.mean: Tensor | None = None
        self.count: Tensor | None = None
        self._pending: list[Tensor] = []

    def update(self, value: float | Tensor) -> None:
        """Queue one loss (a 0-d tensor or a float); NaN and infinite losses are skipped when folded."""
        self._pending.append(value if isinstance(value, Tensor) else torch.tensor(float(value)))
        if len(self._pending) >= self.fold_every:
            self._fold()

    def _fold(self) -> None:
        if not self._pending:
            return
        losses = torch.stack([value.detach().reshape(()) for value in self._pending]).to(torch.float64)
        self._pending = []
        if self.mean is None or self.count is None:
            self.mean = torch.zeros((), dtype=torch.float64, device=losses.device)
            self.count = torch.zeros((), dtype=torch.float64, device=losses.device)
        finite = torch.isfinite(losses)
        weights = finite.to(torch.float64)
        later = weights.flip(0).cumsum(0).flip(0) - weights  # finite losses after each one
        folded = (torch.where(finite, losses, 0.0) * torch.pow(self.decay, later)).sum()
        total = weights.sum()
        self.mean = torch.pow(self.decay, total) * self.mean + (1.0 - self.decay) * folded
        self.count = self.count + total

    def packed(self) -> Tensor | None:
        """``[m, n]`` as one float64 tensor (for a cross-rank mean), or None before the first update."""
        self._fold()
        if self.mean is None or self.count is None:
            return None
        return torch.stack([self.mean, self.count])

    def corrected(self, mean: float, count: float) -> float | None:
        """``mean / (1 - decay**count)``; None when ``count`` is 0 (no finite loss yet)."""
        if count <= 0:
            return None
        return float(mean) / (1.0 - self.decay ** float(count))

    @property
    def value(self) -> float | None:
        """The bias-corrected average, or None before the first finite loss."""
        packed = self.packed()
        if packed is None:
            return None
        mean, count = packed.tolist()
        return self.corrected(mean, count)

    def state_dict(self) -> dict[str, Any]:
        """Primitives only: ``{"mean", "count"}``."""
        packed = self.packed()
        mean, count = (0.0, 0.0) if packed is None else packed.tolist()
        return {"mean": mean, "count": count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`, tolerating missing keys."""
        self._pending = []
        self.mean = torch.tensor(float(state.get("mean", 0.0)), dtype=torch.float64)
        self.count = torch.tensor(float(state.get("count", 0.0)), dtype=torch.float64)


class CertificateWindow:
    """The windowed certificates over the last ``window`` certified steps.

    ``certified_rate`` is the fraction of the last ``window`` certificates with ``decrease`` (over the
    ones seen so far while fewer). ``ema_decrease`` compares the training-loss EMA recorded with the
    newest certificate against the one recorded with the oldest certificate still in the window
    (``window`` certificates back once full): 1.0 if it went down, 0.0 if not, None with fewer than two.
    """

    def __init__(self, window: int) -> None:
        self.window = check_int_at_least("window", window, 1)
        self.decreases: deque[bool] = deque(maxlen=window)
        # window + 1 values: the newest EMA is compared with the EMA `window` certificates earlier.
        self.emas: deque[float] = deque(maxlen=window + 1)

    def record(self, decrease: bool, ema: float | None = None) -> None:
        """Append one certificate's ``decrease`` flag and the training-loss EMA at that step (if known)."""
        self.decreases.append(bool(decrease))
        if ema is not None and math.isfinite(ema):
            self.emas.append(float(ema))

    @property
    def certified_rate(self) -> float | None:
        """Fraction of decreasing steps among the certificates in the window; None when empty."""
        if not self.decreases:
            return None
        return sum(self.decreases) / len(self.decreases)

    @property
    def ema_decrease(self) -> float | None:
        """1.0 when the EMA decreased across the window, 0.0 when not, None with fewer than two EMAs."""
        if len(self.emas) < 2:
            return None
        return float(self.emas[-1] < self.emas[0])

    def metrics(self, prefix: str = "lyapunov/") -> dict[str, float]:
        """``{prefix + "certified_rate", prefix + "ema_decrease"}`` for the values that are defined."""
        values = {"certified_rate": self.certified_rate, "ema_decrease": self.ema_decrease}
        return {prefix + name: value for name, value in values.items() if value is not None}

    def state_dict(self) -> dict[str, Any]:
        """Primitives only: the window length, the decrease flags and the EMA history."""
        return {"window": self.window, "decreases": list(self.decreases), "emas": list(self.emas)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (the current ``window`` wins if it changed); tolerant of gaps."""
        self.decreases = deque((bool(x) for x in state.get("decreases", [])), maxlen=self.window)
        self.emas = deque((float(x) for x in state.get("emas", [])), maxlen=self.window + 1)


class ValidationTrend:
    """``val_decrease``: 1.0 when the validation loss is below the previous validation's, else 0.0.

    :meth:`observe` returns None for the first validation (nothing to compare with) and for non-finite
    values, which are not remembered either.
    """

    def __init__(self) -> None:
        self.previous: float | None = None

    def observe(self, val_loss: float) -> float | None:
        """Record ``val_loss`` and return the decrease flag against the previous one (None if undefined)."""
        val_loss = float(val_loss)
        if not math.isfinite(val_loss):
            return None
        previous, self.previous = self.previous, val_loss
        if previous is None:
            return None
        return float(val_loss < previous)

    def state_dict(self) -> dict[str, Any]:
        """Primitives only: ``{"previous"}``."""
        return {"previous": self.previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`, tolerating a missing key."""
        previous = state.get("previous")
        self.previous = None if previous is None else float(previous)
