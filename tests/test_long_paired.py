"""``python -m benchmarks.long_paired``: a variant's cells paired by seed against the panel's rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.long_paired import main, paired_cells, render


def _row(policy: str, lr: float, seed: int, final: float | None, task: str = "cnn") -> dict:
    # the fields of a results line that the report's summary reads (benchmarks.long.run_one writes them all)
    return {"task": task, "optimizer": "sgd", "policy": policy, "lr": lr, "seed": seed, "final_val_loss": final,
            "diverged": final is None, "final_minus_best": 0.0, "val_auc": final}


REFERENCE = [
    _row("stablelr", 0.1, 0, 0.020), _row("stablelr", 0.1, 1, 0.030), _row("stablelr", 0.1, 2, 0.010),
    _row("wsd", 0.1, 0, 0.012), _row("wsd", 0.1, 1, 0.016), _row("wsd", 0.1, 2, 0.014),
    _row("wsd", 0.3, 0, 0.010), _row("wsd", 0.3, 1, 0.010),  # seed 2 missing: this cell cannot be the best
    _row("prodigy", 1.0, 0, 0.001), _row("prodigy", 1.0, 1, 0.001), _row("prodigy", 1.0, 2, 0.001),
]  # fmt: skip


def test_cells_are_paired_by_seed_with_the_standard_error_and_the_best_peer_over_the_same_seeds() -> None:
    variant = [_row("stablelr", 0.1, 0, 0.018), _row("stablelr", 0.1, 1, 0.027), _row("stablelr", 0.1, 2, 0.012),
               _row("stablelr", 0.1, 7, 0.5)]  # seed 7 has no reference row: left out, not paired
    (cell,) = paired_cells(variant, REFERENCE)
    assert (cell.panel, cell.lr, cell.seeds) == ("cnn", 0.1, 3)
    assert cell.variant == pytest.approx(0.019) and cell.reference == pytest.approx(0.020)
    # differences -0.002, -0.003, +0.002: mean -0.001, sample sd 0.002646, stderr 0.001528
    assert cell.difference == pytest.approx(-0.001)
    assert cell.stderr == pytest.approx(math.sqrt(7e-6) / math.sqrt(3))
    assert cell.best_peer == ("wsd", 0.1, pytest.approx(0.014))  # not prodigy's single point, not a partial cell
    table = render([cell])
    assert "| cnn | 0.1 | 3 | 0.0190 | 0.0200 | -0.0010 ± 0.0015 | wsd (0.1): 0.0140, +35.7% |" in table


def test_peers_run_beside_the_variant_are_not_taken_for_it() -> None:
    variant = [_row("stablelr", 0.1, 0, 0.018), _row("wsd", 0.1, 0, 0.5)]  # the wsd line comes last
    (cell,) = paired_cells(variant, REFERENCE)
    assert cell.variant == pytest.approx(0.018) and cell.difference == pytest.approx(-0.002)


def test_a_diverged_variant_run_counts_as_infinite_instead_of_being_paired_away() -> None:
    variant = [_row("stablelr", 0.1, 0, None), _row("stablelr", 0.1, 1, 0.03)]
    (cell,) = paired_cells(variant, REFERENCE)
    assert cell.seeds == 2 and math.isinf(cell.variant) and math.isinf(cell.difference)


def test_no_matching_run_is_a_clear_error_naming_what_to_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="None of the variant's 1 'stablelr' runs has a 'stablelr' row of the same panel"):
        paired_cells([_row("stablelr", 0.05, 0, 0.02)], REFERENCE)
    variant, reference = tmp_path / "variant.jsonl", tmp_path / "reference.jsonl"
    variant.write_text(json.dumps(_row("stablelr", 0.05, 0, 0.02)) + "\n")
    reference.write_text("".join(json.dumps(row) + "\n" for row in REFERENCE))
    with pytest.raises(SystemExit, match="run the variant on the grid's lrs and seeds"):
        main([str(variant), "--reference", str(reference)])
    with pytest.raises(SystemExit, match="does not exist"):
        main([str(tmp_path / "missing.jsonl"), "--reference", str(reference)])
    variant.write_text(json.dumps(_row("stablelr", 0.1, 0, 0.02)) + "\n" + json.dumps(_row("stablelr", 0.1, 1, 0.02)) + "\n")
    assert main([str(variant), "--reference", str(reference)]) == 0
    assert "| cnn | 0.1 | 2 | 0.0200 | 0.0250 | -0.0050 ± 0.0050 |" in capsys.readouterr().out


def test_long_refuses_a_partial_lr_grid_that_would_overwrite_the_report() -> None:
    from benchmarks.long import main as long_main

    with pytest.raises(SystemExit, match="--lrs runs a part of the grid: add --no-report"):
        long_main(["--quick", "--lrs", "0.1"])
