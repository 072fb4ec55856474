"""Read a run's TensorBoard event files back and summarize its stability: the `stablelr report` command.

.. code-block:: python

    run = load_run("lightning_logs/version_0")     # every events.out.tfevents.* of the run, merged
    summary = summarize(run)                       # plain dict; missing tags are None
    print(format_table(summary))
    write_dashboard(run, "dashboard.png")          # six small panels, one page (report_dashboard.py)

The module is pure (no Lightning import): it reads files written by any TensorBoard writer.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from lightning_stablelr.report_verdict import diagnose, monitor_budget

__all__ = [
    "ReportError",
    "RunScalars",
    "format_report",
    "format_table",
    "load_run",
    "summarize",
    "summary_to_json",
    "write_dashboard",  # noqa: F822 (lazy: see __getattr__ at the end)
]

EVENT_FILE_GLOB = "events.out.tfevents.*"
_LR_TAG = re.compile(r"^stablelr/lr(-.+)?$")
_TRAIN_LOSS_TAGS = ("train_loss", "train_loss_step", "train_loss_epoch", "train/loss", "loss")
_VAL_LOSS_TAGS = ("val_loss", "val/loss", "val_loss_epoch")
_VAL_ACC_TAGS = ("val_acc", "val/acc", "val_accuracy", "val_acc_epoch")
_HINT = (
    "Pass the Lightning log directory that contains events.out.tfevents.* files "
    "(for example lightning_logs/version_0, or a Hydra run's output directory trained with "
    "logger=tensorboard)."
)


class ReportError(Exception):
    """A run directory or output path that cannot be reported on; the message says what to pass."""


@dataclass(frozen=True)
class RunScalars:
    """Every scalar of one run: ``scalars[tag]`` is a step-sorted tuple of ``(step, value)``.

    Contract: at most one value per (tag, step), the last one written (by wall time), so that a
    resumed run that rewrote some steps reads as if it had never been interrupted.
    """

    run_dir: Path
    event_files: tuple[Path, ...]
    scalars: dict[str, tuple[tuple[int, float], ...]] = field(default_factory=dict)

    def tags(self) -> list[str]:
        """All scalar tags, sorted."""
        return sorted(self.scalars)

    def steps(self, tag: str) -> list[int]:
        """The steps of ``tag`` in increasing order; empty when the tag is missing."""
        return [step for step, _ in self.scalars.get(tag, ())]

    def values(self, tag: str) -> list[float]:
        """The values of ``tag`` in step order; empty when the tag is missing."""
        return [value for _, value in self.scalars.get(tag, ())]

    def first(self, tag: str) -> float | None:
        """The value at the smallest step, or ``None`` when the tag is missing."""
        series = self.scalars.get(tag)
        return series[0][1] if series else None

    def last(self, tag: str) -> float | None:
        """The value at the largest step, or ``None`` when the tag is missing."""
        series = self.scalars.get(tag)
        return series[-1][1] if series else None


def _event_files(run_dir: Path) -> list[Path]:
    if run_dir.is_file() and run_dir.name.startswith("events.out.tfevents."):
        return [run_dir]
    # Name order is creation order for TensorBoard's names (events.out.tfevents.<unix time>.<host>...):
    # it breaks wall-time ties in favour of the file written later.
    return sorted((path for path in run_dir.rglob(EVENT_FILE_GLOB) if path.is_file()),
                  key=lambda path: (path.name, str(path)))


def _read_scalar_events(path: Path) -> list[tuple[float, str, int, float]]:
    """``(wall_time, tag, step, value)`` for every scalar in one file, in file order."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    # 0 keeps everything; images, audio and histograms are not needed, so keep one of each.
    guidance = {ea.SCALARS: 0, ea.TENSORS: 0, ea.IMAGES: 1, ea.AUDIO: 1, ea.HISTOGRAMS: 1,
                ea.COMPRESSED_HISTOGRAMS: 1}
    # purge_orphaned_data=False: we resolve resumes ourselves, across files, by wall time.
    accumulator = ea.EventAccumulator(str(path), size_guidance=guidance, purge_orphaned_data=False)
    accumulator.Reload()
    tags = accumulator.Tags()
    records = [(event.wall_time, tag, int(event.step), float(event.value))
               for tag in tags["scalars"] for event in accumulator.Scalars(tag)]
    for tag in tags["tensors"]:
        # New-style scalars (add_scalar(new_style=True), TF2 writers) arrive as rank-0 tensors.
        if accumulator.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
            continue
        for event in accumulator.Tensors(tag):
            array = tensor_util.make_ndarray(event.tensor_proto)
            if array.size == 1:
                records.append((event.wall_time, tag, int(event.step), float(array.reshape(()))))
    return records


