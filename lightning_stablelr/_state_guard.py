"""No tensor the module owns may change during a probe: detect in-place changes, undo them or refuse.

Pure module (no Lightning import), used by :class:`~lightning_stablelr.probe.ObjectiveProbe`.

A replayed ``training_step`` may change module state in place, the mean-teacher / BYOL / DINO pattern
being the common case::

    with torch.no_grad():
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.mul_(0.9).add_(0.1 * s)

``torch.func.functional_call`` swaps in only the tensors it is given, so a frozen parameter that is
not passed is the real one. :class:`ModuleStateGuard` makes the guarantee general, at the cost of
reading version counters (``Tensor._version``, bumped by every in-place operation):

- **first call (verification)**: every parameter, trainable or frozen, is passed as a clone, and every
  plain tensor attribute (a tensor stored on a submodule that is neither parameter nor buffer) is
  backed up. Afterwards the clones whose version moved name the parameters the loss source changes;
  they are *shielded* (passed as clones on every later call), the plain attributes that changed are
  restored and backed up around every later call, and one :class:`ProbeSideEffectWarning` names them.
- **later calls**: unshielded tensors are the real ones (no copy); their versions are compared before
  and after. A change (a conditional update that did not happen during verification) cannot be undone:
  the guard refuses every further call with :class:`ProbeSideEffectError` naming the tensor.

Buffers are always passed as clones by the probe, so they are only checked. torchmetrics states are
restored by the probe itself and skipped here.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_stablelr._module_layout import ModuleLayout, module_layout
from lightning_stablelr._probe_isolation import is_metric

__all__ = ["ModuleStateGuard", "ProbeSideEffectError", "ProbeSideEffectWarning", "state_guard"]

_FIX = "Implement `probe_loss(self, batch) -> Tensor` returning the loss without the update."


class ProbeSideEffectError(RuntimeError):
    """A probe changed a tensor the module owns in place, and the change could not be undone."""


class ProbeSideEffectWarning(UserWarning):
    """The replayed loss source changes module tensors in place; the probes now work on copies of them."""


def _version(tensor: Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors carry no version counter
        return None


def _plain_tensor_attributes(
    module: nn.Module, named_modules: Iterable[tuple[str, nn.Module]] | None = None
) -> Iterator[tuple[str, nn.Module, str, Tensor]]:
    """``(qualified name, owner, attribute, tensor)`` for tensors stored as plain submodule attributes
    (``named_modules``: ``module.named_modules()`` when the caller has walked the tree already)."""
    for prefix, submodule in module.named_modules() if named_modules is None else named_modules:
        if is_metric(submodule):
            continue  # a torchmetrics Metric: the probe restores its states itself
        for attribute, value in vars(submodule).items():
            if isinstance(value, Tensor):
                yield (f"{prefix}.{attribute}" if prefix else attribute), submodule, attribute, value


def _source(module: nn.Module) -> str:
    return "probe_loss" if callable(getattr(module, "probe_loss", None)) else "training_step"


def _clone(tensor: Tensor) -> Tensor:
    # Caller-given points keep their graph (create_graph probes); the module's own tensors are detached.
    return tensor.clone() if tensor.requires_grad else tensor.detach().clone()


class ModuleStateGuard:
    """Shields the module's tensors from in-place changes made by the probe's loss source.

    One guard per module (:func:`state_guard`), shared by every probe of it: what one probe learned
    (and a stop) holds for all of them, and the warning is shown once.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.verified = False
        self.shielded: set[str] = set()  # parameters passed as clones on every call
        self.restored: set[str] = set()  # plain tensor attributes backed up and restored on every call
        self.error: str | None = None
        self._clones: list[tuple[str, Tensor, int | None]] = []
        self._slots: list[tuple[dict[str, Any], str, Tensor | None]] = []
        self._learned: set[str] = set()

    def argument(self, name: str, tensor: Tensor) -> Tensor:
        """The tensor ``functional_call`` gets for parameter ``name``: a clone until verified or when shielded."""
        if self.verified and name not in self.shielded:
            return tensor
        clone = _clone(tensor)
        self._clones.append((name, clone, _version(clone)))
        return clone

    def parameters(self, params: Mapping[str, Tensor], own: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Every parameter of the module: ``params[name]`` where given, else the module's own (frozen ones).
        ``own``: ``dict(module.named_parameters())`` when the caller has it already."""
        if own is None:
            own = dict(self.module.named_parameters())
        return {name: self.argument(name, params[name] if name in params else own[name].detach()) for name in own}

    def begin(self, layout: ModuleLayout | None = None) -> dict[str, Any]:
        """Record versions (and the backups needed to undo) before a probe call; raise when disabled.
        ``layout``: the module's :func:`~lightning_stablelr._module_layout.module_layout`, walked now."""
        if self.error is not None:
            raise ProbeSideEffectError(self.error)
        if layout is None:
            layout = module_layout(self.module)
        self._clones, self._learned = [], set()
        self._slots = [
            (slots, key, tensor)
            for _, submodule in layout.modules
            for slots in (submodule._parameters, submodule._buffers)
            for key, tensor in slots.items()
        ]
        owned = {**layout.parameters, **layout.buffers}
        plain = {
            name: (owner, attribute, value)
            for name, owner, attribute, value in _plain_tensor_attributes(self.module, layout.modules)
        }
        backups = {
            name: value.detach().clone()
            for name, (_, _, value) in plain.items()
            if not self.verified or name in self.restored
        }
        return {
            "owned": [(name, tensor, _version(tensor)) for name, tensor in owned.items()],
            "plain": [(name, owner, attribute, value, _version(value)) for name, (owner, attribute, value) in plain.items()],
            "backups": backups,
        }

    def restore_slots(self) -> None:
        """Put every parameter and buffer object back where :meth:`begin` found it.

        ``functional_call`` restores the wrong tensors when one submodule is registered under two names
        (``self.encoder`` and ``self.body[0]``): without this, the probe's θ would stay in the model.
        """
        for slots, key, tensor in self._slots:
            if slots.get(key) is not tensor:
                slots[key] = tensor

    def after_point(self) -> None:
        """After each evaluation: put the tensors back and release this point's clones (one copy alive at a time)."""
        self.restore_slots()
        self._learned |= {name for name, clone, version in self._clones if _version(clone) != version}
        self._clones = []

    def end(self, record: dict[str, Any]) -> None:
        """Undo what can be undone, learn what to shield, refuse what cannot be undone."""
        self.after_point()
        learned, self._learned = self._learned, set()
        changed: list[str] = []
        for name, owner, attribute, value, version in record["plain"]:
            current = vars(owner).get(attribute)
            if current is not value:  # rebound: put the original back (no copy needed)
                object.__setattr__(owner, attribute, value)
                learned.add(name)
            if _version(value) != version:
                backup = record["backups"].get(name)
                if backup is None:
                    changed.append(name)
                    continue
                with torch.no_grad():
                    value.copy_(backup)
                learned.add(name)
        changed += [name for name, tensor, version in record["owned"] if _version(tensor) != version]
        if changed:
            self.error = (
                f"{type(self.module).__name__}'s loss source changed {sorted(changed)[:5]} in place during a probe"
                " (an update that did not happen on the first probe, so no copy was kept to undo it). The probes"
                f" of this module are stopped for the rest of the run so that training is not changed. {_FIX}"
            )
            raise ProbeSideEffectError(self.error)
        if learned - self.shielded - self.restored:
            parameters = dict(self.module.named_parameters())
            self.shielded |= {name for name in learned if name in parameters}
            self.restored |= {name for name in learned if name not in parameters}
            warnings.warn(
                f"{type(self.module).__name__}.{_source(self.module)} changes {sorted(learned)[:5]} in place (for example an"
                " EMA or mean-teacher update). The probes replay training_step, so they now work on copies of these"
                " tensors and the real ones stay untouched; each probe still runs it once per point"
                f" (3 extra calls per probed step). {_FIX}",
                ProbeSideEffectWarning,
                stacklevel=3,
            )
        self.verified = True


_GUARDS: weakref.WeakKeyDictionary[nn.Module, ModuleStateGuard] = weakref.WeakKeyDictionary()


def state_guard(module: nn.Module) -> ModuleStateGuard:
    """The guard of ``module``, shared by every :class:`~lightning_stablelr.probe.ObjectiveProbe` of it."""
    guard = _GUARDS.get(module)
    if guard is None:
        guard = _GUARDS[module] = ModuleStateGuard(module)
    return guard
