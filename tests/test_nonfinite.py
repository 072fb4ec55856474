"""``lightning_stablelr.nonfinite``: the flag, the on-device neutralisation and the lazy count."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_stablelr.nonfinite import NonfiniteTracker, tensors_nonfinite


def test_the_flag_sees_nan_and_both_infinities_and_not_large_half_precision_values():
    finite = [torch.ones(3), torch.zeros(2, 2)]
    assert tensors_nonfinite(finite).item() is False
    for bad in (math.nan, math.inf, -math.inf):
        assert tensors_nonfinite([*finite, torch.tensor([0.0, bad])]).item() is True, bad
    # 10_000 float16 values of 60_000: their float16 2-norm would overflow (6e6 > 65504), float32's does not
    assert tensors_nonfinite([torch.full((10_000,), 60_000.0, dtype=torch.float16)]).item() is False
    assert tensors_nonfinite([torch.full((4,), 1e100, dtype=torch.float64)]).item() is False
    assert tensors_nonfinite([]) is None and tensors_nonfinite([torch.empty(0)]) is None


def _optimizer(fused: bool) -> tuple[torch.optim.Optimizer, torch.nn.Parameter]:
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9, fused=fused)
    return optimizer, weight


@pytest.mark.parametrize("read_cpu_flags", [True, False])
def test_a_bad_step_is_zeroed_and_counted_lazily_with_its_step(monkeypatch, read_cpu_flags):
    monkeypatch.setattr(NonfiniteTracker, "read_cpu_flags", read_cpu_flags)
    optimizer, weight = _optimizer(fused=False)
    tracker = NonfiniteTracker()
    for step, value in enumerate([1.0, math.nan, 1.0, math.inf]):
        weight.grad = torch.full((3,), value)
        tracker.record_loss(torch.tensor(2.0))
        tracker.protect(optimizer, step)
        if not math.isfinite(value):
            assert torch.equal(weight.grad, torch.zeros(3))  # zeroed on the device
        else:
            assert torch.equal(weight.grad, torch.ones(3))
    assert tracker.take() == (2, 3)
    assert tracker.take() == (0, -1)  # reset


def test_a_nan_loss_counts_and_decides_only_when_told():
    optimizer, weight = _optimizer(fused=False)
    tracker = NonfiniteTracker()
    weight.grad = torch.ones(3)
    tracker.record_loss(torch.tensor(math.nan))
    tracker.protect(optimizer, 5, loss_decides=False)  # DDP: the loss is this rank's only
    assert torch.equal(weight.grad, torch.ones(3)) and tracker.take() == (1, 5)
    tracker.record_loss(torch.tensor(math.nan))
    tracker.protect(optimizer, 6)
    assert torch.equal(weight.grad, torch.zeros(3)) and tracker.take() == (1, 6)


def test_a_fused_optimizer_gets_found_inf_and_skips_the_step_exactly():
    optimizer, weight = _optimizer(fused=True)
    tracker = NonfiniteTracker()
    weight.grad = torch.ones(3)
    tracker.protect(optimizer, 0)
    optimizer.step()  # a first, finite step: the momentum buffer is g = 1, the weights 0.9
    weight.grad = torch.tensor([1.0, math.nan, 1.0])
    tracker.protect(optimizer, 1)
    assert optimizer.found_inf.item() == 1.0  # type: ignore[attr-defined]
    optimizer.step()
    assert torch.allclose(weight.detach(), torch.full((3,), 0.9), rtol=0, atol=1e-7)  # skipped
    # The momentum buffer was not touched: the next step is buf = 0.9·1 + 1, θ = 0.9 - 0.1·1.9 = 0.71.
    weight.grad = torch.ones(3)
    tracker.protect(optimizer, 2)
    assert "found_inf" not in optimizer.__dict__  # the flag of the skipped step does not outlive it
    optimizer.step()
    assert torch.allclose(weight.detach(), torch.full((3,), 0.71), rtol=0, atol=1e-6)
    assert tracker.take() == (1, 1)


def test_a_nan_first_step_of_fused_sgd_leaves_no_uninitialised_momentum():
    # torch's fused SGD allocates its momentum buffers with empty_like on the first step: a found_inf
    # skip would leave garbage in them, so the first step gets zeroed gradients instead.
    optimizer, weight = _optimizer(fused=True)
    tracker = NonfiniteTracker()
    weight.grad = torch.full((3,), math.nan)
    tracker.protect(optimizer, 0)
    optimizer.step()
    weight.grad = torch.ones(3)
    tracker.protect(optimizer, 1)
    optimizer.step()
    assert torch.allclose(weight.detach(), torch.full((3,), 0.9), rtol=0, atol=1e-7)


def test_every_rank_enters_the_flag_reduce_even_with_nothing_to_test():
    # Sharded parameters: a rank whose gradient shards are empty (and no loss) still joins the max-reduce,
    # or the other ranks would wait in it forever.
    parameter = torch.nn.Parameter(torch.zeros(0))
    parameter.grad = torch.zeros(0)
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    calls = []
    flag = NonfiniteTracker().protect(optimizer, 3, reduce_flag=lambda f: calls.append(f) or f, loss_decides=False)
    assert len(calls) == 1 and calls[0].item() == 0.0 and not bool(flag)


def test_the_callback_side_counts_locally_only_on_one_process_and_pickles_without_the_trainer():
    import pickle

    from lightning_stablelr.callbacks._nonfinite_steps import NonfiniteSteps
    from lightning_stablelr.controller import StableLRController

    steps = NonfiniteSteps(StableLRController(), skip=True)
    steps.tracker.record_loss(torch.tensor(math.nan))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    steps.tracker.protect(optimizer, 0)
    steps._one_process = False  # DDP: a rank's own count would give the ranks different C
    assert steps.resolve_local() == 0 and steps.tracker.pending
    steps._one_process = True
    assert steps.resolve_local() == 1 and steps.controller.stability_factor == 0.5
    steps._reduce_flag = lambda flag: flag  # a closure over the trainer in a sharded fit
    assert pickle.loads(pickle.dumps(steps))._reduce_flag is None
