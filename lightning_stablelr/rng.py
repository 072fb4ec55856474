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
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = [
    "CONNECTIVITY_SEED", "ProbeSeed", "RngStates", "isolated_rng", "probe_seed", "reseed", "restore_rng_states",
    "rng_states",
]  # fmt: skip

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


class RngStates(NamedTuple):
    """The global random streams' states: torch CPU, every initialised CUDA device (None if CUDA is not
    initialised), ``random`` and numpy (:func:`rng_states`)."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None
    python: tuple[Any, ...]
    numpy: tuple[Any, ...]


def rng_states() -> RngStates:
    """Copy every global random stream's state (about 40 µs, numpy's being most of it)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return RngStates(torch.get_rng_state(), cuda, random.getstate(), np.random.get_state())


def restore_rng_states(states: RngStates) -> None:
    """Put back the states :func:`rng_states` copied."""
    torch.set_rng_state(states.cpu)
    if states.cuda is not None:
        torch.cuda.set_rng_state_all(states.cuda)
    random.setstate(states.python)
    np.random.set_state(states.numpy)


#: What each point of a probe starts from: an int seeds every stream (:func:`reseed`); :class:`RngStates`
#: (copied by :func:`rng_states` before a training step's forward) replays that step's own random draws.
ProbeSeed = int | RngStates


def _start_point(seed: ProbeSeed, cuda: bool) -> None:
    if isinstance(seed, RngStates):
        restore_rng_states(seed)
        if cuda and seed.cuda is None:  # CUDA initialised after the copy: every point still draws alike
            torch.cuda.manual_seed_all(_SEED_OFFSET)
    else:
        reseed(seed, cuda=cuda)


@contextlib.contextmanager
def isolated_rng() -> Iterator[Callable[[ProbeSeed], None]]:
    """Save torch (CPU + initialised CUDA), ``random`` and numpy RNG states; yield ``reseed``; restore all.

    One save/restore serves all points of a probe (numpy's state is slow to copy); call the yielded
    ``reseed(seed)`` before each point. ``seed`` may also be :class:`RngStates`, which are then restored
    before each point (every point draws what the training step drew: the same dropout masks).
    """
    states = rng_states()
    try:
        yield functools.partial(_start_point, cuda=states.cuda is not None)
    finally:
        restore_rng_states(states)
