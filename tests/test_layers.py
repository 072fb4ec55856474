"""The layers of docs/ARCHITECTURE.md, enforced: pure modules, private Lightning access, the check cadence."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from packaging.version import Version

from lightning_stablelr.callbacks._lightning_access import log_step, log_to_loggers, put_callback_metrics
from lightning_stablelr.callbacks._optimizers import param_group_lr_names
from lightning_stablelr.config import CheckCadence

ROOT = Path(__file__).resolve().parents[1]


def _pure_modules() -> list[str]:
    """Every module docs/ARCHITECTURE.md marks ``pure`` in its module map."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = text.split("```", 2)[1]
    modules, package = [], ""
    for line in block.splitlines():
        if re.match(r"^\s{2}(\w+)/\s*$", line):
            package = re.match(r"^\s{2}(\w+)/", line).group(1) + "."
        match = re.match(r"^\s+([\w/]+)\.py\s+pure\b", line)
        if match:
            modules.append("lightning_stablelr." + package + match.group(1))
    return modules


def test_every_module_the_architecture_calls_pure_imports_no_lightning_hydra_or_recipes():
    modules = _pure_modules()
    assert len(modules) >= 15, modules  # the map was parsed
    code = f"import sys, importlib; [importlib.import_module(m) for m in {modules!r}]; " + (
        "print(sorted(m for m in ('lightning', 'hydra', 'recipes') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_private_lightning_access_works_on_the_installed_lightning(tmp_path):
    # The supported range is pyproject's `lightning>=2.2`; _lightning_access.py is the only module to adapt.
    assert Version(lightning.__version__) >= Version("2.2")
    seen = {}

    class Probe(lightning.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.setdefault("steps", []).append(log_step(trainer))
            put_callback_metrics(trainer, {"probe/value": 1.5})
            log_to_loggers(trainer, {"probe/value": 2.5})

    trainer = lightning.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                                default_root_dir=tmp_path, enable_model_summary=False, callbacks=[Probe()])
    trainer.fit(BoringModel())
    # _batches_that_stepped, the step self.log writes at: incremented after on_train_batch_end
    assert seen["steps"] == [0, 1, 2]
    assert float(trainer.callback_metrics["probe/value"]) == 1.5  # _logger_connector._callback_metrics
    assert isinstance(trainer._logger_connector.should_update_logs, bool)


def test_check_cadence_is_dense_early_then_every_n_th_step():
    cadence = CheckCadence(check_every_n_steps=5, dense_check_steps=3)
    assert [step for step in range(16) if cadence.should_check(step)] == [0, 1, 2, 4, 9, 14]
    assert not any(CheckCadence(0, 0).should_check(step) for step in range(100))
    with pytest.raises(ValueError, match=r"`check_every_n_steps` must be an integer >= 0, got -1"):
        CheckCadence(-1, 0)


def test_lr_names_follow_learning_rate_monitor_and_duplicate_group_names_raise():
    def sgd(*names):
        groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], **({"name": n} if n else {})} for n in names]
        return torch.optim.SGD(groups, lr=0.1)

    names = param_group_lr_names([sgd(None), sgd("a", "b"), torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])])
    assert names == {(0, 0): "stablelr/lr-SGD", (1, 0): "stablelr/lr-SGD-1/a", (1, 1): "stablelr/lr-SGD-1/b",
                     (2, 0): "stablelr/lr-Adam"}
    assert param_group_lr_names([sgd(None, None)]) == {(0, 0): "stablelr/lr-SGD/pg1", (0, 1): "stablelr/lr-SGD/pg2"}
    with pytest.raises(MisconfigurationException, match=r"several param groups named \['a'\]"):
        param_group_lr_names([sgd("a", "a")])
