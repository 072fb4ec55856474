"""StableLRScheduler: exact lr trajectories, param-group ratios, resume, and the guard through a closure."""

from __future__ import annotations

import gc
import io
import math
import re
import warnings

import pytest
import torch

from lightning_stablelr.controller import StableLRController
from lightning_stablelr.scheduler import StableLRScheduler


def _regression(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(32, 3, generator=generator)
    targets = inputs @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(32, 1, generator=generator)
    loader = [(inputs[i : i + 8], targets[i : i + 8]) for i in range(0, 32, 8)]
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    return model, loader


def test_readme_example_trains_and_follows_the_closed_form() -> None:
    model, loader = _regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.functional.mse_loss

    def evaluate(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(sum(loss_fn(model(x), y) for x, y in loader) / len(loader))

    seen, train_losses = [], []
    # The docstring's example, verbatim apart from the two recording lines.
    scheduler = StableLRScheduler(optimizer, steps_per_epoch=len(loader))
    for _epoch in range(3):
        for x, y in loader:
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            scheduler.observe(train_loss=loss.item())
            scheduler.step()
            train_losses.append(loss.item())
        scheduler.observe(val_loss=evaluate(model))  # once per validation: updates G

    # The model is still far from overfitting (train and validation data coincide), so G stays 1.
    assert scheduler.controller.gap_factor == 1.0
    # Defaults: without total_steps no time decay (one warning), linear warmup over the first 20 steps.
    assert seen == [max(0.001, 0.1 * min(1.0, (step + 1) / 20)) for step in range(12)]
    assert scheduler.get_last_lr() == [pytest.approx(0.1 * 13 / 20, rel=1e-12)]  # step 12: still warming up
    assert train_losses[-1] < 0.5 * train_losses[0]


def test_exact_trajectory_with_warmup_decay_floor_and_epoch_interval() -> None:
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([parameter], lr=0.4)
    scheduler = StableLRScheduler(
        optimizer, steps_per_epoch=5, decay_rate=0.7, warmup_steps=3, min_lr_ratio=0.05
    )
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == [
        max(0.4 * 0.05, 0.4 * (min(1.0, (k + 1) / 3) * math.exp(-0.7 * (k / 5)))) for k in range(40)
    ]
    assert lrs[0] == 0.4 / 3 and lrs[-1] == 0.4 * 0.05
    assert scheduler.last_epoch == 40 and scheduler.base_lrs == [0.4]

    optimizer = torch.optim.SGD([parameter], lr=0.4)
    scheduler = StableLRScheduler(
        optimizer, steps_per_epoch=5, decay_rate=0.7, interval="epoch", min_lr_ratio=0.0, warmup_steps=0
    )
    lrs = []
    for _ in range(12):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == [0.4] * 5 + [0.4 * math.exp(-0.7)] * 5 + [0.4 * math.exp(-1.4)] * 2


def test_param_groups_keep_their_ratios() -> None:
    first, second = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [first], "lr": 0.1}, {"params": [second], "lr": 0.01}], lr=0.5)
    scheduler = StableLRScheduler(optimizer, steps_per_epoch=2, decay_rate=0.3, min_lr_ratio=0.1)
    for step in range(30):
        optimizer.step()
        scheduler.step()
        if step == 5:
            scheduler.observe_nonfinite()
        high, low = scheduler.get_last_lr()
        assert high / low == pytest.approx(10.0, rel=1e-12)
        assert [group["lr"] for group in optimizer.param_groups] == [high, low]
    # the decay is floored at 0.1 of the base lrs; the non-finite step's C = 1/2 applies after the floor
    assert scheduler.get_last_lr() == pytest.approx([0.005, 0.0005], rel=1e-12)


