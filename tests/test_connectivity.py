"""Connectivity instruments against analytic segments, and the snapshot window's bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_stablelr.connectivity import (
    PairwiseBarrierMatrix,
    SegmentMetrics,
    SnapshotWindow,
    equiconnectedness,
    interpolate,
    segment_losses,
    segment_metrics,
)

ALPHAS_7 = [i / 6 for i in range(7)]


def test_interpolate_is_exact_at_the_endpoints_and_linear_between():
    theta_a = {"w": torch.tensor([0.1, 0.7, -3.3]), "b": torch.tensor(2.0)}
    theta_b = {"w": torch.tensor([1.9, -0.2, 5.1]), "b": torch.tensor(-1.0)}
    assert all(torch.equal(interpolate(theta_a, theta_b, 0.0)[k], theta_a[k]) for k in theta_a)
    assert all(torch.equal(interpolate(theta_a, theta_b, 1.0)[k], theta_b[k]) for k in theta_a)
    quarter = interpolate(theta_a, theta_b, 0.25)
    assert torch.allclose(quarter["w"], torch.tensor([0.55, 0.475, -1.2]))
    assert float(quarter["b"]) == pytest.approx(1.25)
    with pytest.raises(
        ValueError, match=r"theta_a and theta_b must have the same keys, got only-in-a=\['b'\]"
    ):
        interpolate(theta_a, {"w": theta_b["w"]}, 0.5)


def test_segment_losses_on_a_double_well_give_the_analytic_barrier():
    # L(θ) = (θ - a)²(θ - b)² on the segment from a to b is (b - a)^4 t²(1 - t)²: barrier (b - a)^4 / 16.
    a, b = -1.0, 1.0
    grad_enabled = []

    def loss_fn(params):
        grad_enabled.append(torch.is_grad_enabled())
        theta = params["theta"]
        return ((theta - a) ** 2 * (theta - b) ** 2).sum()

    theta_a = {"theta": torch.tensor([a], dtype=torch.float64, requires_grad=True)}
    theta_b = {"theta": torch.tensor([b], dtype=torch.float64)}
    alphas, losses = segment_losses(loss_fn, theta_a, theta_b)
    assert alphas == ALPHAS_7 and grad_enabled == [False] * 7
    expected = [(b - a) ** 4 * t**2 * (1 - t) ** 2 for t in ALPHAS_7]
    assert losses == pytest.approx(expected, abs=1e-12)
    metrics = segment_metrics(alphas, losses)
    assert metrics.barrier == pytest.approx(1.0)
    assert metrics.sublevel_excess == pytest.approx(1.0)
    assert metrics.superlevel_dip == pytest.approx(0.0)
    assert not metrics.connected
    assert theta_a["theta"].grad is None


def test_bump_family_barrier_and_sublevel_excess():
    # L(t) = L_a(1 - t) + L_b t + h 4t(1 - t) with L_a = 1, L_b = 2, h = 0.5, i.e. 1 + 3t - 2t².
    # barrier = h at t = 1/2; on the 7-point grid max L = 19/9 (t = 4/6 and 5/6): excess 1/9.
    losses = [1.0 * (1 - t) + 2.0 * t + 0.5 * 4 * t * (1 - t) for t in ALPHAS_7]
    metrics = segment_metrics(ALPHAS_7, losses, tol=1e-3)
    assert metrics.barrier == pytest.approx(0.5, abs=1e-12)
    assert metrics.sublevel_excess == pytest.approx(1 / 9, abs=1e-12)
    assert metrics.superlevel_dip == pytest.approx(0.0, abs=1e-12)
    assert metrics.connected is False
    assert segment_metrics(ALPHAS_7, losses, tol=0.12).connected is True


def test_dip_family_superlevel_dip():
    # L(t) = 1 + t - 0.5 4t(1 - t) = 1 - t + 2t²: min on the grid 8/9 (t = 1/6 and 2/6), dip 1/9.
    losses = [1.0 * (1 - t) + 2.0 * t - 0.5 * 4 * t * (1 - t) for t in ALPHAS_7]
    metrics = segment_metrics(ALPHAS_7, losses)
    assert metrics == SegmentMetrics(
        barrier=pytest.approx(0.0, abs=1e-12),
        sublevel_excess=pytest.approx(0.0, abs=1e-12),
        superlevel_dip=pytest.approx(1 / 9, abs=1e-12),
        connected=True,
    )


def test_segment_losses_evaluates_the_given_loss_at_each_interpolated_point():
    target = torch.tensor([1.0, -2.0])

    def loss_fn(params):
        return ((params["w"] - target) ** 2).sum()

    theta_a, theta_b = {"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([2.0, -4.0])}
    alphas, losses = segment_losses(loss_fn, theta_a, theta_b, num_points=5, device="cpu")
    assert alphas == [0.0, 0.25, 0.5, 0.75, 1.0]
    # ||t (2, -4) - (1, -2)||² = 5 (2t - 1)²
    assert losses == pytest.approx([5.0, 1.25, 0.0, 1.25, 5.0])
    metrics = segment_metrics(alphas, losses)
    assert (metrics.barrier, metrics.sublevel_excess) == (0.0, 0.0)
    assert metrics.superlevel_dip == pytest.approx(5.0)


def test_non_finite_losses_count_as_infinitely_high():
    interior_nan = segment_metrics([0.0, 0.5, 1.0], [1.0, math.nan, 1.0])
    assert interior_nan.barrier == math.inf and interior_nan.sublevel_excess == math.inf
    assert interior_nan.superlevel_dip == 0.0 and interior_nan.connected is False
    diverged_end = segment_metrics([0.0, 0.5, 1.0], [1.0, 2.0, math.inf])
    assert math.isnan(diverged_end.barrier) and math.isnan(diverged_end.sublevel_excess)
    assert diverged_end.connected is False


def test_segment_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"alphas must increase strictly from 0.0 to 1.0, got \[0.1, 1.0\]"):
        segment_metrics([0.1, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="alphas and losses must have the same length >= 2, got 3 and 2"):
        segment_metrics([0.0, 0.5, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"`tol` must be a finite number >= 0, got -0.1"):
        segment_metrics([0.0, 1.0], [1.0, 1.0], tol=-0.1)
    with pytest.raises(ValueError, match=r"`num_points` must be an integer >= 2, got 1"):
        segment_losses(lambda p: p["w"].sum(), {"w": torch.zeros(1)}, {"w": torch.ones(1)}, num_points=1)


def _params(value: float, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    return {
        "w": torch.full((3, 2), value, requires_grad=requires_grad),
        "b": torch.full((2,), -value, requires_grad=requires_grad),
    }


def test_snapshot_window_clones_to_cpu_and_evicts_the_oldest():
    window = SnapshotWindow(3)
    source = _params(0.0, requires_grad=True)
    first = window.add(source, epoch=0, step=10)
    with torch.no_grad():
        source["w"].add_(100.0)
    assert float(first.params["w"][0, 0]) == 0.0  # a clone, not a view of the live parameter
    assert first.params["w"].device == torch.device("cpu") and not first.params["w"].requires_grad
    for epoch in range(1, 5):
        window.add(_params(float(epoch)), epoch=epoch, step=10 * (epoch + 1))
    assert [s.epoch for s in window.snapshots] == [2, 3, 4]
    assert [s.index for s in window.snapshots] == [2, 3, 4]
    assert [s.step for s in window.snapshots] == [30, 40, 50]
    assert [float(s.params["b"][0]) for s in window.snapshots] == [-2.0, -3.0, -4.0]
    assert len(window) == 3 and window.newest.epoch == 4
    assert window.memory_bytes == 3 * (6 + 2) * 4
    pairs = window.pairs_with_newest()
    assert [(older.epoch, newest.epoch) for older, newest in pairs] == [(2, 4), (3, 4)]


def test_pairwise_barrier_matrix_and_equiconnectedness():
    window = SnapshotWindow(3)
    assert window.pairs_with_newest() == [] and math.isnan(
        equiconnectedness(window.pairwise_barrier_matrix())
    )
    s0 = window.add(_params(0.0), epoch=0, step=1)
    s1 = window.add(_params(1.0), epoch=1, step=2)
    window.record_barrier(s0, s1, 0.25)
    s2 = window.add(_params(2.0), epoch=2, step=3)
    window.record_barrier(s1, s2, 0.0)
    window.record_barrier(s0.index, s2.index, 0.75)
    matrix = window.pairwise_barrier_matrix()
    assert isinstance(matrix, PairwiseBarrierMatrix)
    assert matrix.labels == ["e0", "e1", "e2"] and matrix.epochs == [0, 1, 2] and matrix.steps == [1, 2, 3]
    expected = torch.tensor([[0.0, 0.25, 0.75], [0.25, 0.0, 0.0], [0.75, 0.0, 0.0]], dtype=torch.float64)
    assert torch.equal(matrix.values, expected)
    assert equiconnectedness(matrix) == 0.75

    # Evicting epoch 0 drops its barriers; the new pairs are not measured yet (NaN).
    window.add(_params(3.0), epoch=3, step=4)
    matrix = window.pairwise_barrier_matrix()
    assert matrix.epochs == [1, 2, 3]
    assert matrix.values[0, 1] == 0.0 and matrix.values[1, 0] == 0.0
    assert bool(matrix.values[2, :2].isnan().all()) and bool(matrix.values[:2, 2].isnan().all())
    assert equiconnectedness(matrix) == 0.0
    with pytest.raises(ValueError, match=r"record_barrier needs two different snapshots held by the window"):
        window.record_barrier(s0, s1, 1.0)


def test_equiconnectedness_is_the_max_over_pairs():
    assert equiconnectedness([0.1, 0.4, 0.2]) == 0.4
    assert equiconnectedness({(0, 1): 0.3, (0, 2): 0.9, (1, 2): math.nan}) == 0.9
    metrics = [SegmentMetrics(0.2, 0.0, 0.0, True), SegmentMetrics(0.6, 0.1, 0.0, False)]
    assert equiconnectedness(metrics) == 0.6
    assert math.isnan(equiconnectedness([]))
    assert equiconnectedness(torch.tensor([[0.0, 0.5], [0.5, 9.0]])) == 0.5  # diagonal ignored
    with pytest.raises(ValueError, match=r"pairwise_barriers must be a square matrix, got shape \(2, 3\)"):
        equiconnectedness(torch.zeros(2, 3))


def test_snapshot_window_argument_errors():
    with pytest.raises(ValueError, match=r"`window` must be an integer >= 2, got 1"):
        SnapshotWindow(1)
    with pytest.raises(
        ValueError, match=r"`device` must be a torch device such as 'cpu' or 'cuda:0', got 'gpu0'"
    ):
        SnapshotWindow(2, device="gpu0")
    window = SnapshotWindow(2)
    window.add(_params(0.0), epoch=0, step=0)
    with pytest.raises(ValueError, match="params must have the same names and shapes as the snapshots"):
        window.add({"w": torch.zeros(3, 2)}, epoch=1, step=1)
    window.clear()
    assert len(window) == 0 and window.add({"w": torch.zeros(1)}, epoch=1, step=1).index == 1
