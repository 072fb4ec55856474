"""Evaluate the training objective at arbitrary parameters, deterministically and with no side effects.

Pure module: no ``lightning`` import, so plain PyTorch and Fabric users can probe their own
``nn.Module`` the same way (duck typing on ``probe_loss`` / ``training_step``).

.. code-block:: python

    probe = ObjectiveProbe(model)
    theta = probe.parameters()                       # detached references
    doubled = {name: 2 * p for name, p in theta.items()}
    loss_here, loss_there = probe.losses(batch, [theta, doubled], seed=step)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_stablelr._probe_isolation import (
    restored_metric_states,
    restored_training_flags,
    silenced_logging,
)
from lightning_stablelr._state_guard import ProbeSideEffectError, ProbeSideEffectWarning, state_guard
from lightning_stablelr.rng import isolated_rng

__all__ = ["ObjectiveProbe", "ProbeError", "ProbeSideEffectError", "ProbeSideEffectWarning", "probe_failure_advice"]



class ProbeError(RuntimeError):
    """The module offers no way to compute its training loss at given parameters."""


def probe_failure_advice(error: BaseException) -> str:
    """The fix to print after a failed probe: a ProbeError carries its own; ``probe_loss`` cannot fix other errors."""
    if isinstance(error, (ProbeError, ProbeSideEffectError)):
        return "Its message says what to change."
    return (
        "The error came from evaluating the model on a cached batch, which `probe_loss` would not change. If"
        " training itself runs, please report it with this message."
    )


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


def _training_loss(module: nn.Module, batch: Any, batch_idx: int) -> Tensor:
    """The loss source: ``probe_loss(batch)`` if defined, else the silenced ``training_step``'s loss."""
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
        with silenced_logging(module), restored_metric_states(module):
            output = (
                training_step(batch, batch_idx) if _accepts_batch_idx(training_step) else training_step(batch)
            )
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


