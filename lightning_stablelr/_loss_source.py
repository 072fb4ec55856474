"""The loss source a probe evaluates: ``probe_loss(batch)``, else a silenced replay of ``training_step``
(pure: no Lightning import). Used by :class:`~lightning_stablelr.probe.ObjectiveProbe`."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from torch import Tensor, nn

from lightning_stablelr._probe_isolation import restored_metric_states, silenced_logging

__all__ = ["LossSource", "ProbeError", "replay_isolation", "training_loss"]


class ProbeError(RuntimeError):
    """The module offers no way to compute its training loss at given parameters."""


def _accepts_batch_idx(training_step: Callable[..., Any]) -> bool:
    """Mirror Lightning's rule: ``batch_idx`` is passed when named, or when the step takes >= 2 arguments."""
    function = getattr(training_step, "__func__", None)
    if function is not None:  # a bound method: inspect its function once, not on every probe
        return _function_accepts_batch_idx(function)
    return _signature_accepts_batch_idx(training_step, skip_first=False)


@functools.lru_cache(maxsize=64)
def _function_accepts_batch_idx(function: Callable[..., Any]) -> bool:
    return _signature_accepts_batch_idx(function, skip_first=True)


def _signature_accepts_batch_idx(training_step: Callable[..., Any], *, skip_first: bool) -> bool:
    try:
        parameters = list(inspect.signature(training_step).parameters.values())[1 if skip_first else 0 :]
    except (TypeError, ValueError):  # builtins or C callables: be generous
        return True
    positional = 0
    for parameter in parameters:
        if parameter.name == "batch_idx" or parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            return True
        if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            positional += 1
    return positional >= 2


def training_loss(module: nn.Module, batch: Any, batch_idx: int) -> Tensor:
    """The loss source: ``probe_loss(batch)`` if defined, else ``training_step``'s loss.

    The caller holds :func:`replay_isolation` around every call (once around all the points of a probe: one
    module walk, not one per point)."""
    probe_loss = getattr(module, "probe_loss", None)
    if callable(probe_loss):
        loss = probe_loss(batch)
        source = "probe_loss"
    else:
        training_step = getattr(module, "training_step", None)
        if not callable(training_step):
            raise ProbeError(
                f"{type(module).__name__} has neither `probe_loss` nor `training_step`, so its objective cannot"
                " be probed. Implement `probe_loss(self, batch) -> Tensor` returning the scalar training loss."
            )
        if getattr(module, "automatic_optimization", True) is False:
            # Running a manual-optimization step would call optimizer.step() on the real weights.
            raise ProbeError(
                f"{type(module).__name__} uses manual optimization, so its `training_step` cannot be replayed"
                " as a probe. Implement `probe_loss(self, batch) -> Tensor` returning the scalar training loss."
            )
        output = training_step(batch, batch_idx) if _accepts_batch_idx(training_step) else training_step(batch)
        loss = output.get("loss") if isinstance(output, Mapping) else output
        source = "training_step"
    if not isinstance(loss, Tensor):
        raise ProbeError(
            f"{type(module).__name__}.{source} returned {type(loss).__name__}, not a loss Tensor (or a dict with"
            " a 'loss' Tensor). Implement `probe_loss(self, batch) -> Tensor` returning the scalar training loss."
        )
    if loss.numel() != 1:
        raise ProbeError(
            f"{type(module).__name__}.{source} returned a loss of shape {tuple(loss.shape)}; the probe needs a"
            " scalar. Reduce it, or implement `probe_loss(self, batch) -> Tensor` returning a scalar."
        )
    return loss.reshape(())


@contextlib.contextmanager
def replay_isolation(module: nn.Module, submodules: Iterable[nn.Module] | None = None) -> Iterator[None]:
    """What a replayed ``training_step`` needs around it: ``self.log`` silenced, torchmetrics states restored
    (``submodules``: ``module.modules()`` when the caller has walked the tree already)."""
    with silenced_logging(module), restored_metric_states(module, submodules):
        yield


class LossSource(nn.Module):
    """Holds the module so that ``functional_call`` can reparametrise it and still run ``training_step``
    (inside the caller's :func:`replay_isolation`)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Any, batch_idx: int) -> Tensor:
        return training_loss(self.module, batch, batch_idx)
