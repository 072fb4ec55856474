"""Whole-fit cost of the callbacks, and StableLR's own per-step hook time: ``python -m benchmarks.overhead``.

**Whole fits.** Each run is a complete ``trainer.fit`` of ``--steps`` optimizer steps (640 by default:
10 epochs of 64 steps, a validation of 4 batches after each), timed from the call to its return, with no
untimed warm-up steps inside: what a user waits for. Models: an MLP ``64-256-256-10`` (about 3 ms per
step here) and an MLP ``64-1024-1024-10`` (about 13 ms), batch 128, cross-entropy on fixed synthetic
data, SGD with momentum, Lightning's default logger (in a temporary directory), no checkpointing,
progress bar or model summary. Conditions (``--conditions``): ``none``, ``stablelr`` (``StableLR()``
defaults, guard checks included), ``stablelr_noguard`` (guard checks off: the hot path, validation-end
and logging work alone) and ``monitor`` (``StabilityMonitor()`` defaults). They run interleaved
(each round: every model, every condition), and a condition's ratio is its process CPU time
(``time.process_time``: insensitive to other processes taking the cores) over ``none``'s in the same
round; the table shows the median and range over ``--rounds`` rounds (wall-time ratios beside it).
Every fit starts after ``gc.collect()``: a full collection of a Lightning process's ~420k objects takes
about 165 ms, 12% of a 3 ms-per-step fit, and without it such a collection lands in a random fit (the
previous fit's garbage decides when), which made single rounds of any condition up to x1.3.

**Hook time.** A per-step cost of tens of µs is far below the scatter of whole fits (±5% of paired
medians on a shared machine), so StableLR's own hooks are also timed from inside: ``StableLR`` with its
guard checks off (``check_every_n_steps=0, dense_check_steps=0``), every ``on_*`` hook wrapped with
``time.perf_counter``, summed per optimizer step. The table shows the median over all steps of
``--hook-runs`` fits per model, and the mean with the epoch-end and validation-end hooks spread over
the steps. The same clock around ``StableLR()`` and ``StabilityMonitor()`` at their defaults gives all the
time spent inside their hooks in a whole fit (guard checks, probes, logging) as a share of a no-callback fit:
each callback's own cost, free of the whole fits' scatter (Lightning's dispatch of the hooks and any cache
effects on training are not in it).
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import (
    BENCH_DIR,
    RESULTS_PATH,
    command_line,
    machine_info,
    machine_line,
    quiet_lightning,
    replace_section,
)

__all__ = [
    "CONDITIONS", "HOOK_HEADER", "MODELS", "TABLE_HEADER", "TARGETS", "StepHookClock", "fit_once", "format_tables",
    "main", "measure",
]  # fmt: skip

MODELS = {"mlp-3ms": (64, 256, 256, 10), "mlp-13ms": (64, 1024, 1024, 10)}
CONDITIONS = ("none", "stablelr", "stablelr_noguard", "monitor")
TARGETS = {"stablelr": 1.03, "stablelr_noguard": 1.03, "monitor": 1.05}
HOOK_TARGET_US = 50.0
BATCH = 128
STEPS_PER_EPOCH = 64
TABLE_HEADER = (
    "| model | ms per step (none, wall) | condition | whole-fit CPU time vs none (median, range) "
    "| whole-fit wall time vs none (median) | target | met |"
)
HOOK_HEADER = (
    "| model | StableLR hooks per step, guard checks off: median µs | mean µs (epoch and validation ends "
    "included) | steps timed | target | met | `StableLR()` hooks with its guard checks, whole fit: ms (% of "
    "`none`'s fit) | `StabilityMonitor()` hooks, whole fit: ms (% of `none`'s fit) |"
)


class SyntheticMLP(L.LightningModule):
    """An MLP on fixed synthetic classification data (``STEPS_PER_EPOCH`` batches of ``BATCH``, 4 val batches)."""

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(widths):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])
        generator = torch.Generator().manual_seed(0)
        n = BATCH * (STEPS_PER_EPOCH + 4)
        x = torch.randn(n, widths[0], generator=generator)
        y = torch.randint(0, widths[-1], (n,), generator=generator)
        self.train_set = TensorDataset(x[: BATCH * STEPS_PER_EPOCH], y[: BATCH * STEPS_PER_EPOCH])
        self.val_set = TensorDataset(x[BATCH * STEPS_PER_EPOCH :], y[BATCH * STEPS_PER_EPOCH :])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.03, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=BATCH, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=BATCH)


class StepHookClock(L.Callback):
    """Sums the wall time inside the instrumented callbacks' ``on_*`` hooks per optimizer step.

    Put it first in the callback list: its ``on_train_batch_start`` opens the step's bucket, so every
    hook until the next batch start counts for that step; hooks outside batches (fit start, epoch end,
    validation) go to :attr:`outside`.
    """

    def __init__(self) -> None:
        self.per_step: dict[int, float] = defaultdict(float)
        self.outside = 0.0
        self._step: int | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._step = trainer.global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step = None

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
                seconds = time.perf_counter() - started
                if self._step is None:
                    self.outside += seconds
                else:
                    self.per_step[self._step] += seconds

        return timed


def _callbacks(condition: str) -> list[L.Callback]:
    from lightning_stablelr import StabilityMonitor, StableLR

    if condition == "stablelr_noguard":
        return [StableLR(check_every_n_steps=0, dense_check_steps=0)]
    return {"none": [], "stablelr": [StableLR()], "monitor": [StabilityMonitor()]}[condition]


def fit_once(
    widths: Sequence[int], callbacks: list[L.Callback], steps: int, accelerator: str = "cpu"
) -> tuple[float, float]:
    """``(wall, CPU)`` seconds of one whole ``trainer.fit`` of ``steps`` optimizer steps on ``accelerator``
    (``"gpu"``: one CUDA device, synchronised before the clocks stop)."""
    L.seed_everything(0, verbose=False)
    model = SyntheticMLP(widths)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator=accelerator, devices=1, max_steps=steps, max_epochs=-1, default_root_dir=tmp,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, callbacks=callbacks,
        )  # fmt: skip
        gc.collect()  # see the module docstring: no previous fit's garbage collected inside this one's time
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.fit(model)
        if accelerator != "cpu" and torch.cuda.is_available():
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if trainer.global_step != steps:
        raise RuntimeError(f"the fit stopped at global_step={trainer.global_step}, expected {steps}.")
    return wall, cpu


def measure(models: Sequence[str], conditions: Sequence[str], rounds: int, steps: int,
            progress: bool = True, accelerator: str = "cpu") -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{clock: {model: {condition: [seconds of each round's fit]}}}`` for clocks ``wall`` and ``cpu``."""
    times: dict[str, dict[str, dict[str, list[float]]]] = {
        clock: {m: {c: [] for c in conditions} for m in models} for clock in ("wall", "cpu")
    }
    for round_index in range(rounds):
        for model in models:
            for condition in conditions:
                wall, cpu = fit_once(MODELS[model], _callbacks(condition), steps, accelerator)
                times["wall"][model][condition].append(wall)
                times["cpu"][model][condition].append(cpu)
                if progress:
                    print(f"round {round_index + 1}/{rounds} {model:>8} {condition:>8}: {1000 * wall / steps:6.2f} "
                          f"ms/step wall, {cpu:6.2f} s CPU", file=sys.stderr, flush=True)
    return times


