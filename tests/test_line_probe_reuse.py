"""The guard's check reuses the training step's loss as L0 (two forward passes, not three) only when a replay
would compute the same number, and the run is then bit-identical to one that replays L0 every time."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stablelr import StableLR
from lightning_stablelr.callbacks.line_probe_session import LineProbeSession
from lightning_stablelr.line_probe import line_losses
from lightning_stablelr.rng import rng_states, same_rng_states
from tests.helpers import TinyClassifier, make_trainer

STEPS = 40
CHECKS = 10  # dense_check_steps=10, no periodic check within 40 steps at C = 1 (check_every_n_steps=100)


class Classifier(TinyClassifier):
    """TinyClassifier on 40 fixed batches of 16; ``ramp`` scales the loss by ``1 + ramp·global_step`` (a loss
    that depends on the training state, which a replay after the step computes differently)."""

    def __init__(self, dropout: float = 0.0, ramp: float = 0.0, probe_scale: float | None = None) -> None:
        super().__init__(dropout=dropout, lr=0.5)
        self.ramp = ramp
        if probe_scale is not None:  # a probe_loss that is not the training loss
            self.probe_loss = lambda batch: probe_scale * nn.functional.cross_entropy(self(batch[0]), batch[1])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * (1.0 + self.ramp * self.global_step) if self.ramp else loss

    def train_dataloader(self) -> DataLoader:
        x, y = TinyClassifier.batch(num_samples=16 * STEPS, seed=1)
        return DataLoader(TensorDataset(x, y), batch_size=16)


def _fit(tmp_path: Any, model: Classifier, monkeypatch: pytest.MonkeyPatch, reverify: int, **trainer: Any) -> dict:
    monkeypatch.setattr(LineProbeSession, "REVERIFY_EVERY", reverify)
    callback = StableLR(dense_check_steps=CHECKS, check_every_n_steps=100, gap_strength=0.0)
    lrs: list[float] = []

    class Record(L.Callback):  # after StableLR: the lr it set for the next step
        def on_train_batch_end(self, trainer_: L.Trainer, *args: Any) -> None:
            lrs.append(trainer_.optimizers[0].param_groups[0]["lr"])

    make_trainer(tmp_path, max_steps=STEPS, callbacks=[callback, Record()], **trainer).fit(model)
    session = callback.line_probe
    return {
        "lrs": lrs,
        "replays": model.training_step_calls - STEPS * trainer.get("accumulate_grad_batches", 1),
        "probes": session.probes_run,
        "reused": session.losses_reused,
        "refuted": session._reuse_refuted,
        "weights": [p.detach().clone() for p in model.parameters()],
    }


def _same_run(first: dict, second: dict) -> bool:
    return first["lrs"] == second["lrs"] and all(map(torch.equal, first["weights"], second["weights"]))


def test_a_deterministic_training_step_gives_l0_for_free_and_the_same_run(tmp_path, monkeypatch):
    reused = _fit(tmp_path, Classifier(), monkeypatch, reverify=4)
    replayed = _fit(tmp_path, Classifier(), monkeypatch, reverify=1)  # every check replays L0 and compares
    # checks 0, 4, 8 replay L0 (verification), the other 7 take it from the training step: 2 passes each
    assert (reused["probes"], reused["reused"], reused["refuted"]) == (CHECKS, 7, False)
    assert reused["replays"] == 3 * 3 + 2 * 7
    assert (replayed["probes"], replayed["reused"], replayed["replays"]) == (CHECKS, 0, 3 * CHECKS)
    assert not replayed["refuted"]
    assert min(reused["lrs"]) < max(reused["lrs"])  # the guard's lr moved: the checks decided something
    assert _same_run(reused, replayed)


def test_dropout_draws_random_numbers_so_l0_is_replayed(tmp_path, monkeypatch):
    result = _fit(tmp_path, Classifier(dropout=0.5), monkeypatch, reverify=4)
    assert result["probes"] >= CHECKS  # more once C < 1 (checks every 10th step)
    assert (result["reused"], result["refuted"], result["replays"]) == (0, False, 3 * result["probes"])


def test_a_loss_that_depends_on_the_step_is_refuted_at_the_first_check_and_the_run_is_unchanged(tmp_path, monkeypatch):
    ramped = _fit(tmp_path, Classifier(ramp=1e-3), monkeypatch, reverify=16)
    replayed = _fit(tmp_path, Classifier(ramp=1e-3), monkeypatch, reverify=1)
    assert (ramped["reused"], ramped["refuted"], ramped["replays"]) == (0, True, 3 * CHECKS)
    assert _same_run(ramped, replayed)


def test_a_probe_loss_other_than_the_training_loss_is_never_replaced(tmp_path, monkeypatch):
    result = _fit(tmp_path, Classifier(probe_scale=2.0), monkeypatch, reverify=16)
    assert (result["reused"], result["refuted"]) == (0, True)


def test_gradient_accumulation_replays_l0(tmp_path, monkeypatch):
    result = _fit(tmp_path, Classifier(), monkeypatch, reverify=1, accumulate_grad_batches=2)
    assert result["probes"] == CHECKS and result["reused"] == 0 and not result["refuted"]


@pytest.mark.parametrize(
    "draw", [lambda: torch.rand(1), lambda: random.random(), lambda: np.random.rand()], ids=["torch", "random", "numpy"]
)
def test_same_rng_states_sees_a_draw_from_each_stream(draw):
    before = rng_states()
    assert same_rng_states(before, rng_states())
    draw()
    assert not same_rng_states(before, rng_states())


def test_line_losses_with_a_known_l0_evaluates_two_points():
    theta_before = {"w": torch.tensor([1.0, 2.0])}
    theta_after = {"w": torch.tensor([0.5, 1.0])}
    seen: list[list[float]] = []

    def evaluate(points: Any) -> list[Tensor]:
        seen.extend(point["w"].tolist() for point in points)
        return [point["w"].pow(2).sum() for point in points]

    values = line_losses(evaluate, theta_before, theta_after, loss_before=torch.tensor(7.0))
    assert seen == [[0.5, 1.0], [1.5, 3.0]]  # θ_after and the mirror θ_before - Δθ; not θ_before
    assert values.tolist() == [7.0, 1.25, 11.25, 1.25]  # [L0 as given, L+, L-, ‖Δθ‖²]