def _scripted_run(
    scheduler: StableLRScheduler, optimizer: torch.optim.Optimizer, steps: range
) -> list[float]:
    lrs = []
    for step in steps:
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.observe(train_loss=0.1 + 0.01 * (step % 3))
        if step % 4 == 3:
            scheduler.observe(val_loss=1.0 + 0.02 * step)  # gets worse: overfitting
        if step in (2, 9):
            scheduler.observe_line(1.0, 0.9, 1.5)  # a = -0.3, c = 0.4, s_max = 1.5
        if step == 13:
            scheduler.observe_line(1.0, 0.0, 2.0)  # c = 0: s_max = inf, recovery
        scheduler.step()
    return lrs


def test_state_dict_resume_gives_identical_trajectory() -> None:
    def build():
        parameter = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.SGD([parameter], lr=0.2, momentum=0.9)
        scheduler = StableLRScheduler(
            optimizer, steps_per_epoch=4, decay_rate=0.1, warmup_steps=2, gap_patience=2
        )
        return optimizer, scheduler

    optimizer, scheduler = build()
    uninterrupted = _scripted_run(scheduler, optimizer, range(24))
    assert scheduler.controller.gap_factor < 1.0 and scheduler.controller.checks == 3

    optimizer, scheduler = build()
    first_half = _scripted_run(scheduler, optimizer, range(11))
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # primitives only: the safe loader accepts it
    optimizer, scheduler = build()
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    second_half = _scripted_run(scheduler, optimizer, range(11, 24))
    assert first_half + second_half == uninterrupted


def _scheduler(groups: int = 1, steps_per_epoch: int = 4) -> StableLRScheduler:
    parameters = [torch.nn.Parameter(torch.ones(2)) for _ in range(groups)]
    optimizer = torch.optim.SGD([{"params": [p]} for p in parameters], lr=0.1)
    return StableLRScheduler(optimizer, steps_per_epoch=steps_per_epoch, half_life=1.0, warmup_steps=0)


def test_load_state_dict_refuses_a_foreign_or_mismatched_state_and_leaves_the_scheduler_as_it_was() -> None:
    saved = _scheduler()
    for _ in range(5):
        saved.optimizer.step()
        saved.step()
    exponential = torch.optim.lr_scheduler.ExponentialLR(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1), 0.9)
    cases = [
        (_scheduler(), exponential.state_dict(), "got a state without a 'controller' entry (found: ['_get_lr_called_within_step',"),
        (_scheduler(groups=2), saved.state_dict(), "the state holds base lrs for 1 param group(s), this scheduler's optimizer has 2."),
    ]  # fmt: skip
    for target, state, message in cases:
        before = dict(target.__dict__)
        with pytest.raises(ValueError, match=re.escape(message)):
            target.load_state_dict(state)
        assert target.__dict__ == before and target.last_epoch == 0


def test_load_state_dict_says_when_the_saved_steps_per_epoch_replaces_the_schedulers_own() -> None:
    saved = _scheduler(steps_per_epoch=8)
    target = _scheduler(steps_per_epoch=16)
    with pytest.warns(UserWarning, match=re.escape("the state's steps_per_epoch=8 replaces this scheduler's 16")):
        target.load_state_dict(saved.state_dict())
    assert target.steps_per_epoch == 8


def test_a_snapshot_taken_after_the_step_is_named_once_instead_of_leaving_the_guard_silently_off() -> None:
    scheduler = _scheduler()
    parameter = scheduler.optimizer.param_groups[0]["params"][0]
    with pytest.warns(UserWarning, match=re.escape("no parameter moved between snapshot() and check_step()")) as caught:
        for _ in range(3):
            parameter.grad = torch.ones_like(parameter)
            scheduler.optimizer.step()
            scheduler.snapshot()  # the wrong order: after the step
            line = scheduler.check_step(lambda: (parameter**2).sum())
            scheduler.step()
    assert (line.first_order, line.curvature) == (0.0, 0.0) and scheduler.controller.stability_factor == 1.0
    assert sum("no parameter moved" in str(w.message) for w in caught) == 1


