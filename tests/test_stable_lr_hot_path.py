"""StableLR's hot path: on a step that is neither a guard check nor a logging step, its hooks make no host
sync (on an accelerator; on a CPU, one read of a CPU flag, which waits for nothing) (``aten._local_scalar_dense``: ``.item()``, ``float(t)``, ``bool(t)``) and no collective
(``strategy.reduce``, ``torch.distributed.all_reduce``), also on the step where a gradient turns NaN.
The non-finite step is still neutralised there (on the device) and counted at the next check or log step.

A 16-step run with a guard check every 4 steps and logs every 5: steps 3, 7, 11, 15 are checks, steps 4, 9,
14 logging steps (Lightning logs at ``(batches_that_stepped + 1) % 5 == 0``); confirmation checks the
guard asks for come on top. A NaN enters one gradient at the quiet step ``NAN_STEP``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_stablelr import StableLR
from lightning_stablelr.callbacks._lightning_access import logs_this_step
from lightning_stablelr.nonfinite import NonfiniteTracker
from tests.helpers import make_trainer, regression_loader

STEPS = 16
NAN_STEP = 5
HOOKS = (
    "on_train_start", "on_train_epoch_start", "on_train_batch_start", "on_before_backward",
    "on_before_optimizer_step", "on_train_batch_end", "on_train_epoch_end",
)  # fmt: skip


class HostSyncs(TorchDispatchMode):
    """Counts reads of tensor values into Python: ``aten._local_scalar_dense`` (``.item()``, ``float(t)``,
    ``bool(t)``) and ``Tensor.tolist`` (which reads a CPU tensor without dispatching)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> HostSyncs:
        tolist = self._tolist = torch.Tensor.tolist

        def counted_tolist(tensor: Tensor) -> Any:
            self.count += 1
            return tolist(tensor)

        torch.Tensor.tolist = counted_tolist  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]
        super().__exit__(*exc)


class Probed(L.LightningModule):
    """``Linear(4, 8) -> tanh -> Linear(8, 1)``, SGD with momentum; a NaN gradient or a NaN loss at given steps."""

    def __init__(self, *, fused: bool, nan_grad_step: int | None = None, nan_loss_step: int | None = None,
                 tensor_lr: bool = False) -> None:
        super().__init__()
        self.tensor_lr = tensor_lr
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.fused, self.nan_grad_step, self.nan_loss_step = fused, nan_grad_step, nan_loss_step
        self.weights: dict[int, list[Tensor]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.global_step == self.nan_loss_step:  # a NaN loss whose gradients are finite
            loss = loss + torch.tensor(math.nan)
        return loss

    def on_after_backward(self) -> None:
        if self.global_step == self.nan_grad_step:
            self.net[0].weight.grad[0, 0] = math.nan

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.weights[self.global_step] = [p.detach().clone() for p in self.parameters()]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        lr = torch.tensor(0.05) if self.tensor_lr else 0.05  # a Tensor lr: on an accelerator, reading it is a sync
        return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9, fused=self.fused)


def _instrument(callback: StableLR) -> tuple[dict[int, list[int]], set[int]]:
    """Wrap the callback's hooks: ``syncs[step] = [host syncs, strategy.reduce calls]`` inside them, per
    step (from its batch start to the next; -1: fit and epoch hooks); ``read_steps``: checks and logs."""
    syncs: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    current = [-1]
    read_steps: set[int] = set()

    def wrap(name: str) -> None:
        hook = getattr(callback, name)

        def counted(trainer: L.Trainer, *args: Any, **kwargs: Any) -> Any:
            if name == "on_train_batch_start":
                current[0] = trainer.global_step
                if logs_this_step(trainer):
                    read_steps.add(trainer.global_step)
            if name.endswith("epoch_end") or name == "on_train_start":
                current[0] = -1  # allowed: once per epoch or fit
            reduce = trainer.strategy.reduce

            def counting_reduce(*a: Any, **k: Any) -> Any:
                syncs[current[0]][1] += 1
                return reduce(*a, **k)

            trainer.strategy.reduce = counting_reduce  # type: ignore[method-assign]
            try:
                with HostSyncs() as mode:
                    result = hook(trainer, *args, **kwargs)
            finally:
                trainer.strategy.reduce = reduce  # type: ignore[method-assign]
            syncs[current[0]][0] += mode.count
            if name == "on_train_batch_start" and callback._check_step == trainer.global_step:
                read_steps.add(trainer.global_step)
            return result

        setattr(callback, name, counted)

    for name in HOOKS:
        wrap(name)
    return syncs, read_steps


def _fit(
    tmp_path: Any, model: Probed, monkeypatch: pytest.MonkeyPatch, nonfinite_test: str = "gradients"
) -> tuple[StableLR, dict, set[int], list]:
    collectives: list[int] = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: collectives.append(1))
    callback = StableLR(
        check_every_n_steps=4, dense_check_steps=0, warmup_steps=0, decay_rate=0.1, nonfinite_test=nonfinite_test
    )
    syncs, read_steps = _instrument(callback)
    trainer = make_trainer(tmp_path, max_steps=STEPS, limit_val_batches=0, log_every_n_steps=5, callbacks=[callback])
    trainer.fit(model, regression_loader(STEPS * 4, 4))
    assert trainer.global_step == STEPS
    return callback, syncs, read_steps, collectives


