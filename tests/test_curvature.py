"""The three-point line model against an exact quadratic, where every coefficient is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_stablelr.curvature import LineModel, line_model, loss_resolution


def _quadratic(seed: int):
    generator = torch.Generator().manual_seed(seed)
    n = 6
    root = torch.randn(n, n, generator=generator, dtype=torch.float64)
    hessian = root @ root.T + 0.5 * torch.eye(n, dtype=torch.float64)
    linear = torch.randn(n, generator=generator, dtype=torch.float64)
    theta = torch.randn(n, generator=generator, dtype=torch.float64)

    def loss(point: torch.Tensor) -> float:
        return float(0.5 * point @ hessian @ point + linear @ point)

    return hessian, linear, theta, loss


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_quadratic_gives_exact_coefficients(seed: int) -> None:
    hessian, linear, theta, loss = _quadratic(seed)
    gradient = hessian @ theta + linear
    update = -0.05 * gradient  # a gradient step: a descent direction, so a < 0 and c > 0
    model = line_model(loss(theta), loss(theta + update), loss(theta - update))

    expected_a = float(gradient @ update)
    expected_c = float(update @ hessian @ update)
    assert expected_a < 0 < expected_c
    assert abs(model.first_order - expected_a) / abs(expected_a) < 1e-12
    assert abs(model.curvature - expected_c) / expected_c < 1e-12
    expected_margin = -2.0 * expected_a / expected_c
    assert abs(model.step_margin - expected_margin) / expected_margin < 1e-12
    assert model.taylor_error < 1e-12
    assert model.finite


def test_exact_quadratic_with_directional_derivative_has_zero_taylor_error() -> None:
    hessian, linear, theta, loss = _quadratic(3)
    gradient = hessian @ theta + linear
    update = -0.1 * gradient
    model = line_model(
        loss(theta),
        loss(theta + update),
        loss(theta - update),
        directional_derivative=float(gradient @ update),
    )
    assert model.taylor_error < 1e-12


def test_cubic_term_shows_up_in_taylor_error_with_directional_derivative() -> None:
    # L(s) = -s + s^2 + s^3 along the line: a = (L(1) - L(-1))/2 = -1 + 1 = 0 vs the exact slope -1.
    def along(s: float) -> float:
        return -s + s**2 + s**3

    model = line_model(along(0.0), along(1.0), along(-1.0), directional_derivative=-1.0)
    assert model.first_order == 0.0
    assert model.curvature == 2.0
    assert model.taylor_error == 1.0


def test_step_margin_cases() -> None:
    # a < 0, c > 0: L(s) = 1 - 2 s + s^2 -> a = -2, c = 2, s_max = 2.
    assert line_model(1.0, 0.0, 4.0) == LineModel(-2.0, 2.0, 2.0, 0.0, resolution=2.0**-5)
    # a < 0, c <= 0: concave along the line -> no upper limit.
    concave = line_model(1.0, 0.0, 1.0)
    assert (concave.first_order, concave.curvature, concave.step_margin) == (-0.5, -1.0, math.inf)
    assert concave.finite and concave.predicts_decrease
    # a >= 0: not a descent direction.
    ascent = line_model(1.0, 2.0, 0.5)
    assert ascent.first_order == 0.75
    assert ascent.step_margin == 0.0
    assert not ascent.predicts_decrease


def test_curvature_margin_judges_the_steps_size_whatever_its_direction() -> None:
    # a descent step: the curvature margin is s_max
    descent = line_model(1.0, 0.0, 4.0)
    assert descent.curvature_margin == descent.step_margin == 2.0
    # uphill on this batch with little curvature (noise, momentum): a small step, a large margin
    uphill = line_model(1.0, 1.1, 0.9)  # a = 0.1, c = 0.0 up to rounding -> no curvature to overshoot
    assert uphill.step_margin == 0.0 and uphill.curvature_margin == math.inf
    uphill = line_model(1.0, 1.2, 0.9)  # a = 0.15, c = 0.1
    assert uphill.curvature_margin == pytest.approx(2 * 0.15 / 0.1)
    # across a valley (both neighbours far up): curvature dominates, a small margin, as for an overshoot
    valley = line_model(1.0, 3.0, 2.8)  # a = 0.1, c = 3.8
    assert valley.curvature_margin == pytest.approx(2 * 0.1 / 3.8)
    assert math.isnan(line_model(1.0, math.nan, 2.0).curvature_margin)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("position", [0, 1, 2])
def test_non_finite_loss_gives_non_finite_model(bad: float, position: int) -> None:
    losses = [1.0, 0.5, 2.0]
    losses[position] = bad
    model = line_model(*losses)
    assert math.isnan(model.step_margin)
    assert math.isnan(model.taylor_error)
    assert not model.finite
    assert not model.predicts_decrease


def test_loss_resolution_detects_the_losses_format() -> None:
    import torch

    def rounded(dtype: torch.dtype, *values: float) -> list[float]:
        return [float(torch.tensor(v, dtype=dtype).float()) for v in values]

    bf16 = rounded(torch.bfloat16, 2.31, 2.30, 2.33)
    assert loss_resolution(*bf16) == 2.0**-6  # 2.3 lies in [2, 4): ulp 2^(1-7)
    assert loss_resolution(*rounded(torch.float16, 2.31, 2.30, 2.33)) == 2.0**-9
    assert loss_resolution(*rounded(torch.float32, 2.31, 2.30, 2.33)) == 2.0**-22
    assert loss_resolution(2.31, 2.30, 2.33) == 2.0**-51  # Python floats: float64
    assert loss_resolution(0.0, 0.0, 0.0) == 0.0 and loss_resolution(1.0, math.nan, 1.0) == 0.0
    # bf16 losses one or two ulps apart are rounding: unresolved; the same step in fp32 is resolved
    assert not line_model(*bf16).resolved
    assert line_model(*rounded(torch.float32, 2.31, 2.30, 2.33)).resolved
    assert line_model(*rounded(torch.bfloat16, 2.5, 2.0, 3.5)).resolved  # a real overshoot is seen in bf16
    assert not line_model(1.0, 1.0, 1.0).resolved  # the loss did not move