def measure_hooks(
    models: Sequence[str], runs: int, steps: int, accelerator: str = "cpu"
) -> dict[str, tuple[list[float], float, float, float]]:
    """``{model: (per-step hook seconds of every timed step, total hook seconds / steps, StableLR(), monitor)}``:
    the first two with guard checks off; the last two are the medians over ``runs`` fits of all seconds inside
    the hooks of ``StableLR()`` (guard checks included) and of ``StabilityMonitor()``, per fit."""
    from lightning_stablelr import StabilityMonitor, StableLR

    result: dict[str, tuple[list[float], float, float, float]] = {}
    if runs <= 0:
        return result  # --hook-runs 0: whole-fit ratios only

    def timed_fit(widths: Sequence[int], callback: L.Callback) -> StepHookClock:
        clock = StepHookClock()
        fit_once(widths, [clock, clock.instrument(callback)], steps, accelerator)
        return clock

    for model in models:
        per_step: list[float] = []
        total = 0.0
        with_checks: list[float] = []
        monitor: list[float] = []
        for _ in range(runs):
            clock = timed_fit(MODELS[model], StableLR(check_every_n_steps=0, dense_check_steps=0))
            per_step += list(clock.per_step.values())
            total += sum(clock.per_step.values()) + clock.outside
            clock = timed_fit(MODELS[model], StableLR())
            with_checks.append(sum(clock.per_step.values()) + clock.outside)
            clock = timed_fit(MODELS[model], StabilityMonitor())
            monitor.append(sum(clock.per_step.values()) + clock.outside)
        result[model] = (per_step, total / (runs * steps), statistics.median(with_checks), statistics.median(monitor))
    return result


def _ratios(times: dict[str, list[float]], condition: str) -> list[float]:
    return [t / base for t, base in zip(times[condition], times["none"], strict=True)]


