"""Cost of the callbacks in optimizer steps per second: ``python -m benchmarks.overhead``.

Models: the default recipe's MLP (64-512-512-10) and its small CNN (``model=cnn``), both on the default
recipe's digits (300 training images, batch 32, validation every epoch) with SGD + momentum, built from
``conf/`` through Hydra. Each run is a real ``lightning.Trainer`` on the CPU with the default recipe's
TensorBoard logger (in a temporary directory), no checkpointing, no progress bar and no model summary.

Conditions: ``none``, ``stablelr`` (``StableLR()`` defaults), ``monitor`` (``StabilityMonitor()`` defaults)
and ``both``. They run interleaved in one process (none, stablelr, monitor, both, none, ... per model),
after ``--warmup-rounds`` discarded rounds, for ``--repeats`` rounds.

**What is timed.** A callback placed first in the list reads the clocks at the start of optimizer step
``--warmup-steps`` and at the start of step ``--warmup-steps + --steps``: the window holds ``--steps``
whole steps with everything in between (the callbacks' hooks, validations, end-of-epoch probes, logging),
and excludes Trainer construction, setup and the first steps. Time per step = window / steps, for two
clocks: the process's CPU time (``time.process_time``, all threads; insensitive to other processes taking
the cores, so the ratios are judged on it) and wall time (what a user waits; noisy on a shared machine).
The ratio of a condition is its time per step over ``none``'s in the same round; the table shows the
median over rounds (and the range).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.common import (
    BENCH_DIR,
    CONF_DIR,
    RESULTS_PATH,
    command_line,
    machine_info,
    machine_line,
    quiet_lightning,
    replace_section,
)

__all__ = ["CONDITIONS", "TABLE_HEADER", "TARGETS", "StepWindowTimer", "format_table", "main", "measure"]

CONDITIONS = ("none", "stablelr", "monitor", "both")
MODELS = ("mlp", "cnn")
TARGETS = {"stablelr": 1.03, "monitor": 1.05, "both": 1.03 * 1.05}
TABLE_HEADER = (
    "| model | condition | steps/s (wall, median) | CPU time per step vs none (median) | range | "
    "wall time per step vs none (median) | target (CPU) | met |"
)


class StepWindowTimer(L.Callback):
    """Clock at the start of step ``warmup`` and of step ``warmup + steps`` (the run's ``max_steps`` ends after it).

    Put it first in the callback list, so that both clock readings precede every other callback's work
    of that step: the window then contains exactly ``steps`` complete optimizer steps.
    """

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.started: tuple[float, float] | None = None
        self.elapsed: tuple[float, float] | None = None  # (wall seconds, CPU seconds)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.warmup and self.started is None:
            self.started = (time.perf_counter(), time.process_time())
        elif trainer.global_step == self.warmup + self.steps and self.started is not None and self.elapsed is None:
            self.elapsed = (time.perf_counter() - self.started[0], time.process_time() - self.started[1])


def _compose(model: str) -> Any:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"model={model}", "lr_policy=stablelr", "monitor=off"])


def _condition_callbacks(condition: str) -> list[L.Callback]:
    from lightning_stablelr import StabilityMonitor, StableLR

    return {
        "none": [],
        "stablelr": [StableLR()],
        "monitor": [StabilityMonitor()],
        "both": [StableLR(), StabilityMonitor()],
    }[condition]


def time_one(cfg: Any, datamodule: Any, condition: str, warmup: int, steps: int) -> tuple[float, float]:
    """``(wall, CPU)`` seconds per optimizer step of one run (see the module docstring)."""
    from hydra.utils import instantiate

    L.seed_everything(int(cfg.seed), verbose=False)
    model = instantiate(cfg.model)
    timer = StepWindowTimer(warmup, steps)
    with tempfile.TemporaryDirectory() as tmp:
        logger = instantiate(cfg.logger.tensorboard, save_dir=tmp)
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=warmup + steps + 1, max_epochs=-1, logger=logger,
            log_every_n_steps=int(cfg.trainer.log_every_n_steps), enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            callbacks=[timer, *_condition_callbacks(condition)],
        )  # fmt: skip
        trainer.fit(model, datamodule=datamodule)
    if timer.elapsed is None:
        raise RuntimeError(f"the timing window did not close (global_step={trainer.global_step}).")
    return timer.elapsed[0] / steps, timer.elapsed[1] / steps


def measure(models: Sequence[str], repeats: int, warmup_rounds: int, warmup: int, steps: int,
            progress: bool = True) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{clock: {model: {condition: [seconds per step of each kept round]}}}`` for clocks ``wall``, ``cpu``;
    conditions interleaved within each round."""
    from hydra.utils import instantiate

    times = {clock: {m: {c: [] for c in CONDITIONS} for m in models} for clock in ("wall", "cpu")}
    configs = {model: _compose(model) for model in models}
    datamodules = {model: instantiate(configs[model].data) for model in models}
    rounds = warmup_rounds + repeats
    for round_index in range(rounds):
        for model in models:
            for condition in CONDITIONS:
                wall, cpu = time_one(configs[model], datamodules[model], condition, warmup, steps)
                if round_index >= warmup_rounds:
                    times["wall"][model][condition].append(wall)
                    times["cpu"][model][condition].append(cpu)
                if progress:
                    kept = "warm-up" if round_index < warmup_rounds else "kept"
                    print(f"round {round_index + 1}/{rounds} ({kept}) {model:>3} {condition:>8}: "
                          f"{1 / wall:7.1f} steps/s wall, {1 / cpu:7.1f} per CPU second", file=sys.stderr, flush=True)
    return times


def ratios(times: dict[str, list[float]], condition: str) -> list[float]:
    """Per-round ratios ``time per step of condition / time per step of none`` (paired by round)."""
    return [t / base for t, base in zip(times[condition], times["none"])]


def format_table(times: dict[str, dict[str, dict[str, list[float]]]]) -> str:
    """The Markdown table: one row per (model, condition), header :data:`TABLE_HEADER`; judged on CPU time."""
    lines = [TABLE_HEADER, "|---|---|---|---|---|---|---|---|"]
    for model, by_condition in times["cpu"].items():
        walls = times["wall"][model]
        for condition in CONDITIONS:
            steps_per_s = 1.0 / statistics.median(walls[condition])
            if condition == "none":
                lines.append(f"| {model} | none | {steps_per_s:.1f} | 1.000 | — | 1.000 | — | — |")
                continue
            values = ratios(by_condition, condition)
            median = statistics.median(values)
            target = TARGETS[condition]
            lines.append(
                f"| {model} | {condition} | {steps_per_s:.1f} | {median:.3f} | {min(values):.3f} to "
                f"{max(values):.3f} | {statistics.median(ratios(walls, condition)):.3f} | ≤ {target:.2f} | "
                f"{'✅' if median <= target else '❌'} |"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 5 steps per run (smoke test)")
    parser.add_argument("--repeats", type=int, default=5, help="kept rounds (the median is over these)")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="discarded rounds first")
    parser.add_argument("--warmup-steps", type=int, default=30,
                        help="untimed steps first (past StableLR's dense checks: steady state)")
    parser.add_argument("--steps", type=int, default=200, help="steps in the timing window")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: less noise on shared cores)")
    parser.add_argument("--out", type=Path, default=None, help="directory for RESULTS.md (default: benchmarks/)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.quick:
        args.repeats, args.warmup_rounds, args.warmup_steps, args.steps = 1, 0, 1, 5
    torch.set_num_threads(args.threads)
    quiet_lightning()
    started = time.perf_counter()
    times = measure(args.models, args.repeats, args.warmup_rounds, args.warmup_steps, args.steps)
    elapsed = time.perf_counter() - started
    table = format_table(times)
    print(table)
    body = "\n\n".join([
        "## Overhead of the callbacks",
        f"Command: `{command_line('benchmarks.overhead', argv)}` (took {elapsed:.0f} s; torch threads: "
        f"{args.threads}).",
        machine_line(machine_info()),
        f"Each run: the default recipe's data, model and TensorBoard logger, SGD + momentum (lr 0.03), "
        f"{args.warmup_steps} untimed steps, then a window of {args.steps} optimizer steps timed from a "
        f"first-placed callback (validations and end-of-epoch probes inside the window count); "
        f"{args.warmup_rounds} discarded round(s), then {args.repeats} rounds of none, stablelr, monitor, "
        "both, interleaved. Ratio = time per step over `none`'s in the same round; median and range over rounds. "
        "The targets are judged on the process's CPU time per step, which other users of the cores do not "
        "inflate; wall-time ratios are shown next to them.",
        table,
    ])
    replace_section((args.out or BENCH_DIR) / RESULTS_PATH.name, "overhead", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
