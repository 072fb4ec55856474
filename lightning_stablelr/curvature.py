"""The three-point line model of the loss along the last update (pure: floats only).

Given the loss at three points on the line through the update Δθ that the optimizer just made,

    L0 = L(θ),   L+ = L(θ + Δθ),   L- = L(θ - Δθ),

the quadratic through them is ``L(θ + sΔθ) ≈ L0 + a·s + ½·c·s²`` with

    a = (L+ - L-) / 2          ≈ ∇L(θ)ᵀΔθ       (exact for a quadratic loss)
    c = L+ + L- - 2·L0         ≈ ΔθᵀHΔθ         (exact for a quadratic loss)

It predicts a decrease of the loss for step scales ``s`` in ``(0, s_max)`` with

    s_max = -2a / c    if a < 0 and c > 0   (the model has a minimum at -a/c)
          = +inf       if a < 0 and c <= 0  (descent direction with no positive curvature)
          = 0.0        if a >= 0            (not a descent direction: no s > 0 decreases the model)

The step actually taken is ``s = 1``; ``s_max`` is the *step margin* logged as ``lyapunov/step_margin``.
StableLR's guard reads the *curvature margin* ``2|a|/c`` (:attr:`LineModel.curvature_margin`, logged as
``stablelr/step_margin``): ``s_max`` for a descent step, and for a step that went uphill on its batch the same
ratio of slope to curvature, since a lower lr cannot turn such a step downhill.

**Resolution.** Under ``bf16-true``/``16-true`` the losses are rounded to a few significant bits, and a
healthy step moves them by only a few units in the last place (ulp): a and c are then rounding noise.
:func:`loss_resolution` recovers the ulp from the values themselves (three losses that are all exactly
representable in bf16 were almost surely rounded to it), and :attr:`LineModel.resolved` is False when the
losses moved by less than :data:`RESOLVED_ULPS` ulps, so the guard can skip such a check.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

__all__ = ["RESOLVED_ULPS", "LineModel", "line_model", "loss_resolution"]

_EPS = 1e-12

RESOLVED_ULPS = 8.0
"""A line model is resolved when ``|a| + |c|/2 = max(|L+ - L0|, |L- - L0|)`` exceeds this many ulps of the
losses' format: a and c then carry at most ~25% rounding error, enough to tell an overshoot (``c > 2|a|``)."""

# (mantissa bits, low bits of a float32 that must be zero, smallest normal exponent) per format, coarsest first
_FORMATS = ((7, 16, -126), (10, 13, -14))


def _float32_bits(value: float) -> int | None:
    try:
        packed = struct.pack("<f", value)
    except OverflowError:
        return None
    if struct.unpack("<f", packed)[0] != value:
        return None  # not a float32 value (a float64 loss): use float64's resolution
    return struct.unpack("<I", packed)[0]


def loss_resolution(*losses: float) -> float:
    """The ulp of the coarsest float format (bf16, fp16, fp32, fp64) in which every loss is exact.

    ``ulp = 2**(floor(log2(max|L|)) - mantissa_bits)``: 7 bits for bf16, 10 for fp16, 23 for fp32, 52 for
    fp64. Losses computed in fp32 are exact in bf16 with probability ``2**-16`` each, so three of them
    betray a bf16 loss. Returns 0.0 when every loss is 0 or a loss is not finite.
    """
    values = [float(v) for v in losses]
    if not all(math.isfinite(v) for v in values):
        return 0.0
    largest = max((abs(v) for v in values), default=0.0)
    if largest == 0.0:
        return 0.0
    exponent = math.floor(math.log2(largest))
    bits = [_float32_bits(v) for v in values]
    if any(b is None for b in bits):
        return 2.0 ** (exponent - 52)
    for mantissa, low_bits, min_exponent in _FORMATS:
        mask = (1 << low_bits) - 1
        if exponent >= min_exponent and all(b & mask == 0 for b in bits):  # type: ignore[operator]
            return 2.0 ** (exponent - mantissa)
    return 2.0 ** (exponent - 23)


