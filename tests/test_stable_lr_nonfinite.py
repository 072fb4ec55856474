"""Non-finite values: a NaN loss and an Inf gradient never reach the weights, halve C and are counted.

A tiny regressor trains 12 SGD steps (one epoch, no validation). At step ``NAN_LOSS_STEP`` its loss is NaN
(so are all its gradients); at step ``INF_GRAD_STEP`` one gradient entry is set to Inf in
``on_after_backward``. The guard's line checks are switched off, so that the lr differs from the run
without events only through the non-finite halvings of the stability factor ``C``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stablelr import StableLR

NAN_LOSS_STEP = 3
INF_GRAD_STEP = 7
STEPS = 12
BASE_LR = 0.05
# No line checks (the first would come after the run) and no validation: C moves only on non-finite steps.
# nonfinite_test="gradients": the Inf gradient comes with a finite loss, which the default loss test passes.
NO_LINE_CHECKS = {
    "decay_rate": 0.5, "check_every_n_steps": 10_000, "dense_check_steps": 0, "warmup_steps": 10,
    "nonfinite_test": "gradients",
}  # fmt: skip


class FaultyRegressor(L.LightningModule):
    """``Linear(4, 1)`` on a fixed regression set; injects a NaN loss and an Inf gradient at given steps."""

    def __init__(self, nan_loss_step: int | None, inf_grad_step: int | None) -> None:
        super().__init__()
        self.nan_loss_step = nan_loss_step
        self.inf_grad_step = inf_grad_step
        self.layer = nn.Linear(4, 1)
        self.lrs: dict[int, float] = {}

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.layer(x), y)
        if self.global_step == self.nan_loss_step:
            loss = loss * float("nan")
        self.log("train_loss", loss)
        return loss

    def on_after_backward(self) -> None:
        if self.global_step == self.inf_grad_step:
            self.layer.weight.grad[0, 0] = float("inf")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=BASE_LR, momentum=0.9)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        optimizer.step(closure=optimizer_closure)
        self.lrs[self.global_step] = optimizer.param_groups[0]["lr"]  # the lr this step used

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(STEPS * 4, 4, generator=generator)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(
            STEPS * 4, 1, generator=generator
        )
        return DataLoader(TensorDataset(x, y), batch_size=4)


def _fit(tmp_path: Path, name: str, *, events: bool, **stablelr) -> tuple[FaultyRegressor, L.Trainer]:
    L.seed_everything(0, verbose=False)
    model = FaultyRegressor(NAN_LOSS_STEP if events else None, INF_GRAD_STEP if events else None)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_val_batches=0,
        deterministic=True,
        callbacks=[StableLR(**NO_LINE_CHECKS, **stablelr)],
        logger=CSVLogger(tmp_path, name=name),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    return model, trainer


def _nonfinite_params(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]


def _logged_by_step(trainer: L.Trainer, key: str) -> dict[int, float]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(handle) if row.get(key)}


def test_nan_loss_and_inf_grad_are_skipped_halve_the_lr_and_are_counted(tmp_path: Path) -> None:
    reference, _ = _fit(tmp_path, "reference", events=False)
    with pytest.warns(UserWarning, match=r"non-finite loss or gradient at step \d") as reports:
        model, trainer = _fit(tmp_path, "events", events=True)
    reported = [str(r.message) for r in reports if "non-finite" in str(r.message)]
    assert [f"step {NAN_LOSS_STEP};" in m for m in reported] == [True, False]
    assert [f"step {INF_GRAD_STEP};" in m for m in reported] == [False, True]

    assert trainer.global_step == STEPS
    assert _nonfinite_params(model) == [], "a non-finite step reached the weights"
    assert sorted(model.lrs) == sorted(reference.lrs) == list(range(STEPS))
    for step in range(STEPS):
        ratio = model.lrs[step] / reference.lrs[step]
        if step < NAN_LOSS_STEP:
            assert ratio == 1.0, step
        elif NAN_LOSS_STEP < step < INF_GRAD_STEP:
            assert ratio == pytest.approx(0.5, rel=1e-12), f"C not halved after the NaN loss at step {step}"
        elif step > INF_GRAD_STEP:
            assert ratio == pytest.approx(0.25, rel=1e-12), (
                f"C not halved again after the Inf grad at step {step}"
            )
    # The reference lr is pure decay: exp(-0.5 * t) with t = step / 12.
    assert reference.lrs[STEPS - 1] == pytest.approx(BASE_LR * math.exp(-0.5 * (STEPS - 1) / STEPS), rel=1e-9)

    assert float(trainer.callback_metrics["stablelr/nonfinite_steps"]) == 2.0
    assert float(trainer.callback_metrics["stablelr/stability_factor"]) == pytest.approx(0.25)
    # The CSV logger got the count at every step: 0 up to the NaN step, 1 up to the Inf step, then 2 (and at the
    # epoch's end, step STEPS: the next step's point).
    logged = _logged_by_step(trainer, "stablelr/nonfinite_steps")
    assert logged == {step: float((step > NAN_LOSS_STEP) + (step > INF_GRAD_STEP)) for step in range(STEPS + 1)}
    factors = _logged_by_step(trainer, "stablelr/stability_factor")
    assert factors == {step: 0.5 ** logged[step] for step in range(STEPS + 1)}


def test_without_skipping_the_nan_reaches_the_weights(tmp_path: Path) -> None:
    # The control that shows the test above can fail: the same events, not skipped, poison the weights.
    model, trainer = _fit(tmp_path, "unskipped", events=True, skip_nonfinite=False)
    assert trainer.global_step == STEPS
    assert _nonfinite_params(model) == ["layer.weight", "layer.bias"]
