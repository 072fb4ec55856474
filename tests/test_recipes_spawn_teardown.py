"""``recipes.launch.SpawnedGroupTeardown``: a ddp_spawn rank ends its process group before its process exits."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from recipes import launch
from recipes.launch import SpawnedGroupTeardown


class _Linear(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _GroupAfterTeardown(L.Callback):
    """Listed after SpawnedGroupTeardown: records whether the rank's group still exists once it has run. Lightning
    sends rank 0's ``callback_metrics`` back to the main process after the teardown hooks."""

    def teardown(self, trainer, pl_module, stage):
        trainer.callback_metrics["group_initialized"] = torch.tensor(float(dist.is_initialized()))


def _fit(strategy: str, callbacks: list[L.Callback], devices: int = 2) -> L.Trainer:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(_Linear(), DataLoader(data, batch_size=8))
    return trainer


@pytest.mark.ddp
def test_a_spawned_rank_has_no_process_group_left_after_its_teardown():
    with_teardown = _fit("ddp_spawn", [SpawnedGroupTeardown(), _GroupAfterTeardown()])
    assert with_teardown.callback_metrics["group_initialized"].item() == 0.0
    # Without it the group outlives the fit inside the worker (what gloo's threads could abort on at exit).
    without = _fit("ddp_spawn", [_GroupAfterTeardown()])
    assert without.callback_metrics["group_initialized"].item() == 1.0


def test_other_strategies_keep_their_group_for_later_stages(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(launch, "finish_distributed", lambda: calls.append("finish"))
    trainer = _fit("auto", [SpawnedGroupTeardown()], devices=1)
    assert trainer.global_step == 2 and calls == []
