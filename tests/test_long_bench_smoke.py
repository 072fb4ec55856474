"""The long-horizon panels (``python -m benchmarks.long``): schedules, fingerprints, ``--quick`` output and resume.

The quick mode writes into ``tmp_path`` (``--out``), never into the committed ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from benchmarks.long_engine import lr_multiplier, warmup_steps

COMMON_KEYS = {
    "task", "optimizer", "policy", "lr", "seed", "config", "data", "steps_planned", "eval_every",
    "initial_val_loss", "val_curve", "lr_trace", "c_trace", "nonfinite_losses", "c_min", "steps", "wall_s",
    "final_val_loss", "best_val_loss", "diverged", "val_auc", "final_minus_best",
}  # fmt: skip
STABLELR_KEYS = {"stability_factor", "gap_factor", "checks", "nonfinite_steps", "margins"}


def test_peer_schedules_share_the_warmup_and_end_where_documented() -> None:
    total = 2000
    assert warmup_steps(total) == 100
    cosine, wsd = lr_multiplier("cosine", total), lr_multiplier("wsd", total)
    assert lr_multiplier("constant", total) is None
    assert [cosine(0), cosine(49), cosine(99)] == [pytest.approx(0.01), pytest.approx(0.5), pytest.approx(1.0)]
    assert [wsd(0), wsd(49), wsd(99)] == [cosine(0), cosine(49), cosine(99)]
    assert cosine(100) == pytest.approx(1.0) and cosine(1050) == pytest.approx(0.55) and cosine(2000) == pytest.approx(0.1)
    assert wsd(1599) == 1.0 and wsd(1600) == pytest.approx(1.0) and wsd(1800) == pytest.approx(0.5)
    assert wsd(1999) == pytest.approx(1 / 400)


def test_a_guard_source_change_reruns_only_stablelr_in_the_short_panels_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before, the short panels' fingerprint held StableLR's config and cadence but not the guard's source: after a
    # controller.py change only 42 of 129 StableLR rows reran, and stale rows were reported as current.
    from benchmarks import robustness

    def configs() -> dict[str, str]:
        robustness.run_config.cache_clear()
        return {policy: robustness.run_config("sgd", policy, (), 10, 64) for policy in ("stablelr", "cosine")}

    before = configs()
    monkeypatch.setattr(robustness, "_source_hash", lambda: "another guard")
    try:
        after = configs()
    finally:
        robustness.run_config.cache_clear()
    assert after["cosine"] == before["cosine"]
    assert after["stablelr"] != before["stablelr"]


def test_a_guard_source_change_reruns_only_stablelr(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import long

    before = {policy: long.run_config("regression", policy, 40, 20) for policy in ("stablelr", "cosine")}
    monkeypatch.setattr(long, "_source_hash", lambda: "another guard")
    long.run_config.cache_clear()
    try:
        after = {policy: long.run_config("regression", policy, 40, 20) for policy in ("stablelr", "cosine")}
    finally:
        long.run_config.cache_clear()
    assert after["cosine"] == before["cosine"]
    assert after["stablelr"] != before["stablelr"]


def _section(text: str) -> str:
    match = re.search(r"<!-- BEGIN long -->\n(.*?)\n<!-- END long -->", text, re.DOTALL)
    assert match is not None, text
    return match.group(1)


@pytest.mark.slow
def test_long_quick_writes_results_resumes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from benchmarks.long import QUICK_GRID, grid_specs, main
    from benchmarks.long_report import TABLE_HEADER
    from lightning_stablelr.config import CheckCadence
    from lightning_stablelr.controller import StableLRConfig

    assert main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    results = tmp_path / "long_quick.jsonl"
    records = [json.loads(line) for line in results.read_text().splitlines()]
    specs = grid_specs(QUICK_GRID)
    assert len(records) == len(specs) == 33  # 3 panels x (2 lrs x 5 policies + 1 Prodigy point)
    assert {(r["task"], r["optimizer"], r["policy"], r["lr"], r["seed"]) for r in records} == {s.key for s in specs}
    checked_steps = sum(CheckCadence().should_check(step) for step in range(QUICK_GRID.steps))
    for record in records:
        stable = record["policy"] == "stablelr"
        assert set(record) == COMMON_KEYS | (STABLELR_KEYS if stable else set()), record["policy"]
        assert record["steps"] == QUICK_GRID.steps and len(record["val_curve"]) == 2
        assert math.isfinite(record["initial_val_loss"]) and record["wall_s"] > 0
        final = record["final_val_loss"]
        assert record["diverged"] == (final is None or final > 1.5 * record["initial_val_loss"])
        if final is not None:
            assert record["best_val_loss"] == min(v for v in record["val_curve"] if v is not None) <= final
        first_lr = record["lr_trace"][0]
        if record["policy"] == "constant":
            assert first_lr == record["lr"]
        elif record["policy"] in ("cosine", "wsd", "schedulefree"):
            assert first_lr == pytest.approx(record["lr"] / warmup_steps(QUICK_GRID.steps))
        elif stable:
            assert first_lr == pytest.approx(record["lr"] / StableLRConfig().warmup_steps)
            # the cadence's checks, less dropped non-finite steps, plus the guard's confirmation checks
            assert record["checks"] + record["nonfinite_steps"] >= checked_steps
            assert len(record["margins"]) == record["checks"]
            assert 0 < record["c_min"] <= record["stability_factor"] <= StableLRConfig().max_lr_boost
            assert record["c_trace"] == [1.0]
    section = _section((tmp_path / "RESULTS.md").read_text())
    assert TABLE_HEADER in section and "Command: `python -m benchmarks.long --quick" in section
    assert "Machine: `nproc`=" in section and "| panel | target | met | detail |" in section
    for panel in QUICK_GRID.panels:
        assert f"### {panel}" in section
    assert (tmp_path / "long.png").stat().st_size > 10_000
    capsys.readouterr()

    assert main(["--quick", "--out", str(tmp_path), "--no-progress", "--no-report"]) == 0
    assert "long: 0 runs" in capsys.readouterr().out
    assert len(results.read_text().splitlines()) == 33

    # A StableLR line whose fingerprint no longer matches (a changed guard) reruns; the peers' lines do not.
    stale = [dict(r, config="stale") if r["policy"] == "stablelr" else r for r in records]
    results.write_text("".join(json.dumps(r) + "\n" for r in stale))
    assert main(["--quick", "--out", str(tmp_path), "--no-progress", "--no-report", "--panels", "regression"]) == 0
    assert "long: 2 runs" in capsys.readouterr().out
