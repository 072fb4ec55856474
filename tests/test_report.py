"""Tests for lightning_stablelr.report and the `stablelr report` command line."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
from tb_server import DOCUMENTED_SCALARS, RESUMED_SCALARS, write_documented_run
from torch.utils.tensorboard import SummaryWriter

from lightning_stablelr.cli import main
from lightning_stablelr.report import (
    ReportError,
    format_report,
    format_table,
    load_run,
    summarize,
    summary_to_json,
    write_dashboard,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DASH = "\u2014"


@pytest.fixture(scope="module")
def documented_run(tmp_path_factory) -> Path:
    """A run with every documented tag, resumed once (see tests/tb_server.py for the values)."""
    save_dir = tmp_path_factory.mktemp("documented")
    write_documented_run(save_dir)
    return save_dir


def _expected_summary(run_dir: Path) -> dict:
    return {
        "run_dir": str(run_dir),
        "verdict": {
            "kind": "overfitting",
            "headline": "the lr ends 16x below its peak because G cut it 2x after the model began to overfit at step 20",
            "findings": [
                "overfitting began at step 20: the validation loss stopped improving while the gap (L_va - L_tr)/|L_va| "
                "reached 0.5, so G cut the lr 2x in 2 step(s) (gap_factor 0.5)",
                "the guard acted 1 time(s) on a measured overshoot (stability_factor fell 1 time(s) in the logged "
                "points; lowest 0.5, last 0.75)",
                "lr peak 0.5 -> end 0.0312 (16x lower)",
                "1 step(s) had a NaN/Inf loss or gradient and were dropped",
            ],
            "overfit_step": 20,
        },
        "event_files": 2,
        "last_step": 30,
        "lr": {"stablelr/lr-0": {"start": 0.5, "end": 0.03125},  # end: the resumed value wins
               "stablelr/lr-head": {"start": 1.0, "end": 0.125}},
        "max_stable_lr": {"last": 0.125},
        "gap": {"last": 0.5, "history": [{"step": 10, "value": 0.125}, {"step": 20, "value": 0.375},
                                         {"step": 30, "value": 0.5}]},
        "gap_factor": {"last": 0.5, "changes": [{"step": 20, "from": 1.0, "to": 0.75},
                                                {"step": 30, "from": 0.75, "to": 0.5}]},
        "stability_factor": {"min": 0.5, "last": 0.75},
        "certified_rate": {"last": 0.25, "mean": (0.75 + 1.0 + 0.25) / 3},
        "barrier": {"worst": 0.25, "worst_step": 20},
        "superlevel_dip": {"max": 0.5, "last": 0.25},
        "equiconnectedness": {"last": 0.375, "max": 0.5},
        "sharpness": {"last": 32.0, "threshold": 64.0, "max_eos_ratio": 0.5},
        "overhead": {"last": 0.046875, "deferred_probes": 2.0, "budget": None},
        "val_loss": 0.875,
        "val_acc": 0.75,
        "nonfinite_steps": 1,
    }


def test_load_run_merges_files_and_keeps_the_last_written_value_per_step(documented_run):
    run = load_run(documented_run)
    assert [path.name.startswith("events.out.tfevents.") for path in run.event_files] == [True, True]
    for tag, series in DOCUMENTED_SCALARS.items():
        expected = {**series, **RESUMED_SCALARS.get(tag, {})}
        assert run.scalars[tag] == tuple(sorted(expected.items())), tag
    assert run.last("val_loss") == 0.875 and run.first("val_loss") == 1.5
    assert run.last("missing/tag") is None and run.values("missing/tag") == []


def test_load_run_orders_by_wall_time_not_by_file(tmp_path):
    # The file written second holds the OLDER wall time: the newer value (in the first file) wins.
    first = SummaryWriter(log_dir=str(tmp_path))
    first.add_scalar("val_loss", 2.0, global_step=5, walltime=2000.0)
    first.close()
    second = SummaryWriter(log_dir=str(tmp_path))
    second.add_scalar("val_loss", 3.0, global_step=5, walltime=1000.0)
    second.add_scalar("val_loss", 1.0, global_step=6, walltime=1000.0)
    second.add_scalar("val_loss", 0.5, global_step=6, walltime=1000.0)  # same time: the later record wins
    second.add_scalar("lyapunov/max_stable_lr", 0.25, global_step=6, new_style=True)
    second.close()
    run = load_run(tmp_path)
    assert run.scalars["val_loss"] == ((5, 2.0), (6, 0.5))
    assert run.scalars["lyapunov/max_stable_lr"] == ((6, 0.25),)


def test_summarize_reports_the_written_numbers(documented_run):
    assert summarize(load_run(documented_run)) == _expected_summary(documented_run)


def test_summarize_shows_missing_tags_as_none_and_the_table_as_dashes(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path))
    writer.add_scalar("val_loss", math.nan, global_step=3)
    writer.close()
    summary = summarize(load_run(tmp_path))
    assert summary["lr"] == {} and summary["gap_factor"] == {"last": None, "changes": []}
    assert summary["certified_rate"] == {"last": None, "mean": None}
    assert summary["barrier"] == {"worst": None, "worst_step": None}
    assert summary["nonfinite_steps"] is None and summary["val_acc"] is None
    assert math.isnan(summary["val_loss"])
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in format_table(summary).splitlines()[3:])
    assert rows["lr start -> end [stablelr/lr]"] == DASH
    assert rows["certified rate (last / mean)"] == DASH
    assert rows["gap_factor changes"] == DASH
    assert rows["worst consecutive barrier"] == DASH
    assert rows["final val_loss"] == "nan"
    assert json.loads(summary_to_json(summary))["val_loss"] is None


def test_gap_history_keeps_only_new_values_because_stablelr_repeats_the_last_gap(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path))
    for step, gap in enumerate([0.5, 0.5, 0.5, 0.25, 0.25, 0.5]):
        writer.add_scalar("stablelr/gap", gap, global_step=step)
    for step, factor in enumerate([1.0, 1.0, 0.5, 0.5, 0.5, 0.25]):
        writer.add_scalar("stablelr/gap_factor", factor, global_step=step)
    writer.close()
    summary = summarize(load_run(tmp_path))
    assert summary["gap"] == {"last": 0.5, "history": [{"step": 0, "value": 0.5}, {"step": 3, "value": 0.25},
                                                       {"step": 5, "value": 0.5}]}
    assert summary["gap_factor"]["changes"] == [{"step": 2, "from": 1.0, "to": 0.5},
                                                {"step": 5, "from": 0.5, "to": 0.25}]
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in format_table(summary).splitlines()[3:])
    assert rows["gap (last; validations)"] == "0.5 (3 values, min 0.25, max 0.5)"
    assert rows["gap_factor changes"] == "2: step 2: 1 -> 0.5; step 5: 0.5 -> 0.25"


def test_format_table_is_aligned_and_contains_the_numbers(documented_run):
    table = format_table(summarize(load_run(documented_run)))
    lines = table.splitlines()
    assert lines[0] == f"stablelr report: {documented_run} (2 event file(s), last step 30)"
    value_column = lines[1].index("value")
    assert all(line[value_column - 2:value_column] == "  " and line[value_column] != " " for line in lines[2:])
    rows = {line[:value_column].rstrip(): line[value_column:] for line in lines[3:]}
    assert rows == {
        "lr start -> end [stablelr/lr-0]": "0.5 -> 0.03125",
        "lr start -> end [stablelr/lr-head]": "1 -> 0.125",
        "max stable lr (last)": "0.125",
        "gap (last; validations)": "0.5 (3 values, min 0.125, max 0.5)",
        "gap_factor (last)": "0.5",
        "gap_factor changes": "2: step 20: 1 -> 0.75; step 30: 0.75 -> 0.5",
        "stability_factor (min / last)": "0.5 / 0.75",
        "certified rate (last / mean)": "0.25 / 0.6667",
        "worst consecutive barrier": "0.25 (step 20)",
        "superlevel dip (max / last)": "0.5 / 0.25",
        "equiconnectedness (last / max)": "0.375 / 0.5",
        "sharpness vs threshold (last)": "32 vs 64",
        "eos ratio (max)": "0.5",
        "probe overhead (last)": "4.7% of training time (budget unknown)",
        "deferred probes (last)": "2",
        "final val_loss": "0.875",
        "final val_acc": "0.75",
        "non-finite steps": "1",
    }


def test_cli_prints_the_table(documented_run, capsys):
    assert main(["report", str(documented_run)]) == 0
    captured = capsys.readouterr()
    assert captured.out == format_report(summarize(load_run(documented_run))) + "\n"
    assert captured.err == ""


def test_cli_json_parses_and_matches_the_summary(documented_run, capsys):
    assert main(["report", str(documented_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == _expected_summary(documented_run)


def test_cli_png_writes_a_readable_dashboard(documented_run, tmp_path, capsys):
    png = tmp_path / "dashboard.png"
    assert main(["report", str(documented_run), "--png", str(png), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["val_loss"] == 0.875  # stdout stays pure JSON
    assert captured.err == f"dashboard written to {png}\n"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert matplotlib.image.imread(png).shape == (760, 1200, 4)  # 12 x 7.6 in at 100 dpi


def test_write_dashboard_rejects_high_dpi_and_unwritable_paths(documented_run, tmp_path):
    run = load_run(documented_run)
    with pytest.raises(ValueError, match=re.escape("`dpi` must be a finite number in [10, 100], got 300.")):
        write_dashboard(run, tmp_path / "x.png", dpi=300)
    missing = tmp_path / "no" / "such" / "dir" / "x.png"
    with pytest.raises(ReportError, match=re.escape(f"cannot write the dashboard to '{missing}'")):
        write_dashboard(run, missing)


def test_cli_empty_directory_exits_2_with_a_clear_message(tmp_path, capsys):
    (tmp_path / "lightning_logs").mkdir()
    (tmp_path / "lightning_logs" / "hparams.yaml").write_text("{}\n")
    assert main(["report", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"stablelr: error: no TensorBoard event files (events.out.tfevents.*) under '{tmp_path}'. "
        "Pass the Lightning log directory that contains events.out.tfevents.* files (for example "
        "lightning_logs/version_0, or a Hydra run's output directory trained with logger=tensorboard).\n"
    )


def test_cli_missing_directory_and_usage_errors_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["report", str(missing)]) == 2
    assert capsys.readouterr().err.startswith(f"stablelr: error: run directory '{missing}' does not exist. Pass")
    assert main([]) == 2
    assert "stablelr: error: the following arguments are required: COMMAND" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--bogus"]) == 2
    assert "stablelr: error: unrecognized arguments: --bogus" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--png", str(tmp_path / "no" / "x.png")]) == 2
    assert "Pass the Lightning log directory" in capsys.readouterr().err  # no events: checked before --png
    assert main(["--help"]) == 0
    assert "usage: stablelr" in capsys.readouterr().out


@pytest.mark.slow
def test_python_dash_m_cli_runs_the_report_and_propagates_exit_codes(documented_run, tmp_path):
    command = [sys.executable, "-m", "lightning_stablelr.cli", "report"]
    result = subprocess.run([*command, str(documented_run), "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["lr"]["stablelr/lr-0"] == {"start": 0.5, "end": 0.03125}
    empty = subprocess.run([*command, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2
    assert empty.stderr.startswith("stablelr: error: no TensorBoard event files")
