"""DDP-consistent reductions with a failure flag, and finiteness tests (pure: no Lightning import).

Every function takes the collective as ``reduce(tensor, op) -> tensor`` (``op`` is ``"mean"``,
``"sum"`` or ``"min"``; the callbacks pass ``trainer.strategy.reduce``), so a plain PyTorch or Fabric
loop can use them too. A collective must be entered by every rank in the same order: a rank whose
computation raised still joins, with its failure flag set, and every rank then sees ``failed=True``,
never a hang.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["RankMeanAccumulator", "Reduce", "Reduced", "all_finite", "nonfinite_across_ranks", "reduce_with_flag"]

#: ``reduce(tensor, op)``: the element-wise reduction of ``tensor`` over all ranks (identity on one process).
Reduce = Callable[[Tensor, str], Tensor]


class Reduced(NamedTuple):
    """What :func:`reduce_with_flag` returns: the reduced values (host floats) and whether any rank failed."""

    values: list[float]
    failed: bool


def reduce_with_flag(
    reduce: Reduce,
    values: Sequence[float] | Tensor | None,
    *,
    size: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float64,
    op: str = "mean",
) -> Reduced:
    """All-reduce ``[values..., flag]`` in one collective; ``flag`` is 1 on a rank that passes ``values=None``.

    ``values`` (``size`` numbers, or a tensor of them kept on its device: no host sync before the
    collective) is this rank's contribution; None marks this rank's failure and sends NaNs of the same
    length. Returns ``Reduced(reduced values, failed)`` with ``failed`` true on every rank when any rank
    failed (then the values carry no information). One host sync, after the collective.

    Raises:
        ValueError: ``values`` does not hold ``size`` numbers (a bug of the caller: every rank must send
            the same length).
    """
    if values is None:
        body = torch.full((size,), math.nan, dtype=dtype, device=device)
        flag = torch.ones(1, dtype=dtype, device=device)
    else:
        body = torch.as_tensor(values, dtype=dtype).reshape(-1).to(device=device, dtype=dtype)
        if body.numel() != size:
            raise ValueError(f"`values` must hold {size} numbers (the same on every rank), got {body.numel()}.")
        flag = torch.zeros(1, dtype=dtype, device=device)
    reduced = reduce(torch.cat([body, flag]), op).tolist()
    return Reduced(reduced[:size], reduced[size] > 0)


def _by_device_and_dtype(tensors: Sequence[Tensor]) -> list[list[Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    return list(groups.values())


def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """0-d bool tensor: every element of every tensor is finite. No host sync (the caller decides when).

    Uses the max-abs norm, which stays finite for any finite input (a 2-norm could overflow to inf).
    Exact but slow on CPU; :func:`nonfinite_across_ranks` calls it only when the fast test is in doubt.
    """
    if not tensors:
        return torch.tensor(True)
    device = tensors[0].device
    checks: list[Tensor] = []
    for group in _by_device_and_dtype(tensors):
        try:
            norms = torch._foreach_norm(group, ord=math.inf)
        except (RuntimeError, TypeError, NotImplementedError):  # sparse or exotic tensors
            norms = [tensor.abs().max() if tensor.numel() else tensor.new_zeros(()) for tensor in group]
        checks.append(torch.stack([norm.float() for norm in norms]).isfinite().all().to(device))
    return torch.stack(checks).all()


def _norm_total(tensors: Sequence[Tensor]) -> Tensor:
    """0-d fp32 sum of the 2-norms (fused): finite if every element is finite and nothing overflows."""
    if not tensors:
        return torch.zeros(())
    device = tensors[0].device
    totals: list[Tensor] = []
    for group in _by_device_and_dtype(tensors):
        try:
            norms = torch._foreach_norm(group, 2, dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            norms = [torch.linalg.vector_norm(tensor.float()) for tensor in group]
        totals.append(torch.stack(norms).sum().to(device))
    return totals[0] if len(totals) == 1 else torch.stack(totals).sum()


def nonfinite_across_ranks(tensors: Sequence[Tensor], reduce: Reduce | None, device: torch.device | str) -> bool:
    """True if any element of ``tensors`` is NaN/Inf on any rank. Every rank must call it.

    ``reduce`` is None on a single process (no collective). The common case costs one fused 2-norm,
    one collective on ``device`` (a sum, which propagates NaN/Inf) and one host sync. Only when the
    total is not finite (a NaN/Inf somewhere, or a huge but finite gradient whose square overflows) do
    all ranks run the exact max-abs test and a second collective, so the answer is exact.
    """
    total = _norm_total(tensors)
    if reduce is not None:
        total = reduce(total.to(device), "sum")
    if math.isfinite(float(total)):
        return False
    local = ~all_finite(tensors)
    if reduce is None:
        return bool(local)
    return bool(reduce(local.to(device=device, dtype=torch.float32), "sum").item() > 0)


class RankMeanAccumulator:
    """Running sum and count of finite scalar losses, kept on their device (no host sync per step).

    :meth:`flush` returns ``(mean, count)`` over all ranks, ``mean = Σ_ranks sum / Σ_ranks count``, and
    resets; it is a collective, so every rank must call it at the same point.
    """

    def __init__(self) -> None:
        self._sum: Tensor | None = None
        self._count: Tensor | None = None
        self._cpu_sum = 0.0
        self._cpu_count = 0.0

    def add(self, value: Tensor, scale: float = 1.0) -> None:
        """Add ``scale · value`` if it is finite (decided on device; on CPU as Python floats, which is faster)."""
        if value.device.type == "cpu":
            number = float(value) * scale
            if math.isfinite(number):
                self._cpu_sum += number
                self._cpu_count += 1.0
            return
        value = value.detach().float().reshape(()) * scale
        finite = value.isfinite()
        if self._sum is None or self._count is None or self._sum.device != value.device:
            self._sum, self._count = value.new_zeros(()), value.new_zeros(())
        self._sum = self._sum + torch.where(finite, value, torch.zeros_like(value))
        self._count = self._count + finite.float()

    def pending(self) -> tuple[float, float]:
        """This rank's ``(sum, count)`` not yet flushed (a host sync)."""
        if self._sum is None or self._count is None:
            return self._cpu_sum, self._cpu_count
        return float(self._sum) + self._cpu_sum, float(self._count) + self._cpu_count

    def flush(self, reduce: Reduce, device: torch.device | str, world_size: int) -> tuple[float, float] | None:
        """``(mean, count)`` over all ranks, or None when no rank saw a finite value; then reset."""
        local = torch.tensor([self._cpu_sum, self._cpu_count], device=device)
        if self._sum is not None and self._count is not None:
            local = local + torch.stack([self._sum, self._count]).to(local.device)
        self._sum = self._count = None
        self._cpu_sum = self._cpu_count = 0.0
        (total, count), _ = reduce_with_flag(reduce, local, size=2, device=device, dtype=local.dtype)
        if count <= 0:
            return None
        return total / count, count * world_size
