"""StableLRScheduler.check_step(closure, loss=...): the step's training loss stands in for L0 (two closure calls
instead of three) once a replay has reproduced it, with every check's numbers unchanged."""

from __future__ import annotations

import pytest
import torch

from lightning_stablelr.scheduler import StableLRScheduler
from tests.test_scheduler import _regression


def _loop_with_training_loss(pass_loss: bool, dropout: float, steps: int = 24) -> tuple[list, int, StableLRScheduler]:
    """A plain loop checking every step; returns (every check's a, c and C, closure calls, scheduler)."""
    _, loader = _regression()
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    scheduler = StableLRScheduler(optimizer, steps_per_epoch=4, decay_rate=0.0, check_every_n_steps=1, guard_window=1)
    history, calls = [], [0]
    for step in range(steps):
        x, y = loader[step % len(loader)]

        def closure(x=x, y=y) -> torch.Tensor:
            calls[0] += 1
            return torch.nn.functional.mse_loss(net(x), y)

        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        scheduler.snapshot()
        optimizer.step()
        line = scheduler.check_step(closure, loss=loss.detach() if pass_loss else None)
        history.append((line.first_order, line.curvature, scheduler.controller.stability_factor))
        scheduler.step()
    return history, calls[0], scheduler


def test_check_step_with_the_training_loss_calls_the_closure_twice_and_changes_nothing() -> None:
    reused, calls, scheduler = _loop_with_training_loss(pass_loss=True, dropout=0.0)
    replayed, replay_calls, _ = _loop_with_training_loss(pass_loss=False, dropout=0.0)
    assert replay_calls == 3 * 24
    assert calls == 3 * 2 + 2 * 22  # checks 0 and 16 replay L0 (verification), the other 22 take it
    assert (scheduler.loss_reuse.reused, scheduler.loss_reuse.refuted) == (22, False)
    assert reused == replayed  # every check's a, c and C, bit for bit
    assert min(h[2] for h in reused) < 1.0  # the guard acted on these checks


def test_check_step_with_dropout_in_the_closure_refutes_the_training_loss_at_once() -> None:
    reused, calls, scheduler = _loop_with_training_loss(pass_loss=True, dropout=0.5)
    replayed, _, _ = _loop_with_training_loss(pass_loss=False, dropout=0.5)
    assert (scheduler.loss_reuse.reused, scheduler.loss_reuse.refuted, calls) == (0, True, 3 * 24)
    assert reused == replayed



def test_a_loss_that_is_not_a_scalar_is_refused_before_the_snapshot_is_used() -> None:
    model, loader = _regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = StableLRScheduler(optimizer, steps_per_epoch=4, decay_rate=0.0)
    x, y = loader[0]
    per_sample = (model(x) - y).pow(2).squeeze(1)
    per_sample.mean().backward()
    scheduler.snapshot()
    optimizer.step()
    with pytest.raises(ValueError, match=r"scalar training loss, got a tensor of shape \(8,\)"):
        scheduler.check_step(lambda: torch.nn.functional.mse_loss(model(x), y), loss=per_sample.detach())
    line = scheduler.check_step(lambda: torch.nn.functional.mse_loss(model(x), y), loss=per_sample.mean().detach())
    assert line.finite  # the snapshot was still there for the corrected call