def _own_time(seconds: float, base: float | None) -> str:
    """``ms (share% of the no-callback fit)``, the share only when that fit was timed."""
    return f"{1000 * seconds:.1f}" + (f" ({100 * seconds / base:.1f}%)" if base else "")


def format_tables(times: dict[str, dict[str, dict[str, list[float]]]],
                  hooks: dict[str, tuple[list[float], float, float, float]], steps: int, judge: str = "cpu") -> str:
    """The whole-fit table (:data:`TABLE_HEADER`) and the hook table (:data:`HOOK_HEADER`), in Markdown;
    ``judge``: the clock whose median meets the target or not (``"wall"`` on a GPU, where the host's CPU
    time does not include the device's work)."""
    lines = [TABLE_HEADER, "|---|---|---|---|---|---|---|"]
    for model, by_condition in times["cpu"].items():
        ms = 1000 * statistics.median(times["wall"][model]["none"]) / steps
        for condition in by_condition:
            if condition == "none":
                continue
            cpu, wall = _ratios(by_condition, condition), _ratios(times["wall"][model], condition)
            median, target = statistics.median(wall if judge == "wall" else cpu), TARGETS[condition]
            lines.append(
                f"| {model} | {ms:.2f} | {condition} | {median:.3f} ({min(cpu):.3f} to {max(cpu):.3f}) | "
                f"{statistics.median(wall):.3f} | ≤ {target:.2f} | {'✅' if median <= target else '❌'} |"
            )
    if hooks:
        lines += ["", HOOK_HEADER, "|---|---|---|---|---|---|---|---|"]
    for model, (per_step, mean, with_checks, monitor) in hooks.items():
        median = 1e6 * statistics.median(per_step)
        none = times["wall"].get(model, {}).get("none")
        base = statistics.median(none) if none else None
        lines.append(
            f"| {model} | {median:.1f} | {1e6 * mean:.1f} | {len(per_step)} | ≤ {HOOK_TARGET_US:.0f} | "
            f"{'✅' if median <= HOOK_TARGET_US else '❌'} | {_own_time(with_checks, base)} | {_own_time(monitor, base)} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 8-step fits (smoke test)")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds (the median is over these)")
    parser.add_argument("--steps", type=int, default=640, help="optimizer steps of every fit")
    parser.add_argument("--hook-runs", type=int, default=2, help="fits per model for the hook timing (0: none)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: less noise on shared cores)")
    parser.add_argument("--out", type=Path, default=None, help="directory for RESULTS.md (default: benchmarks/)")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu",
                        help="gpu: one CUDA device, judged on wall time, written to the section overhead_gpu")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.hook_runs = 1, 8, 1
    conditions = ["none", *(c for c in args.conditions if c != "none")]
    torch.set_num_threads(args.threads)
    quiet_lightning()
    started = time.perf_counter()
    times = measure(args.models, conditions, args.rounds, args.steps, accelerator=args.accelerator)
    hooks = measure_hooks(args.models, args.hook_runs, args.steps, args.accelerator)
    elapsed = time.perf_counter() - started
    on_gpu = args.accelerator == "gpu"
    tables = format_tables(times, hooks, args.steps, judge="wall" if on_gpu else "cpu")
    print(tables)
    body = "\n\n".join([
        "## Overhead of the callbacks" + (" on a GPU (judged on wall time)" if on_gpu else ""),
        f"Command: `{command_line('benchmarks.overhead', argv)}` (took {elapsed:.0f} s; torch threads: "
        f"{args.threads}).",
        machine_line(machine_info()),
        f"Whole fits of {args.steps} optimizer steps (epochs of {STEPS_PER_EPOCH} steps, a validation after "
        f"each), timed from `trainer.fit` to its return, nothing untimed inside; {args.rounds} interleaved "
        f"round(s) of {', '.join(conditions)}; ratio = the fit's process CPU time over `none`'s in the same "
        "round, median and range over rounds. Hook time: StableLR with guard checks off, its `on_*` hooks "
        f"timed inside {args.hook_runs} fit(s) per model, summed per optimizer step; median over steps; and "
        f"all time inside `StableLR()`'s hooks (guard checks included) and `StabilityMonitor()`'s per fit, median of {args.hook_runs} "
        "fit(s), over the median wall time of `none`'s fits: the callback's own share, without the fits' "
        "scatter (Lightning's dispatch of its hooks is not in it). "
        "Details in `benchmarks/overhead.py`'s docstring.",
        tables,
    ])
    replace_section((args.out or BENCH_DIR) / RESULTS_PATH.name, "overhead_gpu" if on_gpu else "overhead", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
