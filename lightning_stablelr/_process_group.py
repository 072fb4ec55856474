"""The default ``torch.distributed`` group as :class:`~lightning_stablelr.StableLRScheduler` uses it (pure: no
Lightning import): its size, one all-reduce, and the rule that ``check_step(loss=...)`` is given on every rank
or on none."""

from __future__ import annotations

import torch

__all__ = ["all_reduce", "check_step_training_loss", "world_size"]


def world_size() -> int:
    """Processes of the default ``torch.distributed`` group (1 when it is not initialized)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if distributed else 1


def all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """``tensor`` averaged (``"mean"``) or maximised (``"max"``) over the default group; a collective."""
    reduced = tensor.clone()
    max_op, sum_op = torch.distributed.ReduceOp.MAX, torch.distributed.ReduceOp.SUM
    torch.distributed.all_reduce(reduced, op=max_op if op == "max" else sum_op)
    return reduced / world_size() if op == "mean" else reduced


def check_step_training_loss(loss: torch.Tensor | float | None, device: torch.device) -> torch.Tensor | None:
    """``check_step``'s ``loss`` as a 0-d tensor; under torch.distributed every rank must pass it or none must
    (one small all-reduce on ``device``: otherwise ranks would run different numbers of forwards).

    Raises:
        ValueError: ``loss`` has more than one element, or it was given on some ranks only.
    """
    training = None
    if loss is not None:
        training = torch.as_tensor(loss).detach()
        if training.numel() != 1:
            raise ValueError(
                f"check_step(loss=...) takes the step's scalar training loss, got a tensor of shape"
                f" {tuple(training.shape)}. Pass the reduced loss your backward used (e.g. loss.mean().detach())."
            )
        training = training.reshape(())
    if world_size() > 1:
        given = all_reduce(torch.tensor([float(training is not None)], device=device), "mean").item()
        if 0.0 < given < 1.0:
            raise ValueError(
                f"check_step(loss=...) was given on {given:.0%} of the ranks; pass it on every rank or on none:"
                " the ranks must run the same forward passes (their collectives would hang otherwise)."
            )
    return training
