"""Non-finite steps detected and neutralised on the device, without a host sync (pure: no Lightning import).

For every optimizer step, on the device and without a host sync or a collective, one of two tests:

    loss test:      bad = not isfinite(L)   for the loss(es) recorded since the last step (O(1))
    gradient test:  bad = not isfinite(‖g_i‖₂ for every gradient g_i)  or  not isfinite(L)
                    (one fused ``_foreach_norm``, at least float32: one read of every gradient)

The loss test (``protect(test_gradients=False)``) costs nothing that grows with the model; it misses
only a gradient that turns non-finite while the loss stays finite (a backward-only NaN, e.g. the
gradient of ``sqrt`` or ``norm`` at 0). The gradient test catches every NaN/Inf element; a gradient
whose 2-norm overflows counts too (its sum of squares: beyond a norm of about 1.8e19 for float32 and
narrower dtypes, 1.3e154 for float64; no update survives such a gradient anyway). Sparse gradients are
tested through their values, sharded (``DTensor``, FSDP2) gradients through their local shards; ranks
that hold different shards pass ``reduce_flag`` so that all of them take the same decision.
:meth:`NonfiniteTracker.protect` then makes the update harmless, still on the device:

- an optimizer that can skip a step on the device (``optimizer._step_supports_amp_scaling``: torch's
  SGD, Adam, AdamW and Adagrad with ``fused=True``) gets ``optimizer.found_inf = bad``, the flag a
  ``GradScaler`` passes: its kernel then skips the step and leaves the optimizer state untouched
  (except on the optimizer's very first step, which gets the zeroed gradients below: fused SGD would
  leave its momentum buffers uninitialised);
- any other optimizer gets every gradient zeroed (``masked_fill_(bad, 0)``, a pass over the gradients
  on an accelerator; on a CPU only on a bad step): the weights stay finite, but momentum and weight
  decay still move them by their finite amount on that step.

The number of such steps and the last of them accumulate on the device; :meth:`NonfiniteTracker.take`
reads them (one host sync) at the points where they are needed: logging, guard checks, validation.
A flag that lives on the CPU is read at once (:attr:`NonfiniteTracker.read_cpu_flags`): CPU kernels are
synchronous, so that read waits for nothing, and a finite step then skips the masking and the counting.
Under DDP every rank holds the same all-reduced gradients, so the gradient test needs no collective
(the loss test does: each rank has its own loss, so several processes use the gradient test).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "NonfiniteCount", "NonfiniteTracker", "ReduceMax", "clear_found_inf", "step_gradients", "tensors_nonfinite",
]  # fmt: skip

#: ``reduce_max(tensor)``: the element-wise maximum over all ranks (a collective).
ReduceMax = Callable[[Tensor], Tensor]


class NonfiniteCount(NamedTuple):
    """What :meth:`NonfiniteTracker.take` read: how many non-finite steps, and the last one (-1: none)."""

    count: int
    last_step: int


def step_gradients(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The gradients ``optimizer`` would apply, as local dense tensors: a sparse gradient's values, a sharded
    (DTensor, FSDP2) gradient's local shard; views, so that writing into them writes the gradient."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grads = [grad.to_local() if hasattr(grad, "to_local") else grad for grad in grads]
    return [grad._values() if grad.is_sparse else grad for grad in grads]


def _stacked_norms(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The 2-norms of ``tensors``, one stacked 1-d tensor per device and dtype (one fused ``_foreach_norm``
    each); half precision in float32 (a float16 norm overflows at 65504), float32/64 in their own dtype."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for tensor in tensors:
        if tensor.numel():
            groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    stacked = []
    for (_, dtype), group in groups.items():
        norms = torch._foreach_norm(group, 2, dtype=torch.float32) if dtype.itemsize < 4 else torch._foreach_norm(group, 2)
        stacked.append(torch.stack(norms))
    return stacked


def tensors_nonfinite(tensors: Sequence[Tensor]) -> Tensor | None:
    """0-d bool tensor, True when some tensor has a NaN/Inf (or an overflowing 2-norm); None if empty.

    One fused ``torch._foreach_norm`` per device and dtype; no host sync.
    """
    flag: Tensor | None = None
    for norms in _stacked_norms(tensors):
        bad = ~norms.isfinite().all()
        flag = bad if flag is None else flag | bad.to(flag.device)
    return flag


def _all_finite_on_cpu(tensors: Sequence[Tensor]) -> bool:
    """Whether every tensor is finite, read at once: ``tensors`` are on the CPU (no device queue to wait for)."""
    return all(math.isfinite(value) for norms in _stacked_norms(tensors) for value in norms.tolist())


class NonfiniteTracker:
    """Flags non-finite steps on the device, protects the update, and counts them lazily (see the module).

    ``read_cpu_flags`` (default True): a flag that lives on the CPU is read at once. CPU kernels run
    synchronously, so that read waits for nothing (it is not a host sync); it lets a finite step skip the
    masking pass and the counting, the common case. The result is the same as on an accelerator, where
    the flag is never read per step (False forces that path, e.g. to test it on a CPU).
    """

    read_cpu_flags = True

    def __init__(self) -> None:
        self._losses: list[Tensor] = []
        self._count: Tensor | None = None
        self._last: Tensor | None = None

    def record_loss(self, loss: Tensor) -> None:
        """Keep one backward's loss for the next :meth:`protect` (a reference, no computation)."""
        self._losses.append(loss.detach())

    def loss_is_finite_now(self) -> bool:
        """True when losses were recorded, all live on the CPU (read at once, see :attr:`read_cpu_flags`) and
        all are finite; they are then consumed. False changes nothing: call :meth:`protect`. The fast path of
        a quiet step under the loss test, and the first thing :meth:`protect` tries under it."""
        if not self._losses or not self._losses_finite_on_cpu(self._losses):
            return False
        self._losses = []
        return True

    def _losses_finite_on_cpu(self, losses: list[Tensor]) -> bool:
        return self.read_cpu_flags and all(loss.is_cpu and math.isfinite(loss.item()) for loss in losses)

    def forget_loss(self) -> None:
        """Drop the kept losses (a step handled elsewhere, e.g. by a GradScaler)."""
        self._losses = []

    def protect(
        self,
        optimizer: torch.optim.Optimizer,
        step: int,
        *,
        skip: bool = True,
        loss_decides: bool = True,
        reduce_flag: ReduceMax | None = None,
        test_gradients: bool = True,
    ) -> Tensor | None:
        """Flag this optimizer step, neutralise it on the device when ``skip``, and count it; no host sync.

        ``loss_decides``: a non-finite loss also neutralises the step. Pass False when ranks may differ
        in it (DDP: each rank has its own loss but the same gradients); it is then only counted.
        ``reduce_flag(flag)``: the maximum over ranks (a collective; on NCCL no host sync), for ranks that
        hold different gradients (sharded parameters): every rank then neutralises the same steps.
        ``test_gradients=False``: only the recorded losses decide (O(1): no pass over the gradients; a
        gradient that turns non-finite while the loss stays finite goes through). Needs ``loss_decides``
        and a recorded loss; without one the gradients are tested anyway.
        Returns the step's flag (0-d bool), or None when there is nothing to check or the step is known to
        be finite (the CPU path).
        """
        loss_only = not test_gradients and loss_decides and reduce_flag is None
        if skip:
            optimizer.__dict__.pop("found_inf", None)  # a previous step's flag (if no post-hook removed it)
        if loss_only and self.loss_is_finite_now():
            return None  # the common case: one read of a CPU scalar, nothing else
        losses, self._losses = self._losses, []
        if loss_only and losses:
            on_cpu = self.read_cpu_flags and all(loss.is_cpu for loss in losses)
            bad = tensors_nonfinite(losses)
            return self._neutralise(optimizer, step, skip, step_gradients(optimizer), bad, bad, on_cpu=on_cpu)
        grads = step_gradients(optimizer)
        on_cpu = self.read_cpu_flags and all(tensor.device.type == "cpu" for tensor in grads + losses)
        if on_cpu and reduce_flag is None and _all_finite_on_cpu(grads + losses):
            return None  # a finite step, known without waiting (CPU kernels are synchronous): nothing to do
        if loss_decides:
            decided = counted = tensors_nonfinite(grads + losses)
        else:
            decided, loss_bad = tensors_nonfinite(grads), tensors_nonfinite(losses)
            counted = decided if loss_bad is None else loss_bad if decided is None else decided | loss_bad.to(decided.device)
        if counted is None and reduce_flag is not None:  # nothing to test here, but every rank enters the reduce
            device = next((p.device for group in optimizer.param_groups for p in group["params"]), torch.device("cpu"))
            counted = torch.zeros((), dtype=torch.bool, device=device)
        if counted is None:
            return None
        if reduce_flag is not None:
            decided = counted = reduce_flag(counted.float()) > 0
            if on_cpu and not bool(counted):
                return counted
        return self._neutralise(optimizer, step, skip, grads, decided, counted, on_cpu=on_cpu)

    def _neutralise(
        self,
        optimizer: torch.optim.Optimizer,
        step: int,
        skip: bool,
        grads: list[Tensor],
        decided: Tensor | None,
        counted: Tensor | None,
        *,
        on_cpu: bool,
    ) -> Tensor | None:
        """Skip (fused optimizer) or zero the update where ``decided``; count the step where ``counted``.
        ``on_cpu``: ``counted`` is known to be True (the CPU path reads it at once) unless ``decided`` differs."""
        if counted is None:
            return None
        if skip and grads and decided is not None:
            # Not on an optimizer's first step: torch's fused SGD then allocates its momentum buffers with
            # empty_like and a skipped kernel would leave them uninitialised (zeroed gradients are safe).
            if getattr(optimizer, "_step_supports_amp_scaling", False) and optimizer.state:
                optimizer.found_inf = decided.float()  # type: ignore[attr-defined]
            elif not on_cpu:
                for grad in grads:
                    grad.masked_fill_(decided.to(grad.device), 0.0)
            elif decided is counted or bool(decided):
                for grad in grads:
                    grad.zero_()
        self._count = counted.float() if self._count is None else self._count + counted.to(self._count.device)
        last = torch.where(counted, float(step), -1.0)
        self._last = last if self._last is None else torch.maximum(self._last, last.to(self._last.device))
        return counted

    def take(self, reduce_max: ReduceMax | None = None, device: torch.device | str = "cpu") -> NonfiniteCount:
        """The non-finite steps counted since the last call (one host sync), then reset.

        ``reduce_max(tensor)``: the element-wise maximum over ranks (a collective every rank must enter),
        so that a non-finite loss seen on one rank counts on all (the count is the largest rank's);
        None on one process. ``device``: where a rank that saw no step builds its contribution.
        """
        if self._count is None or self._last is None:
            values = None
        else:
            values = torch.stack([self._count, self._last])
        self._count = self._last = None
        if reduce_max is not None:
            local = values if values is not None else torch.tensor([0.0, -1.0], device=device)
            values = reduce_max(local)
        if values is None:
            return NonfiniteCount(0, -1)
        count, last = values.tolist()
        return NonfiniteCount(int(count), int(last))

    @property
    def pending(self) -> bool:
        """Whether some step was flagged (or may have been) since the last :meth:`take` (no host sync)."""
        return self._count is not None


def clear_found_inf(optimizer: torch.optim.Optimizer, *args: object) -> None:
    """Step post-hook: remove the ``found_inf`` set by :meth:`NonfiniteTracker.protect` after the step."""
    optimizer.__dict__.pop("found_inf", None)

