"""Resume exactness: a SIGKILLed and resumed run equals an uninterrupted one, lr for lr and bit for bit.

``tests/scripts/train_stablelr.py`` runs in real subprocesses. Run A trains ``EPOCHS`` epochs without
interruption. Run B is the same command, but the script SIGKILLs itself right before optimizer step
``KILL_STEP`` (in the middle of an epoch, after ``last.ckpt`` of the previous epoch was written); then it is
started again with ``ckpt_path=last.ckpt``. The steps of the interrupted epoch are done twice in B: the
second time is the one that counts (the last value per step), as ``stablelr report`` reads it.

If this test fails, run the script by hand with ``--stablelr off`` (no callback) the same way: the harness
alone is exact (checked when the test was written), so a difference with StableLR is StableLR's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "train_stablelr.py"
REPO = Path(__file__).resolve().parents[1]
EPOCHS = 5
STEPS_PER_EPOCH = 6  # --train-size 24 / --batch-size 4
CHECKPOINT_EPOCH = 2  # last.ckpt holds the end of epoch 2 (0-based) when the kill happens
KILL_STEP = (CHECKPOINT_EPOCH + 1) * STEPS_PER_EPOCH + 2  # two steps into epoch 3
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH

# The validation targets are noisier (std 2) than the training targets (std 1), so the relative gap is
# about 0.5 from the first validation on; with min_delta = 100 only the first validation counts as an
# improvement, so G shrinks at every later validation and last.ckpt holds G < 1 whatever the optimizer
# did. The lr is high (SGD 0.2, momentum 0.9) and the checks dense, so the guard moves C before and after
# the kill (with a band narrow enough for this healthy lr).
CONFIG = {
    "decay_rate": 0.2,
    "min_delta": 100.0,
    "check_every_n_steps": 2,
    "dense_check_steps": 4,
    # a strict band (cut below s = 4, grow above 8) and a short window keep C moving on this healthy run
    "safety": 0.25,
    "recover_above": 8.0,
    "guard_window": 1,
}


def _run(out: Path, *extra: str) -> subprocess.Popen:
    command = [
        sys.executable, str(SCRIPT), "--out", str(out), "--epochs", str(EPOCHS), "--val-noise", "2.0",
        "--stablelr", json.dumps(CONFIG),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    log = (out.parent / f"{out.name}.log").open("ab")
    return subprocess.Popen([*command, *extra], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait(process: subprocess.Popen, log: Path, expected_rc: int = 0, timeout: float = 240) -> None:
    try:
        rc = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"training script hung; log:\n{log.read_text()[-4000:]}") from None
    assert rc == expected_rc, (
        f"script exited with {rc}, expected {expected_rc}; log:\n{log.read_text()[-4000:]}"
    )


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _lr_by_step(path: Path) -> dict[int, list[float]]:
    """Per-step lrs, the last record per global step winning (a resumed run redoes the killed epoch)."""
    return {record["step"]: record["lrs"] for record in _records(path)}


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"weights differ after resume: {different}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_and_resume_reproduce_the_uninterrupted_run(tmp_path: Path) -> None:
    run_a, run_b = tmp_path / "A", tmp_path / "B"
    # A and the first half of B are independent: run them side by side on the two cores.
    process_a = _run(run_a)
    process_b = _run(run_b, "--kill-at-step", str(KILL_STEP))
    _wait(process_b, tmp_path / "B.log", expected_rc=-signal.SIGKILL)
    killed_steps = [record["step"] for record in _records(run_b / "lr_rank0.jsonl")]
    assert killed_steps == list(range(KILL_STEP)), "the kill must come right before step KILL_STEP"
    assert not (run_b / "done_rank0.json").exists()
    checkpoint = torch.load(run_b / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == (CHECKPOINT_EPOCH + 1) * STEPS_PER_EPOCH

    _wait(_run(run_b, "--resume"), tmp_path / "B.log")
    _wait(process_a, tmp_path / "A.log")

    resumed_steps = [record["step"] for record in _records(run_b / "lr_rank0.jsonl")][KILL_STEP:]
    assert resumed_steps == list(range(checkpoint["global_step"], TOTAL_STEPS)), "resume must redo epoch 3"
    # Lightning handed the sampler the same epochs: the killed epoch 3 is started twice in B.
    assert [r["epoch"] for r in _records(run_a / "sampler_epochs_rank0.jsonl")] == list(range(EPOCHS))
    assert [r["epoch"] for r in _records(run_b / "sampler_epochs_rank0.jsonl")] == [0, 1, 2, 3, 3, 4]

    lrs_a, lrs_b = _lr_by_step(run_a / "lr_rank0.jsonl"), _lr_by_step(run_b / "lr_rank0.jsonl")
    assert sorted(lrs_a) == list(range(TOTAL_STEPS))
    mismatches = {step: (lrs_a[step], lrs_b.get(step)) for step in lrs_a if lrs_a[step] != lrs_b.get(step)}
    assert not mismatches, (
        f"lr trajectory differs after resume (step: (uninterrupted, resumed)): {mismatches}"
    )
    _assert_same_weights(
        torch.load(run_a / "final_rank0.pt", weights_only=True),
        torch.load(run_b / "final_rank0.pt", weights_only=True),
    )
    assert json.loads((run_b / "done_rank0.json").read_text()) == {
        "global_step": TOTAL_STEPS,
        "current_epoch": EPOCHS,
    }

    _assert_controller_state_was_exercised(run_a, lrs_a)


def _assert_controller_state_was_exercised(run: Path, lrs: dict[int, list[float]]) -> None:
    """The resumed state is not trivial: G and C had moved away from 1 in ``last.ckpt`` before the kill."""
    factors = _records(run / "factors_rank0.jsonl")
    at_checkpoint = next(r for r in factors if r["where"] == "epoch" and r["epoch"] == CHECKPOINT_EPOCH)
    assert at_checkpoint["stablelr/gap_factor"] < 1.0, f"G never changed before the kill: {at_checkpoint}"
    assert min(r["stablelr/stability_factor"] for r in factors if r["step"] <= KILL_STEP) < 1.0, (
        "the guard never shrank C before the kill"
    )
    after_kill = {r["stablelr/stability_factor"] for r in factors if r["step"] > KILL_STEP}
    assert len(after_kill) > 1, "the guard must keep changing C after the resume point"
    # Two groups keep their 2:1 base-lr ratio through every factor.
    for step, (body, head) in lrs.items():
        assert head == pytest.approx(body / 2, rel=1e-12), step
    assert lrs[TOTAL_STEPS - 1][0] < 0.2 * 0.5, "decay, G and C together must have lowered the lr"
