"""Long-horizon lr-policy panels (issue 8): ``python -m benchmarks.long``.

Three panels (:mod:`benchmarks.long_panels`: a char-level transformer LM with AdamW, a BatchNorm CNN with
SGD + momentum, a benign MSE regression with SGD + momentum), each 2,000 optimizer steps, an lr grid of
two decades and 4 seeds (32 for the CNN, whose runs scatter most), for every policy of :mod:`benchmarks.long_engine` (StableLR at its defaults via
the plain-PyTorch ``StableLRScheduler``; constant, warmup+cosine, WSD, schedule-free; Prodigy as one point
per seed). Runs go through a process pool (``--workers``, one torch thread each) and are appended to
``benchmarks/long.jsonl``, one line per run. A line counts as done only while its config fingerprint
(:func:`run_config`: the panel, steps, policy; for StableLR its resolved config, check cadence and the
source of its schedule/controller/scheduler/curvature modules) and data fingerprint still match, so a
change of the guard reruns only the StableLR runs. :mod:`benchmarks.long_report` then writes the
``long`` section of ``benchmarks/RESULTS.md`` and ``benchmarks/long.png``.

A run **diverges** when its final validation loss is not finite or above 1.5x its value at initialisation.

Examples::

    python -m benchmarks.long                          # the full panels (about 2.5 h on 2 cores; resumable)
    python -m benchmarks.long --policies stablelr      # rerun only StableLR (e.g. after a guard change)
    python -m benchmarks.long --quick --out /tmp/long  # < 1 min smoke test
    python -m benchmarks.long --panels cnn --lrs 0.1 0.3 --policies stablelr --stablelr anneal_to=0.01 \
        --results /tmp/variant.jsonl --no-report          # a variant's cells, then:
    python -m benchmarks.long_paired /tmp/variant.jsonl   # paired by seed against the panel's rows
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from benchmarks.common import BENCH_DIR, RESULTS_PATH, WORK_DIR, command_line, quiet_lightning
from benchmarks.long_engine import POLICIES, SINGLE_POINT, warmup_steps
from benchmarks.long_panels import PANELS
from benchmarks.robustness import _source_hash

__all__ = ["GRID", "QUICK_GRID", "LongGrid", "LongSpec", "grid_specs", "main", "run_config", "run_one"]



@dataclass(frozen=True)
class LongGrid:
    """Panels, lr grid per panel, seeds, steps and evaluation interval; ``panel_seeds``: a panel's own seeds
    where it needs more than ``seeds`` (:meth:`seeds_of`)."""

    panels: tuple[str, ...]
    lrs: Mapping[str, tuple[float, ...]]
    seeds: tuple[int, ...]
    steps: int
    eval_every: int
    panel_seeds: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def seeds_of(self, panel: str) -> tuple[int, ...]:
        """The seeds of ``panel``: its own in ``panel_seeds``, else ``seeds``."""
        return tuple(self.panel_seeds.get(panel, self.seeds))


GRID = LongGrid(
    panels=PANELS,
    lrs={"lm": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2), "cnn": (0.01, 0.03, 0.1, 0.3, 1.0),
         "regression": (0.002, 0.006, 0.02, 0.06, 0.2)},
    seeds=(0, 1, 2, 3), steps=2000, eval_every=200,
    # The BatchNorm CNN's final loss scatters by up to 40% between seeds (BatchNorm's validation spikes at
    # high step sizes): 32 seeds, so that a policy's mean over seeds is not one lucky or unlucky run (with 4,
    # one lr's mean still moved by about ±0.0015, 10% of the panel's best; with 8, one seed still decided a
    # 7% difference between two StableLR variants at lr 0.1; with 16, the paired per-seed standard error of
    # StableLR vs cosine at cosine's best lr was still 0.0014, 9% of the loss: 32 seeds).
    panel_seeds={"cnn": tuple(range(32))},
)  # fmt: skip
"""(5 lrs x 5 policies + 1 Prodigy point) x (4 seeds for the LM and the regression, 32 for the CNN) = 1040 runs."""

QUICK_GRID = LongGrid(panels=PANELS, lrs={"lm": (1e-3, 1e-2), "cnn": (0.03, 1.0), "regression": (0.02, 0.2)},
                      seeds=(0,), steps=40, eval_every=20)
"""``--quick``: 2 lrs, 1 seed, 40 steps (33 runs), for the smoke test."""


@dataclass(frozen=True)
class LongSpec:
    """One run. ``key`` matches :func:`benchmarks.robustness.record_key` so the resume machinery is shared."""

    panel: str
    optimizer: str
    policy: str
    lr: float
    seed: int
    steps: int
    eval_every: int
    config: str
    data: str

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.panel, self.optimizer, self.policy, float(self.lr), int(self.seed))


@cache
def run_config(panel: str, policy: str, steps: int, eval_every: int) -> str:
    """Fingerprint (12 hex digits) of everything that decides a run besides its key and data: the panel's
    optimizer, weight decay and settings (batch, network sizes), steps, evaluation interval, the shared warmup, the policy; for StableLR also
    its resolved config (``StableLRConfig().to_dict()``), check cadence and rule, and the source of
    :data:`benchmarks.common.STABLELR_SOURCES`; for schedule-free/Prodigy their package versions."""
    from importlib.metadata import version

    from benchmarks.long_panels import build_panel

    built = build_panel(panel)
    policy_cfg: Any = {"name": policy}
    if policy == "stablelr":
        from benchmarks.engines import stablelr_cadence
        from benchmarks.long_engine import stablelr_overrides
        from benchmarks.robustness import CHECK_RULE_ID
        from lightning_stablelr.config import config_field_names
        from lightning_stablelr.controller import StableLRConfig

        overrides = stablelr_overrides()  # controller fields and the check cadence
        controller = {key: value for key, value in overrides.items() if key in config_field_names()}
        policy_cfg.update(config=StableLRConfig(**controller).to_dict(), cadence=stablelr_cadence(overrides),
                          check_rule=CHECK_RULE_ID, source=_source_hash())
    elif policy in ("schedulefree", "prodigy"):
        policy_cfg["version"] = version("prodigyopt" if policy == "prodigy" else "schedulefree")
    text = json.dumps({"panel": panel, "optimizer": built.optimizer, "weight_decay": built.weight_decay,
                       "settings": built.settings,
                       "steps": steps, "eval_every": eval_every, "warmup": warmup_steps(steps),
                       "policy": policy_cfg}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


@cache
def data_fingerprint(panel: str) -> str:
    from benchmarks.long_panels import build_panel, panel_fingerprint

    return panel_fingerprint(build_panel(panel))


def grid_specs(grid: LongGrid, policies: Sequence[str] | None = None) -> list[LongSpec]:
    """Every run of ``grid``, cheapest panel first (regression, cnn, lm), seed-major within a panel: an
    interrupted run on a busy machine leaves whole panels (and whole seeds) done rather than a bit of each."""
    from benchmarks.long_panels import build_panel

    specs = []
    for panel in sorted(grid.panels, key=lambda name: ("regression", "cnn", "lm").index(name)):
        for seed in grid.seeds_of(panel):
            optimizer = build_panel(panel).optimizer
            for policy in POLICIES:
                if policies is not None and policy not in policies:
                    continue
                lrs = (1.0,) if policy in SINGLE_POINT else grid.lrs[panel]
                config = run_config(panel, policy, grid.steps, grid.eval_every)
                specs += [LongSpec(panel, optimizer, policy, lr, seed, grid.steps, grid.eval_every, config,
                                   data_fingerprint(panel)) for lr in lrs]
    return specs


def run_one(spec: LongSpec) -> dict[str, Any]:
    """Train one run and return its results line. Non-finite numbers are written as ``null``.

    Fields: the key (``task`` = panel, ``optimizer``, ``policy``, ``lr``, ``seed``), ``config``/``data``
    fingerprints (recomputed here, so a source changed under a running sweep reruns next time),
    ``steps_planned``, ``steps``, ``eval_every``, ``initial_val_loss``, ``final_val_loss``, ``best_val_loss``,
    ``val_curve`` (every ``eval_every`` steps), ``diverged``, ``nonfinite_losses``, ``wall_s``, ``lr_trace``
    (effective lr every 100 steps), ``val_auc``, ``final_minus_best``; for StableLR ``stability_factor``
    (C at the end), ``c_min``, ``c_trace`` (C every 100 steps), ``checks``, ``margins`` (the step margin
    ``s_max`` of every check, ``null`` where not finite), ``gap_factor``, ``nonfinite_steps``.
    """
    from benchmarks.long_engine import train_run
    from benchmarks.long_panels import build_panel
    from benchmarks.robustness import _json_number

    quiet_lightning()
    out = train_run(build_panel(spec.panel), spec.policy, spec.lr, spec.seed, steps=spec.steps,
                    eval_every=spec.eval_every)
    curve = out["val_curve"]
    record = {"task": spec.panel, "optimizer": spec.optimizer, "policy": spec.policy, "lr": float(spec.lr),
              "seed": int(spec.seed), "config": run_config(spec.panel, spec.policy, spec.steps, spec.eval_every),
              "data": data_fingerprint(spec.panel), "steps_planned": spec.steps, "eval_every": spec.eval_every,
              **out, "val_auc": sum(curve) / len(curve),
              "final_minus_best": out["final_val_loss"] - out["best_val_loss"]}
    return {key: _json_number(value) for key, value in record.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.long", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 lrs, 1 seed, 40 steps: a smoke test (< 1 min)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for RESULTS.md, long.png and long.jsonl (default: benchmarks/; "
                        "benchmarks/_work/ with --quick)")
    parser.add_argument("--results", type=Path, default=None, help="JSONL results file (resumed if present)")
    parser.add_argument("--workers", type=int, default=2, help="processes (one torch thread each)")
    parser.add_argument("--panels", nargs="+", default=None, choices=PANELS)
    parser.add_argument("--policies", nargs="+", default=None, choices=POLICIES)
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--lrs", nargs="+", type=float, default=None,
                        help="run only these lrs of every chosen panel (a variant's cells; with --no-report, "
                             "then compare with python -m benchmarks.long_paired)")
    parser.add_argument("--no-report", action="store_true", help="only run; do not write RESULTS.md or the PNG")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing; report the results file's lines as they are (last line per run wins, "
                             "fingerprints not checked: for results made on another machine, see BENCH_MACHINE)")
    parser.add_argument("--stablelr", nargs="*", default=[], metavar="KEY=VALUE",
                        help="StableLR overrides (a sweep of the defaults); use a separate --results file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.robustness import load_results, record_key, run_specs, select_results

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.stablelr:
        import json
        import os

        from benchmarks.long_engine import OVERRIDES_ENV
        from benchmarks.robustness import parse_overrides

        os.environ[OVERRIDES_ENV] = json.dumps(parse_overrides(args.stablelr))
    base = QUICK_GRID if args.quick else GRID
    if args.lrs is not None and not args.no_report:
        raise SystemExit("--lrs runs a part of the grid: add --no-report (and compare the cells with "
                         "python -m benchmarks.long_paired), or drop --lrs to run and report the whole grid.")
    lrs = base.lrs if args.lrs is None else {panel: tuple(args.lrs) for panel in base.lrs}
    # Explicit --seeds apply to every panel; by default each panel has its own (GRID.panel_seeds).
    grid = LongGrid(panels=tuple(args.panels or base.panels), lrs=lrs,
                    seeds=tuple(args.seeds if args.seeds is not None else base.seeds), steps=base.steps,
                    eval_every=base.eval_every, panel_seeds={} if args.seeds is not None else base.panel_seeds)
    out = args.out or (WORK_DIR if args.quick else BENCH_DIR)
    results = args.results or out / ("long_quick.jsonl" if args.quick else "long.jsonl")
    specs = grid_specs(grid, args.policies)
    started = time.perf_counter()
    ran = 0 if args.report_only else run_specs(specs, results, max(1, args.workers),
                                               progress=not args.no_progress, runner=run_one, desc="long")
    elapsed = time.perf_counter() - started
    print(f"long: {ran} runs in {elapsed:.0f} s ({len(specs) - ran} already in {results})", flush=True)
    if not args.no_report:
        from benchmarks.long_report import write_report

        # The report always covers every panel and policy of the grid, also after a filtered rerun.
        everything = grid_specs(LongGrid(base.panels, base.lrs, grid.seeds, base.steps, base.eval_every,
                                         grid.panel_seeds))
        wanted = {spec.key for spec in everything}
        records = (list({record_key(r): r for r in load_results(results) if record_key(r) in wanted}.values())
                   if args.report_only else select_results(load_results(results), everything))
        write_report(records, everything, grid=grid,
                     results_md=out / RESULTS_PATH.name, png=out / "long.png",
                     command=command_line("benchmarks.long", argv), results_file=results, workers=args.workers,
                     wall_s=elapsed)
    return 0


if __name__ == "__main__":
    from benchmarks.robustness import exit_on_sigterm

    os.environ.setdefault("PYTHONHASHSEED", "0")
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    raise SystemExit(main())
