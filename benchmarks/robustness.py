"""Robustness of the lr policies over a learning-rate grid: ``python -m benchmarks.robustness``.

For every (task, optimizer, policy, lr, seed) it trains one tiny model with a real Lightning ``Trainer``
(CPU, no logger, no checkpoint, no progress bar) and records the validation-loss curve. Runs go through
a process pool (``--workers``, one torch thread each) and are appended to a JSONL results file, one line
per finished run; a second invocation skips the keys already there, so an interrupted benchmark resumes.
At the end :mod:`benchmarks.robustness_report` writes the Markdown table into ``RESULTS.md`` (between
``<!-- BEGIN robustness -->`` markers) and the PNG plot.

A run **diverges** when its final training loss (whole training split, eval mode) is not finite or is
above its value at initialisation, or when the weights became non-finite (the run is stopped there).

Examples::

    python -m benchmarks.robustness                     # the full grid (about 25 min on 2 cores)
    python -m benchmarks.robustness --quick --out /tmp/bench   # < 60 s, for the smoke test
    python -m benchmarks.robustness --policies stablelr --stablelr gap_patience=2 \\
        --results benchmarks/_work/sweep_patience2.jsonl --no-report
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    BENCH_DIR,
    RESULTS_PATH,
    WORK_DIR,
    command_line,
    quiet_lightning,
    stablelr_source_hash,
)
from benchmarks.tasks import OVERFIT_TASK, TASKS, overfit_experiment

__all__ = ["GRID", "QUICK_GRID", "Grid", "RunSpec", "load_results", "main", "run_one", "run_specs"]

KEY_FIELDS = ("task", "optimizer", "policy", "lr", "seed")


@dataclass(frozen=True)
class Grid:
    """A benchmark grid; ``lrs`` per optimizer, ``epochs``/``batch_size`` per task."""

    tasks: tuple[str, ...]
    optimizers: tuple[str, ...]
    lrs: Mapping[str, tuple[float, ...]]
    seeds: tuple[int, ...]
    epochs: Mapping[str, int]
    batch_size: Mapping[str, int]
    overfit: bool = True  # also run conf/experiment/digits_overfit.yaml (its lr; epochs: epochs[OVERFIT_TASK] or its own)


GRID = Grid(
    tasks=TASKS,
    optimizers=("sgd", "adamw"),
    lrs={
        "sgd": (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
        "adamw": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1),
    },
    seeds=(0, 1, 2),
    epochs={"digits": 50, "synthetic": 40, "regression": 40},
    batch_size={"digits": 50, "synthetic": 100, "regression": 50},
)
"""The full grid: 3 tasks x (7 SGD lrs x 5 policies + 7 AdamW lrs x 6 policies) x 3 seeds = 693 runs, plus the
overfitting experiment (5 SGD policies x 3 seeds)."""

QUICK_GRID = Grid(
    tasks=("digits", "regression"),
    optimizers=("sgd", "adamw"),
    lrs={"sgd": (0.03, 3.0), "adamw": (1e-3, 0.1)},
    seeds=(0,),
    epochs={"digits": 2, "synthetic": 2, "regression": 2, OVERFIT_TASK: 2},
    batch_size={"digits": 100, "synthetic": 100, "regression": 100},
)
"""``--quick``: 2 tasks x 2 lrs per optimizer x 1 seed x 2 epochs (44 runs) + the overfitting experiment for
2 epochs (5 runs), for the smoke test."""


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid. ``stablelr`` holds StableLR overrides (empty: the library defaults)."""

    task: str
    optimizer: str
    policy: str
    lr: float
    seed: int
    epochs: int
    batch_size: int
    stablelr: tuple[tuple[str, Any], ...] = ()
    engine: str = "plain"
    config: str = ""
    data: str = ""  # task_fingerprint of the task's data as the main process builds it

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.task, self.optimizer, self.policy, float(self.lr), int(self.seed))


def _source_hash() -> str:
    return stablelr_source_hash()  # a module-level name, so that a test can stand in another guard


