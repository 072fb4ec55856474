"""The three-point probe of the loss along the update the optimizer just made (pure: no Lightning).

With ``θ`` the parameters before the step, ``θ + Δθ`` after it and one batch, one seed:

    L0 = L(θ),   L+ = L(θ + Δθ),   L- = L(θ - Δθ)

and :func:`lightning_stablelr.curvature.line_model` turns them into ``a ≈ gᵀΔθ``, ``c ≈ ΔθᵀHΔθ`` and
the step margin ``s_max``. Three forward passes (two when ``L0`` is known), any optimizer (the update is read off the weights).

.. code-block:: python

    before = {n: p.detach().clone() for n, p in probe.parameters().items()}
    optimizer.step()
    result = three_point_probe(probe, batch, before, probe.parameters(), step=step, seed=step)
    result.line.step_margin
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_stablelr.curvature import LineModel, line_model
from lightning_stablelr.probe import ObjectiveProbe
from lightning_stablelr.rng import ProbeSeed

__all__ = [
    "LineProbeResult",
    "TrainingLossReuse",
    "directional_derivative",
    "has_active_dropout",
    "line_losses",
    "line_points",
    "three_point_losses",
    "three_point_probe",
]


@dataclass(frozen=True)
class LineProbeResult:
    """The three losses of one probe, the squared update norm and the line model built from them.

    Attributes:
        step: the optimizer step whose update ``Δθ`` was probed (``global_step`` before that step).
        loss_before: ``L0 = L(θ)``.
        loss_after: ``L+ = L(θ + Δθ)``.
        loss_mirror: ``L- = L(θ - Δθ)``.
        update_norm_sq: ``‖Δθ‖²`` (fp32 sum over all probed tensors).
        line: ``line_model(L0, L+, L-)``.
        finite: the three losses and the line model are finite (False also when the probe failed).
        failed: the probe raised (on some rank): no information about the loss, unlike a NaN loss.
    """

    step: int
    loss_before: float
    loss_after: float
    loss_mirror: float
    update_norm_sq: float
    line: LineModel
    finite: bool
    failed: bool = False

    @classmethod
    def from_losses(
        cls,
        step: int,
        losses: Sequence[float],
        update_norm_sq: float,
        *,
        failed: bool = False,
        directional_derivative: float | None = None,
    ) -> LineProbeResult:
        """Build the result from ``[L0, L+, L-]``; ``failed=True`` forces ``finite=False``.

        ``directional_derivative`` is the exact ``gᵀΔθ`` from the step's own gradient when known: the
        line model's Taylor error then compares ``a`` with it (see :func:`~lightning_stablelr.curvature.line_model`).
        A non-finite value is ignored (the Taylor error falls back to the three-point consistency check).
        """
        loss_before, loss_after, loss_mirror = (float(value) for value in losses)
        if directional_derivative is not None and not math.isfinite(directional_derivative):
            directional_derivative = None
        line = line_model(loss_before, loss_after, loss_mirror, directional_derivative=directional_derivative)
        finite = (
            not failed
            and all(math.isfinite(value) for value in (loss_before, loss_after, loss_mirror))
            and line.finite
        )
        return cls(
            int(step), loss_before, loss_after, loss_mirror, float(update_norm_sq), line, finite, bool(failed)
        )

    @classmethod
    def unavailable(cls, step: int) -> LineProbeResult:
        """A result that carries no information (every loss NaN, ``finite=False``)."""
        return cls.from_losses(step, (math.nan, math.nan, math.nan), math.nan, failed=True)


class TrainingLossReuse:
    """When the training step's own loss may stand in for the probe's ``L0`` (two forward passes, not three).

    ``L0 = L(θ)`` on the step's batch is the loss the training step computed before the update, when a replay
    reproduces it. That is checked, not assumed: the first eligible check, and every ``reverify_every``-th
    after it, replays ``L0`` anyway (:meth:`plan`), :meth:`flags` compares the replay with the training loss bit
    for bit, and :meth:`record` takes the flags (reduced over ranks, so that every rank runs the same passes):
    one mismatch ends the reuse for good (:attr:`refuted`). A non-finite training loss proves nothing and is
    not counted. Shared by the callbacks' :class:`~lightning_stablelr.callbacks.line_probe_session.LineProbeSession`
    and :meth:`~lightning_stablelr.StableLRScheduler.check_step`.
    """

    #: The default ``reverify_every``: one forward pass of insurance per 16 eligible checks.
    REVERIFY_EVERY = 16

    def __init__(self, reverify_every: int | None = None) -> None:
        self.reverify_every = int(self.REVERIFY_EVERY if reverify_every is None else reverify_every)
        self.checks = 0  #: eligible checks that ran to the end (their flags recorded)
        self.refuted = False  #: a replay did not reproduce the training loss: never reuse again
        self.reused = 0  #: checks that took L0 from the training step

    def plan(self, training_loss: Tensor | None) -> tuple[bool, Tensor | None]:
        """``(verify, known L0)`` for a check given the step's training loss (None: not eligible)."""
        if training_loss is None or self.refuted:
            return False, None
        verify = self.checks % self.reverify_every == 0
        return verify, None if verify else training_loss

    @staticmethod
    def flags(replayed: Tensor, training_loss: Tensor | None, verify: bool) -> Tensor:
        """``[mismatch, inconclusive]`` of this rank, on the device of ``replayed`` (no host sync): mismatch = a
        verifying replay of ``L0`` differs from the training loss; inconclusive = that loss is not finite."""
        flags = torch.zeros(2, dtype=replayed.dtype, device=replayed.device)
        if verify and training_loss is not None:
            expected = training_loss.detach().to(replayed)
            finite = expected.isfinite()
            flags = torch.stack([(replayed != expected) & finite, ~finite]).to(replayed.dtype)
        return flags

    def record(self, eligible: bool, mismatch: float, inconclusive: float, reused: bool) -> None:
        """After a check that ran: ``mismatch``/``inconclusive`` as reduced over ranks (any rank > 0)."""
        self.reused += bool(reused)
        if not eligible:
            return
        if mismatch > 0:
            self.refuted = True
        if inconclusive == 0:  # NaN flags (a failed check) count neither way
            self.checks += 1