def test_one_skipped_step_and_steps_protect_neutralised_do_not_raise_the_unmoved_warning() -> None:
    scheduler = _scheduler()
    parameter = scheduler.optimizer.param_groups[0]["params"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        for step in range(6):
            scheduler.snapshot()  # the right order: before the step
            if step in (1, 2):  # GradScaler overflows, two in a row: optimizer.step() skipped
                pass
            elif step in (3, 4):  # NaN gradients two steps in a row: protect() zeroes them
                parameter.grad = torch.full_like(parameter, float("nan"))
                scheduler.protect()
                scheduler.optimizer.step()
            else:
                parameter.grad = torch.ones_like(parameter)
                scheduler.optimizer.step()
            scheduler.check_step(lambda: (parameter**2).sum())
            scheduler.step()
    assert torch.isfinite(parameter).all() and scheduler._order.warned is False


def test_the_step_order_hook_leaves_the_optimizer_once_its_scheduler_is_gone() -> None:
    scheduler = _scheduler()
    optimizer = scheduler.optimizer
    parameter = optimizer.param_groups[0]["params"][0]
    parameter.grad = torch.ones_like(parameter)
    hooks = optimizer._optimizer_step_post_hooks
    assert len(hooks) == 1
    optimizer.step()
    assert scheduler._order.stepped is True
    del scheduler
    gc.collect()
    optimizer.step()  # the dead scheduler's hook removes itself on the next step
    assert len(hooks) == 0


def test_a_closure_returning_an_unreduced_loss_is_refused_with_its_shape_and_the_step_is_kept() -> None:
    scheduler = _scheduler()
    parameter = scheduler.optimizer.param_groups[0]["params"][0]
    parameter.grad = torch.ones_like(parameter)
    scheduler.snapshot()
    scheduler.optimizer.step()
    after = parameter.detach().clone()
    with pytest.raises(ValueError, match=re.escape("got a tensor of shape (2,). Reduce it (e.g. `loss.mean()`)")):
        scheduler.check_step(lambda: parameter**2)
    assert torch.equal(parameter, after)


def test_guard_restores_parameters_bit_exactly_and_shrinks_a_too_large_step() -> None:
    # L(θ) = ½ θᵀAθ with A = diag(1, 10): SGD diverges along the stiff axis for lr > 2/10.
    hessian = torch.tensor([1.0, 10.0], dtype=torch.float64)
    theta = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    optimizer = torch.optim.SGD([theta], lr=0.3)
    scheduler = StableLRScheduler(
        optimizer, steps_per_epoch=100, decay_rate=0.0, warmup_steps=0, safety=0.5, recover_above=4.0, guard_window=1
    )

    def loss() -> torch.Tensor:
        return 0.5 * (hessian * theta**2).sum()

    calls = []

    def closure() -> torch.Tensor:
        calls.append(torch.rand(1).item())  # the forked RNG: the same draw at all three points
        return loss()

    optimizer.zero_grad()
    loss().backward()
    gradient = theta.grad.clone()
    scheduler.snapshot()
    optimizer.step()
    after = theta.detach().clone()
    torch.manual_seed(123)
    expected_next_random = torch.rand(1)
    torch.manual_seed(123)
    line = scheduler.check_step(closure)

    assert torch.equal(theta.detach(), after)
    assert torch.equal(theta.grad, gradient)
    assert torch.equal(torch.rand(1), expected_next_random)  # the caller's random stream is untouched
    assert len(set(calls)) == 1 and len(calls) == 3

    update = -0.3 * hessian  # Δθ = -lr · Aθ at θ = (1, 1)
    expected_a = float((hessian * update).sum())  # gᵀΔθ = -0.3 · 101
    expected_c = float((hessian * update**2).sum())  # ΔθᵀAΔθ = 0.09 · 1001
    assert line.first_order == pytest.approx(expected_a, rel=1e-12)
    assert line.curvature == pytest.approx(expected_c, rel=1e-12)
    margin = -2.0 * expected_a / expected_c  # 0.6727 < 2: the step overshoots
    assert line.step_margin == pytest.approx(margin, rel=1e-12)
    shrink = margin / math.sqrt(8.0)  # guard_window=1: to the centre sqrt(recover_above/safety) of the band
    assert scheduler.controller.stability_factor == pytest.approx(shrink, rel=1e-12)
    assert scheduler.get_last_lr() == pytest.approx([0.3 * shrink], rel=1e-12)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.3 * shrink, rel=1e-12)


