"""``recipes.train.train`` and ``recipes.eval.evaluate`` in-process: metrics, TensorBoard tags, exact lr
trajectories, exact resumes, and the helpers behind sweeps (summary table, DDP relaunch detection)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from recipes.errors import RecipeError
from recipes.eval import evaluate
from recipes.launch import relaunches_script, single_run_command, sweep_job_needs_child
from recipes.summary import collect_sweep, format_table, read_metrics, write_metrics, write_sweep_summary
from recipes.train import train
from tests.test_recipes_helpers import FAST, compose_train, with_output_dir

STABLELR_TAGS = {
    "stablelr/lr-SGD", "stablelr/decay", "stablelr/gap", "stablelr/gap_factor", "stablelr/stability_factor",
    "stablelr/step_margin", "stablelr/nonfinite_steps",
}  # fmt: skip
MONITOR_TAGS = {
    "lyapunov/delta_v", "lyapunov/decrease", "lyapunov/first_order", "lyapunov/curvature", "lyapunov/step_margin",
    "lyapunov/taylor_error", "lyapunov/certified_rate", "lyapunov/ema_decrease", "lyapunov/val_decrease",
    "lyapunov/sharpness", "lyapunov/stability_threshold", "lyapunov/eos_ratio", "connectivity/barrier",
    "connectivity/sublevel_excess", "connectivity/superlevel_dip", "connectivity/connected",
    "connectivity/equiconnectedness", "monitor/deferred_probes", "monitor/overhead",
}  # fmt: skip
RECIPE_TAGS = {"lr", "train_loss_step", "train_loss_epoch", "val_loss", "val_acc", "val_loss_best", "test_acc"}


def _scalars(run_dir: Path) -> tuple[EventAccumulator, dict[str, dict[int, float]]]:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    values = {tag: {event.step: event.value for event in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    return events, values


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The default job (StableLR + StabilityMonitor) for 2 epochs on the full 300-image train split,
    with the monitor measuring everything (monitor=full) so that every chart gets a point."""
    run_dir = tmp_path_factory.mktemp("digits_run")
    cfg = with_output_dir(
        compose_train(["trainer.max_epochs=2", "monitor=full", "debug.lr_trace=true",
                       "callbacks.progress_bar.refresh_rate=0"]),
        run_dir,
    )  # fmt: skip
    return run_dir, cfg, train(cfg)


