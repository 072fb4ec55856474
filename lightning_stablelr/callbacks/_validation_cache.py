"""The validation batches the monitor caches: prepared as Lightning prepares them, without touching the loader.

:func:`cached_validation_batches` reads the first ``count`` batches of the first validation loader

- through the same steps as Lightning's evaluation loop: ``precision_plugin.convert_input`` (float64
  under ``precision="64-true"``, bf16 under ``"bf16-true"``), ``on_before_batch_transfer``, then
  ``strategy.batch_to_device``, so that a probe feeds the model inputs of its own dtype;
- without consuming the loader's own random generators (``DataLoader(shuffle=True, generator=g)``):
  iterating a loader draws from ``g`` (the workers' base seed and the sampler's permutation), so the
  states of every ``torch.Generator`` found on the loader, its sampler and batch sampler are restored
  afterwards and later validation epochs see the batch order they would have seen without the monitor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_stablelr.callbacks._monitor_support import detached_copy, first_batches

__all__ = ["cached_validation_batches", "preserved_generators"]


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """Every distinct ``torch.Generator`` on the loader, its sampler, its batch sampler and that one's sampler."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    owners = [loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)]
    generators: dict[int, torch.Generator] = {}
    for owner in owners:
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator):
            generators[id(generator)] = generator
    return list(generators.values())


@contextlib.contextmanager
def preserved_generators(loader: Any) -> Iterator[None]:
    """Run the block, then put back the state of every generator :func:`_loader_generators` finds."""
    saved = [(generator, generator.get_state()) for generator in _loader_generators(loader)]
    try:
        yield
    finally:
        for generator, state in saved:
            generator.set_state(state)


def _first_loader(loaders: Any) -> Any:
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


def cached_validation_batches(trainer: pl.Trainer, count: int, device: torch.device | str) -> list[Any]:
    """Copies (on ``device``) of the first ``count`` validation batches as the model sees them; [] without a loader."""
    loader = _first_loader(trainer.val_dataloaders)
    module = trainer.lightning_module

    def prepare(batch: Any) -> Any:
        batch = trainer.precision_plugin.convert_input(batch)
        batch = module.on_before_batch_transfer(batch, 0)
        return detached_copy(trainer.strategy.batch_to_device(batch), device)

    with preserved_generators(loader):
        return first_batches(loader, count, prepare)
