"""Probe points for sharded parameters (FSDP2 ``DTensor``): written into the shards in place, then restored
(pure: no Lightning import).

``torch.func.functional_call`` swaps the tensors registered on a module, but FSDP2 all-gathers its own
sharded parameters in a forward pre-hook, so a swapped-in tensor would never reach the computation. For
such a module :class:`~lightning_stablelr.probe.ObjectiveProbe` evaluates each point θ this way instead:

    p.copy_(θ_p)  for every parameter p (DTensor: each rank writes its local shard)
    L(θ) = the ordinary forward (FSDP2 gathers the written shards), under no_grad, re-seeded
    then every parameter and buffer is copied back, bit-exactly, also when the forward raises

FSDP2 keeps the root unit's parameters gathered after a forward (the backward would need them), so
after each point, and after the restore, every FSDP2 unit is resharded (:func:`reshard`): the next
forward, the probe's or training's, gathers the current shards instead of reusing a stale copy.

Every rank must probe the same points (the same Δθ everywhere) because the forward's all-gathers are
collectives; each rank's loss is its own batch's, to be averaged over the ranks by the caller.
Differentiable probes (``create_graph=True``: sharpness) are refused with :class:`ShardedProbeError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_stablelr._module_layout import ModuleLayout

__all__ = ["ShardedProbeError", "in_place_point_losses", "is_sharded", "reshard", "restored_in_place"]


class ShardedProbeError(RuntimeError):
    """A probe that sharded (DTensor) parameters cannot serve: a differentiable one."""


def _is_fsdp_unit(module: nn.Module) -> bool:
    # Looked up on the class: an instance lookup of a missing name goes through nn.Module.__getattr__ and
    # raises inside, about 1 µs per module on every probe (FSDP2 units are instances of a generated subclass).
    cls = type(module)
    return callable(getattr(cls, "reshard", None)) and hasattr(cls, "unshard")


def is_sharded(module: nn.Module, layout: ModuleLayout | None = None) -> bool:
    """Whether some parameter of ``module`` is a ``DTensor`` (FSDP2 ``fully_shard``, tensor parallel) or some
    submodule is an FSDP2 unit (whose parameters a forward may have left gathered as plain tensors).
    ``layout``: the module's :func:`~lightning_stablelr._module_layout.module_layout`, when walked already."""
    parameters = module.parameters() if layout is None else layout.parameters.values()
    if any(hasattr(type(parameter), "placements") and hasattr(type(parameter), "to_local") for parameter in parameters):
        return True
    return any(_is_fsdp_unit(unit) for unit in (module.modules() if layout is None else layout.submodules))


def reshard(module: nn.Module) -> None:
    """Free every FSDP2 unit's gathered parameters (``FSDPModule.reshard``) so the next forward gathers the
    shards as they are now; a no-op for modules that are not FSDP2 units."""
    for unit in module.modules():
        if _is_fsdp_unit(unit):
            unit.reshard()  # type: ignore[operator]


@contextlib.contextmanager
def restored_in_place(
    parameters: Sequence[Tensor], buffers: Sequence[Tensor], module: nn.Module | None = None
) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    """Under ``no_grad``: yield copies of ``parameters`` and ``buffers``, then copy them back bit-exactly on exit
    (also when the block raises) and reshard ``module``'s FSDP2 units. The block writes probe points into the
    tensors in place; shared by :func:`in_place_point_losses` and ``StableLRScheduler.check_step``."""
    with torch.no_grad():
        saved = [parameter.detach().clone() for parameter in parameters]
        saved_buffers = [buffer.detach().clone() for buffer in buffers]
        try:
            yield saved, saved_buffers
        finally:
            for parameter, value in zip(parameters, saved):
                parameter.copy_(value)
            for buffer, value in zip(buffers, saved_buffers):
                buffer.copy_(value)
            if module is not None:
                reshard(module)


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _same_storage(first: Tensor, second: Tensor) -> bool:
    a, b = _local(first), _local(second)
    return a.numel() > 0 and a.data_ptr() == b.data_ptr()


def in_place_point_losses(
    module: nn.Module,
    points: Sequence[Mapping[str, Tensor] | None],
    evaluate: Callable[[], Tensor],
    reseed: Callable[[Any], None],
    seed: Any,
    *,
    buffers: Mapping[str, Tensor] | None = None,
) -> list[Tensor]:
    """``[evaluate() at θ for θ in points]`` with each θ written into ``module``'s parameters in place.

    A point maps parameter names to values (a point that omits a name, or None, uses the module's own
    value); a value may be the live parameter itself (``ObjectiveProbe.parameters()``): it is read from a
    copy taken first. ``buffers``: named buffers whose values each point starts from, and into which the
    forward's in-place updates are copied back (BatchNorm recalibration); the module's own buffers end
    exactly as they were. ``reseed(seed)`` runs before each point.
    """
    reshard(module)  # a forward (validation) may have left the root's parameters gathered: register the shards
    parameters = dict(module.named_parameters())
    own_buffers = dict(module.named_buffers())
    values: list[Tensor] = []
    with restored_in_place(list(parameters.values()), list(own_buffers.values()), module) as (kept, kept_buffers):
        saved, saved_buffers = dict(zip(parameters, kept)), dict(zip(own_buffers, kept_buffers))
        for point in points:
            for name, parameter in parameters.items():
                value = point.get(name) if point else None
                parameter.copy_(saved[name] if value is None or _same_storage(value, parameter) else value)
            for name, buffer in own_buffers.items():
                buffer.copy_(buffers[name] if buffers and name in buffers else saved_buffers[name])
            reseed(seed)
            try:
                values.append(evaluate())
            finally:
                reshard(module)
            for name in buffers or {}:
                buffers[name].copy_(own_buffers[name])
    return values
