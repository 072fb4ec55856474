"""DDP-consistent reductions with a failure flag, and finiteness tests (pure: no Lightning import).

Every function takes the collective as ``reduce(tensor, op) -> tensor`` (``op`` is ``"mean"``,
``"sum"`` or ``"min"``; the callbacks pass ``trainer.strategy.reduce``), so a plain PyTorch or Fabric
loop can use them too. A collective must be entered by every rank in the same order: a rank whose
computation raised still joins, with its failure flag set, and every rank then sees ``failed=True``,
never a hang.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["RankMeanAccumulator", "Reduce", "Reduced", "reduce_with_flag"]

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


class RankMeanAccumulator:
    """Running sum and count of finite scalar losses, kept on their device (no host sync per step).

    :meth:`add` only keeps a reference to the detached loss; every ``fold_every`` values are stacked and
    summed on their device (the non-finite ones left out). :meth:`flush` returns ``(mean, count)`` over
    all ranks, ``mean = Σ_ranks sum / Σ_ranks count``, and resets; it is a collective, so every rank must
    call it at the same point.
    """

    fold_every = 256

    def __init__(self) -> None:
        self._sum: Tensor | None = None
        self._count: Tensor | None = None
        self._values: list[Tensor] = []
        self._scales: list[float] = []

    def add(self, value: Tensor, scale: float = 1.0) -> None:
        """Add ``scale · value`` (a one-element tensor) if it is finite; decided later, on its device."""
        self._values.append(value.detach() if value.requires_grad else value)  # one-element: reshaped when folded
        self._scales.append(float(scale))
        if len(self._values) >= self.fold_every:
            self._fold()

    def _fold(self) -> None:
        if not self._values:
            return
        device = self._values[0].device
        try:  # the common case, one stack: every value has the same shape on the same device
            values = torch.stack(self._values).reshape(-1).float()
        except RuntimeError:  # mixed shapes ((), (1,)) or devices
            values = torch.stack([value.reshape(()).to(device) for value in self._values]).float()
        scales = set(self._scales)
        if len(scales) == 1:
            values = values * scales.pop()
        else:
            values = values * torch.tensor(self._scales, device=values.device)
        finite = values.isfinite()
        total = torch.where(finite, values, torch.zeros_like(values)).sum()
        count = finite.float().sum()
        if self._sum is None or self._count is None:
            self._sum, self._count = total, count
        else:
            self._sum, self._count = self._sum + total.to(self._sum.device), self._count + count.to(self._sum.device)
        self._values, self._scales = [], []

    def pending(self) -> tuple[float, float]:
        """This rank's ``(sum, count)`` not yet flushed (a host sync). Changes nothing: a checkpoint taken
        mid-epoch leaves the later sums bit for bit as without it."""
        state = self.state()
        finite = [value * scale for value, scale in zip(state["values"], state["scales"]) if math.isfinite(value * scale)]
        return state["sum"] + math.fsum(finite), state["count"] + len(finite)

    def state(self) -> dict[str, Any]:
        """Everything not yet flushed, as Python numbers (a host sync; changes nothing): the folded ``sum`` and
        ``count`` and the values and scales not folded yet. :meth:`load_state` restores it exactly, so a resumed
        run adds up the same float32 numbers in the same order as the run that was not interrupted."""
        values = [float(value.detach().reshape(()).float()) for value in self._values]
        folded = self._sum is not None and self._count is not None
        return {
            "sum": float(self._sum) if folded else 0.0,
            "count": float(self._count) if folded else 0.0,
            "folded": folded,
            "values": values,
            "scales": list(self._scales),
        }

    def load_state(self, state: Mapping[str, Any], device: torch.device | str = "cpu") -> None:
        """Restore :meth:`state` (its values as float32 tensors on ``device``, where the losses live)."""
        self.reset()
        if state.get("folded"):
            self._sum = torch.tensor(float(state["sum"]), dtype=torch.float32, device=device)
            self._count = torch.tensor(float(state["count"]), dtype=torch.float32, device=device)
        self._values = [torch.tensor(float(value), dtype=torch.float32, device=device) for value in state["values"]]
        self._scales = [float(scale) for scale in state["scales"]]

    def reset(self) -> None:
        """Forget everything not yet flushed (a new fit)."""
        self._sum = self._count = None
        self._values, self._scales = [], []

    def flush(self, reduce: Reduce, device: torch.device | str, world_size: int) -> tuple[float, float] | None:
        """``(mean, count)`` over all ranks, or None when no rank saw a finite value; then reset."""
        self._fold()
        local = torch.zeros(2, dtype=torch.float64, device=device)
        if self._sum is not None and self._count is not None:
            local = local + torch.stack([self._sum, self._count]).to(local)
        self._sum = self._count = None
        (total, count), _ = reduce_with_flag(reduce, local, size=2, device=device, dtype=local.dtype)
        if count <= 0:
            return None
        return total / count, count * world_size
