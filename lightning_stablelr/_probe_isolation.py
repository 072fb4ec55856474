"""What a probe replaying ``training_step`` must leave as it found (pure: no Lightning import).

Context managers used by :class:`lightning_stablelr.probe.ObjectiveProbe`: ``self.log`` silenced, the
``.training`` flags and every torchmetrics ``Metric``'s state restored. Tensors the module owns are guarded
separately (:mod:`lightning_stablelr._state_guard`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor, nn

__all__ = ["is_metric", "restored_metric_states", "restored_training_flags", "silenced_logging"]

_SILENCED = ("log", "log_dict")
_MISSING = object()


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def silenced_logging(module: nn.Module) -> Iterator[None]:
    """Shadow ``module.log``/``module.log_dict`` on the instance, then restore what was there before.

    A probe is not a training step: its ``self.log`` calls must not reach the trainer's results.
    """
    saved = {name: module.__dict__.get(name, _MISSING) for name in _SILENCED}
    try:
        for name in _SILENCED:
            object.__setattr__(module, name, _noop)
        yield
    finally:
        for name, value in saved.items():
            if value is _MISSING:
                module.__dict__.pop(name, None)
            else:
                object.__setattr__(module, name, value)


@contextlib.contextmanager
def restored_training_flags(module: nn.Module, submodules: Iterable[nn.Module] | None = None) -> Iterator[None]:
    """A user's ``training_step`` may toggle ``.train()/.eval()``; the probe must leave the modes as found.
    ``submodules``: ``module.modules()`` when the caller has walked the tree already."""
    flags = [(submodule, submodule.training) for submodule in (module.modules() if submodules is None else submodules)]
    try:
        yield
    finally:
        for submodule, training in flags:
            if submodule.training is not training:  # nn.Module.__setattr__ costs ~1 µs: only the flags that moved
                submodule.training = training


_METRIC_BOOKKEEPING = ("_update_count", "_computed", "_forward_cache")


def _copied_state(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_copied_state(item) for item in value]
    return value


def is_metric(module: nn.Module) -> bool:
    """Whether ``module`` is a torchmetrics ``Metric`` (duck-typed: its instance dict holds ``_defaults``). Read
    from ``vars``: ``getattr`` of a missing name goes through ``nn.Module.__getattr__``, which raises inside,
    about 1 µs per module on every probe."""
    return isinstance(vars(module).get("_defaults"), dict)


@contextlib.contextmanager
def restored_metric_states(module: nn.Module, submodules: Iterable[nn.Module] | None = None) -> Iterator[None]:
    """Put back the state of every torchmetrics ``Metric`` inside ``module`` after a replayed step.

    A ``training_step`` commonly updates metrics (``self.train_acc(preds, y)``). Their states are plain
    attributes, not buffers, so the cloned buffers of :func:`torch.func.functional_call` do not protect
    them: without this, every probe point would add a fake sample to the epoch's training metrics.
    Duck-typed on ``Metric``'s ``_defaults`` (no torchmetrics import here).
    """
    metrics = [m for m in (module.modules() if submodules is None else submodules) if is_metric(m)]
    saved = [
        (metric, {name: _copied_state(getattr(metric, name)) for name in [*metric._defaults, *_METRIC_BOOKKEEPING]
                  if hasattr(metric, name)})
        for metric in metrics
    ]  # fmt: skip
    try:
        yield
    finally:
        for metric, state in saved:
            for name, value in state.items():
                setattr(metric, name, value)
