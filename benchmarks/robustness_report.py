"""Summaries of the robustness benchmark: per-policy figures, the targets, the Markdown table and the plot.

Per (task, optimizer, policy), over the lr grid, with ``v(lr)`` = the mean over seeds of the final
validation loss (``inf`` if any seed ended non-finite):

- ``diverged``: runs (lr x seed) whose final training loss is non-finite or above its initial value;
- ``median``: the median over the grid of ``v(lr)``;
- ``best`` and ``best_lr``: ``min v(lr)`` and where it occurs;
- ``final_minus_best``: median over the grid of the seed-mean of (final - best-so-far) validation loss
  (late overfitting; 0 when the last epoch is the best);
- ``auc``: median over the grid of the seed-mean of the mean validation loss over epochs.

Targets (DESIGN.md, per task x optimizer of the grid): StableLR never diverges; its ``median`` is below
every peer's; at each peer's ``best_lr`` its ``v`` is within 2% of the peer's. On the overfitting experiment
(``digits_overfit``, one lr): it never diverges and its ``final_minus_best`` is below every peer's.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info, machine_line, replace_section
from benchmarks.tasks import OVERFIT_TASK

__all__ = ["TABLE_HEADER", "PolicySummary", "format_table", "summarize", "targets", "write_plot", "write_report"]

TABLE_HEADER = (
    "| task | optimizer | policy | diverged | median final val | best final val (lr) | final - best | "
    "AUC | StableLR at this best lr |"
)


def _value(record: Mapping[str, Any], name: str) -> float:
    value = record.get(name)
    return math.inf if value is None else float(value)


def _mean(values: Sequence[float]) -> float:
    return math.inf if not values or any(not math.isfinite(v) for v in values) else sum(values) / len(values)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


@dataclass(frozen=True)
class PolicySummary:
    """One row of the table: see the module docstring for each figure."""

    task: str
    optimizer: str
    policy: str
    runs: int
    diverged: int
    median: float
    best: float
    best_lr: float
    final_minus_best: float
    auc: float
    by_lr: dict[float, float]


def summarize(records: Sequence[Mapping[str, Any]]) -> list[PolicySummary]:
    """One :class:`PolicySummary` per (task, optimizer, policy) present in ``records``."""
    cells: dict[tuple[str, str, str], dict[float, list[Mapping[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        cells[(record["task"], record["optimizer"], record["policy"])][float(record["lr"])].append(record)
    summaries = []
    for (task, optimizer, policy), by_lr in cells.items():
        final = {lr: _mean([_value(r, "final_val_loss") for r in runs]) for lr, runs in sorted(by_lr.items())}
        gaps = [_mean([_value(r, "final_minus_best") for r in runs]) for runs in by_lr.values()]
        aucs = [_mean([_value(r, "val_auc") for r in runs]) for runs in by_lr.values()]
        best_lr = min(final, key=lambda lr: final[lr])
        summaries.append(PolicySummary(
            task, optimizer, policy, runs=sum(len(runs) for runs in by_lr.values()),
            diverged=sum(bool(r["diverged"]) for runs in by_lr.values() for r in runs),
            median=_median(list(final.values())), best=final[best_lr], best_lr=best_lr,
            final_minus_best=_median(gaps), auc=_median(aucs), by_lr=final,
        ))  # fmt: skip
    order = {name: i for i, name in enumerate(("stablelr", "constant", "exponential", "plateau", "cosine",
                                               "schedulefree"))}
    return sorted(summaries, key=lambda s: (s.task, s.optimizer != "sgd", order.get(s.policy, 99), s.policy))


def _panels(summaries: Sequence[PolicySummary]) -> dict[tuple[str, str], dict[str, PolicySummary]]:
    panels: dict[tuple[str, str], dict[str, PolicySummary]] = defaultdict(dict)
    for summary in summaries:
        panels[(summary.task, summary.optimizer)][summary.policy] = summary
    return panels


def targets(summaries: Sequence[PolicySummary]) -> list[dict[str, Any]]:
    """The four DESIGN.md targets per (task, optimizer): ``{"panel", "target", "met", "detail"}`` rows."""
    rows = []
    for (task, optimizer), policies in _panels(summaries).items():
        stable = policies.get("stablelr")
        if stable is None:
            continue
        peers = [s for name, s in policies.items() if name != "stablelr"]
        panel = f"{task}/{optimizer}"
        rows.append({"panel": panel, "target": "never diverges", "met": stable.diverged == 0,
                     "detail": f"{stable.diverged}/{stable.runs} runs diverged"})
        if not peers:
            continue
        if task == OVERFIT_TASK:
            lowest = min(peers, key=lambda s: s.final_minus_best)
            rows.append({"panel": panel, "target": "final - best below every peer",
                         "met": stable.final_minus_best < lowest.final_minus_best,
                         "detail": f"{stable.final_minus_best:.4g} vs {lowest.final_minus_best:.4g} ({lowest.policy})"})
            continue
        best_peer = min(peers, key=lambda s: s.median)
        rows.append({"panel": panel, "target": "median beats every peer", "met": stable.median < best_peer.median,
                     "detail": f"{stable.median:.4g} vs {best_peer.median:.4g} ({best_peer.policy}), "
                               f"{_percent(stable.median, best_peer.median)}"})
        worst = max(peers, key=lambda s: _ratio(stable.by_lr.get(s.best_lr, math.inf), s.best))
        worst_ratio = _ratio(stable.by_lr.get(worst.best_lr, math.inf), worst.best)
        rows.append({"panel": panel, "target": "within 2% at each peer's best lr", "met": worst_ratio <= 1.02,
                     "detail": f"worst: {worst.policy} at lr {worst.best_lr:g}: {stable.by_lr.get(worst.best_lr, math.inf):.4g}"
                               f" vs {worst.best:.4g} ({_percent(stable.by_lr.get(worst.best_lr, math.inf), worst.best)})"})
    return rows


def _ratio(value: float, reference: float) -> float:
    if not math.isfinite(value) or not math.isfinite(reference):
        return math.inf if math.isfinite(reference) else math.nan
    return value / reference if reference > 0 else math.inf


def _percent(value: float, reference: float) -> str:
    ratio = _ratio(value, reference)
    return "n/a" if not math.isfinite(ratio) else f"{100 * (ratio - 1):+.1f}%"


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "∞"
    if math.isnan(value):
        return "n/a"
    return f"{value:.3g}" if abs(value) >= 1e4 else f"{value:.4f}"


def format_table(summaries: Sequence[PolicySummary]) -> str:
    """The Markdown table: one row per (task, optimizer, policy), header :data:`TABLE_HEADER`."""
    lines = [TABLE_HEADER, "|" + "---|" * TABLE_HEADER.count(" | ") + "---|"]
    for (_, _), policies in _panels(summaries).items():
        stable = policies.get("stablelr")
        for summary in policies.values():
            if stable is None or summary.policy == "stablelr":
                at_best = "—"
            else:
                value = stable.by_lr.get(summary.best_lr, math.inf)
                at_best = f"{_fmt(value)} ({_percent(value, summary.best)})"
            lines.append(
                f"| {summary.task} | {summary.optimizer} | {summary.policy} | {summary.diverged}/{summary.runs} | "
                f"{_fmt(summary.median)} | {_fmt(summary.best)} ({summary.best_lr:g}) | "
                f"{_fmt(summary.final_minus_best)} | {_fmt(summary.auc)} | {at_best} |"
            )
    return "\n".join(lines)


def format_targets(rows: Sequence[Mapping[str, Any]]) -> str:
    """The targets as a Markdown table (``met`` as ✅/❌)."""
    lines = ["| panel | target | met | detail |", "|---|---|---|---|"]
    lines += [f"| {r['panel']} | {r['target']} | {'✅' if r['met'] else '❌'} | {r['detail']} |" for r in rows]
    return "\n".join(lines)


def write_plot(summaries: Sequence[PolicySummary], path: Path, dpi: int = 70) -> Path:
    """Final val loss (seed mean) vs lr, one line per policy, one panel per task x optimizer; diverged = x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {key: value for key, value in _panels(summaries).items()
              if any(len(s.by_lr) > 1 for s in value.values())}  # a one-lr experiment is not a curve
    tasks = sorted({task for task, _ in panels})
    optimizers = [name for name in ("sgd", "adamw") if any(opt == name for _, opt in panels)]
    fig, axes = plt.subplots(len(tasks), len(optimizers), figsize=(5 * len(optimizers), 3.2 * len(tasks)),
                             squeeze=False)
    for row, task in enumerate(tasks):
        for col, optimizer in enumerate(optimizers):
            axis = axes[row][col]
            policies = panels.get((task, optimizer), {})
            finite = [v for s in policies.values() for v in s.by_lr.values() if math.isfinite(v)]
            top = min(max(finite), 3 * _median(finite)) * 1.05 if finite else 1.0
            for name, summary in policies.items():
                lrs = list(summary.by_lr)
                values = [min(v, top) if math.isfinite(v) else math.nan for v in summary.by_lr.values()]
                style = {"linewidth": 2.4, "color": "black"} if name == "stablelr" else {"linewidth": 1.2}
                (line,) = axis.plot(lrs, values, marker="o", markersize=3, label=name, **style)
                bad = [lr for lr, v in summary.by_lr.items() if not math.isfinite(v)]
                axis.plot(bad, [top] * len(bad), "x", color=line.get_color(), markersize=7)
            axis.set_xscale("log")
            axis.set_ylim(top=top * 1.02)
            axis.set_title(f"{task} / {optimizer}", fontsize=9)
            axis.set_xlabel("base lr", fontsize=8)
            axis.set_ylabel("final val loss (mean of seeds)", fontsize=8)
            axis.tick_params(labelsize=7)
            axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_report(records: Sequence[Mapping[str, Any]], specs: Sequence[Any], *, grid: Mapping[str, Any],
                 results_md: Path, png: Path, command: str, results_file: Path, workers: int,
                 wall_s: float) -> str:
    """Write the ``robustness`` section of ``results_md`` and the plot ``png``; return the section's text.

    ``records`` are the results lines of ``specs`` (see :func:`benchmarks.robustness.select_results`).
    """
    wanted = {spec.key for spec in specs}
    selected = list(records)
    summaries = summarize(selected)
    write_plot(summaries, png)
    run_seconds = sum(float(r.get("wall_s") or 0.0) for r in selected)
    body = "\n\n".join([
        "## Robustness over the learning-rate grid",
        f"Command: `{command}` ({len(selected)} of {len(wanted)} runs in `{results_file.name}`, {workers} worker "
        f"processes with one torch thread each; this invocation took {wall_s:.0f} s, the runs' fit time sums to "
        f"{run_seconds:.0f} s).",
        machine_line(machine_info()),
        f"Grid: tasks {', '.join(grid['tasks'])}; lrs {dict(grid['lrs'])}; seeds {list(grid['seeds'])}; "
        f"epochs {dict(grid['epochs'])}; batch size {dict(grid['batch_size'])}.",
        format_table(summaries),
        "Targets (DESIGN.md):",
        format_targets(targets(summaries)),
        f"![final validation loss vs lr]({png.name})",
    ])
    replace_section(results_md, "robustness", body)
    return body
