"""Connectivity probes: loss along straight segments, barriers, level-set metrics, snapshot window.

Pure module (no Lightning import). For a segment from ``θ_a`` to ``θ_b`` the loss is sampled at
``θ(alpha) = (1 - alpha) θ_a + alpha θ_b`` on a uniform grid of alpha in [0, 1], endpoints included, and reduced to
three numbers (:func:`segment_metrics`):

- ``barrier = max_alpha [L(alpha) - ((1 - alpha) L_a + alpha L_b)]`` (Entezari et al. 2022);
- ``sublevel_excess = max_alpha L(alpha) - max(L_a, L_b)``;
- ``superlevel_dip = min(L_a, L_b) - min_alpha L(alpha)``.

All three are >= 0 because the endpoints are among the samples. A low barrier or excess shows that
the endpoints are connected; a high one proves nothing (a curved path may connect them, Garipov et
al. 2018, Draxler et al. 2018). :class:`SnapshotWindow` keeps the last few parameter snapshots as
detached clones on CPU (by default) and the pairwise barriers measured between them.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_stablelr.validation import check_int_at_least, check_non_negative

__all__ = [
    "PairwiseBarrierMatrix",
    "SegmentMetrics",
    "Snapshot",
    "SnapshotWindow",
    "equiconnectedness",
    "interpolate",
    "segment_losses",
    "segment_metrics",
]

LossFn = Callable[[dict[str, Tensor]], Tensor]


def _check_same_layout(theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor]) -> None:
    if set(theta_a) != set(theta_b):
        raise ValueError(
            f"theta_a and theta_b must have the same keys, got only-in-a={sorted(set(theta_a) - set(theta_b))} "
            f"only-in-b={sorted(set(theta_b) - set(theta_a))}."
        )
    for key, a in theta_a.items():
        if a.shape != theta_b[key].shape:
            raise ValueError(
                f"theta_a[{key!r}] and theta_b[{key!r}] must have the same shape, "
                f"got {tuple(a.shape)} and {tuple(theta_b[key].shape)}."
            )
        if not torch.is_floating_point(a):
            raise ValueError(f"theta_a[{key!r}] must be a floating-point tensor, got dtype {a.dtype}.")


def interpolate(
    theta_a: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], alpha: float
) -> dict[str, Tensor]:
    """Return ``(1 - alpha) θ_a + alpha θ_b`` per key (``torch.lerp``: exactly ``θ_a`` at 0 and ``θ_b`` at 1).

    ``θ_b`` is moved to ``θ_a``'s device and dtype. alpha outside [0, 1] extrapolates. The result is
    detached from both inputs.
    """
    _check_same_layout(theta_a, theta_b)
    return {
        k: torch.lerp(a.detach(), theta_b[k].detach().to(device=a.device, dtype=a.dtype), float(alpha))
        for k, a in theta_a.items()
    }


def segment_losses(
    loss_fn: LossFn,
    theta_a: Mapping[str, Tensor],
    theta_b: Mapping[str, Tensor],
    num_points: int = 7,
    *,
    device: torch.device | str | None = None,
) -> tuple[list[float], list[float]]:
    """Evaluate ``loss_fn`` along the segment: ``alphas = [i / (num_points - 1)]``, ``losses = [L(θ(alpha))]``.

    Endpoints included (``num_points >= 2``; the default 7 contains alpha = 0.5). Runs under
    ``torch.no_grad()``. With ``device`` the endpoints are copied there once and interpolated there
    (snapshots live on CPU; the model may not). Non-finite losses are returned as they are.
    """
    check_int_at_least("num_points", num_points, 2, hint="Both endpoints are always evaluated.")
    _check_same_layout(theta_a, theta_b)
    if device is not None:
        theta_a = {k: t.detach().to(device) for k, t in theta_a.items()}
        theta_b = {k: t.detach().to(device) for k, t in theta_b.items()}
    alphas = [i / (num_points - 1) for i in range(num_points)]
    with torch.no_grad():
        losses = [float(loss_fn(interpolate(theta_a, theta_b, alpha))) for alpha in alphas]
    return alphas, losses


@dataclass(frozen=True)
class SegmentMetrics:
    """Level-set metrics of one sampled segment (see :func:`segment_metrics`).

    Attributes:
        barrier: ``max_alpha [L(alpha) - ((1 - alpha) L_a + alpha L_b)]``, the rise above the chord (>= 0).
        sublevel_excess: ``max_alpha L(alpha) - max(L_a, L_b)`` (>= 0).
        superlevel_dip: ``min(L_a, L_b) - min_alpha L(alpha)`` (>= 0).
        connected: ``sublevel_excess <= tol``.
    """

    barrier: float
    sublevel_excess: float
    superlevel_dip: float
    connected: bool


def segment_metrics(alphas: Sequence[float], losses: Sequence[float], tol: float = 1e-3) -> SegmentMetrics:
    """Reduce a sampled segment ``(alpha_i, L(alpha_i))``, alpha from 0 to 1, to :class:`SegmentMetrics`.

    ``connected`` means precisely: every *sampled* point of the straight segment has loss
    ``<= max(L_a, L_b) + tol``. If the loss between samples stays below that level too, the segment
    lies in the sublevel set ``{θ : L(θ) <= max(L_a, L_b) + tol}``, so both endpoints are in one of its
    path-connected components. It is a certificate up to the grid and the batches used; ``False``
    proves nothing, since a curved path may connect them. ``superlevel_dip <= tol`` is the paper's
    superlevel reading: the segment stays in ``S_λ = {θ : L(θ) >= λ}`` at ``λ = min(L_a, L_b) - tol``.

    NaN losses count as ``+inf`` (a diverged point is high): metrics involving them are ``inf`` (or
    NaN when an endpoint is infinite) and ``connected`` is False. ``tol`` is absolute, in loss units.
    """
    if len(alphas) != len(losses) or len(alphas) < 2:
        raise ValueError(
            f"alphas and losses must have the same length >= 2, got {len(alphas)} and {len(losses)}."
        )
    if alphas[0] != 0.0 or alphas[-1] != 1.0 or any(b <= a for a, b in itertools.pairwise(alphas)):
        raise ValueError(f"alphas must increase strictly from 0.0 to 1.0, got {list(alphas)}.")
    tol = check_non_negative("tol", tol, hint="It is absolute, in loss units.")
    values = [math.inf if math.isnan(v) else float(v) for v in losses]
    start, end = values[0], values[-1]
    rises = [v - ((1.0 - a) * start + a * end) for a, v in zip(alphas, values)]
    # Python's max() is order-dependent with NaN (inf - inf at an infinite endpoint): make it NaN.
    barrier = math.nan if any(math.isnan(r) for r in rises) else max(rises)
    sublevel_excess = max(values) - max(start, end)
    superlevel_dip = min(start, end) - min(values)
    return SegmentMetrics(barrier, sublevel_excess, superlevel_dip, bool(sublevel_excess <= tol))


@dataclass(frozen=True)
class Snapshot:
    """One parameter snapshot: detached clones (on the window's device) and where it was taken.

    ``index`` counts snapshots added to the window (0, 1, 2, ...) and never repeats, so it
    identifies a snapshot after older ones were evicted.
    """

    params: dict[str, Tensor]
    epoch: int
    step: int
    index: int

    @property
    def label(self) -> str:
        """Short axis label for plots: ``"e{epoch}"``."""
        return f"e{self.epoch}"


@dataclass(frozen=True)
class PairwiseBarrierMatrix:
    """Pairwise barriers between the window's snapshots, oldest first, for the heatmap.

    ``values[i, j]`` (float64, symmetric) is the barrier between snapshots ``i`` and ``j``; NaN where
    that pair was not measured; 0 on the diagonal (a segment of length zero has no barrier).
    """

    labels: list[str]
    epochs: list[int]
    steps: list[int]
    values: Tensor


class SnapshotWindow:
    """The last ``window`` parameter snapshots, oldest evicted first, with their pairwise barriers.

    Snapshots are detached clones on ``device`` (CPU by default, so GPU memory is not spent on
    them); memory is ``window`` times the parameters' size (see :attr:`memory_bytes`). A barrier
    recorded with :meth:`record_barrier` is dropped with the first of its two snapshots.

    Args:
        window: the most snapshots kept (>= 2). The newest is compared with up to ``window - 1``
            previous ones, so "compare with the previous K snapshots" is ``SnapshotWindow(K + 1)``.
        device: where the clones live.
        dtype: the floating dtype the clones are stored in (None keeps each tensor's own; a tensor with values
            beyond the dtype's range keeps its own too). ``torch.float16`` halves an fp32 window and kept the
            monitor's connectivity metrics within 0.2% of fp32; ``torch.bfloat16`` was up to 2% off
            (``tests/test_monitor_memory.py``).

    Example::

        window = SnapshotWindow(4)
        window.add(params, epoch=0, step=100)
        for older, newest in window.pairs_with_newest():
            metrics = segment_metrics(*segment_losses(loss_fn, older.params, newest.params))
            window.record_barrier(older, newest, metrics.barrier)
        equiconnectedness(window.pairwise_barrier_matrix())
    """

    def __init__(
        self, window: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> None:
        check_int_at_least("window", window, 2, hint="A pair of snapshots needs two of them.")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(
                f"`device` must be a torch device such as 'cpu' or 'cuda:0', got {device!r}."
            ) from error
        self.window = window
        self.dtype = dtype
        self._snapshots: deque[Snapshot] = deque(maxlen=window)
        self._barriers: dict[tuple[int, int], float] = {}
        self._next_index = 0

    def add(self, params: Mapping[str, Tensor], *, epoch: int, step: int) -> Snapshot:
        """Store a clone of ``params`` (evicting the oldest snapshot when full) and return it."""
        if not params:
            raise ValueError("params must be a non-empty dict of tensors, got an empty one.")
        if self._snapshots:
            reference = self._snapshots[-1].params
            if set(params) != set(reference) or any(params[k].shape != reference[k].shape for k in reference):
                raise ValueError(
                    "params must have the same names and shapes as the snapshots already in the window, "
                    f"got keys {sorted(params)} (window holds {sorted(reference)}); call clear() first."
                )
        clone = {k: t.detach().to(self.device, dtype=self._storage_dtype(t), copy=True) for k, t in params.items()}
        snapshot = Snapshot(clone, int(epoch), int(step), self._next_index)
        self._next_index += 1
        if len(self._snapshots) == self.window:
            evicted = self._snapshots[0].index
            self._barriers = {pair: b for pair, b in self._barriers.items() if evicted not in pair}
        self._snapshots.append(snapshot)
        return snapshot

    def _storage_dtype(self, tensor: Tensor) -> torch.dtype:
        """``dtype`` for a floating tensor whose values it can hold (finite and within its range), else its own."""
        if self.dtype is None or not tensor.is_floating_point() or tensor.dtype == self.dtype:
            return tensor.dtype
        largest = float(tensor.detach().abs().max()) if tensor.numel() else 0.0
        return self.dtype if largest <= torch.finfo(self.dtype).max else tensor.dtype

    @property
    def snapshots(self) -> tuple[Snapshot, ...]:
        """The snapshots held, oldest first."""
        return tuple(self._snapshots)

    @property
    def newest(self) -> Snapshot | None:
        """The last snapshot added, or None when empty."""
        return self._snapshots[-1] if self._snapshots else None

    def __len__(self) -> int:
        return len(self._snapshots)

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the snapshot clones."""
        return sum(t.numel() * t.element_size() for s in self._snapshots for t in s.params.values())

    def pairs_with_newest(self) -> list[tuple[Snapshot, Snapshot]]:
        """``(older, newest)`` for every older snapshot, oldest first; the last is the consecutive pair."""
        if len(self._snapshots) < 2:
            return []
        newest = self._snapshots[-1]
        return [(older, newest) for older in list(self._snapshots)[:-1]]

    def record_barrier(self, first: Snapshot | int, second: Snapshot | int, barrier: float) -> None:
        """Remember the barrier of the segment between two snapshots held (by object or ``index``)."""
        held = {s.index for s in self._snapshots}
        i, j = (s.index if isinstance(s, Snapshot) else int(s) for s in (first, second))
        if i not in held or j not in held or i == j:
            raise ValueError(
                f"record_barrier needs two different snapshots held by the window (indices {sorted(held)}), "
                f"got {i} and {j}."
            )
        self._barriers[(min(i, j), max(i, j))] = float(barrier)

    def pairwise_barrier_matrix(self) -> PairwiseBarrierMatrix:
        """The recorded barriers as a :class:`PairwiseBarrierMatrix` over the snapshots held."""
        snapshots = list(self._snapshots)
        position = {s.index: n for n, s in enumerate(snapshots)}
        values = torch.full((len(snapshots), len(snapshots)), math.nan, dtype=torch.float64)
        values.fill_diagonal_(0.0)
        for (i, j), barrier in self._barriers.items():
            values[position[i], position[j]] = values[position[j], position[i]] = barrier
        return PairwiseBarrierMatrix(
            labels=[s.label for s in snapshots],
            epochs=[s.epoch for s in snapshots],
            steps=[s.step for s in snapshots],
            values=values,
        )

    def clear(self) -> None:
        """Drop every snapshot and barrier (indices keep counting up)."""
        self._snapshots.clear()
        self._barriers.clear()


def equiconnectedness(
    pairwise_barriers: PairwiseBarrierMatrix
    | Tensor
    | Mapping[object, float | SegmentMetrics]
    | Iterable[float | SegmentMetrics],
) -> float:
    """``max`` barrier over the pairs measured in the window; NaN when none was measured.

    Accepts a :class:`PairwiseBarrierMatrix` or a square tensor (off-diagonal entries, NaN = not
    measured, are used), a mapping pair -> barrier, or an iterable of barriers; ``SegmentMetrics``
    values contribute their ``barrier``. A bound on this number that holds across epochs is the
    package's measurable reading of "equiconnected".
    """
    if isinstance(pairwise_barriers, PairwiseBarrierMatrix):
        pairwise_barriers = pairwise_barriers.values
    if isinstance(pairwise_barriers, Tensor):
        matrix = pairwise_barriers.detach().to(torch.float64)
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"pairwise_barriers must be a square matrix, got shape {tuple(matrix.shape)}.")
        off_diagonal = ~torch.eye(matrix.shape[0], dtype=torch.bool)
        candidates = [float(v) for v in matrix[off_diagonal].tolist()]
    else:
        items = pairwise_barriers.values() if isinstance(pairwise_barriers, Mapping) else pairwise_barriers
        candidates = [float(v.barrier if isinstance(v, SegmentMetrics) else v) for v in items]
    measured = [v for v in candidates if not math.isnan(v)]
    return max(measured) if measured else math.nan