class _LossSource(nn.Module):
    """Holds the module so that ``functional_call`` can reparametrise it and still run ``training_step``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Any, batch_idx: int) -> Tensor:
        return _training_loss(self.module, batch, batch_idx)


class ObjectiveProbe:
    """The training loss L(θ) on a batch at any parameters θ, with zero observer effect.

    ``loss(batch, params)`` returns ``float32(L(θ = params))`` where L is ``module.probe_loss(batch)`` if
    defined, else the loss of ``module.training_step(batch, batch_idx)`` (a Tensor or ``out["loss"]``)
    with ``self.log``/``self.log_dict`` silenced. Parameters missing from ``params`` (and frozen ones)
    are the module's own.

    Contract, for every call:

    - the module's parameters (trainable *and frozen*), buffers, plain tensor attributes, ``.grad`` and
      ``.training`` flags are unchanged afterwards (buffers are passed as clones, so BatchNorm running
      statistics never move), and so are the states of torchmetrics metrics that a replayed
      ``training_step`` updates; in-place updates (an EMA teacher) are undone or stop the probe, see
      :mod:`lightning_stablelr._state_guard`. Other side effects of your ``training_step`` (a Python
      counter, a print) do happen on every probe point: define ``probe_loss`` to avoid them;
    - the torch (CPU + initialised CUDA), ``random`` and numpy RNG states are unchanged, and the probe
      itself runs under a fixed ``seed``: the same seed at the same θ gives the same loss, and every
      point of one probe sees the same dropout masks;
    - it runs under ``torch.no_grad()`` unless ``create_graph=True``, in which case the result is
      differentiable w.r.t. the given ``params`` (use ``torch.autograd.grad``, never ``.backward()``,
      so that no ``.grad`` is written);
    - ``forward_context`` (e.g. a precision plugin's ``forward_context``) wraps the computation.

    Pass the unwrapped module (``trainer.lightning_module``), never a DDP wrapper: nothing must be
    broadcast or synchronised by a probe.

    Args:
        module: the model; a LightningModule or any ``nn.Module`` with ``probe_loss`` or ``training_step``.
        forward_context: optional factory of a context manager entered around every evaluation.
    """

    def __init__(
        self, module: nn.Module, forward_context: Callable[[], AbstractContextManager[Any]] | None = None
    ) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(
                f"`module` must be a torch.nn.Module, got {type(module).__name__}. Pass the LightningModule itself."
            )
        if forward_context is not None and not callable(forward_context):
            raise ValueError(
                f"`forward_context` must be a callable returning a context manager, or None, got {forward_context!r}."
            )
        self.module = module
        self.forward_context = forward_context
        self._source = _LossSource(module)
        self._guard = state_guard(module)

    def parameters(self) -> dict[str, Tensor]:
        """Detached references (no copy) to the module's trainable parameters, keyed by name."""
        return {name: p.detach() for name, p in self.module.named_parameters() if p.requires_grad}

    def _call_arguments(
        self, params: Mapping[str, Tensor] | None, buffers: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        known = dict(self.module.named_parameters())
        if params is None:
            params = {name: p.detach() for name, p in known.items()}
        else:
            unknown = set(params) - set(known)
            if unknown:
                raise ValueError(
                    f"params has names that are not parameters of {type(self.module).__name__}: "
                    f"{sorted(unknown)[:5]}. Build them from ObjectiveProbe.parameters()."
                )
        arguments = {f"module.{name}": tensor for name, tensor in self._guard.parameters(params).items()}
        own_buffers = dict(self.module.named_buffers())
        if buffers:
            unknown = set(buffers) - set(own_buffers)
            if unknown:
                raise ValueError(
                    f"buffers has names that are not buffers of {type(self.module).__name__}: "
                    f"{sorted(unknown)[:5]}. Use names from module.named_buffers()."
                )
        for name, buffer in own_buffers.items():
            if buffers and name in buffers:
                # The caller's tensor itself: in-place updates (BatchNorm recalibration) are meant to land in it.
                arguments[f"module.{name}"] = buffers[name]
            else:
                # A clone, so in-place updates (BatchNorm running stats, num_batches_tracked) hit a throwaway copy.
                arguments[f"module.{name}"] = buffer.detach().clone()
        return arguments

    def loss(
        self,
        batch: Any,
        params: Mapping[str, Tensor] | None = None,
        *,
        batch_idx: int = 0,
        seed: int = 0,
        create_graph: bool = False,
        buffers: Mapping[str, Tensor] | None = None,
        training: bool | None = None,
    ) -> Tensor:
        """The fp32 scalar loss on ``batch`` at ``params`` (the module's current parameters when None).

        Optional, for probes that need another mode than the training step's (e.g. connectivity
        probes in eval mode with recalibrated BatchNorm statistics):

        - ``buffers``: named buffers (names from ``module.named_buffers()``) used *as given*, not
          cloned, so in-place updates made by the forward pass (BatchNorm running statistics in train
          mode) land in these tensors; the module's own buffers still never change. Buffers not named
          are cloned as usual.
        - ``training``: ``True``/``False`` runs the call with ``module.train(training)``; ``None`` (default)
          keeps the modules' current flags. The flags are restored afterwards either way.
        """
        return self.point_losses(
            batch, [params], batch_idx=batch_idx, seed=seed, create_graph=create_graph, buffers=buffers,
            training=training,
        )[0]  # fmt: skip

    def point_losses(
        self,
        batch: Any,
        points: Sequence[Mapping[str, Tensor] | None],
        *,
        batch_idx: int = 0,
        seed: int = 0,
        create_graph: bool = False,
        buffers: Mapping[str, Tensor] | None = None,
        training: bool | None = None,
    ) -> list[Tensor]:
        """``[loss(batch, θ, ...) for θ in points]`` as fp32 tensors, without any host synchronisation.

        Same contract as :meth:`loss` (every point re-seeded with ``seed``), with one RNG save/restore
        and one mode save/restore for all points.
        """
        grad_mode = contextlib.nullcontext() if create_graph else torch.no_grad()
        values: list[Tensor] = []
        record = self._guard.begin()
        with isolated_rng() as reseed, restored_training_flags(self.module), grad_mode:
            for params in points:
                arguments = self._call_arguments(params, buffers)
                reseed(seed)
                context = (
                    self.forward_context() if self.forward_context is not None else contextlib.nullcontext()
                )
                with context:
                    if training is not None:
                        self.module.train(bool(training))
                    try:
                        loss = functional_call(self._source, arguments, (batch, batch_idx))
                    finally:
                        self._guard.after_point()
                values.append(loss.float())
        self._guard.end(record)
        return values

    def losses(
        self,
        batch: Any,
        points: Sequence[Mapping[str, Tensor]],
        *,
        batch_idx: int = 0,
        seed: int = 0,
        training: bool | None = None,
    ) -> list[float]:
        """``[L(θ) for θ in points]`` on one batch with one seed (same dropout masks at every point).

        One host synchronisation for all points, not one per point. ``training`` as in :meth:`loss`.
        """
        if not points:
            return []
        values = self.point_losses(batch, points, batch_idx=batch_idx, seed=seed, training=training)
        return torch.stack(values).tolist()