#: Identifies the guard's check-step rule (``CheckCadence.should_check``) in the run fingerprints: bump it
#: whenever that rule changes, so StableLR's recorded runs rerun. Its value is the hash the benchmark
#: recorded for this rule before it moved into ``lightning_stablelr.config``, plus the guard's confirmation checks.
CHECK_RULE_ID = "1e3d3ad1+confirm"


@cache
def run_config(optimizer: str, policy: str, stablelr: tuple[tuple[str, Any], ...], epochs: int,
               batch_size: int) -> str:
    """Fingerprint of everything that decides a run besides its key: the optimizer and policy configs as
    resolved now (StableLR: its full config and check cadence, so a change of defaults reruns its runs),
    epochs and batch size. A results line counts as done only while this fingerprint and its data fingerprint
    (recorded by the worker that ran it: :func:`benchmarks.tasks.task_fingerprint`) still match."""
    from omegaconf import OmegaConf

    from benchmarks.common import CONF_DIR

    optimizer_cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "optimizer" / f"{optimizer}.yaml"))
    optimizer_cfg.pop("lr", None)
    if policy == "stablelr":
        from benchmarks.engines import stablelr_cadence
        from lightning_stablelr.config import StableLRConfig, config_field_names

        overrides = dict(stablelr)
        config = StableLRConfig(**{k: v for k, v in overrides.items() if k in config_field_names()}).to_dict()
        rule = CHECK_RULE_ID
        policy_cfg: Any = {**config, "cadence": stablelr_cadence(overrides), "check_rule": rule,
                           "source": _source_hash()}
    elif policy == "schedulefree":
        policy_cfg = "schedulefree.AdamWScheduleFree"
    else:
        policy_cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "lr_policy" / f"{policy}.yaml"))
    text = json.dumps({"optimizer": optimizer_cfg, "policy": policy_cfg, "epochs": epochs,
                       "batch_size": batch_size}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def record_key(record: Mapping[str, Any]) -> tuple[Any, ...]:
    """``(task, optimizer, policy, lr, seed)`` of a results line."""
    return (record["task"], record["optimizer"], record["policy"], float(record["lr"]), int(record["seed"]))


def _identity(record: Mapping[str, Any]) -> tuple[Any, ...]:
    return record_key(record), record.get("config", ""), record.get("data", "")


def _spec_identity(spec: RunSpec) -> tuple[Any, ...]:
    return spec.key, spec.config, spec.data


def data_fingerprint(task: str) -> str:
    """:func:`benchmarks.tasks.task_fingerprint` of ``task`` as this process builds it."""
    from benchmarks.tasks import task_fingerprint

    return task_fingerprint(_task(task))


def select_results(records: Sequence[Mapping[str, Any]], specs: Sequence[RunSpec]) -> list[Mapping[str, Any]]:
    """The results lines of ``specs`` (same key, config and data fingerprints); the last line wins for duplicates."""
    wanted = {_spec_identity(spec) for spec in specs}
    chosen: dict[tuple[Any, ...], Mapping[str, Any]] = {}
    for record in records:
        if _identity(record) in wanted:
            chosen[record_key(record)] = record
    return list(chosen.values())


def grid_specs(grid: Grid, policies: Sequence[str] | None = None,
               stablelr: Mapping[str, Any] | None = None, engine: str = "plain") -> list[RunSpec]:
    """Every run of ``grid``, seed-major (a partial run covers every cell with the first seeds)."""
    from benchmarks.policies import policies_for

    overrides = tuple(sorted((stablelr or {}).items()))
    specs = []
    for seed in grid.seeds:
        for task in grid.tasks:
            for optimizer in grid.optimizers:
                for lr in grid.lrs[optimizer]:
                    for policy in policies_for(optimizer):
                        if policies is not None and policy not in policies:
                            continue
                        own = overrides if policy == "stablelr" else ()
                        epochs, batch = grid.epochs[task], grid.batch_size[task]
                        config = run_config(optimizer, policy, own, epochs, batch)
                        specs.append(RunSpec(task, optimizer, policy, lr, seed, epochs, batch, own, engine, config,
                                             data_fingerprint(task)))
        if grid.overfit:
            experiment = overfit_experiment()
            optimizer, lr = experiment["optimizer"], experiment["lr"]
            epochs, batch = grid.epochs.get(OVERFIT_TASK, experiment["epochs"]), experiment["batch_size"]
            for policy in policies_for(optimizer):
                if policies is not None and policy not in policies:
                    continue
                own = overrides if policy == "stablelr" else ()
                config = run_config(optimizer, policy, own, epochs, batch)
                specs.append(RunSpec(OVERFIT_TASK, optimizer, policy, lr, seed, epochs, batch, own, engine, config,
                                     data_fingerprint(OVERFIT_TASK)))
    return specs


@cache
def _task(name: str) -> Any:
    from benchmarks.tasks import build_task

    return build_task(name)


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Train one run of the grid with ``spec.engine`` and return its results line (``None`` for NaN/Inf)."""
    from benchmarks.engines import run_lightning, run_plain
    from benchmarks.policies import load_policy
    from benchmarks.tasks import task_fingerprint

    quiet_lightning()
    task = _task(spec.task)
    policy = load_policy(spec.policy, spec.epochs, dict(spec.stablelr))
    engine = run_lightning if spec.engine == "lightning" else run_plain
    started = time.perf_counter()
    outcome = engine(task, policy, optimizer=spec.optimizer, lr=spec.lr, seed=spec.seed, epochs=spec.epochs,
                     batch_size=spec.batch_size)
    wall = time.perf_counter() - started
    curve = outcome.val_curve + [math.nan] * (spec.epochs - len(outcome.val_curve))
    final_train, initial_train = outcome.final_train_loss, outcome.initial_train_loss
    diverged = outcome.nonfinite_weights or not math.isfinite(final_train) or final_train > initial_train
    finite_curve = [value for value in curve if math.isfinite(value)]
    best_val = min(finite_curve) if finite_curve else math.nan
    stats = outcome.stablelr or {}
    record = {
        "task": spec.task, "optimizer": spec.optimizer, "policy": spec.policy, "lr": float(spec.lr),
        "seed": int(spec.seed), "config": spec.config, "data": task_fingerprint(task), "engine": spec.engine, "epochs": spec.epochs, "batch_size": spec.batch_size,
        "steps": outcome.steps, "stablelr": dict(spec.stablelr),
        "initial_train_loss": initial_train, "initial_val_loss": outcome.initial_val_loss,
        "final_train_loss": final_train, "final_val_loss": curve[-1], "best_val_loss": best_val,
        "best_epoch": curve.index(best_val) if finite_curve else None,
        "final_minus_best": curve[-1] - best_val,
        "val_auc": sum(curve) / len(curve),  # mean val loss over epochs: the area under the curve per epoch
        "diverged": bool(diverged), "nonfinite_losses": outcome.nonfinite_losses,
        "lr_end": outcome.lr_trace[-1] if outcome.lr_trace else None,
        "stablelr_checks": stats.get("checks"), "stablelr_nonfinite_steps": stats.get("nonfinite_steps"),
        "gap_factor": stats.get("gap_factor"), "stability_factor": stats.get("stability_factor"),
        "val_curve": curve, "wall_s": wall,
    }  # fmt: skip
    return {key: _json_number(value) for key, value in record.items()}


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_number(item) for item in value]
    return value


def load_results(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a JSONL results file (a torn last line from a killed run is ignored)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _init_worker() -> None:
    torch.set_num_threads(1)
    quiet_lightning()


def run_specs(specs: Sequence[Any], results: Path, workers: int, progress: bool = True,
              runner: Callable[[Any], dict[str, Any]] = run_one, desc: str = "robustness") -> int:
    """Run the specs whose key is not yet in ``results``, appending one JSON line each; returns how many ran.

    A spec has ``key`` (``(task, optimizer, policy, lr, seed)``), ``config`` and ``data`` fingerprints; its
    line counts as done only while all three match. ``runner(spec)`` (picklable) returns the line.
    """
    done = {_identity(record) for record in load_results(results)}
    pending = [spec for spec in specs if _spec_identity(spec) not in done]
    results.parent.mkdir(parents=True, exist_ok=True)
    if not pending:
        return 0
    from tqdm import tqdm

    bar = tqdm(total=len(specs), initial=len(specs) - len(pending), desc=desc, unit="run",
               disable=not progress, dynamic_ncols=True)
    # Repair a torn last line (killed mid-write) so that appending starts on a fresh line.
    if results.exists() and results.stat().st_size and not results.read_bytes().endswith(b"\n"):
        with results.open("a") as handle:
            handle.write("\n")
    with results.open("a") as handle:
        if workers <= 1:
            _init_worker()
            outputs: Iterable[dict[str, Any]] = map(runner, pending)
            _append_all(outputs, handle, bar)
        else:
            context = multiprocessing.get_context("spawn")
            with context.Pool(workers, initializer=_init_worker, maxtasksperchild=200) as pool:
                _append_all(pool.imap_unordered(runner, pending, chunksize=1), handle, bar)
    bar.close()
    return len(pending)


def _append_all(outputs: Iterable[dict[str, Any]], handle: Any, bar: Any) -> None:
    for record in outputs:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        bar.update(1)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--stablelr expects KEY=VALUE, got {item!r}")
        try:
            overrides[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[name] = value
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.robustness", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny grid (< 60 s) for the smoke test")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for RESULTS.md, the PNG and the JSONL (default: benchmarks/)")
    parser.add_argument("--results", type=Path, default=None, help="JSONL results file (resumed if present)")
    parser.add_argument("--engine", choices=("plain", "lightning"), default="plain",
                        help="plain: StableLRScheduler in a plain loop (default, fits the time budget); "
                        "lightning: a real Trainer with the StableLR callback")
    parser.add_argument("--workers", type=int, default=2, help="processes (one torch thread each)")
    parser.add_argument("--tasks", nargs="+", default=None, choices=TASKS)
    parser.add_argument("--optimizers", nargs="+", default=None, choices=("sgd", "adamw"))
    parser.add_argument("--policies", nargs="+", default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--stablelr", nargs="*", default=[], metavar="KEY=VALUE",
                        help="StableLR overrides (a sweep of the defaults); use a separate --results file")
    parser.add_argument("--no-overfit", action="store_true", help="skip the overfitting experiment")
    parser.add_argument("--no-report", action="store_true", help="only run; do not write RESULTS.md or the PNG")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing; report the results file's lines as they are (last line per run wins, "
                             "fingerprints not checked: for results made on another machine, see BENCH_MACHINE)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the Pool's context manager, which terminates the workers


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    grid = QUICK_GRID if args.quick else GRID
    grid = Grid(
        tasks=tuple(args.tasks or grid.tasks), optimizers=tuple(args.optimizers or grid.optimizers),
        lrs=grid.lrs, seeds=tuple(args.seeds if args.seeds is not None else grid.seeds),
        epochs=grid.epochs, batch_size=grid.batch_size, overfit=grid.overfit and not args.no_overfit,
    )  # fmt: skip
    out = args.out or BENCH_DIR
    default_results = (out if args.out else WORK_DIR) / ("robustness_quick.jsonl" if args.quick else "robustness.jsonl")
    results = args.results or default_results
    specs = grid_specs(grid, args.policies, parse_overrides(args.stablelr), args.engine)
    started = time.perf_counter()
    ran = 0 if args.report_only else run_specs(specs, results, max(1, args.workers), progress=not args.no_progress)
    elapsed = time.perf_counter() - started
    print(f"robustness: {ran} runs in {elapsed:.0f} s ({len(specs) - ran} already in {results})", flush=True)
    if not args.no_report:
        from benchmarks.robustness_report import write_report

        wanted = {spec.key for spec in specs}
        records = (list({record_key(r): r for r in load_results(results) if record_key(r) in wanted}.values())
                   if args.report_only else select_results(load_results(results), specs))
        write_report(
            records, specs, grid=asdict(grid), results_md=out / RESULTS_PATH.name if args.out
            else RESULTS_PATH, png=out / "robustness.png", command=command_line("benchmarks.robustness", argv),
            results_file=results, workers=args.workers, wall_s=elapsed,
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    raise SystemExit(main())