@dataclass(frozen=True)
class LineModel:
    """Coefficients of the quadratic line model (see the module docstring for the formulas).

    Attributes:
        first_order: ``a = (L+ - L-)/2``, approximately ``gᵀΔθ``.
        curvature: ``c = L+ + L- - 2·L0``, approximately ``ΔθᵀHΔθ``.
        step_margin: ``s_max`` (``-2a/c``, ``+inf`` or ``0.0``); NaN when an input loss is not finite.
        taylor_error: relative error of the model, see :func:`line_model`; NaN when not finite.
        resolution: the losses' ulp (:func:`loss_resolution`); 0 when unknown (a model built by hand).
    """

    first_order: float
    curvature: float
    step_margin: float
    taylor_error: float
    resolution: float = 0.0

    @property
    def resolved(self) -> bool:
        """True when the losses moved by more than :data:`RESOLVED_ULPS` ulps: ``|a| + |c|/2 > 8·ulp``.

        Also False for a step that did not move the loss at all (``a == c == 0``).
        """
        moved = abs(self.first_order) + 0.5 * abs(self.curvature)
        return moved > RESOLVED_ULPS * self.resolution and moved > 0.0

    @property
    def finite(self) -> bool:
        """True when ``a``, ``c`` and ``taylor_error`` are finite and ``s_max`` is not NaN (``+inf`` is valid)."""
        return (
            math.isfinite(self.first_order)
            and math.isfinite(self.curvature)
            and not math.isnan(self.step_margin)
            and math.isfinite(self.taylor_error)
        )

    @property
    def curvature_margin(self) -> float:
        """``2|a|/c`` for ``c > 0`` (``+inf`` for ``c <= 0``, NaN when not finite): ``s_max`` of a descent step,
        and for a step that went uphill on the probed batch (``a >= 0``, noise or momentum) the same ratio of
        slope to curvature, so the step's *size* against the curvature is judged, not its direction."""
        if math.isnan(self.step_margin) or not math.isfinite(self.curvature):
            return math.nan
        if self.curvature <= 0:
            return math.inf
        return 2.0 * abs(self.first_order) / self.curvature

    @property
    def predicts_decrease(self) -> bool:
        """True when the model predicts ``L(θ + Δθ) < L0``, i.e. the full step ``s = 1`` is inside ``(0, s_max)``."""
        return self.finite and self.first_order < 0 and self.step_margin > 1.0


def line_model(
    loss_before: float,
    loss_plus: float,
    loss_minus: float,
    *,
    directional_derivative: float | None = None,
    eps: float = _EPS,
) -> LineModel:
    """Fit the quadratic line model through ``(0, L0)``, ``(1, L+)``, ``(-1, L-)``.

    Args:
        loss_before: ``L0 = L(θ)``.
        loss_plus: ``L+ = L(θ + Δθ)`` (the loss after the step).
        loss_minus: ``L- = L(θ - Δθ)`` (the mirrored point).
        directional_derivative: optional exact ``gᵀΔθ`` (for example ``-lr·‖g‖²`` for plain SGD). When
            given, the Taylor error measures the odd higher-order terms: ``|a - gᵀΔθ| / max(|gᵀΔθ|, eps)``.
        eps: floor of the denominators.

    Returns:
        A :class:`LineModel`. Without ``directional_derivative`` the Taylor error is
        ``|L+ - (L0 + a + c/2)| / max(|L+ - L0|, eps)``. Three points determine the quadratic, so this is
        zero up to floating-point round-off: it is a consistency check of the inputs, not a measure of the
        cubic terms. If any loss (or the derivative) is not finite, ``step_margin`` and ``taylor_error``
        are NaN and :attr:`LineModel.finite` is False.
    """
    l0, lp, lm = float(loss_before), float(loss_plus), float(loss_minus)
    first_order = (lp - lm) / 2.0
    curvature = lp + lm - 2.0 * l0
    inputs = [l0, lp, lm]
    if directional_derivative is not None:
        inputs.append(float(directional_derivative))
    if not all(math.isfinite(value) for value in inputs):
        return LineModel(first_order, curvature, math.nan, math.nan)
    resolution = loss_resolution(l0, lp, lm)

    if first_order >= 0:
        step_margin = 0.0
    elif curvature > 0:
        step_margin = -2.0 * first_order / curvature
    else:
        step_margin = math.inf

    if directional_derivative is None:
        predicted = l0 + first_order + 0.5 * curvature
        taylor_error = abs(lp - predicted) / max(abs(lp - l0), eps)
    else:
        exact = float(directional_derivative)
        taylor_error = abs(first_order - exact) / max(abs(exact), eps)
    return LineModel(first_order, curvature, step_margin, taylor_error, resolution)
