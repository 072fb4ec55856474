"""One walk over a module's tree for everything a probe needs to know about it (pure: no Lightning import).

A probe used to walk the module for each of its helpers: the parameters and buffers (deduplicated and with
every alias), the submodules whose slots the state guard records, the plain tensor attributes it backs up,
the training flags it restores and the torchmetrics states it puts back. On a 12-layer transformer (124
submodules) those walks cost more than a forward pass per probe. :func:`module_layout` walks once.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["ModuleLayout", "module_layout"]


@dataclass(frozen=True)
class ModuleLayout:
    """What one walk of ``module.named_modules(remove_duplicate=False)`` found.

    Attributes:
        modules: ``(prefix, submodule)`` with each submodule once, in ``module.named_modules()`` order.
        parameters: ``dict(module.named_parameters())``: each tensor once, under its first name.
        buffers: ``dict(module.named_buffers())``, likewise.
        aliases: first name of a tensor -> every name it is registered under (tied weights, shared
            submodules), parameters and buffers each among their own kind.
    """

    modules: list[tuple[str, nn.Module]]
    parameters: dict[str, Tensor]
    buffers: dict[str, Tensor]
    aliases: dict[str, list[str]]

    @property
    def submodules(self) -> list[nn.Module]:
        """The submodules alone (``list(module.modules())``)."""
        return [submodule for _, submodule in self.modules]


def module_layout(module: nn.Module) -> ModuleLayout:
    """Walk ``module`` once: the same names and order as ``named_modules()``, ``named_parameters()`` and
    ``named_buffers()`` (the first occurrence of a tensor or submodule in the walk that keeps duplicates is the
    one those deduplicating walks keep), plus every alias."""
    modules: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    parameters: dict[str, Tensor] = {}
    buffers: dict[str, Tensor] = {}
    aliases: dict[str, list[str]] = {}
    first_parameter: dict[int, str] = {}
    first_buffer: dict[int, str] = {}
    for prefix, submodule in module.named_modules(remove_duplicate=False):
        if id(submodule) not in seen:
            seen.add(id(submodule))
            modules.append((prefix, submodule))
        for slots, first, found in (
            (submodule._parameters, first_parameter, parameters),
            (submodule._buffers, first_buffer, buffers),
        ):
            for key, tensor in slots.items():
                if tensor is None:
                    continue
                name = f"{prefix}.{key}" if prefix else key
                owner = first.setdefault(id(tensor), name)
                if owner == name:
                    found[name] = tensor
                aliases.setdefault(owner, []).append(name)
    return ModuleLayout(modules, parameters, buffers, aliases)
