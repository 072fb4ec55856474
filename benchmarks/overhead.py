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

**In-run hook time.** On 2 shared cores the A/B ratios scatter by +-20% from round to round, too much to
resolve a 3% target. So every hook (``on_*``) of the measured callbacks is also timed inside the same run;
with ``h`` the hook seconds and ``w`` the wall seconds of the window, ``w / (w - h)`` is the slowdown the
callbacks' own work causes, measured without comparing two runs. It misses indirect costs (cache effects,
garbage collection), which the A/B ratios include.
"""

from __future__ import annotations

import argparse
import functools
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

__all__ = ["CONDITIONS", "TABLE_HEADER", "TARGETS", "HookClock", "StepWindowTimer", "format_table", "main", "measure"]

CONDITIONS = ("none", "stablelr", "monitor", "both")
MODELS = ("mlp", "cnn")
TARGETS = {"stablelr": 1.03, "monitor": 1.05, "both": 1.03 * 1.05}
TABLE_HEADER = (
    "| model | condition | steps/s (wall, median) | hook ms per step (median) | in-run slowdown w/(w-h) "
    "(median) | A/B CPU time vs none (median, range) | A/B wall time vs none (median) | target | met |"
)


class HookClock:
    """Sums the wall time spent in the ``on_*`` hooks of the callbacks passed to :meth:`instrument`."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def instrument(self, callback: L.Callback) -> L.Callback:
        """Replace each ``on_*`` hook the callback overrides by a timed wrapper (on the instance only)."""
        for name in dir(L.Callback):
            if name.startswith("on_") and getattr(type(callback), name) is not getattr(L.Callback, name):
                setattr(callback, name, self._timed(getattr(callback, name)))
        return callback

    def _timed(self, hook: Any) -> Any:
        @functools.wraps(hook)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return timed


class StepWindowTimer(L.Callback):
    """Clock at the start of step ``warmup`` and of step ``warmup + steps`` (the run's ``max_steps`` ends after it).

    Put it first in the callback list, so that both clock readings precede every other callback's work
    of that step: the window then contains exactly ``steps`` complete optimizer steps.
    """

    def __init__(self, warmup: int, steps: int, hooks: HookClock | None = None) -> None:
        self.warmup, self.steps = warmup, steps
        self.hooks = hooks or HookClock()
        self.started: tuple[float, float, float] | None = None
        self.elapsed: tuple[float, float, float] | None = None  # (wall, CPU, hook) seconds

    def _now(self) -> tuple[float, float, float]:
        return time.perf_counter(), time.process_time(), self.hooks.seconds

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.warmup and self.started is None:
            self.started = self._now()
        elif trainer.global_step == self.warmup + self.steps and self.started is not None and self.elapsed is None:
            now = self._now()
            self.elapsed = (now[0] - self.started[0], now[1] - self.started[1], now[2] - self.started[2])


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


def time_one(cfg: Any, datamodule: Any, condition: str, warmup: int, steps: int) -> tuple[float, float, float]:
    """``(wall, CPU, hook)`` seconds per optimizer step of one run (see the module docstring)."""
    from hydra.utils import instantiate

    from recipes.train import build_model  # the model config names no optimizer: build_model passes it in

    L.seed_everything(int(cfg.seed), verbose=False)
    model = build_model(cfg)
    hooks = HookClock()
    timer = StepWindowTimer(warmup, steps, hooks)
    with tempfile.TemporaryDirectory() as tmp:
        logger = instantiate(cfg.logger.tensorboard, save_dir=tmp)
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=warmup + steps + 1, max_epochs=-1, logger=logger,
            log_every_n_steps=int(cfg.trainer.log_every_n_steps), enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            callbacks=[timer, *(hooks.instrument(cb) for cb in _condition_callbacks(condition))],
        )  # fmt: skip
        trainer.fit(model, datamodule=datamodule)
    if timer.elapsed is None:
        raise RuntimeError(f"the timing window did not close (global_step={trainer.global_step}).")
    wall, cpu, hook = timer.elapsed
    return wall / steps, cpu / steps, hook / steps


def measure(models: Sequence[str], repeats: int, warmup_rounds: int, warmup: int, steps: int,
            progress: bool = True) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{clock: {model: {condition: [seconds per step of each kept round]}}}`` for clocks ``wall``, ``cpu``
    and ``hook`` (time inside the callbacks' hooks); conditions interleaved within each round."""
    from hydra.utils import instantiate

    times = {clock: {m: {c: [] for c in CONDITIONS} for m in models} for clock in ("wall", "cpu", "hook")}
    configs = {model: _compose(model) for model in models}
    datamodules = {model: instantiate(configs[model].data) for model in models}
    rounds = warmup_rounds + repeats
    for round_index in range(rounds):
        for model in models:
            for condition in CONDITIONS:
                wall, cpu, hook = time_one(configs[model], datamodules[model], condition, warmup, steps)
                if round_index >= warmup_rounds:
                    times["wall"][model][condition].append(wall)
                    times["cpu"][model][condition].append(cpu)
                    times["hook"][model][condition].append(hook)
                if progress:
                    kept = "warm-up" if round_index < warmup_rounds else "kept"
                    print(f"round {round_index + 1}/{rounds} ({kept}) {model:>3} {condition:>8}: "
                          f"{1 / wall:7.1f} steps/s wall, {1 / cpu:7.1f} per CPU second, hooks "
                          f"{1000 * hook:6.3f} ms/step", file=sys.stderr, flush=True)
    return times


def ratios(times: dict[str, list[float]], condition: str) -> list[float]:
    """Per-round ratios ``time per step of condition / time per step of none`` (paired by round)."""
    return [t / base for t, base in zip(times[condition], times["none"])]


def format_table(times: dict[str, dict[str, dict[str, list[float]]]]) -> str:
    """The Markdown table: one row per (model, condition), header :data:`TABLE_HEADER`.

    A target is met when the in-run slowdown (median over rounds) is within it; the A/B ratios are shown
    next to it as the cross-check that includes indirect costs.
    """
    lines = [TABLE_HEADER, "|---|---|---|---|---|---|---|---|---|"]
    for model, by_condition in times["cpu"].items():
        walls, hooks = times["wall"][model], times["hook"][model]
        for condition in CONDITIONS:
            steps_per_s = 1.0 / statistics.median(walls[condition])
            if condition == "none":
                lines.append(f"| {model} | none | {steps_per_s:.1f} | 0 | 1.000 | 1.000 | 1.000 | — | — |")
                continue
            slowdown = statistics.median(w / (w - h) for w, h in zip(walls[condition], hooks[condition]))
            values = ratios(by_condition, condition)
            target = TARGETS[condition]
            lines.append(
                f"| {model} | {condition} | {steps_per_s:.1f} | {1000 * statistics.median(hooks[condition]):.3f} | "
                f"{slowdown:.3f} | {statistics.median(values):.3f} ({min(values):.3f} to {max(values):.3f}) | "
                f"{statistics.median(ratios(walls, condition)):.3f} | ≤ {target:.2f} | "
                f"{'✅' if slowdown <= target else '❌'} |"
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
        "Hook time: wall time inside the measured callbacks' `on_*` hooks within the window (same run); "
        "in-run slowdown = window / (window - hook time), on which the targets are judged; the A/B ratios "
        "(CPU time, wall time) are the cross-check between runs.",
        table,
    ])
    replace_section((args.out or BENCH_DIR) / RESULTS_PATH.name, "overhead", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