def load_run(run_dir: str | Path, *, merge: bool = False) -> RunScalars:
    """Read every event file under ``run_dir`` (recursively) and merge their scalars.

    Contract: per (tag, step) the value with the latest wall time wins (ties: the later file, then
    the later record), which is what a resumed run means. One run's files lie in one directory (a resume
    writing into the same log directory adds files there); files in several directories are several runs
    (``version_0`` and ``version_1``, or every run under an output root), and merging them would describe a
    run that never happened, so that raises :class:`ReportError` listing them, unless ``merge=True`` (a
    resume that Lightning wrote into a new version directory). Also raises when ``run_dir`` does not exist,
    holds no ``events.out.tfevents.*`` file, or its files hold no scalar.
    """
    path = Path(run_dir)
    if not path.exists():
        raise ReportError(f"run directory '{path}' does not exist. {_HINT}")
    files = _event_files(path)
    if not files:
        raise ReportError(f"no TensorBoard event files (events.out.tfevents.*) under '{path}'. {_HINT}")
    directories = sorted({file.parent for file in files})
    if len(directories) > 1 and not merge:
        shown = ", ".join(str(directory) for directory in directories[:5])
        more = f" and {len(directories) - 5} more" if len(directories) > 5 else ""
        raise ReportError(
            f"'{path}' holds the event files of {len(directories)} runs, one per directory: {shown}{more}. Report"
            " one of them (stablelr report <one directory>), or pass --merge (merge=True) if they are one run"
            " resumed into a new directory: the latest value per tag and step then wins."
        )
    records = []
    for file_index, file in enumerate(files):
        for order, (wall_time, tag, step, value) in enumerate(_read_scalar_events(file)):
            records.append((wall_time, file_index, order, tag, step, value))
    if not records:
        raise ReportError(
            f"the event files under '{path}' hold no scalars ({len(files)} file(s)): the run stopped before its first"
            " logging step (Trainer(log_every_n_steps=...)), or the files are not TensorBoard event files."
        )
    records.sort(key=lambda record: record[:3])
    latest: dict[str, dict[int, float]] = {}
    for _, _, _, tag, step, value in records:
        latest.setdefault(tag, {})[step] = value
    scalars = {tag: tuple(sorted(by_step.items())) for tag, by_step in latest.items()}
    return RunScalars(run_dir=path, event_files=tuple(files), scalars=scalars)


def _same(a: float, b: float) -> bool:
    # NaN == NaN here: a run of NaN gaps is one value, not a change at every step.
    return a == b or (math.isnan(a) and math.isnan(b))


def _first_present(run: RunScalars, candidates: Sequence[str]) -> str | None:
    return next((tag for tag in candidates if tag in run.scalars), None)


def _finite_max(values: Sequence[float]) -> float | None:
    finite = [value for value in values if math.isfinite(value)]
    return max(finite) if finite else None


def _finite_mean(values: Sequence[float]) -> float | None:
    finite = [value for value in values if math.isfinite(value)]
    return sum(finite) / len(finite) if finite else None