@pytest.mark.parametrize("fused", [True, False], ids=["fused-sgd", "sgd"])
@pytest.mark.parametrize("nonfinite_test", ["loss", "gradients"])
def test_quiet_steps_make_no_host_sync_and_no_collective_and_still_stop_a_nan(
    tmp_path, monkeypatch, fused, nonfinite_test
):
    # The accelerator path: the step's flag stays on the device (read_cpu_flags=False forces it on a CPU).
    # nonfinite_test="loss" sees a NaN loss; "gradients" also a NaN gradient whose loss is finite.
    monkeypatch.setattr(NonfiniteTracker, "read_cpu_flags", False)
    if nonfinite_test == "loss":
        model = Probed(fused=fused, nan_loss_step=NAN_STEP, nan_grad_step=NAN_STEP)  # a NaN loss: NaN gradients
    else:
        model = Probed(fused=fused, nan_grad_step=NAN_STEP)
    callback, syncs, read_steps, collectives = _fit(tmp_path, model, monkeypatch, nonfinite_test)

    quiet = [step for step in range(STEPS) if step not in read_steps]
    assert {3, 4, 7, 9, 11, 14, 15} <= read_steps and NAN_STEP in quiet and len(quiet) >= 6, read_steps
    assert {step: syncs[step] for step in quiet} == {step: [0, 0] for step in quiet}
    assert all(syncs[step][0] > 0 for step in (3, 7, 11)), sorted(syncs.items())
    assert collectives == []

    # The NaN step was neutralised on the device and counted at the next check (step 7) or log (step 9).
    assert callback.controller.nonfinite_steps == 1
    assert callback.controller.guard_counts["nonfinite"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    before, after = model.weights[NAN_STEP], model.weights[NAN_STEP + 1]
    if fused:  # the fused optimizer skipped the step on the device: weights (and momentum) untouched
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    else:  # zero gradients: only momentum moved the weights
        assert not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_on_a_cpu_the_flag_is_read_once_per_step_and_the_result_is_the_same(tmp_path, monkeypatch):
    # A CPU flag is read at once (CPU kernels are synchronous: nothing to wait for): one read per quiet
    # step, no collective, and the same weights as the device path.
    model = Probed(fused=False, nan_grad_step=NAN_STEP)
    callback, syncs, read_steps, collectives = _fit(tmp_path, model, monkeypatch)
    quiet = [step for step in range(STEPS) if step not in read_steps]
    assert {step: syncs[step] for step in quiet} == {step: [1, 0] for step in quiet} and collectives == []
    assert callback.controller.nonfinite_steps == 1

    monkeypatch.setattr(NonfiniteTracker, "read_cpu_flags", False)
    device_path = Probed(fused=False, nan_grad_step=NAN_STEP)
    _fit(tmp_path, device_path, monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), device_path.parameters(), strict=True))


def test_a_nan_loss_with_finite_gradients_counts_and_is_skipped(tmp_path, monkeypatch):
    # Issue 8: the loss, not only the gradients, decides (one process: every rank sees it).
    monkeypatch.setattr(NonfiniteTracker, "read_cpu_flags", False)
    model = Probed(fused=True, nan_loss_step=NAN_STEP)
    callback, syncs, read_steps, _ = _fit(tmp_path, model, monkeypatch, "loss")
    assert callback.controller.nonfinite_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(model.weights[NAN_STEP], model.weights[NAN_STEP + 1], strict=True))
    assert {step: syncs[step] for step in range(STEPS) if step not in read_steps} == {
        step: [0, 0] for step in range(STEPS) if step not in read_steps
    }


def test_the_loss_test_reads_no_gradient_on_quiet_steps_and_the_gradients_on_check_steps(tmp_path, monkeypatch):
    # nonfinite_test="loss" (the default): a NaN gradient under a finite loss passes on a quiet step (the
    # documented price of an O(1) test) but is caught on a guard-check step, whose snapshot reads the gradients.
    quiet = Probed(fused=False, nan_grad_step=NAN_STEP)
    callback, _, read_steps, _ = _fit(tmp_path, quiet, monkeypatch, "loss")
    assert NAN_STEP not in read_steps
    assert not all(torch.isfinite(p).all() for p in quiet.weights[NAN_STEP + 1])  # the weights took the NaN

    checked = Probed(fused=False, nan_grad_step=3)  # step 3 is a guard check
    callback, _, _, _ = _fit(tmp_path, checked, monkeypatch, "loss")
    assert callback.controller.nonfinite_steps == 1
    assert all(torch.isfinite(p).all() for p in checked.parameters())
    assert StableLR().nonfinite_test == "loss"
    with pytest.raises(ValueError, match=r"`nonfinite_test` must be one of 'loss', 'gradients', got 'grads'"):
        StableLR(nonfinite_test="grads")


def test_a_tensor_lr_is_written_every_step_without_being_read_back(tmp_path, monkeypatch):
    # decay_rate > 0: the lr changes at every step, so StableLR writes it on every quiet step too.
    monkeypatch.setattr(NonfiniteTracker, "read_cpu_flags", False)
    model = Probed(fused=False, tensor_lr=True)
    _, syncs, read_steps, _ = _fit(tmp_path, model, monkeypatch, "loss")
    quiet = [step for step in range(STEPS) if step not in read_steps]
    assert len(quiet) >= 6 and {step: syncs[step] for step in quiet} == {step: [0, 0] for step in quiet}
    group = model.trainer.optimizers[0].param_groups[0]
    assert isinstance(group["lr"], Tensor) and float(group["lr"]) == pytest.approx(group["stablelr_lr"], rel=1e-6)
