"""The entry points as users run them (subprocesses): DDP through Hydra, sweeps with and without DDP, and
short, clear messages for bad command lines. Every run has a timeout: a hang fails the test."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from recipes.summary import read_metrics
from tests.test_recipes_helpers import FAST, describe, run_module

pytestmark = pytest.mark.slow

# Generous: a DDP run takes ~15 s on an idle 2-core machine, but rank 1 imports torch and Lightning
# from scratch and CI machines are shared.
TIMEOUT = 240
QUICK = [FAST]


def _hydra_dirs(root: Path) -> list[Path]:
    return sorted(path.parent for path in root.rglob(".hydra"))


def _lr_traces(run_dir: Path) -> list[list[dict]]:
    return [json.loads((run_dir / "lr_trace" / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.ddp
def test_ddp_cpu_single_run_one_directory_same_lr_on_both_ranks(tmp_path):
    run_dir = tmp_path / "run"
    result = run_module(
        ["trainer=ddp_cpu", f"hydra.run.dir={run_dir}", "debug.lr_trace=true", *QUICK], cwd=tmp_path, timeout=TIMEOUT
    )
    assert result.returncode == 0, describe(result)
    assert _hydra_dirs(tmp_path) == [run_dir]  # rank 1 wrote no .hydra/ and no directory of its own
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]
    assert (run_dir / "train.log").is_file() and (run_dir / "train_ddp_process_1.log").is_file()
    assert "[rank: 1] Seed set to 0" in (run_dir / "train_ddp_process_1.log").read_text()
    rank0, rank1 = _lr_traces(run_dir)
    # 64 images over 2 ranks, 16 per batch: 2 steps per epoch; StableLR checks every one of them (dense)
    assert [record["step"] for record in rank0] == [0, 1, 2, 3]
    assert rank0 == rank1
    assert rank0[-1]["lr"][0] < 0.03  # the decay ran: exp(-0.03 * t) < 1
    metrics = read_metrics(run_dir)
    assert metrics["global_step"] == 4.0 and math.isfinite(metrics["val_loss"])
    # the closing lines: the report command on the event files, TensorBoard on the folder above the run
    assert result.stdout.rstrip().splitlines()[-2:] == [
        f"   what happened:  stablelr report {run_dir.resolve() / 'tensorboard'}",
        f"   charts:         tensorboard --logdir {tmp_path.resolve()}   (Custom Scalars tab)",
    ]


@pytest.mark.ddp
def test_fsdp_recipe_shards_the_net_and_keeps_both_ranks_on_one_lr(tmp_path):
    # trainer=fsdp is for GPUs; on 2 CPU processes (gloo) the same ModelParallelStrategy and FSDP2 sharding run.
    run_dir = tmp_path / "run"
    result = run_module(
        ["trainer=fsdp", "trainer.accelerator=cpu", f"hydra.run.dir={run_dir}", "debug.lr_trace=true", *QUICK],
        cwd=tmp_path, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, describe(result)
    rank0, rank1 = _lr_traces(run_dir)
    assert [record["step"] for record in rank0] == [0, 1, 2, 3]
    assert rank0 == rank1
    metrics = read_metrics(run_dir)
    assert metrics["global_step"] == 4.0 and math.isfinite(metrics["val_loss"])
    # The parameters were DTensor shards: the monitor's sharpness said so, once, from rank 0.
    assert (result.stderr + result.stdout).count("sharpness is not supported on sharded (DTensor, FSDP2)") == 1


@pytest.mark.ddp
def test_multirun_with_ddp_sim_runs_in_the_sweep_process(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_module(
        ["-m", "trainer=ddp_sim", "lr_policy=stablelr,constant", "monitor=off", f"hydra.sweep.dir={sweep}", *QUICK],
        cwd=tmp_path,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, describe(result)
    assert _hydra_dirs(tmp_path) == [sweep / "0", sweep / "1"]
    summary = json.loads((sweep / "multirun_summary.json").read_text())
    assert [row["overrides"].split()[1] for row in summary] == ["lr_policy=stablelr", "lr_policy=constant"]
    assert all(math.isfinite(row["val_loss"]) and row["global_step"] == 4.0 for row in summary)
    assert summary[1]["lr_end"] == pytest.approx(0.03)
    assert "single run" not in result.stdout + result.stderr  # spawn needs no child run


@pytest.mark.ddp
def test_multirun_with_ddp_cpu_runs_each_job_as_a_single_run_child(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_module(
        ["-m", "trainer=ddp_cpu", "lr_policy=stablelr,exponential", "monitor=off", "debug.lr_trace=true",
         f"hydra.sweep.dir={sweep}", *QUICK],
        cwd=tmp_path,
        timeout=2 * TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, describe(result)
    assert _hydra_dirs(tmp_path) == [sweep / "0", sweep / "1"]  # no rank started a sweep or a run of its own
    assert sorted(path.name for path in tmp_path.iterdir()) == ["sweep"]
    for job, policy in ((0, "stablelr"), (1, "exponential")):
        job_dir = sweep / str(job)
        assert (job_dir / "train_ddp_process_1.log").is_file()
        assert f"lr_policy={policy}" in (job_dir / ".hydra" / "overrides.yaml").read_text()
        rank0, rank1 = _lr_traces(job_dir)
        assert rank0 == rank1 and len(rank0) == 4
    exponential = _lr_traces(sweep / "1")[0]
    assert [record["lr"][0] for record in exponential] == pytest.approx([0.03, 0.03, 0.0291, 0.0291], rel=1e-9)
    summary = json.loads((sweep / "multirun_summary.json").read_text())
    assert [row["job"] for row in summary] == ["0", "1"] and summary[1]["lr_end"] == pytest.approx(0.0291)
    assert result.stderr.count("running it as a single run") + result.stdout.count("running it as a single run") == 2


def test_policy_comparison_sweep_reports_every_run(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_module(
        ["-m", "lr_policy=stablelr,exponential,plateau", "monitor=off", f"hydra.sweep.dir={sweep}", *QUICK],
        cwd=tmp_path,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, describe(result)
    summary = json.loads((sweep / "multirun_summary.json").read_text())
    policies = [row["overrides"].split()[0] for row in summary]
    assert policies == ["lr_policy=stablelr", "lr_policy=exponential", "lr_policy=plateau"]
    for row in summary:
        assert math.isfinite(row["val_loss"]) and 0.0 < row["val_acc"] <= 1.0
        assert row == pytest.approx(read_metrics(sweep / row["job"]) | {"job": row["job"], "overrides": row["overrides"]})
    assert (sweep / "multirun_summary.csv").read_text().count("\n") == 4
    table = result.stdout[result.stdout.index("multirun_summary (3 runs, sorted by val_loss)"):].splitlines()
    assert table[1].split()[:3] == ["job", "val_loss", "val_acc"] and len(table) == 5


def _short_error(result, expected_code: int) -> str:
    assert result.returncode == expected_code, describe(result)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) < 15, f"{len(lines)} lines:\n" + "\n".join(lines)
    assert "Traceback" not in result.stderr
    return " ".join(" ".join(lines).split())


def test_bad_command_lines_give_short_clear_messages(tmp_path):
    run = f"hydra.run.dir={tmp_path / 'run'}"
    no_gpu = {"CUDA_VISIBLE_DEVICES": ""}  # the same message on machines with GPUs
    commands = {
        "unknown": (["lr_policy=foo", run], "recipes.train", None),
        "gpu": (["trainer=gpu", run], "recipes.train", no_gpu),
        "missing": (["optimizer.lr=???", run], "recipes.train", None),
        "mismatch": (["lr_policy=cosine", "lr_policy.scheduler.eta_min=0.5", run], "recipes.train", None),
        "no_ckpt": ([run], "recipes.eval", None),
    }
    # independent processes: run them side by side, each under its own timeout
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {
            name: pool.submit(run_module, args, cwd=tmp_path, timeout=TIMEOUT, module=module, env=env)
            for name, (args, module, env) in commands.items()
        }
        results = {name: future.result() for name, future in futures.items()}

    unknown = _short_error(results["unknown"], 1)  # Hydra's own message
    assert "Could not find 'lr_policy/foo'" in unknown
    assert "Available options in 'lr_policy': constant cosine exponential plateau stablelr" in unknown
    assert _short_error(results["gpu"], 2) == (
        "recipes.train: configuration error trainer.accelerator=gpu (strategy auto) needs a CUDA GPU, but "
        "torch.cuda.is_available() is False on this machine. Use trainer=cpu for one CPU process, or "
        "trainer=ddp_cpu (real DDP, 2 CPU processes over gloo) / trainer=ddp_sim (ddp_spawn) to test DDP without "
        "GPUs."
    )
    assert _short_error(results["missing"], 2) == (
        "recipes.train: configuration error Missing required value(s): optimizer.lr. These are marked `???` in "
        "the config and have no default; set them on the command line, e.g. `python -m recipes.train "
        "optimizer.lr=<value>`."
    )
    assert "lr_policy=cosine anneals down to eta_min=0.5, which is not below optimizer.lr=0.03" in _short_error(
        results["mismatch"], 2
    )
    assert "recipes.eval: configuration error Missing required value(s): ckpt_path." in _short_error(
        results["no_ckpt"], 2
    )
    assert not (tmp_path / "run" / "metrics.json").exists()
