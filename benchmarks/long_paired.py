"""A StableLR variant's long-panel cells against the panel's own rows, paired by seed:
``python -m benchmarks.long_paired VARIANT.jsonl``.

The long panels' cells scatter by several percent from seed to seed (the CNN's by ~6% of the loss even over
32 seeds), so a variant is judged by the paired difference ``variant - reference`` on the same panel, lr and
seed (the same initialisation and batches), with its standard error, not by two unpaired means. The
reference is the default StableLR rows of ``benchmarks/long.jsonl`` (``--reference``), and each cell also
shows the best peer's best cell of that panel (the issue-8 target it must come within 2% of).

Run the variant's cells first, e.g.::

    python -m benchmarks.long --panels cnn --lrs 0.1 0.3 --policies stablelr --stablelr anneal_to=0.01 \\
        --results /tmp/variant.jsonl --no-report
    python -m benchmarks.long_paired /tmp/variant.jsonl

Lines are matched by run (``benchmarks.robustness.record_key``: task, optimizer, policy, lr, seed); the last line per run wins in each file, and fingerprints are not
checked (the variant's differ from the reference's by construction).
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import BENCH_DIR
from benchmarks.long_engine import SINGLE_POINT
from benchmarks.robustness import load_results, record_key
from benchmarks.robustness_report import _value, summarize

__all__ = ["PairedCell", "main", "paired_cells", "render"]


@dataclass(frozen=True)
class PairedCell:
    """One (panel, lr) of the variant: its mean final validation loss over the paired seeds, the
    reference's mean over the same seeds, the paired mean difference and its standard error (None with one
    seed or a diverged run), and the best peer's best per-lr mean over those seeds (None when no peer ran them)."""

    panel: str
    lr: float
    seeds: int
    variant: float
    reference: float
    difference: float
    stderr: float | None
    best_peer: tuple[str, float, float] | None  # (policy, lr, mean)


def _latest(records: Sequence[Mapping[str, Any]]) -> dict[tuple[Any, ...], Mapping[str, Any]]:
    """``{record_key: line}``, the last line per run winning (a results file keeps stale lines of reruns)."""
    return {record_key(record): record for record in records}


def paired_cells(variant: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]],
                 policy: str = "stablelr") -> list[PairedCell]:
    """``policy``'s cells of ``variant`` paired with ``policy``'s rows of ``reference`` (see :class:`PairedCell`);
    other policies' lines in ``variant`` (peers run alongside) are ignored. A non-finite final (``null``) counts
    as infinite, so that a variant that diverges is not paired away.

    Raises:
        ValueError: no line of ``variant`` has a reference row of the same panel, lr and seed.
    """
    ours = [r for r in _latest(variant).values() if r["policy"] == policy]
    theirs = _latest(reference)
    pairs: dict[tuple[str, float], list[tuple[Mapping[str, Any], Mapping[str, Any]]]] = {}
    for record in ours:
        match = theirs.get(record_key(record))
        if match is not None:
            pairs.setdefault((record["task"], float(record["lr"])), []).append((record, match))
    if not pairs:
        raise ValueError(
            f"None of the variant's {len(ours)} {policy!r} runs has a {policy!r} row of the same panel, lr and seed in the "
            "reference file: run the variant on the grid's lrs and seeds, or pass the right --reference.")
    out = []
    for (task, lr), matched in sorted(pairs.items()):
        mine = [_value(a, "final_val_loss") for a, _ in matched]
        ref = [_value(b, "final_val_loss") for _, b in matched]
        diffs = [a - b for a, b in zip(mine, ref)]
        finite = len(diffs) > 1 and all(math.isfinite(d) for d in diffs)
        stderr = statistics.stdev(diffs) / math.sqrt(len(diffs)) if finite else None
        seeds = {int(a["seed"]) for a, _ in matched}
        out.append(PairedCell(task, lr, len(matched), statistics.fmean(mine), statistics.fmean(ref),
                              statistics.fmean(diffs), stderr, _best_peer(theirs.values(), task, policy, seeds)))
    return out


def _best_peer(reference: Iterable[Mapping[str, Any]], task: str, policy: str,
               seeds: set[int]) -> tuple[str, float, float] | None:
    """The lowest per-lr mean over ``seeds`` (:func:`~benchmarks.robustness_report.summarize`) among the other
    grid policies of ``task``, over the (policy, lr) cells that ran all of ``seeds``."""
    peers = [r for r in reference if r["task"] == task and r["policy"] not in (policy, *SINGLE_POINT)
             and int(r["seed"]) in seeds]
    ran: dict[tuple[str, float], set[int]] = {}
    for record in peers:
        ran.setdefault((record["policy"], float(record["lr"])), set()).add(int(record["seed"]))
    complete = [r for r in peers if ran[(r["policy"], float(r["lr"]))] == seeds]
    best = min(summarize(complete), key=lambda summary: summary.best, default=None)
    return None if best is None else (best.policy, best.best_lr, best.best)


def render(cells: Sequence[PairedCell]) -> str:
    """A Markdown table of ``cells``."""
    lines = ["| panel | lr | seeds | variant | reference | paired difference | best peer (lr): mean, variant vs it |",
             "|---|---|---|---|---|---|---|"]
    for cell in cells:
        stderr = "" if cell.stderr is None else f" ± {cell.stderr:.4f}"
        peer = "—"
        if cell.best_peer is not None:
            name, lr, mean = cell.best_peer
            peer = f"{name} ({lr:g}): {mean:.4f}, {100 * (cell.variant / mean - 1):+.1f}%"
        lines.append(f"| {cell.panel} | {cell.lr:g} | {cell.seeds} | {cell.variant:.4f} | {cell.reference:.4f} |"
                     f" {cell.difference:+.4f}{stderr} | {peer} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.long_paired", description=__doc__.split("\n")[0])
    parser.add_argument("variant", type=Path, help="the variant's JSONL results (python -m benchmarks.long ...)")
    parser.add_argument("--reference", type=Path, default=BENCH_DIR / "long.jsonl",
                        help="the panel's rows (default: benchmarks/long.jsonl)")
    args = parser.parse_args(argv)
    for path in (args.variant, args.reference):
        if not path.exists():
            raise SystemExit(f"{path} does not exist: pass the JSONL file python -m benchmarks.long wrote.")
    try:
        cells = paired_cells(load_results(args.variant), load_results(args.reference))
    except ValueError as error:
        raise SystemExit(str(error)) from None
    print(render(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