def line_points(
    theta_before: Mapping[str, Tensor], theta_after: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], Tensor]:
    """``(θ - Δθ, ‖Δθ‖²)`` with ``Δθ = θ_after - θ_before``.

    The arithmetic runs in fp32 or wider (so that bf16/fp16 weights do not lose the small update), and the
    mirrored point is cast back to each parameter's dtype. ``‖Δθ‖²`` is a 0-d tensor (fp32, fp64 for fp64 weights) on the
    device of the first parameter (no host synchronisation here).
    """
    if set(theta_before) != set(theta_after):
        missing = sorted(set(theta_before) ^ set(theta_after))
        raise ValueError(
            f"theta_before and theta_after must name the same parameters, got a difference in {missing[:5]}."
            " Take both from ObjectiveProbe.parameters()."
        )
    names = list(theta_before)
    if not names:
        return {}, torch.zeros(())
    befores = [theta_before[name].detach() for name in names]
    afters = [theta_after[name].detach() for name in names]
    device = befores[0].device
    if all(t.dtype == torch.float32 and t.device == device for t in befores + afters):
        # Fused fast path: one pass for Δθ, one for θ - Δθ, one fused norm.
        deltas = torch._foreach_sub(afters, befores)
        mirrors = torch._foreach_sub(befores, deltas)
        norm_sq = torch.stack(torch._foreach_norm(deltas)).pow(2).sum()
        return dict(zip(names, mirrors)), norm_sq
    mirror: dict[str, Tensor] = {}
    squares: list[Tensor] = []
    for name, before, after in zip(names, befores, afters):
        dtype = torch.promote_types(before.dtype, torch.float32)  # fp64 stays fp64
        wide = before.to(dtype)
        delta = after.to(dtype) - wide
        mirror[name] = (wide - delta).to(before.dtype)
        squares.append(delta.pow(2).sum().to(device, torch.float64))
    wide = any(before.dtype == torch.float64 for before in befores)
    return mirror, torch.stack(squares).sum().to(torch.float64 if wide else torch.float32)


def line_losses(
    evaluate: Callable[[Sequence[Mapping[str, Tensor]]], Sequence[Tensor]],
    theta_before: Mapping[str, Tensor],
    theta_after: Mapping[str, Tensor],
    *,
    loss_before: Tensor | None = None,
) -> Tensor:
    """The three-point probe: ``[L0, L+, L-, ‖Δθ‖²]`` as one tensor on the loss device (no host sync).

    fp32, or fp64 when a loss is fp64 (a closure computing in double precision keeps it).

    ``evaluate(points)`` returns the loss at each of ``[θ_before, θ_after, θ_before - Δθ]`` (one batch,
    every point under the same seed); :func:`line_points` builds the mirrored point. This is the one
    implementation behind the callbacks' shared probe (``evaluate`` = :meth:`ObjectiveProbe.point_losses`)
    and :meth:`~lightning_stablelr.StableLRScheduler.check_step` (``evaluate`` writes each point into the
    parameters and calls the user's closure).

    ``loss_before``: ``L0`` already known (the training step's own loss on this batch, when replaying it would
    give the same number): then only ``[θ_after, θ_before - Δθ]`` are evaluated, two forward passes instead of three.
    """
    mirror, norm_sq = line_points(theta_before, theta_after)
    if hasattr(norm_sq, "full_tensor"):  # sharded parameters (FSDP2 DTensors): the global ‖Δθ‖², on every rank
        norm_sq = norm_sq.full_tensor()
    if loss_before is None:
        evaluated = evaluate([theta_before, theta_after, mirror])
    else:
        evaluated = [loss_before, *evaluate([theta_after, mirror])]
    losses = [_scalar_loss(loss) for loss in evaluated]
    dtype = torch.float64 if any(loss.dtype == torch.float64 for loss in losses) else torch.float32
    device = losses[0].device
    return torch.stack([*(loss.to(device, dtype) for loss in losses), norm_sq.to(device, dtype)])