@pytest.mark.slow
def test_default_job_returns_finite_metrics_and_writes_them(digits_run):
    run_dir, _, metrics = digits_run
    for key in ("val_loss", "val_acc", "val_loss_best", "val_acc_best", "val_loss_final_minus_best", "train_loss",
                "test_loss", "test_acc", "lr_end", "stablelr/gap_factor", "stablelr/stability_factor",
                "lyapunov/sharpness", "wall_time_s"):  # fmt: skip
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert metrics["epochs"] == 2.0 and metrics["global_step"] == 20.0  # 300 images / 32 per batch = 10 steps
    assert 0.5 < metrics["val_acc"] <= 1.0 and metrics["val_loss"] < math.log(10)
    assert metrics["val_loss_final_minus_best"] == metrics["val_loss"] - metrics["val_loss_best"] >= 0.0
    assert metrics["run_dir"] == str(run_dir.resolve())
    # metrics.json writes non-finite values (e.g. an infinite step margin: no positive curvature) as null,
    # read back as nan
    written = {k: (math.nan if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    assert read_metrics(run_dir) == pytest.approx(written, nan_ok=True)
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["best-epoch001.ckpt", "last.ckpt"]


@pytest.mark.slow
def test_default_job_writes_every_documented_tensorboard_tag(digits_run):
    run_dir, _, _ = digits_run
    events, scalars = _scalars(run_dir)
    missing = (STABLELR_TAGS | MONITOR_TAGS | RECIPE_TAGS) - set(scalars)
    assert not missing, f"missing tags: {sorted(missing)}"
    assert {"connectivity/path", "connectivity/pairwise"} <= set(events.Tags()["images"])
    hparams = yaml.safe_load((run_dir / "tensorboard" / "hparams.yaml").read_text())
    assert hparams["optimizer"]["lr"] == 0.03 and hparams["lr_policy"]["name"] == "stablelr"
    assert hparams["paths"]["output_dir"] == str(run_dir)  # the resolved config, not the interpolations


@pytest.mark.slow
def test_default_job_lr_is_the_stablelr_formula_from_the_optimizer_lr(digits_run):
    run_dir, _, _ = digits_run
    _, scalars = _scalars(run_dir)
    lrs = scalars["stablelr/lr-SGD"]
    assert len(lrs) >= 4
    for step, lr in lrs.items():
        decay = scalars["stablelr/decay"][step]
        assert decay == pytest.approx(math.exp(-0.03 * step / 10), rel=1e-6)  # t = step / steps_per_epoch
        warmup = min(1.0, (step + 1) / 20)  # warmup_steps: 20
        schedule = max(0.01, warmup * decay * scalars["stablelr/gap_factor"][step])  # the floor bounds the schedule
        assert lr == pytest.approx(0.03 * schedule * scalars["stablelr/stability_factor"][step], rel=1e-6)
        if step in scalars["lr"]:  # the Classifier's lr chart agrees (it has no point after a validation)
            assert scalars["lr"][step] == pytest.approx(lr, rel=1e-6)
    trace = json.loads((run_dir / "lr_trace" / "rank0.json").read_text())
    assert [record["step"] for record in trace] == list(range(20))
    assert max(lrs) == 20  # after the last validation: the lr a further step would use
    shared = [record for record in trace if record["step"] in lrs]
    assert len(shared) >= 3 and all(record["lr"][0] == pytest.approx(lrs[record["step"]], rel=1e-6) for record in shared)


def test_peer_policy_lr_trajectory_is_exact(tmp_path):
    cfg = with_output_dir(
        compose_train([FAST, "lr_policy=exponential", "monitor=off", "trainer.max_epochs=3", "debug.lr_trace=true"]),
        tmp_path,
    )  # fmt: skip
    metrics = train(cfg)
    trace = json.loads((tmp_path / "lr_trace" / "rank0.json").read_text())
    assert [record["step"] for record in trace] == list(range(12))  # 64 images / 16 = 4 steps per epoch
    assert [record["lr"][0] for record in trace] == pytest.approx(
        [0.03 * 0.97 ** (step // 4) for step in range(12)], rel=1e-12
    )
    assert metrics["lr_end"] == pytest.approx(0.03 * 0.97**2, rel=1e-6) and "test_acc" not in metrics


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_resuming_from_an_epoch_end_checkpoint_is_exact(tmp_path):
    common = [FAST, "monitor=off", "debug.lr_trace=true", "trainer.deterministic=true",
              "lr_policy.callback.dense_check_steps=4", "lr_policy.callback.check_every_n_steps=3"]
    straight = with_output_dir(compose_train(["trainer.max_epochs=4", *common]), tmp_path / "straight")
    first_half = with_output_dir(compose_train(["trainer.max_epochs=2", *common]), tmp_path / "interrupted")
    expected = train(straight)
    train(first_half)
    resumed_ckpt = tmp_path / "interrupted" / "checkpoints" / "epoch2.ckpt"
    shutil.copy(tmp_path / "interrupted" / "checkpoints" / "last.ckpt", resumed_ckpt)
    resumed = with_output_dir(
        compose_train(["trainer.max_epochs=4", f"ckpt_path={resumed_ckpt}", *common]), tmp_path / "interrupted"
    )
    metrics = train(resumed)
    final, reference = _weights(tmp_path / "interrupted/checkpoints/last.ckpt"), _weights(tmp_path / "straight/checkpoints/last.ckpt")
    assert final.keys() == reference.keys()
    for name in reference:
        assert torch.equal(final[name], reference[name]), name
    full = json.loads((tmp_path / "straight" / "lr_trace" / "rank0.json").read_text())
    tail = json.loads((tmp_path / "interrupted" / "lr_trace" / "rank0.json").read_text())
    assert [record["step"] for record in tail] == list(range(8, 16))
    assert tail == full[8:]
    assert metrics["val_loss"] == expected["val_loss"] and metrics["lr_end"] == expected["lr_end"]


@pytest.mark.slow
def test_eval_reproduces_the_training_validation_and_explains_mismatches(digits_run, tmp_path):
    run_dir, _, trained = digits_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    cfg = with_output_dir(compose_train([f"ckpt_path={ckpt}"], config_name="eval"), tmp_path / "eval")
    metrics = evaluate(cfg)
    assert metrics["val_loss"] == pytest.approx(trained["val_loss"], rel=1e-6)
    assert metrics["val_acc"] == pytest.approx(trained["val_acc"], rel=1e-6)
    assert metrics["test_acc"] == pytest.approx(trained["test_acc"], rel=1e-6)
    assert read_metrics(tmp_path / "eval")["ckpt_path"] == str(ckpt.resolve())

    # a checkpoint inside a Hydra run directory: the error lists the training run's overrides
    layout = tmp_path / "run"
    (layout / "checkpoints").mkdir(parents=True)
    (layout / ".hydra").mkdir()
    shutil.copy(ckpt, layout / "checkpoints" / "last.ckpt")
    (layout / ".hydra" / "overrides.yaml").write_text("- model=mlp\n- trainer.max_epochs=2\n")
    wrong = with_output_dir(
        compose_train([f"ckpt_path={layout / 'checkpoints' / 'last.ckpt'}", "model=cnn"], config_name="eval"),
        tmp_path / "eval2",
    )
    with pytest.raises(RecipeError) as caught:
        evaluate(wrong)
    assert str(caught.value) == (
        f"The weights in {layout / 'checkpoints' / 'last.ckpt'} do not fit model=SmallCNN on this data config. "
        "Pass the same data=/model= overrides as the training run. The training run used: model=mlp "
        "trainer.max_epochs=2."
    )


def test_eval_requires_an_existing_checkpoint(tmp_path):
    with pytest.raises(RecipeError, match=r"Missing required value\(s\): ckpt_path. .* `python -m recipes.eval "
                                          r"ckpt_path=<value>`"):
        evaluate(with_output_dir(compose_train([], config_name="eval"), tmp_path))
    with pytest.raises(RecipeError, match=r"ckpt_path=/nonexistent.ckpt is not a file. Pass a checkpoint written "
                                          r"by recipes.train"):
        evaluate(with_output_dir(compose_train(["ckpt_path=/nonexistent.ckpt"], config_name="eval"), tmp_path))


def test_sweep_summary_table(tmp_path):
    for job, (policy, loss) in enumerate([("stablelr", 0.25), ("plateau", float("nan")), ("constant", 0.5)]):
        write_metrics(tmp_path / str(job), {"val_loss": loss, "val_acc": 0.9, "lr_end": 0.03, "run_dir": "x"})
        (tmp_path / str(job) / ".hydra").mkdir()
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(f"- lr_policy={policy}\n")
    (tmp_path / "10").mkdir()  # a job that wrote nothing is left out
    rows, json_path = write_sweep_summary(tmp_path)
    assert [row["job"] for row in rows] == ["0", "1", "2"]
    assert math.isnan(rows[1]["val_loss"]) and json.loads(json_path.read_text())[0]["overrides"] == "lr_policy=stablelr"
    assert format_table(collect_sweep(tmp_path), ("val_loss", "val_acc")).splitlines() == [
        "job  val_loss  val_acc  overrides",
        "0    0.25      0.9      lr_policy=stablelr",
        "1    nan       0.9      lr_policy=plateau",
        "2    0.5       0.9      lr_policy=constant",
    ]
    assert (tmp_path / "multirun_summary.csv").read_text().splitlines()[0] == "job,overrides,lr_end,run_dir,val_acc,val_loss"


def test_only_relaunching_strategies_run_sweep_jobs_as_child_processes(tmp_path):
    def trainer(*overrides: str):
        return with_output_dir(compose_train(list(overrides)), tmp_path).trainer

    assert relaunches_script(trainer("trainer=ddp_cpu")) is True
    assert relaunches_script(trainer("trainer=ddp", "trainer.accelerator=cpu", "trainer.sync_batchnorm=false")) is True
    assert relaunches_script(trainer("trainer=ddp_sim")) is False
    assert relaunches_script(trainer("trainer=cpu")) is False
    assert sweep_job_needs_child(with_output_dir(compose_train(["trainer=ddp_cpu"]), tmp_path)) is False


def test_single_run_command_of_a_sweep_job():
    hydra_cfg = OmegaConf.create({
        "runtime": {"config_sources": [
            {"provider": "main", "path": "/repo/conf", "schema": "file"},
            {"provider": "command-line", "path": "/extra/conf", "schema": "file"},
        ]},
        "job": {"config_name": "train"},
        "overrides": {"task": ["trainer=ddp_cpu", "lr_policy=plateau", "+debug.extra=1"]},
    })  # fmt: skip
    assert single_run_command("/sweep/3", hydra_cfg, entry=["python", "-m", "recipes.train"]) == [
        "python", "-m", "recipes.train", "--config-dir", "/extra/conf", "--config-name", "train",
        'hydra.run.dir="/sweep/3"', "hydra.output_subdir=null", "hydra.mode=RUN",
        "trainer=ddp_cpu", "lr_policy=plateau", "+debug.extra=1",
    ]  # fmt: skip


def test_a_missing_ckpt_path_is_refused_before_anything_is_built(tmp_path):
    # Before, it reached trainer.fit and ended in Lightning's FileNotFoundError traceback.
    missing = tmp_path / "nope" / "last.ckpt"
    cfg = with_output_dir(compose_train([FAST, f"ckpt_path={missing}"]), tmp_path / "run")
    with pytest.raises(RecipeError) as info:
        train(cfg)
    assert str(info.value) == (
        f"ckpt_path={missing} is not a file. Resume from a checkpoint recipes.train wrote, e.g. "
        "ckpt_path=outputs/runs/<date>_<time>/checkpoints/last.ckpt, with the same overrides as that run."
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_resuming_a_run_that_already_ended_says_nothing_was_left_to_train(tmp_path):
    # Before: "optimized_metric='val_loss' is not among the final metrics", as if the config were wrong.
    finished = with_output_dir(compose_train([FAST, "monitor=off"]), tmp_path / "finished")
    train(finished)
    ckpt = tmp_path / "finished" / "checkpoints" / "last.ckpt"
    again = with_output_dir(compose_train([FAST, "monitor=off", f"ckpt_path={ckpt}"]), tmp_path / "again")
    with pytest.raises(RecipeError) as info:
        train(again)
    assert str(info.value).startswith(f"ckpt_path={ckpt} had already trained to the end of this run (epoch 2, step 8;")
    assert "nothing was left to train. Raise trainer.max_epochs or trainer.max_steps to continue it" in str(info.value)
