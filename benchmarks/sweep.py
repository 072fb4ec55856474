"""Targeted sweeps of StableLR's defaults against the peers: ``python -m benchmarks.sweep``.

Each variant is a set of StableLR overrides. Its StableLR runs (the robustness grid, StableLR rows only,
``--seeds``) go to ``benchmarks/_work/sweep_<variant>.jsonl`` (resumable, like the benchmark); the peers'
runs are read from the robustness results file (run ``python -m benchmarks.robustness`` first, or at
least its peer rows). For every variant it prints, and writes into ``RESULTS.md`` between
``<!-- BEGIN sweep -->`` markers, one line per task x optimizer panel with the DESIGN.md targets:
divergences, median final val loss vs the best peer median, the worst ratio at a peer's best lr, and
(digits) final - best.

Example::

    python -m benchmarks.sweep --seeds 0 --variants defaults patience2 decay0.01
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BENCH_DIR,
    RESULTS_PATH,
    WORK_DIR,
    command_line,
    machine_info,
    machine_line,
    replace_section,
)
from benchmarks.robustness import (
    GRID,
    Grid,
    exit_on_sigterm,
    grid_specs,
    load_results,
    parse_overrides,
    run_specs,
    select_results,
)
from benchmarks.robustness_report import summarize
from benchmarks.tasks import OVERFIT_TASK

__all__ = ["VARIANTS", "main", "score_variant"]

OLD_DEFAULTS: dict[str, Any] = {"decay_rate": 0.03, "warmup_steps": 0, "safety": 0.5}
"""The three defaults this benchmark changed, at their values before it (every variant below names them)."""


def _old(**changes: Any) -> dict[str, Any]:
    return {**OLD_DEFAULTS, **changes}


VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "old_defaults": _old(),
    # round 1 and 2: one change at a time from the old defaults, then combinations
    "patience2": _old(gap_patience=2),
    "decay0.01": _old(decay_rate=0.01),
    "decay0": _old(decay_rate=0.0),
    "patience2_decay0.01": _old(gap_patience=2, decay_rate=0.01),
    "decay0_warmup10": _old(decay_rate=0.0, warmup_steps=10),
    "decay0_warmup20": _old(decay_rate=0.0, warmup_steps=20),
    "decay0_warmup5": _old(decay_rate=0.0, warmup_steps=5),
    "decay0.003_warmup10": _old(decay_rate=0.003, warmup_steps=10),
    "decay0_warmup10_patience2": _old(decay_rate=0.0, warmup_steps=10, gap_patience=2),
    "decay0_warmup10_tolerance0.5": _old(decay_rate=0.0, warmup_steps=10, gap_tolerance=0.5),
    "decay0_warmup10_strength0.5": _old(decay_rate=0.0, warmup_steps=10, gap_strength=0.5),
    **{f"decay0_warmup10_safety{safety:g}": _old(decay_rate=0.0, warmup_steps=10, safety=safety)
       for safety in (1.0, 0.25, 0.125, 0.0625, 0.05, 0.04, 0.03125, 0.015625)},
    # digits only, around safety 1/4
    "s25_tolerance0.1": _old(decay_rate=0.0, warmup_steps=10, safety=0.25, gap_tolerance=0.1),
    "s25_strength2": _old(decay_rate=0.0, warmup_steps=10, safety=0.25, gap_strength=2.0),
    "s25_decay0.01": _old(decay_rate=0.01, warmup_steps=10, safety=0.25),
    "s25_min_delta0.001": _old(decay_rate=0.0, warmup_steps=10, safety=0.25, min_delta=0.001),
    "s25_min_delta0.003": _old(decay_rate=0.0, warmup_steps=10, safety=0.25, min_delta=0.003),
    # round 3: one change at a time from the chosen defaults (decay 0, warmup 10, safety 1/16)
    "new_warmup5": {"decay_rate": 0.0, "warmup_steps": 5},
    "new_decay0.003": {"decay_rate": 0.003, "warmup_steps": 10},
    "new_patience2": {"decay_rate": 0.0, "warmup_steps": 10, "gap_patience": 2},
    "new_strength0.5": {"decay_rate": 0.0, "warmup_steps": 10, "gap_strength": 0.5},
}
"""Named override sets; ``--set NAME:key=value,key=value`` adds one on the command line."""


def score_variant(stable_records: Sequence[Mapping[str, Any]], peer_records: Sequence[Mapping[str, Any]]
                  ) -> list[dict[str, Any]]:
    """Per (task, optimizer): the targets of DESIGN.md for these StableLR runs against the peers' runs.

    Keys: ``panel``, ``diverged``, ``median``, ``best_peer_median`` (and its policy), ``worst_ratio`` (StableLR
    over the peer at that peer's best lr, the largest over peers), ``worst_peer``, ``final_minus_best`` and
    ``best_peer_final_minus_best`` (the overfitting experiment's row has only ``panel``, ``diverged`` and these two).
    """
    summaries = summarize([*stable_records, *peer_records])
    panels: dict[tuple[str, str], dict[str, Any]] = {}
    for summary in summaries:
        panels.setdefault((summary.task, summary.optimizer), {})[summary.policy] = summary
    rows = []
    for (task, optimizer), policies in sorted(panels.items()):
        stable = policies.pop("stablelr", None)
        if stable is None or not policies:
            continue
        if task == OVERFIT_TASK:
            rows.append({"panel": f"{task}/{optimizer}", "diverged": f"{stable.diverged}/{stable.runs}",
                         "final_minus_best": stable.final_minus_best,
                         "best_peer_final_minus_best": min(s.final_minus_best for s in policies.values())})
            continue
        best_peer = min(policies.values(), key=lambda s: s.median)
        ratios = {name: stable.by_lr.get(s.best_lr, math.inf) / s.best for name, s in policies.items()}
        worst = max(ratios, key=lambda name: ratios[name])
        row = {"panel": f"{task}/{optimizer}", "diverged": f"{stable.diverged}/{stable.runs}",
               "median": stable.median, "best_peer_median": best_peer.median, "best_peer": best_peer.policy,
               "worst_ratio": ratios[worst], "worst_peer": worst}
        rows.append(row)
    return rows


def format_scores(name: str, overrides: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of :func:`score_variant` rows for one variant."""
    settings = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "library defaults"
    lines = [f"**{name}** ({settings})", "",
             "| panel | diverged | median (best peer) | worst at a peer's best lr | final - best (lowest peer) |",
             "|---|---|---|---|---|"]
    for row in rows:
        gap = "" if "final_minus_best" not in row else (
            f"{row['final_minus_best']:.4f} ({row['best_peer_final_minus_best']:.4f})")
        if "median" not in row:
            lines.append(f"| {row['panel']} | {row['diverged']} | | | {gap} |")
            continue
        lines.append(
            f"| {row['panel']} | {row['diverged']} | {row['median']:.4f} ({row['best_peer_median']:.4f} "
            f"{row['best_peer']}) | {100 * (row['worst_ratio'] - 1):+.1f}% vs {row['worst_peer']} | {gap} |"
        )
    grid = [row for row in rows if "median" in row]
    met = sum(row["diverged"].startswith("0/") for row in grid) + sum(
        row["median"] < row["best_peer_median"] for row in grid) + sum(row["worst_ratio"] <= 1.02 for row in grid)
    lines.append(f"\nTargets met on the grid: {met} of {3 * len(grid)} (never diverges, median, within 2%); "
                 f"{OVERFIT_TASK}: " + ", ".join(
                     f"diverged {r['diverged']}, final - best "
                     + ("below every peer" if r["final_minus_best"] < r["best_peer_final_minus_best"] else "NOT below")
                     for r in rows if "median" not in r))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["defaults"])
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME:KEY=VALUE,...",
                        help="define extra variants, e.g. p2:gap_patience=2,decay_rate=0.01")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--peers", type=Path, default=WORK_DIR / "robustness.jsonl",
                        help="robustness results holding the peers' runs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="directory for RESULTS.md (default: benchmarks/)")
    parser.add_argument("--no-run", action="store_true", help="only score the runs already present")
    parser.add_argument("--section", default="sweep", help="RESULTS.md section (marker name) to write")
    parser.add_argument("--title", default="Sweeps of StableLR's defaults", help="heading of that section")
    args = parser.parse_args(argv)
    variants = dict(VARIANTS)
    for item in args.set:
        name, _, settings = item.partition(":")
        variants[name] = parse_overrides([pair for pair in settings.split(",") if pair])
    grid = Grid(tasks=tuple(args.tasks or GRID.tasks), optimizers=GRID.optimizers, lrs=GRID.lrs,
                seeds=tuple(args.seeds), epochs=GRID.epochs, batch_size=GRID.batch_size, overfit=GRID.overfit)
    peer_specs = [s for s in grid_specs(grid) if s.policy != "stablelr"]
    peers = select_results(load_results(args.peers), peer_specs)
    blocks = []
    for name in args.variants:
        overrides = variants[name]
        specs = grid_specs(grid, ["stablelr"], overrides)
        results = WORK_DIR / f"sweep_{name}.jsonl"
        if not args.no_run:
            run_specs(specs, results, args.workers, progress=False)
        stable = select_results(load_results(results), specs)
        block = format_scores(name, overrides, score_variant(stable, peers))
        print(block + "\n", flush=True)
        blocks.append(block)
    body = "\n\n".join([
        f"### {args.title}",
        f"Command: `{command_line('benchmarks.sweep', argv)}` (seeds {list(grid.seeds)}; peers from "
        f"`{args.peers.name}`, {len(peers)} runs).",
        machine_line(machine_info()),
        *blocks,
    ])
    replace_section((args.out or BENCH_DIR) / RESULTS_PATH.name, args.section, body)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    raise SystemExit(main())