def _scalar_loss(loss: Any) -> Tensor:
    value = torch.as_tensor(loss).detach()
    if value.numel() != 1:
        raise ValueError(
            f"The probed loss must be one number (the batch's mean loss), got a tensor of shape {tuple(value.shape)}."
            " Reduce it (e.g. `loss.mean()`) in the closure given to StableLRScheduler.check_step, or in"
            " `training_step`/`probe_loss`."
        )
    return value.reshape(())


def three_point_losses(
    probe: ObjectiveProbe,
    batch: Any,
    theta_before: Mapping[str, Tensor],
    theta_after: Mapping[str, Tensor],
    *,
    batch_idx: int = 0,
    seed: ProbeSeed = 0,
    loss_before: Tensor | None = None,
) -> Tensor:
    """:func:`line_losses` through ``probe`` on ``batch``: ``[L0, L+, L-, ‖Δθ‖²]`` (one seed, no sync).

    Kept as a tensor so that a distributed caller can all-reduce it in a single collective. ``loss_before``
    as in :func:`line_losses` (a known ``L0``: two passes).
    """

    def evaluate(points: Sequence[Mapping[str, Tensor]]) -> list[Tensor]:
        return probe.point_losses(batch, points, batch_idx=batch_idx, seed=seed)

    return line_losses(evaluate, theta_before, theta_after, loss_before=loss_before)


def directional_derivative(
    gradient: Mapping[str, Tensor] | None, theta_before: Mapping[str, Tensor], theta_after: Mapping[str, Tensor]
) -> Tensor:
    """``gᵀΔθ = Σ_p ⟨g_p, θ_after,p - θ_before,p⟩`` in fp32 (NaN when no gradient was kept).

    Sharded (DTensor) tensors: each term is the global inner product (``full_tensor``, a collective), so
    every rank returns the same value."""
    device = next(iter(theta_after.values())).device if theta_after else torch.device("cpu")
    if not gradient:
        return torch.tensor(math.nan, device=device)
    grads = list(gradient.values())
    afters = [theta_after[name] for name in gradient]
    befores = [theta_before[name] for name in gradient]
    sharded = any(hasattr(t, "full_tensor") for t in grads + afters)
    if not sharded and all(t.dtype == torch.float32 and t.device == device for t in grads + afters + befores):
        products = torch._foreach_mul(grads, torch._foreach_sub(afters, befores))  # fused: two kernels in all
        return torch.stack([product.sum() for product in products]).sum()
    terms = [
        (grad.float() * (theta_after[name].float() - theta_before[name].float())).sum()
        for name, grad in gradient.items()
    ]
    terms = [term.full_tensor() if hasattr(term, "full_tensor") else term for term in terms]
    return torch.stack(terms).sum().to(device)


def has_active_dropout(module: torch.nn.Module) -> bool:
    """True when a dropout layer with ``p > 0`` is in training mode (its mask differs between calls)."""
    return any(
        isinstance(layer, torch.nn.modules.dropout._DropoutNd) and layer.training and layer.p > 0
        for layer in module.modules()
    )


def three_point_probe(
    probe: ObjectiveProbe,
    batch: Any,
    theta_before: Mapping[str, Tensor],
    theta_after: Mapping[str, Tensor],
    *,
    step: int,
    batch_idx: int = 0,
    seed: ProbeSeed = 0,
) -> LineProbeResult:
    """Probe ``L0 = L(θ_before)``, ``L+ = L(θ_after)``, ``L- = L(θ_before - Δθ)`` and fit the line model.

    ``Δθ = θ_after - θ_before``; all three passes use the same ``batch``, ``batch_idx`` and ``seed`` (the
    same dropout masks), through :class:`~lightning_stablelr.probe.ObjectiveProbe`, so the module is
    left exactly as it was. Exceptions of the loss source propagate.
    """
    values = three_point_losses(probe, batch, theta_before, theta_after, batch_idx=batch_idx, seed=seed)
    loss_before, loss_after, loss_mirror, norm_sq = values.tolist()
    return LineProbeResult.from_losses(step, (loss_before, loss_after, loss_mirror), norm_sq)
