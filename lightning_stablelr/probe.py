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
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_stablelr._loss_source import LossSource, ProbeError, replay_isolation, training_loss
from lightning_stablelr._module_layout import ModuleLayout, module_layout
from lightning_stablelr._probe_isolation import restored_training_flags
from lightning_stablelr._sharded_probe import ShardedProbeError, in_place_point_losses, is_sharded, reshard
from lightning_stablelr._state_guard import ProbeSideEffectError, ProbeSideEffectWarning, state_guard
from lightning_stablelr.rng import ProbeSeed, isolated_rng

__all__ = [
    "ObjectiveProbe", "ProbeError", "ProbeSideEffectError", "ProbeSideEffectWarning", "ShardedProbeError",
    "probe_failure_advice",
]  # fmt: skip



def probe_failure_advice(error: BaseException) -> str:
    """The fix to print after a failed probe: a ProbeError carries its own; ``probe_loss`` cannot fix other errors."""
    if isinstance(error, (ProbeError, ProbeSideEffectError, ShardedProbeError)):
        return "Its message says what to change."
    return (
        "The error came from evaluating the model on a cached batch, which `probe_loss` would not change. If"
        " training itself runs, please report it with this message."
    )


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
      point of one probe sees the same dropout masks. ``seed`` is an int (every stream seeded with it) or
      :class:`~lightning_stablelr.rng.RngStates` copied by :func:`~lightning_stablelr.rng.rng_states`
      (every point starts from those states: it draws what followed the copy, e.g. a training step's masks);
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
        self._source = LossSource(module)
        self._guard = state_guard(module)
        self._sharded: bool | None = None  # DTensor parameters (FSDP2): points written in place

    def parameters(self) -> dict[str, Tensor]:
        """Detached references (no copy) to the module's trainable parameters, keyed by name (sharded ones:
        the registered shards, the FSDP2 units resharded first)."""
        if self.sharded:
            reshard(self.module)
        return {name: p.detach() for name, p in self.module.named_parameters() if p.requires_grad}

    @property
    def sharded(self) -> bool:
        """Whether the module's parameters are sharded (FSDP2 ``DTensor``s): points are then written in place."""
        return self._sharded_given(None)

    def _sharded_given(self, layout: ModuleLayout | None) -> bool:
        # Only True is kept: a probe made before Lightning's configure_model (a callback's setup) sees the
        # module unsharded, and sharding never goes away.
        if not self._sharded:
            self._sharded = is_sharded(self.module, layout)
        return bool(self._sharded)

    def _call_arguments(
        self, params: Mapping[str, Tensor] | None, buffers: Mapping[str, Tensor] | None, layout: ModuleLayout
    ) -> dict[str, Tensor]:
        """``functional_call``'s tensors for one point: every alias of a (possibly tied) tensor gets the same
        argument, so that ``functional_call`` needs no untying (``layout``: this probe call's walk)."""
        known, own_buffers, aliases = layout.parameters, layout.buffers, layout.aliases
        self._check_names(params, buffers, known, own_buffers)
        if params is None:
            params = {name: p.detach() for name, p in known.items()}
        tensors = self._guard.parameters(params, known)
        for name, buffer in own_buffers.items():
            if buffers and name in buffers:
                # The caller's tensor itself: in-place updates (BatchNorm recalibration) are meant to land in it.
                tensors[name] = buffers[name]
            else:
                # A clone, so in-place updates (BatchNorm running stats, num_batches_tracked) hit a throwaway copy.
                tensors[name] = buffer.detach().clone()
        # Every alias of a tied tensor gets the same argument (functional_call's tie_weights, done once here).
        return {f"module.{alias}": tensor for name, tensor in tensors.items() for alias in aliases.get(name, (name,))}

    def loss(
        self,
        batch: Any,
        params: Mapping[str, Tensor] | None = None,
        *,
        batch_idx: int = 0,
        seed: ProbeSeed = 0,
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
        seed: ProbeSeed = 0,
        create_graph: bool = False,
        buffers: Mapping[str, Tensor] | None = None,
        training: bool | None = None,
    ) -> list[Tensor]:
        """``[loss(batch, θ, ...) for θ in points]`` as fp32 tensors, without any host synchronisation.

        Same contract as :meth:`loss` (every point re-seeded with ``seed``), with one RNG save/restore
        and one mode save/restore for all points.
        """
        # One walk of the module tree serves the guard, the arguments and the isolation of every point.
        layout = module_layout(self.module)
        if self._sharded_given(layout):
            return self._sharded_point_losses(batch, points, batch_idx, seed, create_graph, buffers, training)
        grad_mode = contextlib.nullcontext() if create_graph else torch.no_grad()
        values: list[Tensor] = []
        record = self._guard.begin(layout)
        submodules = layout.submodules
        # One replay isolation (silenced self.log, torchmetrics states) for all points.
        with (
            isolated_rng() as reseed,
            restored_training_flags(self.module, submodules),
            replay_isolation(self.module, submodules),
            grad_mode,
        ):
            for params in points:
                arguments = self._call_arguments(params, buffers, layout)
                reseed(seed)
                context = (
                    self.forward_context() if self.forward_context is not None else contextlib.nullcontext()
                )
                with context:
                    if training is not None:
                        self.module.train(bool(training))
                    try:
                        loss = functional_call(self._source, arguments, (batch, batch_idx), tie_weights=False)
                    finally:
                        self._guard.after_point()
                values.append(loss.float())
        self._guard.end(record)
        return values

    def _sharded_point_losses(
        self,
        batch: Any,
        points: Sequence[Mapping[str, Tensor] | None],
        batch_idx: int,
        seed: ProbeSeed,
        create_graph: bool,
        buffers: Mapping[str, Tensor] | None,
        training: bool | None,
    ) -> list[Tensor]:
        """:meth:`point_losses` for sharded (DTensor) parameters: :mod:`lightning_stablelr._sharded_probe`."""
        if create_graph:
            raise ShardedProbeError(
                f"{type(self.module).__name__} has sharded (DTensor, e.g. FSDP2) parameters, and a differentiable"
                " probe (create_graph=True: Hessian-vector products for sharpness) cannot run through FSDP2's"
                " all-gathers. Turn the sharpness instrument off (StabilityMonitor(sharpness_every_n_steps=0))."
            )
        self._layout_check(points, buffers)

        def evaluate() -> Tensor:
            context = self.forward_context() if self.forward_context is not None else contextlib.nullcontext()
            with context:
                if training is not None:
                    self.module.train(bool(training))
                return training_loss(self.module, batch, batch_idx).float()

        with isolated_rng() as reseed, restored_training_flags(self.module), replay_isolation(self.module):
            return in_place_point_losses(self.module, points, evaluate, reseed, seed, buffers=buffers)

    def _layout_check(self, points: Sequence[Mapping[str, Tensor] | None], buffers: Mapping[str, Tensor] | None) -> None:
        """Raise on names that are not the module's parameters or buffers."""
        known, own_buffers = dict(self.module.named_parameters()), dict(self.module.named_buffers())
        for params in points:
            self._check_names(params, buffers, known, own_buffers)

    def _check_names(
        self,
        params: Mapping[str, Tensor] | None,
        buffers: Mapping[str, Tensor] | None,
        known: Mapping[str, Tensor],
        own_buffers: Mapping[str, Tensor],
    ) -> None:
        if params is not None and not params.keys() <= known.keys():
            unknown = set(params) - set(known)
            raise ValueError(
                f"params has names that are not parameters of {type(self.module).__name__}: "
                f"{sorted(unknown)[:5]}. Build them from ObjectiveProbe.parameters()."
            )
        if buffers and not buffers.keys() <= own_buffers.keys():
            unknown = set(buffers) - set(own_buffers)
            raise ValueError(
                f"buffers has names that are not buffers of {type(self.module).__name__}: "
                f"{sorted(unknown)[:5]}. Use names from module.named_buffers()."
            )

    def losses(
        self,
        batch: Any,
        points: Sequence[Mapping[str, Tensor]],
        *,
        batch_idx: int = 0,
        seed: ProbeSeed = 0,
        training: bool | None = None,
    ) -> list[float]:
        """``[L(θ) for θ in points]`` on one batch with one seed (same dropout masks at every point).

        One host synchronisation for all points, not one per point. ``training`` as in :meth:`loss`.
        """
        if not points:
            return []
        values = self.point_losses(batch, points, batch_idx=batch_idx, seed=seed, training=training)
        return torch.stack(values).tolist()
