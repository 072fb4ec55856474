"""The benchmarks: their ``--quick`` modes, results formats and resume, and the helpers they are built on.

The quick modes write into ``tmp_path`` (``--out``), never into the committed ``benchmarks/RESULTS.md``.
They assert formats and finite numbers, not speed.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from benchmarks.common import replace_section
from benchmarks.robustness_report import TABLE_HEADER as ROBUSTNESS_HEADER
from benchmarks.robustness_report import summarize, targets

RECORD_KEYS = {
    "task", "optimizer", "policy", "lr", "seed", "config", "data", "engine", "epochs", "batch_size", "steps", "stablelr",
    "initial_train_loss", "initial_val_loss", "final_train_loss", "final_val_loss", "best_val_loss",
    "best_epoch", "final_minus_best", "val_auc", "diverged", "nonfinite_losses", "lr_end", "stablelr_checks",
    "stablelr_nonfinite_steps", "gap_factor", "stability_factor", "val_curve", "wall_s",
}  # fmt: skip


def _section(text: str, name: str) -> str:
    match = re.search(rf"<!-- BEGIN {name} -->\n(.*?)\n<!-- END {name} -->", text, re.DOTALL)
    assert match is not None, f"no {name} section in:\n{text}"
    return match.group(1)


def _table_rows(section: str, header: str) -> list[list[str]]:
    lines = section.splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_replace_section_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    replace_section(path, "a", "first")
    assert path.read_text() == "# Benchmark results\n\n<!-- BEGIN a -->\nfirst\n<!-- END a -->\n"
    path.write_text(path.read_text() + "\nhand-written notes\n")
    replace_section(path, "b", "second")
    replace_section(path, "a", "third\nwith $1 and \\1")  # replacement text is literal, not a regex template
    assert path.read_text() == (
        "# Benchmark results\n\n<!-- BEGIN a -->\nthird\nwith $1 and \\1\n<!-- END a -->\n\nhand-written notes\n"
        "\n<!-- BEGIN b -->\nsecond\n<!-- END b -->\n"
    )


def _record(policy: str, lr: float, final: float | None, *, seed: int = 0, gap: float | None = 0.0,
            diverged: bool = False, task: str = "digits") -> dict:
    return {"task": task, "optimizer": "sgd", "policy": policy, "lr": lr, "seed": seed,
            "final_val_loss": final, "final_minus_best": gap, "val_auc": final, "diverged": diverged}


def test_summaries_and_targets_from_known_numbers() -> None:
    records = [
        _record("stablelr", 0.01, 0.30), _record("stablelr", 0.1, 0.20, gap=0.01), _record("stablelr", 1.0, 0.25),
        _record("constant", 0.01, 0.28), _record("constant", 0.1, 0.19, gap=0.05),
        _record("constant", 1.0, None, gap=None, diverged=True),
        # two seeds at one lr: the seed mean (0.204) is what counts
        _record("stablelr", 0.1, 0.208, seed=1),
        # the overfitting experiment: one lr, judged on final - best only
        _record("stablelr", 0.1, 0.30, gap=0.004, task="digits_overfit"),
        _record("constant", 0.1, 0.50, gap=0.2, task="digits_overfit"),
        _record("plateau", 0.1, 0.29, gap=0.003, task="digits_overfit"),
    ]
    by_policy = {s.policy: s for s in summarize(records) if s.task == "digits"}
    stable, constant = by_policy["stablelr"], by_policy["constant"]
    assert stable.by_lr == {0.01: 0.30, 0.1: pytest.approx(0.204), 1.0: 0.25}
    assert (stable.median, stable.best, stable.best_lr, stable.diverged, stable.runs) == (0.25, pytest.approx(0.204), 0.1, 0, 4)
    assert constant.by_lr[1.0] == math.inf and constant.diverged == 1
    assert (constant.median, constant.best, constant.best_lr) == (0.28, 0.19, 0.1)
    assert constant.final_minus_best == 0.05  # median of (0, 0.05, inf)
    rows = {(row["panel"], row["target"]): row for row in targets(summarize(records))}
    assert set(rows) == {
        ("digits/sgd", "never diverges"), ("digits/sgd", "median beats every peer"),
        ("digits/sgd", "within 2% at each peer's best lr"),
        ("digits_overfit/sgd", "never diverges"), ("digits_overfit/sgd", "final - best below every peer")}
    assert rows[("digits/sgd", "never diverges")]["met"] is True
    assert rows[("digits/sgd", "median beats every peer")]["met"] is True  # 0.25 < 0.28
    assert rows[("digits/sgd", "within 2% at each peer's best lr")]["met"] is False  # 0.204 / 0.19 = +7.4%
    assert "+7.4%" in rows[("digits/sgd", "within 2% at each peer's best lr")]["detail"]
    overfit = rows[("digits_overfit/sgd", "final - best below every peer")]
    assert overfit["met"] is False and overfit["detail"] == "0.004 vs 0.003 (plateau)"


@pytest.mark.slow
def test_plain_engine_reproduces_the_lightning_callback() -> None:
    """The plain loop (StableLRScheduler) and the Trainer (StableLR callback) give the same lrs and losses."""
    from benchmarks.engines import run_lightning, run_plain
    from benchmarks.policies import load_policy
    from benchmarks.tasks import build_task

    task = build_task("digits")
    # dense checks on steps 0-1, then the callback's periodic rule: every 3rd step while C = 1, every step
    # while C < 1 (3 // 10 rounds up to 1): steps 0, 1, 2 (C is cut on step 1's check), then 3 to 6: 7 of 9
    cadence = {"dense_check_steps": 2, "check_every_n_steps": 3, "guard_window": 1}
    for policy_name, optimizer, lr in (("stablelr", "sgd", 3.0), ("plateau", "adamw", 0.01)):
        policy = load_policy(policy_name, 3, cadence)
        runs = [engine(task, policy, optimizer=optimizer, lr=lr, seed=1, epochs=3, batch_size=100)
                for engine in (run_lightning, run_plain)]
        lightning_run, plain_run = runs
        assert len(lightning_run.lr_trace) == len(plain_run.lr_trace) == 9
        # The callback forms θ - Δθ with foreach ops, the scheduler in place: L- may differ in the last bits,
        # and with safety < 1/2 the guard's shrink is proportional to s_max, so allow round-off (1e-6).
        exact = policy_name != "stablelr"
        for first, second in ((lightning_run.lr_trace, plain_run.lr_trace),
                              (lightning_run.val_curve, plain_run.val_curve),
                              ([lightning_run.final_train_loss], [plain_run.final_train_loss])):
            assert first == (second if exact else pytest.approx(second, rel=1e-6))
        if policy_name == "stablelr":
            # lr 3 is far too high for SGD: the guard must have cut the lr (C < 1) on its dense checks
            assert lightning_run.stablelr["checks"] == plain_run.stablelr["checks"] == 7
            assert lightning_run.stablelr["stability_factor"] == pytest.approx(
                plain_run.stablelr["stability_factor"], rel=1e-6)
            assert plain_run.stablelr["stability_factor"] < 0.5
            assert plain_run.lr_trace[-1] < 0.5 * lr


@pytest.mark.slow
def test_robustness_quick_writes_results_and_resumes(tmp_path: Path) -> None:
    from benchmarks.robustness import QUICK_GRID, main

    assert main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    results = tmp_path / "robustness_quick.jsonl"
    lines = results.read_text().splitlines()
    # the grid (2 lrs per optimizer) plus the overfitting experiment (its one lr, SGD: 5 policies)
    expected_runs = len(QUICK_GRID.tasks) * len(QUICK_GRID.seeds) * (2 * 5 + 2 * 6) + 5
    assert len(lines) == expected_runs == 49
    records = [json.loads(line) for line in lines]
    assert all(set(record) == RECORD_KEYS for record in records)
    keys = {(r["task"], r["optimizer"], r["policy"], r["lr"], r["seed"]) for r in records}
    assert len(keys) == expected_runs
    assert {r["policy"] for r in records if r["optimizer"] == "sgd"} == {
        "stablelr", "constant", "exponential", "plateau", "cosine"}
    assert {r["policy"] for r in records if r["optimizer"] == "adamw"} == {
        "stablelr", "constant", "exponential", "plateau", "cosine", "schedulefree"}
    for record in records:
        assert math.isfinite(record["initial_train_loss"]) and record["initial_train_loss"] > 0
        assert len(record["val_curve"]) == record["epochs"] == 2
        if not record["diverged"]:
            assert all(math.isfinite(v) for v in record["val_curve"])
            assert record["final_val_loss"] == record["val_curve"][-1]
            assert record["best_val_loss"] == min(record["val_curve"])
        train_size = {"digits": 300, "regression": 200, "digits_overfit": 100}[record["task"]]
        assert record["steps"] == record["epochs"] * math.ceil(train_size / record["batch_size"])
        if record["policy"] == "stablelr":  # 2 epochs: every step is one of the callback's dense checks
            assert record["stablelr_checks"] == record["steps"]
            assert 0 < record["stability_factor"] <= 1 and 0 < record["gap_factor"] <= 1
        else:
            assert record["stablelr_checks"] is None and record["gap_factor"] is None

    section = _section((tmp_path / "RESULTS.md").read_text(), "robustness")
    rows = _table_rows(section, ROBUSTNESS_HEADER)
    assert len(rows) == len(QUICK_GRID.tasks) * (5 + 6) + 5
    assert {(row[0], row[1], row[2]) for row in rows} == {
        (r["task"], r["optimizer"], r["policy"]) for r in records}
    for row in rows:
        assert re.fullmatch(r"\d+/1" if row[0] == "digits_overfit" else r"\d+/2", row[3])
        best, best_lr = re.fullmatch(r"(\S+) \((\S+)\)", row[5]).groups()
        assert math.isfinite(float(best)) and float(best_lr) in (0.03, 3.0, 0.001, 0.1)
    assert (tmp_path / "robustness.png").stat().st_size > 1000

    # Resume: a second invocation finds every key done and runs nothing.
    assert main(["--quick", "--out", str(tmp_path), "--no-progress", "--no-report"]) == 0
    assert results.read_text().splitlines() == lines
    # An interrupted file (two runs lost, a torn last line) is completed with exactly the missing runs.
    results.write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:25])
    assert main(["--quick", "--out", str(tmp_path), "--no-progress", "--no-report"]) == 0
    resumed = [json.loads(line) for line in results.read_text().splitlines() if line.startswith("{") and
               line.endswith("}")]
    assert len(resumed) == expected_runs
    assert {(r["task"], r["optimizer"], r["policy"], r["lr"], r["seed"]) for r in resumed} == keys


@pytest.mark.slow
def test_overhead_quick_writes_its_tables(tmp_path: Path) -> None:
    from benchmarks.overhead import CONDITIONS, HOOK_HEADER, MODELS, TABLE_HEADER, main

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    section = _section((tmp_path / "RESULTS.md").read_text(), "overhead")
    assert "Machine: `nproc`=" in section and "Command: `python -m benchmarks.overhead --quick" in section
    rows = _table_rows(section, TABLE_HEADER)
    assert [(row[0], row[2]) for row in rows] == [(m, c) for m in MODELS for c in CONDITIONS if c != "none"]
    for row in rows:
        assert math.isfinite(float(row[1])) and float(row[1]) > 0  # ms per step without callbacks
        for cell in (row[3].split(" ")[0], row[4]):  # whole-fit CPU and wall ratios
            assert math.isfinite(float(cell)) and float(cell) > 0
    hooks = _table_rows(section, HOOK_HEADER)
    assert [row[0] for row in hooks] == list(MODELS)
    for row in hooks:
        assert 0 < float(row[1]) < 1e5 and 0 < float(row[2]) < 1e5  # µs per step: StableLR's hooks ran
        assert int(row[3]) == 8  # one quick fit of 8 steps per model
        for cell in row[6:8]:  # StableLR() with its checks, the monitor: ms per fit (% of a no-callback fit)
            seconds, share = cell.split(" ")
            assert float(seconds) > 0 and share.startswith("(") and share.endswith("%)") and float(share[1:-2]) > 0
