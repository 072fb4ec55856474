"""DDP: every rank sets the same lr at every step, although the ranks see different data and losses.

``tests/scripts/train_stablelr.py --rank-scaled`` gives rank ``r`` its own train and val shards with inputs
and targets scaled by ``1 + 2 r`` (so its losses are about ``(1 + 2 r)^2`` times rank 0's), and logs
``val_loss`` without ``sync_dist``: StableLR's gap decision and guard must use reduced values, or the ranks'
lrs drift apart. ``strategy="ddp"`` relaunches the script as a second process (gloo on CPU), the way the
``ddp_cpu`` recipe runs. ``ddp_spawn`` is not run here: on 2 cores its workers re-import Lightning and take
about 50 s; the pickling it relies on is tested in ``test_cli_and_pickle.py``. A hang fails through the
subprocess timeout, which ends the whole process group.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import run_multiprocess_script

SCRIPT = Path(__file__).parent / "scripts" / "train_stablelr.py"
REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
STEPS = EPOCHS * 6  # --train-size 24 / --batch-size 4 per rank
CONFIG = {
    "decay_rate": 0.3,
    "gap_tolerance": 0.05,
    # No validation after the first counts as an improvement, so G shrinks whenever the (reduced) gap
    # exceeds the tolerance: a rank that used its own gap would shrink G by a different amount.
    "min_delta": 100.0,
    "check_every_n_steps": 2,
    "dense_check_steps": 4,
    # a strict band on single margins so that C moves on this short run and its reduced decision is tested
    "safety": 0.25,
    "recover_above": 8.0,
    "guard_window": 1,
}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run_ddp(out: Path, strategy: str, timeout: float = 240, *extra: str) -> None:
    out.mkdir()
    command = [
        sys.executable, str(SCRIPT), "--out", str(out), "--epochs", str(EPOCHS), "--stablelr", json.dumps(CONFIG),
        "--strategy", strategy, "--devices", "2", "--rank-scaled", *extra,
    ]  # fmt: skip
    run_multiprocess_script(command, REPO, out / "log.txt", timeout)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_every_rank_sets_the_same_lr_at_every_step(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    _run_ddp(out, "ddp")

    lrs = [_records(out / f"lr_rank{rank}.jsonl") for rank in (0, 1)]
    assert [r["step"] for r in lrs[0]] == list(range(STEPS))
    assert lrs[0] == lrs[1], "ranks set different lrs: " + str(
        [(a, b) for a, b in zip(lrs[0], lrs[1]) if a != b][:5]
    )

    # The ranks really disagreed about the data: rank 1's own, unsynced val loss is several times rank 0's
    # (its last batch's train loss too, though that one is noisier).
    factors = [_records(out / f"factors_rank{rank}.jsonl") for rank in (0, 1)]
    assert len(factors[0]) == len(factors[1]) == STEPS + EPOCHS
    epoch_ends = [[r for r in records if r["where"] == "epoch"] for records in factors]
    for end_0, end_1 in zip(*epoch_ends):
        assert end_1["val_loss"] > 3 * end_0["val_loss"], (end_0, end_1)
        assert end_1["train_loss"] > 1.5 * end_0["train_loss"], (end_0, end_1)
    # Yet every controller quantity (lr, decay, gap, G, C, step margin, ...) is identical on both ranks.
    controller_values = [[_stablelr_only(r) for r in records] for records in factors]
    assert controller_values[0] == controller_values[1]

    last = epoch_ends[0][-1]
    assert last["stablelr/decay"] < 0.6, "decay over 3 epochs at 0.3/epoch gives at most exp(-0.9*17/18)"
    assert last["stablelr/gap_factor"] < 1.0, f"G never moved, the reduced gap decision went untested: {last}"
    assert min(r["stablelr/stability_factor"] for r in factors[0]) < 1.0, "the guard never shrank C"
    # Both ranks took L0 from their own training loss on the same checks (the ramp test below: the opposite).
    done = [json.loads((out / f"probes_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert done[0]["losses_reused"] == done[1]["losses_reused"] > 0 and not done[0]["refuted"] and not done[1]["refuted"]


def _stablelr_only(record: dict) -> dict:
    return {key: value for key, value in record.items() if key.startswith("stablelr/") or key == "step"}


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_a_training_loss_one_rank_cannot_replay_ends_the_reuse_of_l0_on_every_rank(tmp_path: Path) -> None:
    # Rank 1's loss depends on global_step (its replay after the step differs), rank 0's does not: the
    # verification's flag is reduced with the losses, so both ranks stop reusing L0 and keep running the same
    # forward passes (forwards with collectives inside, e.g. SyncBatchNorm, would otherwise hang).
    out = tmp_path / "ramp"
    _run_ddp(out, "ddp", 240, "--rank-ramp", "0.001")
    done = [json.loads((out / f"probes_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert done[0]["probes"] == done[1]["probes"] >= 5
    assert [(d["losses_reused"], d["refuted"]) for d in done] == [(0, True), (0, True)]
    lrs = [_records(out / f"lr_rank{rank}.jsonl") for rank in (0, 1)]
    assert lrs[0] == lrs[1]


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_the_opt_in_boost_raises_the_lr_identically_on_every_rank(tmp_path: Path) -> None:
    # The rank-scaled data of the first test at a 100x smaller lr, with the boost on and G off (a boost never
    # acts against G): C > 1 comes from the reduced probe losses, so both ranks must boost alike at every check.
    out = tmp_path / "ddp_boost"
    config = {**CONFIG, "max_lr_boost": 10.0, "gap_strength": 0.0, "warmup_steps": 2, "decay_rate": 0.0}
    out.mkdir()
    command = [
        sys.executable, str(SCRIPT), "--out", str(out), "--epochs", str(EPOCHS), "--stablelr", json.dumps(config),
        "--strategy", "ddp", "--devices", "2", "--rank-scaled", "--lr", "0.002",
    ]  # fmt: skip
    run_multiprocess_script(command, REPO, out / "log.txt", 240)
    lrs = [_records(out / f"lr_rank{rank}.jsonl") for rank in (0, 1)]
    assert [r["step"] for r in lrs[0]] == list(range(STEPS)) and lrs[0] == lrs[1]
    factors = [[_stablelr_only(r) for r in _records(out / f"factors_rank{rank}.jsonl")] for rank in (0, 1)]
    assert factors[0] == factors[1]
    assert max(r["stablelr/stability_factor"] for r in factors[0]) > 1.0, "the boost never acted"
    assert max(r["stablelr/guard_boost"] for r in factors[0]) >= 1
