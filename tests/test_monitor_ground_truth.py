"""StabilityMonitor against closed forms: a float64 quadratic and a one-parameter loss with a known bump.

On ``L(θ) = ½ θᵀAθ + bᵀθ`` trained by SGD, the update of step t is ``Δ = -lr·g_t`` (``g_t = Aθ_t + b``), so
``first_order = gᵀΔ``, ``curvature = ΔᵀAΔ/‖Δ‖²``, ``delta_v = L(θ_{t+1}) - L(θ_t)`` and ``step_margin = -2a/c``
exactly, and the sharpness is the top eigenvalue of A.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_stablelr.callbacks.monitor import StabilityMonitor
from tests.helpers import make_trainer
from tests.test_monitor_support import (
    BumpModule,
    QuadraticModule,
    RecordingLogger,
    constant_loader,
    series,
    single_thread,  # noqa: F401  (autouse: one torch thread)
)


def _fit_quadratic(tmp_path, lr: float, steps: int, **monitor_args):
    model = QuadraticModule(dim=5, lr=lr, seed=3)
    logger = RecordingLogger()
    monitor = StabilityMonitor(max_overhead=math.inf, connectivity_every_n_epochs=0, **monitor_args)
    trainer = make_trainer(tmp_path, max_epochs=1, logger=logger, callbacks=[monitor], limit_val_batches=0)
    trainer.fit(model, train_dataloaders=constant_loader(steps))
    return model, logger


def test_certificates_equal_the_exact_quadratic_values(tmp_path):
    lr, steps = 0.4, 6
    model, logger = _fit_quadratic(tmp_path, lr, steps, certificate_every_n_steps=1, sharpness_every_n_steps=0)
    hessian, linear = model.hessian, model.linear
    thetas = model.trajectory(steps)
    assert torch.allclose(model.theta.detach(), thetas[-1], rtol=0, atol=1e-12)

    def loss(theta):
        return float(0.5 * theta @ hessian @ theta + linear @ theta)

    logged = {tag: series(logger, f"lyapunov/{tag}") for tag in ("first_order", "curvature", "delta_v", "step_margin")}
    assert sorted(logged["curvature"]) == list(range(steps))  # certificate of step t logged at step t
    for t in range(steps):
        gradient = hessian @ thetas[t] + linear
        update = -lr * gradient
        first_order = float(gradient @ update)
        curvature = float(update @ hessian @ update / (update @ update))
        assert logged["first_order"][t] == pytest.approx(first_order, rel=1e-4)
        assert logged["curvature"][t] == pytest.approx(curvature, rel=1e-4)
        assert logged["delta_v"][t] == pytest.approx(loss(thetas[t + 1]) - loss(thetas[t]), rel=1e-4)
        step_margin = -2.0 * first_order / float(update @ hessian @ update)
        assert logged["step_margin"][t] == pytest.approx(step_margin, rel=1e-4)
    # lr below 2/λ_max: every step decreases the loss, the EMA decreases over the window.
    assert series(logger, "lyapunov/certified_rate") == {t: 1.0 for t in range(steps)}
    assert series(logger, "lyapunov/ema_decrease") == {t: 1.0 for t in range(1, steps)}
    assert set(series(logger, "lyapunov/decrease").values()) == {1.0}


def test_certified_rate_is_the_fraction_of_decreasing_steps_in_the_window(tmp_path):
    # lr above 2/λ_max diverges along the top eigenvector: late steps increase the loss.
    model = QuadraticModule(dim=5, lr=0.1, seed=3)
    top = float(torch.linalg.eigvalsh(model.hessian)[-1])
    lr, steps, window = 2.2 / top, 12, 4
    model, logger = _fit_quadratic(
        tmp_path, lr, steps, certificate_every_n_steps=1, sharpness_every_n_steps=0, certificate_window=window
    )
    hessian, linear = model.hessian, model.linear
    thetas = model.trajectory(steps)
    decreases = [
        float(0.5 * b @ hessian @ b + linear @ b) <= float(0.5 * a @ hessian @ a + linear @ a)
        for a, b in itertools.pairwise(thetas)
    ]
    assert not all(decreases) and any(decreases)
    expected = {t: sum(decreases[max(0, t - window + 1) : t + 1]) / min(t + 1, window) for t in range(steps)}
    assert series(logger, "lyapunov/certified_rate") == pytest.approx(expected)
    assert series(logger, "lyapunov/decrease") == {t: float(d) for t, d in enumerate(decreases)}


def test_sharpness_is_the_top_eigenvalue_and_thresholds_follow(tmp_path):
    lr = 0.3
    model, logger = _fit_quadratic(
        tmp_path, lr, 6, certificate_every_n_steps=0, sharpness_every_n_steps=2, sharpness_iters=50, sharpness_tol=1e-6
    )
    top = float(torch.linalg.eigvalsh(model.hessian)[-1])
    sharpness = series(logger, "lyapunov/sharpness")
    assert sorted(sharpness) == [1, 3, 5]  # after optimizer steps 2, 4, 6 (logged at the step index)
    for value in sharpness.values():
        assert value == pytest.approx(top, rel=1e-2)
    assert series(logger, "lyapunov/stability_threshold") == {step: pytest.approx(2.0 / lr) for step in sharpness}
    for step, ratio in series(logger, "lyapunov/eos_ratio").items():
        assert ratio == pytest.approx(sharpness[step] * lr / 2.0, rel=1e-12)
        assert series(logger, "lyapunov/max_stable_lr")[step] == pytest.approx(2.0 / sharpness[step], rel=1e-12)


def test_connectivity_metrics_equal_the_analytic_bump_and_valley(tmp_path):
    height = 0.5
    model = BumpModule(height=height, start=-1.0)  # snapshots at w = 0, 1, 2 after epochs 0, 1, 2
    logger = RecordingLogger()
    monitor = StabilityMonitor(
        certificate_every_n_steps=0, sharpness_every_n_steps=0, connectivity_points=7, connectivity_batches=1,
        connected_tol=1e-3, max_overhead=math.inf,
    )
    trainer = make_trainer(tmp_path, max_epochs=3, logger=logger, callbacks=[monitor])
    trainer.fit(model, train_dataloaders=constant_loader(1), val_dataloaders=constant_loader(1))
    assert model.w.item() == 2.0

    barrier = series(logger, "connectivity/barrier")
    assert sorted(barrier) == [2, 3]  # epochs 1 and 2 end after optimizer steps 2 and 3
    # Segment w: 0 -> 1, f = 1 + s/4 + h·sin(πs): the chord is 1 + s/4, so the barrier is h at s = 1/2;
    # the highest grid point is s = 1/2 (1.125 + h), above max(L_a, L_b) = 1.25 by h - 1/8.
    assert barrier[2] == pytest.approx(height, abs=1e-6)
    assert series(logger, "connectivity/sublevel_excess")[2] == pytest.approx(height - 0.125, abs=1e-6)
    assert series(logger, "connectivity/superlevel_dip")[2] == pytest.approx(0.0, abs=1e-6)
    assert series(logger, "connectivity/connected")[2] == 0.0
    # Segment w: 1 -> 2, f = 1.25 + s/4 - h·sin(πs): a valley, no barrier, dip h - 1/8 at s = 1/2.
    assert barrier[3] == pytest.approx(0.0, abs=1e-6)
    assert series(logger, "connectivity/sublevel_excess")[3] == pytest.approx(0.0, abs=1e-6)
    assert series(logger, "connectivity/superlevel_dip")[3] == pytest.approx(height - 0.125, abs=1e-6)
    assert series(logger, "connectivity/connected")[3] == 1.0
    # Window: barriers h (0->1), 0 (1->2), and for 0 -> 2, f = 1 + s/2 + h·sin(2πs): h·sin(π/3) at s = 1/6.
    equiconnectedness = series(logger, "connectivity/equiconnectedness")
    assert equiconnectedness[2] == pytest.approx(height, abs=1e-6)
    assert equiconnectedness[3] == pytest.approx(height, abs=1e-6)
    matrix = monitor.last_report.matrix
    assert matrix.labels == ["e0", "e1", "e2"]
    assert float(matrix.values[0, 2]) == pytest.approx(height * math.sqrt(3) / 2, abs=1e-6)
    assert float(matrix.values[1, 2]) == pytest.approx(0.0, abs=1e-6)
    segment = monitor.last_report.segments[-1]
    alphas = [k / 6 for k in range(7)]
    assert segment[2] == pytest.approx(tuple(alphas))
    expected = [BumpModule.profile(1.0 + a, height) for a in alphas]
    assert list(segment[3]) == pytest.approx(expected, abs=1e-6)


def test_state_dict_restores_the_certificate_window_and_counters(tmp_path):
    model = QuadraticModule(dim=5, lr=0.4, seed=3)
    monitor = StabilityMonitor(certificate_every_n_steps=1, sharpness_every_n_steps=0, connectivity_every_n_epochs=0,
                               certificate_window=4, max_overhead=math.inf)
    trainer = make_trainer(tmp_path, logger=RecordingLogger(), callbacks=[monitor], limit_val_batches=0)
    trainer.fit(model, train_dataloaders=constant_loader(6))
    state = monitor.state_dict()
    assert state["certificates"]["window"]["decreases"] == [True] * 4
    assert state["certificates"]["ema"]["count"] == 6.0
    restored = StabilityMonitor(certificate_window=4)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert restored.certificates.window.metrics() == monitor.certificates.window.metrics() == {
        "lyapunov/certified_rate": 1.0, "lyapunov/ema_decrease": 1.0}
    StabilityMonitor().load_state_dict({})  # an empty (older) state is tolerated