def test_guard_keeps_a_diverging_quadratic_finite() -> None:
    def run(guard: bool) -> float:
        hessian = torch.tensor([1.0, 10.0], dtype=torch.float64)
        theta = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
        optimizer = torch.optim.SGD([theta], lr=0.3)
        scheduler = StableLRScheduler(optimizer, steps_per_epoch=10, decay_rate=0.0, warmup_steps=0)
        for _ in range(60):
            optimizer.zero_grad()
            loss = 0.5 * (hessian * theta**2).sum()
            loss.backward()
            if guard:
                scheduler.snapshot()
            optimizer.step()
            if guard:
                scheduler.check_step(lambda: 0.5 * (hessian * theta**2).sum())
            scheduler.step()
        return float(0.5 * (hessian * theta.detach() ** 2).sum())

    assert run(guard=False) > 1e10  # |1 - 0.3·10| = 2 per step on the stiff axis
    assert run(guard=True) < 1e-3


def test_check_step_restores_even_when_the_closure_raises() -> None:
    theta = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = torch.optim.SGD([theta], lr=0.1)
    scheduler = StableLRScheduler(optimizer, steps_per_epoch=1)
    theta.grad = torch.tensor([1.0, 1.0])
    scheduler.snapshot()
    optimizer.step()
    after = theta.detach().clone()
    calls = []

    def closure() -> float:
        calls.append(theta.detach().clone())
        if len(calls) == 2:
            raise RuntimeError("boom")
        return 0.0

    with pytest.raises(RuntimeError, match="boom"):
        scheduler.check_step(closure)
    assert torch.equal(theta.detach(), after)
    assert torch.equal(calls[1], torch.tensor([1.0, 2.0]))  # L0 is evaluated at θ_before
    with pytest.raises(RuntimeError, match=r"^check_step\(\) needs the parameters before the step"):
        scheduler.check_step(closure)


def test_nonfinite_train_loss_halves_the_stability_factor() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = StableLRScheduler(optimizer, steps_per_epoch=1, decay_rate=0.0, warmup_steps=0)
    scheduler.observe(train_loss=torch.tensor(float("nan")))
    scheduler.observe(train_loss=2.0)
    assert scheduler.controller.nonfinite_steps == 1
    assert scheduler.get_last_lr() == [0.5]
    assert scheduler.controller.train_loss_mean == 2.0


