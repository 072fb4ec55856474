"""Debug callbacks enabled from the config (``debug.lr_trace=true``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

__all__ = ["LrTrace"]


class LrTrace(Callback):
    """Record, on every rank, the lr of every param group right before each optimizer step.

    At the end of fit, rank ``k`` writes ``<output_dir>/lr_trace/rank<k>.json``: a list of
    ``{"step": global_step, "lr": [lr of group 0, ...]}``. Under DDP the files of all ranks must be
    identical (the design's "every rank gets the same lr at every step"); the recipe tests compare them.
    Put it last in the callback list so that it sees the lr after every other callback has set it.
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = str(output_dir)
        self.records: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.records.append({"step": trainer.global_step, "lr": [float(g["lr"]) for g in optimizer.param_groups]})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(self.output_dir) / "lr_trace" / f"rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.records))
