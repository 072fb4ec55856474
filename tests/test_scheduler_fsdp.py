"""StableLRScheduler with FSDP2 (``torch.distributed.fsdp.fully_shard``): 2 CPU processes over gloo.

``tests/scripts/fsdp2_scheduler.py`` trains a sharded MLP in a plain torch loop; each rank sees its own
batches (inputs scaled by ``1 + 2 r``), and rank 0's loss is NaN at one step. The guard probes by writing
the three points into each rank's local shards (the same Δθ everywhere) and averages the losses over the
ranks; ``protect`` maximises the non-finite flag over the ranks. So both ranks set the same lr at every
step, and no NaN reaches a shard; without ``protect`` (the control) the NaN does reach them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "fsdp2_scheduler.py"
REPO = Path(__file__).resolve().parents[1]
NAN_STEP = 6

pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 (fully_shard) needs torch >= 2.6")


def _free_port() -> int:
    """A port nobody listens on now (a fixed one can still be held by an earlier run's socket)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(out: Path, port: int, *extra: str) -> subprocess.CompletedProcess:
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--nan-step", str(NAN_STEP), "--port", str(port), *extra],
        env=env, timeout=300, capture_output=True, text=True,
    )  # fmt: skip


def _run(out: Path, port: int, *extra: str) -> list[dict]:
    run = _launch(out, port, *extra)
    assert run.returncode == 0, f"the 2-process FSDP2 run failed (exit {run.returncode}):\n{run.stderr[-4000:]}"
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_fsdp2_ranks_keep_the_same_lr_and_finite_shards_after_a_nan(tmp_path: Path) -> None:
    rank0, rank1 = _run(tmp_path / "protected", _free_port())
    assert rank0["sharded"] and rank1["sharded"]  # the parameters really are DTensor shards
    assert rank0["lrs"] == rank1["lrs"]  # bit-identical on every step
    assert len(set(rank0["lrs"])) > 2  # and the guard moved them
    assert rank0["checks"] == rank1["checks"] >= 8
    assert rank0["stability_factor"] == rank1["stability_factor"] < 1.0
    assert rank0["nonfinite_steps"] == rank1["nonfinite_steps"] == 1  # rank 0's NaN counted on both
    assert rank0["finite"] and rank1["finite"]
    assert rank0["local_sum"] != rank1["local_sum"]  # different shards (not a replicated model)

    control = _run(tmp_path / "control", _free_port(), "--no-protect")
    assert not control[0]["finite"] and not control[1]["finite"]


def test_fsdp2_training_loss_as_l0_on_every_rank_and_a_clear_error_when_only_some_ranks_pass_it(tmp_path: Path) -> None:
    # Sharded parameters: every forward all-gathers, so the ranks must run the same passes. With loss= on
    # both ranks the checks take L0 from it alike (the lrs stay identical); on rank 0 only, both ranks refuse
    # at the first check with the same message instead of hanging in a forward the other rank never runs.
    rank0, rank1 = _run(tmp_path / "all", _free_port(), "--pass-loss", "all")
    assert rank0["lrs"] == rank1["lrs"] and rank0["losses_reused"] == rank1["losses_reused"] > 0
    assert rank0["finite"] and rank1["finite"]
    out = tmp_path / "rank0"
    run = _launch(out, _free_port(), "--pass-loss", "rank0")
    assert run.returncode == 0, run.stderr[-4000:]
    for rank in range(2):
        message = (out / f"error_rank{rank}.txt").read_text()
        assert message.startswith("check_step(loss=...) was given on 50% of the ranks; pass it on every rank or on none")
