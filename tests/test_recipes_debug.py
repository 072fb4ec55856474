"""conf/debug/: the fast, overfit-one-batch and profiler modes, run in-process; and a quiet terminal."""

from __future__ import annotations

import json
import logging
import warnings

import pytest

from recipes.eval import evaluate
from recipes.quiet import TIP_PREFIX, quiet_third_party
from recipes.train import train
from tests.test_recipes_helpers import FAST, compose_train, with_output_dir


def test_fast_mode_runs_two_short_epochs(tmp_path):
    metrics = train(with_output_dir(compose_train([FAST, "monitor=off"]), tmp_path))
    # 64 images, 16 per batch: 4 optimizer steps per epoch, 2 epochs, no test pass.
    assert metrics["global_step"] == 8.0 and metrics["epochs"] == 2.0
    assert "test_acc" not in metrics
    assert json.loads((tmp_path / "metrics.json").read_text())["global_step"] == 8.0


@pytest.mark.slow
def test_overfit_mode_memorises_one_batch(tmp_path):
    cfg = with_output_dir(compose_train(["debug=overfit", "debug.lr_trace=true"]), tmp_path)
    assert cfg.trainer.overfit_batches == 1 and "_target_" not in cfg.monitor
    metrics = train(cfg)
    # One batch per epoch: 40 epochs are 40 optimizer steps on the same 32 images.
    assert metrics["global_step"] == 40.0
    trace = json.loads((tmp_path / "lr_trace" / "rank0.json").read_text())
    assert len(trace) == 40
    # Chance level is ln(10) = 2.30; the one batch is learnt (measured 0.18 with StableLR at lr 0.03).
    assert metrics["train_loss_epoch"] < 0.1 * 2.3026


def test_profiler_mode_times_the_callback_hooks(tmp_path):
    metrics = train(with_output_dir(compose_train(["debug=profiler", "data.train_size=64", "data.batch_size=16",
                                                   "callbacks.progress_bar.refresh_rate=0"]), tmp_path))
    assert metrics["epochs"] == 1.0 and metrics["global_step"] == 4.0
    profile = (tmp_path / "fit-profile.txt").read_text()
    stablelr_rows = [line for line in profile.splitlines() if "[Callback]StableLR" in line and "on_train_batch_end" in line]
    assert len(stablelr_rows) == 1
    # columns: action | mean duration | num calls | total | percentage
    assert int(stablelr_rows[0].split("|")[3]) == 4
    assert "[Callback]StabilityMonitor" in profile


def test_eval_needs_no_optimizer_or_lr_policy(tmp_path):
    run = tmp_path / "run"
    train(with_output_dir(compose_train([FAST, "monitor=off"]), run))
    # the data split of debug=fast; eval composes no debug group
    cfg = compose_train([f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "data.train_size=64", "data.val_size=64",
                         "data.batch_size=16"], config_name="eval")
    assert "optimizer" not in cfg and "lr_policy" not in cfg
    metrics = evaluate(with_output_dir(cfg, tmp_path / "eval"))
    assert metrics["val_loss"] == pytest.approx(json.loads((run / "metrics.json").read_text())["val_loss"], rel=1e-6)


def test_quiet_third_party_drops_exactly_the_known_noise(caplog):
    quiet_third_party()
    quiet_third_party()  # idempotent
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert sum(type(f).__name__ == "TipFilter" for f in logger.filters) == 1
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info(f"{TIP_PREFIX} For seamless cloud logging, try installing [litlogger]")
        logger.info("GPU available: False, used: False")
    assert [record.getMessage() for record in caplog.records] == ["GPU available: False, used: False"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_third_party()
        from torch.utils._pytree import LeafSpec

        LeafSpec()
        warnings.warn("another FutureWarning", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another FutureWarning"]


def test_progress_bar_v_num_is_the_run_directory(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger

    from recipes.quiet import RunProgressBar

    # What Lightning's bar shows for the recipes' logger (version "tensorboard"): its last 4 characters.
    monkeypatch.setattr(TQDMProgressBar, "get_metrics", lambda self, trainer, module: {"v_num": "oard", "loss": 1.5})

    class _Trainer:
        loggers = [TensorBoardLogger(save_dir=str(tmp_path / "2026-01-02_03-04-05"), name="", version="tensorboard")]

    assert RunProgressBar().get_metrics(_Trainer(), None) == {"v_num": "2026-01-02_03-04-05", "loss": 1.5}