@pytest.mark.parametrize("dense_check_steps", [0, 4], ids=["no-check", "check-steps"])
def test_a_nan_step_that_protect_flagged_and_observe_saw_counts_once(dense_check_steps: int) -> None:
    # The README's plain loop: protect(loss) between backward and step, should_check() around the step, then
    # observe(train_loss=loss). All see the NaN of step 1; before, it counted twice and C was quartered (0.25)
    # instead of halved, also when should_check() had already counted the flag on a check step.
    model, loader = _regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = StableLRScheduler(optimizer, steps_per_epoch=4, decay_rate=0.0, warmup_steps=0,
                                  check_every_n_steps=0, dense_check_steps=dense_check_steps)  # fmt: skip
    checked = []
    for step in range(4):
        x, y = loader[step]
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y) * (math.nan if step == 1 else 1.0)
        loss.backward()
        scheduler.protect(loss)
        optimizer.step()
        if scheduler.should_check():  # a check step (dense, or the confirmation after a NaN) counts the flag here
            checked.append(step)
        scheduler.observe(train_loss=loss)
        scheduler.step()
        if step == 1:
            assert scheduler.controller.nonfinite_steps == 1 and scheduler.controller.stability_factor == 0.5
    assert (1 in checked) == bool(dense_check_steps)  # the NaN step itself: its flag counted by should_check()
    assert scheduler.controller.nonfinite_steps == 1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_controller_and_scheduler_agree() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    scheduler = StableLRScheduler(optimizer, steps_per_epoch=3, half_life=2.0, warmup_steps=4)
    controller = StableLRController(half_life=2.0, warmup_steps=4)
    for step in range(20):
        assert scheduler.get_last_lr() == [controller.lr(0.3, step, step / 3)]
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps_per_epoch": 0}, "`steps_per_epoch` must be an integer >= 1, got 0."),
        ({"steps_per_epoch": 2.5}, "`steps_per_epoch` must be an integer >= 1, got 2.5."),
        ({"steps_per_epoch": 4, "decay_rate": -1.0}, "`decay_rate` must be a finite number >= 0, got -1.0."),
        (
            {"steps_per_epoch": 4, "interval": "batch"},
            "`interval` must be one of 'step', 'epoch', got 'batch'.",
        ),
        (
            {"steps_per_epoch": 4, "min_lr_ratio": 2.0},
            "`min_lr_ratio` must be a finite number in [0, 1], got 2.0.",
        ),
    ],
)
def test_bad_arguments(kwargs, message: str) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError) as info:
        StableLRScheduler(optimizer, **kwargs)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-sgd", "sgd"])
def test_protect_neutralises_a_nan_step_and_counts_it_at_the_next_check(fused: bool) -> None:
    model, loader = _regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=fused)
    scheduler = StableLRScheduler(
        optimizer, steps_per_epoch=4, decay_rate=0.0, warmup_steps=0, check_every_n_steps=4, dense_check_steps=0
    )
    weights = []
    for step in range(8):
        x, y = loader[step % 4]
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y) * (math.nan if step == 1 else 1.0)
        loss.backward()
        scheduler.protect(loss)
        weights.append([p.detach().clone() for p in model.parameters()])
        optimizer.step()
        scheduler.step()
        if step == 1:
            assert scheduler.controller.nonfinite_steps == 0  # not read yet: no host sync at this step
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if fused:  # the fused kernel skipped the step: step 2 starts from step 1's weights
        assert all(torch.equal(a, b) for a, b in zip(weights[1], weights[2], strict=True))
    scheduler.should_check(3)  # a check step reads the count
    assert scheduler.controller.nonfinite_steps == 1
    assert scheduler.controller.stability_factor == 0.5
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_the_cadence_checks_ten_times_as_often_while_the_guard_acts():
    from lightning_stablelr.config import CheckCadence

    cadence = CheckCadence(check_every_n_steps=100, dense_check_steps=20)
    resting = [step for step in range(400) if cadence.should_check(step)]
    assert resting == [*range(20), 99, 199, 299, 399]
    acting = [step for step in range(20, 120) if cadence.should_check(step, guarding=True)]
    assert acting == [29, 39, 49, 59, 69, 79, 89, 99, 109, 119]
    assert [step for step in range(50) if CheckCadence(5, 0).should_check(step, guarding=True)] == list(range(50))
    never = CheckCadence(check_every_n_steps=0, dense_check_steps=2)
    assert [step for step in range(300) if never.should_check(step, guarding=True)] == [0, 1]

    # The scheduler asks with guarding = (C < 1).
    model = torch.nn.Linear(2, 1)
    scheduler = StableLRScheduler(torch.optim.SGD(model.parameters(), lr=0.1), steps_per_epoch=10, warmup_steps=0)
    assert not scheduler.should_check(29)
    scheduler.controller.stability_factor = 0.5
    assert scheduler.should_check(29)

