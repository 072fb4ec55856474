"""Summaries of the long-horizon panels: per-panel tables, issue 8's targets, StableLR's C, and the plot.

Per (panel, policy), with ``v(lr)`` = the mean over seeds of the final validation loss (``inf`` if a seed
ended non-finite), as :func:`benchmarks.robustness_report.summarize` computes it:

- ``diverged``: runs whose final val loss is non-finite or above 1.5x its initial value;
- ``best-over-grid``: ``min v(lr)`` (and its lr); ``median over grid``: the median of ``v(lr)``
  (Prodigy: its single point at lr 1);
- ``at warmup+cosine's best lr``: ``v`` at the lr where ``cosine`` is best, and its ratio to cosine's best.

Targets (issue 8, "Done means", per panel): StableLR diverges 0 times; its best-over-grid is within 2% of
the best peer's best-over-grid; its median beats every peer's median; at cosine's best lr it is within 3%
of cosine.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info, machine_line, replace_section
from benchmarks.long_panels import PANELS
from benchmarks.robustness_report import PolicySummary, format_targets, summarize
from benchmarks.robustness_report import _fmt as fmt
from benchmarks.robustness_report import _percent as percent
from benchmarks.robustness_report import _ratio as ratio

__all__ = ["TABLE_HEADER", "format_panel", "long_targets", "write_plot", "write_report"]

TABLE_HEADER = "| policy | diverged | best-over-grid final val (lr) | median over grid | at warmup+cosine's best lr |"
C_HEADER = ("| lr | C at end (per seed) | min C | checks | G at end | last lr / base lr | "
            "s_max median, 10th pct (all checks) | C every 400 steps (seed 0) |")
ORDER = ("stablelr", "constant", "cosine", "wsd", "schedulefree", "prodigy")
REFERENCE = "cosine"


def _panels(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, PolicySummary]]:
    panels: dict[str, dict[str, PolicySummary]] = defaultdict(dict)
    for summary in summarize(records):
        panels[summary.task][summary.policy] = summary
    def rank(name: str, order: Sequence[str]) -> int:
        return order.index(name) if name in order else len(order)

    return {name: dict(sorted(panels[name].items(), key=lambda kv: rank(kv[0], ORDER)))
            for name in sorted(panels, key=lambda name: rank(name, PANELS))}


def long_targets(panels: Mapping[str, Mapping[str, PolicySummary]]) -> list[dict[str, Any]]:
    """Issue 8's four targets per panel as ``{"panel", "target", "met", "detail"}`` rows."""
    rows = []
    for panel, policies in panels.items():
        stable = policies.get("stablelr")
        peers = [s for name, s in policies.items() if name != "stablelr"]
        if stable is None or not peers:
            continue
        rows.append({"panel": panel, "target": "0 divergences", "met": stable.diverged == 0,
                     "detail": f"{stable.diverged}/{stable.runs} runs diverged"})
        best = min(peers, key=lambda s: s.best)
        rows.append({"panel": panel, "target": "best-over-grid within 2% of the best peer's",
                     "met": ratio(stable.best, best.best) <= 1.02,
                     "detail": f"{fmt(stable.best)} (lr {stable.best_lr:g}) vs {fmt(best.best)} ({best.policy}, "
                               f"lr {best.best_lr:g}): {percent(stable.best, best.best)}"})
        lowest = min(peers, key=lambda s: s.median)
        rows.append({"panel": panel, "target": "median over grid beats every peer's", "met": stable.median < lowest.median,
                     "detail": f"{fmt(stable.median)} vs {fmt(lowest.median)} ({lowest.policy}): "
                               f"{percent(stable.median, lowest.median)}"})
        cosine = policies.get(REFERENCE)
        if cosine is not None:
            value = stable.by_lr.get(cosine.best_lr, math.inf)
            rows.append({"panel": panel, "target": "within 3% of warmup+cosine at its best lr",
                         "met": ratio(value, cosine.best) <= 1.03,
                         "detail": f"lr {cosine.best_lr:g}: {fmt(value)} vs {fmt(cosine.best)} "
                                   f"({percent(value, cosine.best)})"})
    return rows


