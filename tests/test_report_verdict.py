"""The verdict of `stablelr report` on a healthy, an overfitting and a diverging run (event files written with
the numbers such runs log), and the monitor budget read from the recipes' hparams.yaml."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.image
import yaml
from torch.utils.tensorboard import SummaryWriter

from lightning_stablelr.cli import main
from lightning_stablelr.report import load_run, summarize
from lightning_stablelr.report_verdict import diagnose, monitor_budget


def _write(run_dir: Path, series: dict[str, list[tuple[int, float]]]) -> Path:
    writer = SummaryWriter(log_dir=str(run_dir))
    for tag, points in series.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()
    return run_dir


def _healthy(run_dir: Path) -> Path:
    steps = range(0, 100, 10)
    return _write(run_dir, {
        "stablelr/lr": [(s, 0.03) for s in steps],
        "stablelr/gap_factor": [(s, 1.0) for s in steps],
        "stablelr/stability_factor": [(s, 1.0) for s in steps],
        "stablelr/gap": [(s, 0.05) for s in steps],
        "lyapunov/max_stable_lr": [(s, 0.09) for s in steps],
        "lyapunov/eos_ratio": [(s, 0.33) for s in steps],
        "train_loss_step": [(s, 2.3 * 0.8 ** (s / 10)) for s in steps],
        "val_loss": [(s, 2.3 * 0.82 ** (s / 10)) for s in steps],
    })  # fmt: skip


def _overfitting(run_dir: Path) -> Path:
    # The default job's shape: G cut at steps 290 and 300 (1 -> 0.5 -> 0.25), the lr falls from 0.03 to 0.0003.
    steps = range(0, 600, 10)
    g = [(s, 1.0 if s < 290 else 0.5 if s < 300 else 0.25) for s in steps]
    return _write(run_dir, {
        "stablelr/lr": [(s, 0.03 if s < 290 else 0.0003) for s in steps],
        "stablelr/gap_factor": g,
        "stablelr/stability_factor": [(s, 1.0 if s != 20 else 0.5) for s in steps],
        "stablelr/gap": [(s, 0.1 if s < 290 else 0.6) for s in steps],
        "lyapunov/max_stable_lr": [(s, 0.12) for s in steps],
        "train_loss_step": [(s, max(0.01, 2.3 - s / 100)) for s in steps],
        "val_loss": [(s, max(0.21, 2.3 - s / 100)) for s in steps],
    })  # fmt: skip


def _diverging(run_dir: Path) -> Path:
    steps = range(0, 50, 10)
    return _write(run_dir, {
        "lr": [(s, 0.3) for s in steps],
        "train_loss_step": [(0, 2.3), (10, 5.1), (20, 40.0), (30, 1e6), (40, math.nan)],
        "val_loss": [(0, 2.3), (10, 6.0), (20, 55.0), (30, 2e6), (40, math.inf)],
    })  # fmt: skip


def test_healthy_run(tmp_path):
    verdict = diagnose(load_run(_healthy(tmp_path)))
    assert verdict.kind == "healthy" and verdict.overfit_step is None
    assert verdict.headline.startswith("healthy")
    assert "the guard never had to act (stability_factor stayed at 1)" in verdict.findings
    assert "lr peak 0.03 = end" in verdict.findings
    assert not any("below the largest stable lr" in finding for finding in verdict.findings)  # 3x < 10x


def test_overfitting_run_names_the_step_and_the_cut(tmp_path):
    verdict = diagnose(load_run(_overfitting(tmp_path)))
    assert verdict.kind == "overfitting" and verdict.overfit_step == 290
    assert verdict.headline == (
        "the lr ends 100x below its peak because G cut it 4x after the model began to overfit at step 290"
    )
    assert verdict.findings[0] == (
        "overfitting began at step 290: the validation loss stopped improving while the gap (L_va - L_tr)/|L_va| "
        "reached 0.6, so G cut the lr 4x in 2 step(s) (gap_factor 0.25)"
    )
    assert verdict.findings[1].startswith("the guard acted 1 time(s) on a measured overshoot")
    assert any(finding.startswith("the lr ends 400x below the largest stable lr (0.12") and
               finding.endswith("G lowered it on purpose, against overfitting") for finding in verdict.findings)


def test_diverging_run(tmp_path):
    verdict = diagnose(load_run(_diverging(tmp_path)))
    assert verdict.kind == "diverged"
    assert verdict.headline == "diverged: the last train_loss_step is nan (step 40)"


def test_lifted_budget_is_reported_with_the_share_used(tmp_path):
    run_dir = _healthy(tmp_path / "tensorboard")
    _write(run_dir, {"monitor/overhead": [(90, 0.5393)]})
    config = {"monitor": {"_target_": "lightning_stablelr.StabilityMonitor", "max_overhead": 1.0}}
    (run_dir / "hparams.yaml").write_text(yaml.safe_dump(config))
    assert monitor_budget(tmp_path) == 1.0
    summary = summarize(load_run(tmp_path))
    assert summary["overhead"]["budget"] == 1.0
    assert ("the monitor's budget was lifted on purpose: max_overhead=1 instead of the default 0.05 "
            "(probes may take that share of training time; it used 54%)") in summary["verdict"]["findings"]


def test_cli_prints_the_verdict_first_and_the_png_carries_it(tmp_path, capsys):
    run_dir = _overfitting(tmp_path / "run")
    png = tmp_path / "dashboard.png"
    assert main(["report", str(run_dir), "--png", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == ("verdict: the lr ends 100x below its peak because G cut it 4x after the model began to "
                        "overfit at step 290")
    assert matplotlib.image.imread(str(png)).shape[:2] == (760, 1200)


def test_overfitting_run_at_the_lr_floor(tmp_path):
    # The default job's numbers: G fell to 0.000243 while the lr stopped at 0.0003 = min_lr_ratio 0.01 x 0.03.
    steps = range(0, 600, 10)
    run_dir = _write(tmp_path, {
        "stablelr/lr": [(s, 0.0292 if s < 290 else 0.0003) for s in steps],
        "stablelr/gap_factor": [(s, 1.0 if s < 290 else 0.000243) for s in steps],
        "stablelr/gap": [(s, 0.1 if s < 290 else 0.947) for s in steps],
    })  # fmt: skip
    verdict = diagnose(load_run(run_dir))
    assert verdict.headline == ("the lr ends 97.3x below its peak because G cut it 4.12e+03x after the model began "
                                "to overfit at step 290 and the lr sits at its floor (min_lr_ratio x base lr)")


def test_the_guard_count_comes_from_its_own_counter_when_logged(tmp_path: Path) -> None:
    # C is logged every 10 steps, so the two cuts between two logged points show as one drop; the guard's
    # cumulative stablelr/guard_overshoot counts both.
    steps = range(0, 60, 10)
    run_dir = _write(tmp_path / "counted", {
        "stablelr/lr": [(s, 0.03) for s in steps],
        "stablelr/gap_factor": [(s, 1.0) for s in steps],
        "stablelr/stability_factor": [(s, 1.0 if s < 20 else 0.25) for s in steps],
        "stablelr/guard_overshoot": [(s, 0.0 if s < 20 else 2.0) for s in steps],
        "train_loss_step": [(s, 2.3 - s / 100) for s in steps],
        "val_loss": [(s, 2.3 - s / 100) for s in steps],
    })  # fmt: skip
    findings = diagnose(load_run(run_dir)).findings
    assert "the guard acted 2 time(s) on a measured overshoot (by its own count; lowest 0.25, last 0.25)" in findings


def test_the_verdict_names_a_boost_of_a_too_small_base_lr(tmp_path: Path) -> None:
    steps = range(0, 100, 10)
    run_dir = _write(tmp_path / "boosted", {
        "stablelr/lr": [(s, 0.01 if s < 30 else 0.04) for s in steps],
        "stablelr/gap_factor": [(s, 1.0) for s in steps],
        "stablelr/stability_factor": [(s, 1.0 if s < 20 else 2.0 if s < 30 else 4.0) for s in steps],
        "stablelr/guard_boost": [(s, 0.0 if s < 20 else 1.0 if s < 30 else 2.0) for s in steps],
        "stablelr/guard_overshoot": [(s, 0.0) for s in steps],
        "train_loss_step": [(s, 2.3 * 0.8 ** (s / 10)) for s in steps],
        "val_loss": [(s, 2.3 * 0.82 ** (s / 10)) for s in steps],
    })  # fmt: skip
    findings = diagnose(load_run(run_dir)).findings
    assert "the guard raised a too-small base lr 2 time(s) (max_lr_boost; stability_factor up to 4x, last 4): a" \
           " larger base lr would start there" in findings
    assert not any("never had to act" in finding for finding in findings)

