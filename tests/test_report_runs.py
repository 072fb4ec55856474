"""`stablelr report` on what users point it at: several runs, a run with no scalars, a run that logged no loss,
and the ``python -m`` entry points."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tb_server import write_documented_run
from torch.utils.tensorboard import SummaryWriter

from lightning_stablelr.cli import main
from lightning_stablelr.report import ReportError, load_run, summarize


def _second_run(root: Path, lr: float = 0.5) -> Path:
    """Another run beside ``write_documented_run``'s version_0: its own directory, from step 0."""
    log_dir = root / "lightning_logs" / "version_1"
    writer = SummaryWriter(log_dir=str(log_dir))
    for step in range(0, 40, 10):
        writer.add_scalar("stablelr/lr-0", lr, global_step=step)
        writer.add_scalar("train_loss", 1.0 / (step + 1), global_step=step)
    writer.close()
    return log_dir


def test_several_runs_are_refused_with_their_list_unless_merged(tmp_path, capsys):
    write_documented_run(tmp_path, resume=False)
    second = _second_run(tmp_path)
    first = tmp_path / "lightning_logs" / "version_0"
    assert main(["report", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error == (
        f"stablelr: error: '{tmp_path}' holds the event files of 2 runs, one per directory: {first}, {second}. Report"
        " one of them (stablelr report <one directory>), or pass --merge (merge=True) if they are one run resumed"
        " into a new directory: the latest value per tag and step then wins.\n"
    )
    # one of them alone reports; --merge takes the union, the later-written value winning per step
    assert main(["report", str(second), "--json"]) == 0
    assert '"stablelr/lr-0": {\n      "start": 0.5,\n      "end": 0.5\n    }' in capsys.readouterr().out
    merged = load_run(tmp_path, merge=True)
    assert len(merged.event_files) == 2 and merged.steps("stablelr/lr-0")[:4] == [0, 10, 20, 30]
    assert main(["report", str(tmp_path), "--merge"]) == 0


def test_event_files_without_scalars_are_an_error(tmp_path):
    SummaryWriter(log_dir=str(tmp_path)).close()  # the file-version record only, as a run killed before logging
    with pytest.raises(ReportError, match=r"hold no scalars \(1 file\(s\)\): the run stopped before its first logging step"):
        load_run(tmp_path)


def test_a_run_that_logged_no_loss_gets_no_verdict_not_healthy(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path))
    for step in range(3):
        writer.add_scalar("stablelr/lr-0", 0.1, global_step=step)
        writer.add_scalar("stablelr/stability_factor", 1.0, global_step=step)
    writer.close()
    verdict = summarize(load_run(tmp_path))["verdict"]
    assert verdict["kind"] == "no-data"
    assert verdict["headline"].startswith("no verdict: no training or validation loss was logged")


@pytest.mark.parametrize("module", ["lightning_stablelr", "lightning_stablelr.report"])
def test_python_dash_m_entry_points_run_the_report(module, tmp_path):
    command = [sys.executable, "-m", module] + (["report"] if module == "lightning_stablelr" else [])
    result = subprocess.run([*command, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("stablelr: error: no TensorBoard event files")


def test_the_dashboard_marks_series_too_short_to_draw_a_line(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_stablelr.report_dashboard import _panel

    writer = SummaryWriter(log_dir=str(tmp_path))
    writer.add_scalar("lyapunov/sharpness", 3.0, global_step=5)  # one probe: a line of one point is invisible
    for step in range(10):
        writer.add_scalar("train_loss", 1.0 / (step + 1), global_step=step)
    writer.close()
    run = load_run(tmp_path)
    figure, ax = plt.subplots()
    _panel(ax, run, ["lyapunov/sharpness", "train_loss"], "t", "y")
    markers = {line.get_label(): line.get_marker() for line in ax.lines}
    plt.close(figure)
    assert markers == {"lyapunov/sharpness": "o", "train_loss": "None"}