def format_panel(policies: Mapping[str, PolicySummary]) -> str:
    """The per-panel table (header :data:`TABLE_HEADER`) and the seed-mean final val loss at every lr."""
    cosine = policies.get(REFERENCE)
    lines = [TABLE_HEADER, "|---|---|---|---|---|"]
    for summary in policies.values():
        if cosine is None or summary.policy == REFERENCE or len(summary.by_lr) == 1:
            at = "—"
        else:
            value = summary.by_lr.get(cosine.best_lr, math.inf)
            at = f"{fmt(value)} ({percent(value, cosine.best)})"
        lines.append(f"| {summary.policy} | {summary.diverged}/{summary.runs} | {fmt(summary.best)} "
                     f"({summary.best_lr:g}) | {fmt(summary.median)} | {at} |")
    lrs = sorted({lr for s in policies.values() if len(s.by_lr) > 1 for lr in s.by_lr})
    grid = ["| policy | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for summary in policies.values():
        if len(summary.by_lr) > 1:
            grid.append(f"| {summary.policy} | " + " | ".join(fmt(summary.by_lr.get(lr, math.nan)) for lr in lrs) + " |")
    return "\n".join(lines) + "\n\nFinal val loss (mean of seeds) per lr:\n\n" + "\n".join(grid)


def format_stability(records: Sequence[Mapping[str, Any]], panel: str) -> str:
    """StableLR's stability factor ``C`` per lr of ``panel``: at the end, its minimum, checks, ``G``, the last
    lr over the base lr, the finite step margins ``s_max`` of every check (median and 10th percentile, both
    seeds) and C's trajectory."""
    runs: dict[float, list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        if record["task"] == panel and record["policy"] == "stablelr":
            runs[float(record["lr"])].append(record)
    if not runs:
        return ""
    lines = [C_HEADER, "|---|---|---|---|---|---|---|---|"]
    for lr, group in sorted(runs.items()):
        group = sorted(group, key=lambda r: r["seed"])
        ends = ", ".join(fmt_c(r.get("stability_factor")) for r in group)
        mins = min((r["c_min"] for r in group if r.get("c_min") is not None), default=None)
        checks = ", ".join(str(r.get("checks")) for r in group)
        gaps = ", ".join(fmt_c(r.get("gap_factor")) for r in group)
        last = ", ".join(fmt_c(_last_lr(r) / lr if _last_lr(r) is not None else None) for r in group)
        trace = " → ".join(fmt_c(c) for c in (group[0].get("c_trace") or [])[::4])
        margins = sorted(m for r in group for m in r.get("margins") or [] if m is not None)
        spread = f"{fmt_c(statistics.median(margins))}, {fmt_c(margins[len(margins) // 10])}" if margins else "n/a"
        lines.append(f"| {lr:g} | {ends} | {fmt_c(mins)} | {checks} | {gaps} | {last} | {spread} | {trace} |")
    return "\n".join(lines)


def _last_lr(record: Mapping[str, Any]) -> float | None:
    trace = record.get("lr_trace") or []
    return trace[-1] if trace else None


def fmt_c(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3g}"


def write_plot(records: Sequence[Mapping[str, Any]], panels: Mapping[str, Mapping[str, PolicySummary]],
               path: Path, dpi: int = 70) -> Path:
    """Row 1: final val loss vs lr per policy (Prodigy dashed); row 2: effective lr vs step at cosine's best
    lr (seed 0); row 3: StableLR's C vs step at every lr (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(panels)
    fig, axes = plt.subplots(3, len(names), figsize=(4.6 * len(names), 9.0), squeeze=False)
    for col, panel in enumerate(names):
        policies = panels[panel]
        top_axis, lr_axis, c_axis = axes[0][col], axes[1][col], axes[2][col]
        finite = [v for s in policies.values() for v in s.by_lr.values() if math.isfinite(v)]
        top = min(max(finite), 2 * statistics.median(finite)) * 1.05 if finite else 1.0
        for name, summary in policies.items():
            style = {"linewidth": 2.4, "color": "black"} if name == "stablelr" else {"linewidth": 1.2}
            if len(summary.by_lr) == 1:
                top_axis.axhline(min(summary.best, top), linestyle="--", label=name, **style)
                continue
            values = [min(v, top) if math.isfinite(v) else top for v in summary.by_lr.values()]
            top_axis.plot(list(summary.by_lr), values, marker="o", markersize=3, label=name, **style)
        top_axis.set(xscale="log", title=f"{panel}: final val loss", xlabel="base lr", ylim=(None, top * 1.02))
        top_axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        reference = policies.get(REFERENCE)
        for record in records:
            if record["task"] != panel or record["seed"] != 0:
                continue
            trace = [math.nan if v is None else v for v in record.get("lr_trace") or []]
            steps = [100 * i for i in range(len(trace))]
            if reference is not None and (record["policy"] == "prodigy" or record["lr"] == reference.best_lr):
                lr_axis.plot(steps, trace, label=record["policy"],
                             **({"linewidth": 2.4, "color": "black"} if record["policy"] == "stablelr" else {}))
            if record["policy"] == "stablelr":
                c_axis.plot(steps, record.get("c_trace") or [], label=f"lr {record['lr']:g}")
        lr_axis.set(yscale="log", xlabel="step", title="effective lr at cosine's best lr (seed 0)")
        c_axis.set(yscale="log", xlabel="step", title="StableLR stability factor C (seed 0)")
        for axis in (top_axis, lr_axis, c_axis):
            axis.grid(alpha=0.3)
            axis.tick_params(labelsize=7)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_report(records: Sequence[Mapping[str, Any]], specs: Sequence[Any], *, grid: Any, results_md: Path,
                 png: Path, command: str, results_file: Path, workers: int, wall_s: float) -> str:
    """Write the ``long`` section of ``results_md`` and the plot ``png``; return the section's text."""
    panels = _panels(records)
    if panels:
        write_plot(records, panels, png)
    run_seconds = sum(float(r.get("wall_s") or 0.0) for r in records)
    parts = [
        "## Long-horizon panels (issue 8)",
        f"Command: `{command}` ({len(records)} of {len(specs)} runs in `{results_file.name}`, {workers} worker "
        f"processes with one torch thread each; this invocation took {wall_s:.0f} s, the runs' training time "
        f"sums to {run_seconds:.0f} s). Rerun only StableLR (e.g. after a guard change; its lines carry a hash "
        "of its config and source, so stale ones rerun by themselves): `python -m benchmarks.long --policies stablelr`.",
        machine_line(machine_info()),
        f"Grid: {grid.steps} optimizer steps, validation every {grid.eval_every}; lrs {dict(grid.lrs)}; seeds "
        f"{list(grid.seeds)}{''.join(f' ({name}: {list(seeds)})' for name, seeds in grid.panel_seeds.items())}. Panels and policies: `benchmarks/long_panels.py`, `benchmarks/long_engine.py` "
        "(warmup 5% of the steps for cosine, WSD and schedule-free; cosine decays to 10% of the peak, WSD "
        "linearly to 0 over the last 20%; constant has no warmup; Prodigy lr=1 at its defaults; StableLR "
        "`StableLRScheduler` at its defaults, its own warmup). Loss: LM nats/char, CNN cross-entropy, "
        "regression MSE.",
    ]
    for panel, policies in panels.items():
        parts += [f"### {panel}", format_panel(policies)]
        stability = format_stability(records, panel)
        if stability:
            parts += ["StableLR's stability factor C:", stability]
    parts += ["### Targets (issue 8, \"Done means\")", format_targets(long_targets(panels))]
    if panels:
        parts.append(f"![long-horizon panels]({png.name})")
    body = "\n\n".join(parts)
    replace_section(results_md, "long", body)
    return body
