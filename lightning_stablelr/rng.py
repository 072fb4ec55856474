"""The one RNG isolator of the package and the probe seeds (pure: no Lightning import).

Every probe (the three-point line probe of the callbacks and of
:meth:`~lightning_stablelr.StableLRScheduler.check_step`, sharpness, connectivity) runs inside
:func:`isolated_rng`, so the global random streams (torch CPU and initialised CUDA, ``random``, numpy)
are exactly as before, also when the block raises; inside, ``reseed(seed)`` fixes every stream, so all
points of one probe see the same dropout masks.

``torch.manual_seed`` is avoided on purpose: when CUDA is not initialised it queues a lazy re-seed that
fires at CUDA initialisation, long after the probe, and changes the user's run. Lightning ships
``lightning.pytorch.utilities.seed.isolate_rng``; this module exists because the pure modules must not
import Lightning.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch

__all__ = ["CONNECTIVITY_SEED", "isolated_rng", "probe_seed", "reseed"]

_SEED_OFFSET = 0x5EED

#: The seed of every connectivity probe: fixed, so that the endpoint loss of an old snapshot, measured
#: when it was new, stays comparable.
CONNECTIVITY_SEED = 0xC0DE


def probe_seed(step: int) -> int:
    """The RNG seed of the probes of optimizer step ``step``: ``0x5EED + step``, equal on every rank."""
    return _SEED_OFFSET + int(step)


def reseed(seed: int, cuda: bool | None = None) -> None:
    """Seed torch's CPU generator (and every CUDA device when ``cuda``; default: when initialised),
    ``random`` and numpy (``seed mod 2**32``)."""
    torch.random.default_generator.manual_seed(seed)
    if cuda if cuda is not None else torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextlib.contextmanager
def isolated_rng() -> Iterator[Callable[[int], None]]:
    """Save torch (CPU + initialised CUDA), ``random`` and numpy RNG states; yield ``reseed``; restore all.

    One save/restore serves all points of a probe (numpy's state is slow to copy); call the yielded
    ``reseed(seed)`` before each point.
    """
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    try:
        yield functools.partial(reseed, cuda=cuda_states is not None)
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
