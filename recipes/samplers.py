"""A training-set order that depends only on (seed, epoch), so resuming from an epoch-end checkpoint is exact.

Lightning's checkpoints hold no RNG state and its loaders do not resume mid-epoch. With a ``RandomSampler``
the order of epoch ``e`` after a resume depends on how many random numbers were drawn before the
interruption. :class:`EpochSeededSampler` draws the permutation of epoch ``e`` from a fresh generator seeded
with ``epoch_seed(seed, e)``, so epoch ``e`` sees the same order in an interrupted-and-resumed run as in an
uninterrupted one.

Lightning calls ``set_epoch(current_epoch)`` on the train loader's sampler before every epoch
(``lightning.fabric.utilities.data._set_sampler_epoch``, from ``_FitLoop.on_advance_start``). Under DDP it
wraps the sampler in ``DistributedSamplerWrapper``, which forwards ``set_epoch`` and shards the permutation,
so every rank derives the same global order and takes its own slice.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from lightning_stablelr.validation import check_int_at_least

__all__ = ["EpochSeededSampler", "epoch_seed"]

_MIX = 0x9E3779B1  # golden-ratio constant: keeps (seed, epoch) and (seed + 1, epoch - 1) apart
_MOD = 2**63 - 1


def epoch_seed(seed: int, epoch: int) -> int:
    """Generator seed of one epoch: ``(seed · 0x9E3779B1 + epoch) mod (2^63 - 1)``.

    A plain ``seed + epoch`` would give seed 0's epoch 1 the order of seed 1's epoch 0, correlating the
    runs of a seed sweep; the multiplier separates them.
    """
    return (int(seed) * _MIX + int(epoch)) % _MOD


class EpochSeededSampler(Sampler[int]):
    """Yields a permutation of ``range(num_samples)`` that is a function of ``(seed, epoch)`` only.

    Args:
        num_samples: size of the data set (``>= 1``).
        seed: base seed; the recipes pass the run's ``seed``.
        shuffle: ``False`` yields ``0, 1, ..., num_samples - 1`` every epoch.

    Example::

        sampler = EpochSeededSampler(300, seed=0)
        sampler.set_epoch(3)
        order = list(sampler)  # identical in every process and after any resume
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True) -> None:
        self.num_samples = check_int_at_least("num_samples", num_samples, 1, "The data set is empty.")
        self.seed = check_int_at_least("seed", seed, 0, "Use a non-negative integer seed.")
        self.shuffle = bool(shuffle)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next ``__iter__`` yields (Lightning calls this every epoch)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        generator = torch.Generator()
        generator.manual_seed(epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples
