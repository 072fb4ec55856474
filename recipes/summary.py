"""Run results on disk: ``<run dir>/metrics.json`` per run and ``multirun_summary.{json,csv}`` per sweep.

``metrics.json`` is written by rank 0 at the end of ``recipes.train.train`` and holds the returned dict
(floats, plus ``run_dir``). A sweep's summary collects every job's ``metrics.json`` together with the
job's overrides (``<job dir>/.hydra/overrides.yaml``), so a policy comparison is one table.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "METRICS_FILE",
    "SUMMARY_COLUMNS",
    "collect_sweep",
    "format_table",
    "read_metrics",
    "write_metrics",
    "write_sweep_summary",
]

METRICS_FILE = "metrics.json"
SUMMARY_NAME = "multirun_summary"
#: Columns of the printed sweep table (all of them go to the json/csv files).
SUMMARY_COLUMNS = ("val_loss", "val_acc", "val_loss_best", "val_loss_final_minus_best", "test_acc", "lr_end")


def write_metrics(run_dir: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Write ``metrics`` to ``<run_dir>/metrics.json`` (non-finite floats as ``null``) and return the path."""
    path = Path(run_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
             for key, value in metrics.items()}
    path.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
    return path


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    """Read ``<run_dir>/metrics.json``; ``null`` comes back as ``nan``."""
    data = json.loads((Path(run_dir) / METRICS_FILE).read_text())
    return {key: (math.nan if value is None else value) for key, value in data.items()}


def _job_sort_key(path: Path) -> tuple[int, str]:
    name = path.parent.name
    return (int(name), "") if name.isdigit() else (1 << 30, str(path))


def collect_sweep(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job directory below ``sweep_dir`` that holds a ``metrics.json``, in job order.

    Each row is ``{"job": <dir relative to sweep_dir>, "overrides": "<space-separated task overrides>",
    **metrics}``.
    """
    sweep = Path(sweep_dir)
    rows = []
    for metrics_path in sorted(sweep.rglob(METRICS_FILE), key=_job_sort_key):
        job_dir = metrics_path.parent
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        row = {"job": str(job_dir.relative_to(sweep)), "overrides": " ".join(overrides or [])}
        row.update(read_metrics(job_dir))
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: Iterable[Mapping[str, Any]], columns: Iterable[str] = SUMMARY_COLUMNS) -> str:
    """A plain-text table: job, the metric ``columns`` (4 significant digits), then the overrides."""
    rows = list(rows)
    header = ["job", *columns, "overrides"]
    body = [[_cell(row.get(key, "")) for key in header] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *body]]
    return "\n".join(lines)


def write_sweep_summary(sweep_dir: str | Path) -> tuple[list[dict[str, Any]], Path]:
    """Collect the sweep and write ``multirun_summary.json`` and ``.csv`` into ``sweep_dir``.

    Returns the rows and the json path.
    """
    sweep = Path(sweep_dir)
    rows = collect_sweep(sweep)
    json_path = sweep / f"{SUMMARY_NAME}.json"
    json_path.write_text(json.dumps(rows, indent=2, default=str) + "\n")
    keys: list[str] = []
    for row in rows:
        keys += [key for key in row if key not in keys]
    with (sweep / f"{SUMMARY_NAME}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return rows, json_path
