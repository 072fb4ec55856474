"""Hydra callbacks of the recipes (registered in ``conf/hydra/default.yaml``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from recipes.summary import SUMMARY_COLUMNS, format_table, write_sweep_summary

__all__ = ["MultirunSummary"]


class MultirunSummary(Callback):
    """At the end of a sweep, tabulate every job's final metrics.

    It reads each job's ``metrics.json`` (written by ``recipes.train``) rather than Hydra's in-memory job
    returns, so it works the same with the basic launcher, with DDP sweep jobs run as child processes and
    with the SLURM launcher (whose jobs return in other processes). It writes
    ``<sweep dir>/multirun_summary.json`` and ``.csv`` and prints the table, best ``sort_by`` first.

    Args:
        sort_by: metric to sort the printed table by (ascending; missing or NaN values last).
        columns: metrics shown in the printed table.
    """

    def __init__(self, sort_by: str = "val_loss", columns: list[str] | tuple[str, ...] = SUMMARY_COLUMNS) -> None:
        self.sort_by = sort_by
        self.columns = tuple(columns)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        rows, json_path = write_sweep_summary(sweep_dir)

        def key(row: dict) -> tuple[bool, float]:
            value = row.get(self.sort_by)
            missing = not isinstance(value, (int, float)) or math.isnan(value)
            return (missing, 0.0 if missing else float(value))

        ordered = sorted(rows, key=key)
        # print, not logging: after the last job, the root logger still writes into that job's log file.
        print(f"\nmultirun_summary ({len(rows)} runs, sorted by {self.sort_by}): {json_path}")
        print(format_table(ordered, self.columns), flush=True)

    def __repr__(self) -> str:
        return f"MultirunSummary(sort_by={self.sort_by!r}, columns={json.dumps(list(self.columns))})"