def summarize(run: RunScalars) -> dict[str, Any]:
    """Summarize a run into a plain, JSON-ready dict; a missing tag gives ``None``, never an error.

    Keys: ``lr`` ({tag: {start, end}} for ``stablelr/lr*``), ``max_stable_lr`` (last), ``gap`` (last,
    history [{step, value}] where the value changed: StableLR repeats the last validation's gap at
    every logging step, so a new value marks a new validation), ``gap_factor`` (last, changes [{step, from, to}]), ``stability_factor`` (min, last),
    ``certified_rate`` (last, mean), ``barrier`` (worst consecutive barrier and its step),
    ``superlevel_dip`` (max, last), ``equiconnectedness`` (last, max), ``sharpness`` (last sharpness,
    last stability threshold, max eos ratio), ``overhead`` (last ``monitor/overhead``, last
    ``monitor/deferred_probes``, ``budget``: the monitor's ``max_overhead`` from the run's ``hparams.yaml``
    or None), ``verdict`` (``kind``, ``headline``, ``findings``: :func:`~lightning_stablelr.report_verdict.diagnose`),
    ``val_loss``/``val_acc`` (final), ``nonfinite_steps`` (the largest
    ``stablelr/nonfinite_steps``, a cumulative count), plus ``run_dir``, ``event_files``, ``last_step``.
    """
    lr = {tag: {"start": run.first(tag), "end": run.last(tag)} for tag in run.tags() if _LR_TAG.match(tag)}

    gap = run.scalars.get("stablelr/gap", ())
    history = [{"step": step, "value": value} for index, (step, value) in enumerate(gap)
               if index == 0 or not _same(value, gap[index - 1][1])]
    factor = run.scalars.get("stablelr/gap_factor", ())
    changes = [{"step": step, "from": before, "to": after}
               for (_, before), (step, after) in pairwise(factor) if not _same(after, before)]

    barriers = run.scalars.get("connectivity/barrier", ())
    finite_barriers = [(value, step) for step, value in barriers if math.isfinite(value)]
    worst_value, worst_step = max(finite_barriers) if finite_barriers else (None, None)

    stability = run.values("stablelr/stability_factor")
    nonfinite = _finite_max(run.values("stablelr/nonfinite_steps"))
    val_loss_tag = _first_present(run, _VAL_LOSS_TAGS)
    val_acc_tag = _first_present(run, _VAL_ACC_TAGS)
    all_steps = [series[-1][0] for series in run.scalars.values() if series]
    budget = monitor_budget(run.run_dir)
    verdict = diagnose(run, budget)
    return {
        "run_dir": str(run.run_dir),
        "verdict": {"kind": verdict.kind, "headline": verdict.headline, "findings": list(verdict.findings),
                    "overfit_step": verdict.overfit_step},
        "event_files": len(run.event_files),
        "last_step": max(all_steps) if all_steps else None,
        "lr": lr,
        "max_stable_lr": {"last": run.last("lyapunov/max_stable_lr")},
        "gap": {"last": run.last("stablelr/gap"), "history": history},
        "gap_factor": {"last": run.last("stablelr/gap_factor"), "changes": changes},
        "stability_factor": {"min": min(stability) if stability else None,
                             "last": run.last("stablelr/stability_factor")},
        "certified_rate": {"last": run.last("lyapunov/certified_rate"),
                           "mean": _finite_mean(run.values("lyapunov/certified_rate"))},
        "barrier": {"worst": worst_value, "worst_step": worst_step},
        "superlevel_dip": {"max": _finite_max(run.values("connectivity/superlevel_dip")),
                           "last": run.last("connectivity/superlevel_dip")},
        "equiconnectedness": {"last": run.last("connectivity/equiconnectedness"),
                              "max": _finite_max(run.values("connectivity/equiconnectedness"))},
        "sharpness": {"last": run.last("lyapunov/sharpness"),
                      "threshold": run.last("lyapunov/stability_threshold"),
                      "max_eos_ratio": _finite_max(run.values("lyapunov/eos_ratio"))},
        "overhead": {"last": run.last("monitor/overhead"),
                     "deferred_probes": run.last("monitor/deferred_probes"), "budget": budget},
        "val_loss": run.last(val_loss_tag) if val_loss_tag else None,
        "val_acc": run.last(val_acc_tag) if val_acc_tag else None,
        "nonfinite_steps": None if nonfinite is None else int(nonfinite),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "\u2014"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _pair(first: Any, second: Any, sep: str = " / ") -> str:
    if first is None and second is None:
        return "\u2014"
    return f"{_fmt(first)}{sep}{_fmt(second)}"


def _gap_changes(changes: list[dict[str, Any]], shown: int = 4) -> str:
    if not changes:
        return "none"
    parts = [f"step {change['step']}: {_fmt(change['from'])} -> {_fmt(change['to'])}" for change in changes[:shown]]
    if len(changes) > shown:
        parts.append(f"(+{len(changes) - shown} more)")
    return f"{len(changes)}: " + "; ".join(parts)


def _overhead(overhead: dict[str, Any]) -> str:
    # The share of training time the monitor's probes took, next to the budget it was allowed.
    if overhead["last"] is None:
        return "\u2014"
    budget = overhead.get("budget")
    allowed = "budget unknown" if budget is None else f"budget max_overhead={budget:g}"
    return f"{overhead['last']:.1%} of training time ({allowed})"


def format_table(summary: dict[str, Any]) -> str:
    """Render :func:`summarize`'s dict as an aligned two-column plain-text table (no verdict: :func:`format_report`).

    Floats use 4 significant digits; a missing value is shown as an em dash.
    """
    rows: list[tuple[str, str]] = []
    if summary["lr"]:
        rows += [(f"lr start -> end [{tag}]", _pair(entry["start"], entry["end"], " -> "))
                 for tag, entry in summary["lr"].items()]
    else:
        rows.append(("lr start -> end [stablelr/lr]", "\u2014"))
    gap_values = [entry["value"] for entry in summary["gap"]["history"]]
    gap_factor = summary["gap_factor"]
    rows += [
        ("max stable lr (last)", _fmt(summary["max_stable_lr"]["last"])),
        ("gap (last; validations)", "\u2014" if not gap_values
         else f"{_fmt(summary['gap']['last'])} ({len(gap_values)} values, min {_fmt(min(gap_values))}, "
              f"max {_fmt(max(gap_values))})"),
        ("gap_factor (last)", _fmt(gap_factor["last"])),
        ("gap_factor changes", "\u2014" if gap_factor["last"] is None else _gap_changes(gap_factor["changes"])),
        ("stability_factor (min / last)", _pair(summary["stability_factor"]["min"],
                                                summary["stability_factor"]["last"])),
        ("certified rate (last / mean)", _pair(summary["certified_rate"]["last"],
                                               summary["certified_rate"]["mean"])),
        ("worst consecutive barrier", "\u2014" if summary["barrier"]["worst"] is None
         else f"{_fmt(summary['barrier']['worst'])} (step {summary['barrier']['worst_step']})"),
        ("superlevel dip (max / last)", _pair(summary["superlevel_dip"]["max"], summary["superlevel_dip"]["last"])),
        ("equiconnectedness (last / max)", _pair(summary["equiconnectedness"]["last"],
                                                 summary["equiconnectedness"]["max"])),
        ("sharpness vs threshold (last)", _pair(summary["sharpness"]["last"],
                                                summary["sharpness"]["threshold"], " vs ")),
        ("eos ratio (max)", _fmt(summary["sharpness"]["max_eos_ratio"])),
        ("probe overhead (last)", _overhead(summary["overhead"])),
        ("deferred probes (last)", _fmt(summary["overhead"]["deferred_probes"])),
        ("final val_loss", _fmt(summary["val_loss"])),
        ("final val_acc", _fmt(summary["val_acc"])),
        ("non-finite steps", _fmt(summary["nonfinite_steps"])),
    ]
    width = max(len(label) for label, _ in [*rows, ("metric", "")])
    header = (f"stablelr report: {summary['run_dir']} ({summary['event_files']} event file(s), "
              f"last step {_fmt(summary['last_step'])})")
    lines = [header, f"{'metric'.ljust(width)}  value", f"{'-' * width}  {'-' * 5}"]
    lines += [f"{label.ljust(width)}  {value}" for label, value in rows]
    return "\n".join(lines)


def format_report(summary: dict[str, Any]) -> str:
    """What ``stablelr report`` prints: the verdict first (headline, then one line per finding), then the table."""
    verdict = summary["verdict"]
    table = format_table(summary).splitlines()
    lines = [table[0], f"verdict: {verdict['headline']}", *(f"  - {finding}" for finding in verdict["findings"]), ""]
    return "\n".join([*lines, *table[1:]])


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def summary_to_json(summary: dict[str, Any]) -> str:
    """Serialize :func:`summarize`'s dict as strict JSON: NaN and infinities become ``null``."""
    return json.dumps(_jsonable(summary), indent=2, allow_nan=False)


def __getattr__(name: str) -> Any:
    # write_dashboard lives in report_dashboard.py, which imports this module: re-exported lazily so that
    # either module can be imported first.
    if name == "write_dashboard":
        from lightning_stablelr.report_dashboard import write_dashboard

        return write_dashboard
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":  # python -m lightning_stablelr.report RUN_DIR [--png FILE] [--json] [--merge]
    import sys

    from lightning_stablelr.cli import main

    sys.exit(main(["report", *sys.argv[1:]]))
