"""The guard's check replays the training step's own random draws and reuses its loss as L0 (two forward passes,
not three) only once a replay has reproduced it bit for bit; the run is then bit-identical to one that replays
L0 every time."""

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
from lightning_stablelr.line_probe import TrainingLossReuse, line_losses
from lightning_stablelr.rng import isolated_rng, restore_rng_states, rng_states
from tests.helpers import TinyClassifier, make_trainer

STEPS = 40
CHECKS = 10  # dense_check_steps=10, no periodic check within 40 steps at C = 1 (check_every_n_steps=100)


class Classifier(TinyClassifier):
    """TinyClassifier on 40 fixed batches of 16; ``ramp`` scales the loss by ``1 + ramp·global_step`` (a loss
    that depends on the training state, which a replay after the step computes differently)."""

    def __init__(
        self, dropout: float = 0.0, ramp: float = 0.0, probe_scale: float | None = None, failing_replays: int = 0
    ) -> None:
        super().__init__(dropout=dropout, lr=0.5)
        self.ramp = ramp
        self.failing_replays = failing_replays  # the first n replays (no_grad calls) raise
        if probe_scale is not None:  # a probe_loss that is not the training loss
            self.probe_loss = lambda batch: probe_scale * nn.functional.cross_entropy(self(batch[0]), batch[1])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.failing_replays and not torch.is_grad_enabled():
            self.failing_replays -= 1
            raise RuntimeError("this replay fails")
        loss = super().training_step(batch, batch_idx)
        return loss * (1.0 + self.ramp * self.global_step) if self.ramp else loss

    def train_dataloader(self) -> DataLoader:
        x, y = TinyClassifier.batch(num_samples=16 * STEPS, seed=1)
        return DataLoader(TensorDataset(x, y), batch_size=16)


def _fit(
    tmp_path: Any, model: Classifier, monkeypatch: pytest.MonkeyPatch, reverify: int, extra_callbacks: Any = (),
    **trainer: Any,
) -> dict:
    monkeypatch.setattr(TrainingLossReuse, "REVERIFY_EVERY", reverify)
    L.seed_everything(0, verbose=False)  # the same dropout masks in both runs of a comparison
    callback = StableLR(dense_check_steps=CHECKS, check_every_n_steps=100, gap_strength=0.0)
    lrs: list[float] = []
    checks: list[tuple[int, float, float, float]] = []  # every check's [L0, L+, L-] as the guard saw them
    factors: list[float] = []

    class Record(L.Callback):  # after StableLR: the lr it set for the next step, the check it made
        def on_train_batch_end(self, trainer_: L.Trainer, *args: Any) -> None:
            lrs.append(trainer_.optimizers[0].param_groups[0]["lr"])
            factors.append(callback.controller.stability_factor)
            result = callback.line_probe._cached
            if result is not None and (not checks or checks[-1][0] != result.step):
                checks.append((result.step, result.loss_before, result.loss_after, result.loss_mirror))

    make_trainer(tmp_path, max_steps=STEPS, callbacks=[callback, Record(), *extra_callbacks], **trainer).fit(model)
    session = callback.line_probe
    return {
        "lrs": lrs,
        "checks": checks,
        "min_c": min(factors),
        "replays": model.training_step_calls - STEPS * trainer.get("accumulate_grad_batches", 1),
        "probes": session.probes_run,
        "reused": session.reuse.reused,
        "refuted": session.reuse.refuted,
        "weights": [p.detach().clone() for p in model.parameters()],
    }


def _same_run(first: dict, second: dict) -> bool:
    return (
        first["checks"] == second["checks"]  # every check's three losses, bit for bit
        and first["lrs"] == second["lrs"]
        and all(map(torch.equal, first["weights"], second["weights"]))
    )


def test_a_deterministic_training_step_gives_l0_for_free_and_the_same_run(tmp_path, monkeypatch):
    reused = _fit(tmp_path, Classifier(), monkeypatch, reverify=4)
    replayed = _fit(tmp_path, Classifier(), monkeypatch, reverify=1)  # every check replays L0 and compares
    # checks 0, 4, 8 replay L0 (verification), the other 7 take it from the training step: 2 passes each
    assert (reused["probes"], reused["reused"], reused["refuted"]) == (CHECKS, 7, False)
    assert reused["replays"] == 3 * 3 + 2 * 7
    assert (replayed["probes"], replayed["reused"], replayed["replays"]) == (CHECKS, 0, 3 * CHECKS)
    assert not replayed["refuted"]
    assert len(reused["checks"]) == CHECKS and reused["min_c"] < 1.0  # the checks decided something
    assert _same_run(reused, replayed)


def test_with_dropout_the_probe_replays_the_training_steps_own_masks_and_reuses_its_loss(tmp_path, monkeypatch):
    reused = _fit(tmp_path, Classifier(dropout=0.5), monkeypatch, reverify=4)
    replayed = _fit(tmp_path, Classifier(dropout=0.5), monkeypatch, reverify=1)
    assert reused["probes"] >= CHECKS and not reused["refuted"] and not replayed["refuted"]  # bit-identical L0
    verified = -(-reused["probes"] // 4)  # checks 0, 4, 8, ...
    assert (reused["reused"], reused["replays"]) == (reused["probes"] - verified, 3 * verified + 2 * (reused["probes"] - verified))
    assert _same_run(reused, replayed)


class DrawAtBatchStart(L.Callback):
    """Draws a random number after StableLR watched the streams and before the forward."""

    def on_train_batch_start(self, *args: Any) -> None:
        torch.rand(1)


def test_a_draw_between_the_watch_and_the_forward_refutes_the_reuse(tmp_path, monkeypatch):
    result = _fit(tmp_path, Classifier(dropout=0.5), monkeypatch, reverify=16, extra_callbacks=[DrawAtBatchStart()])
    assert (result["reused"], result["refuted"], result["replays"]) == (0, True, 3 * result["probes"])


def test_a_loss_that_depends_on_the_step_is_refuted_at_the_first_check_and_the_run_is_unchanged(tmp_path, monkeypatch):
    ramped = _fit(tmp_path, Classifier(ramp=1e-3), monkeypatch, reverify=16)
    replayed = _fit(tmp_path, Classifier(ramp=1e-3), monkeypatch, reverify=1)
    assert (ramped["reused"], ramped["refuted"], ramped["replays"]) == (0, True, 3 * CHECKS)
    assert _same_run(ramped, replayed)


def test_a_probe_loss_other_than_the_training_loss_is_never_replaced(tmp_path, monkeypatch):
    result = _fit(tmp_path, Classifier(probe_scale=2.0), monkeypatch, reverify=16)
    assert (result["reused"], result["refuted"]) == (0, True)


def test_gradient_accumulation_replays_l0(tmp_path, monkeypatch):
    result = _fit(tmp_path, Classifier(), monkeypatch, reverify=16, accumulate_grad_batches=2, max_epochs=2)
    assert result["probes"] >= CHECKS and result["replays"] == 3 * result["probes"]
    assert (result["reused"], result["refuted"]) == (0, False)  # not even tried


def test_a_verification_that_failed_is_not_counted(tmp_path, monkeypatch):
    # Check 0's replay raises (skipped, warned once): check 1 must verify, not reuse L0 unverified.
    with pytest.warns(UserWarning, match="line probe failed at step 0"):
        result = _fit(tmp_path, Classifier(failing_replays=1), monkeypatch, reverify=4)
    assert result["probes"] == CHECKS and not result["refuted"]
    assert result["reused"] == 6  # checks 1, 5, 9 verify; 2-4 and 6-8 reuse (counting check 0: 7)


@pytest.mark.parametrize(
    "draw", [lambda: torch.rand(3).tolist(), lambda: random.random(), lambda: np.random.rand(3).tolist()],
    ids=["torch", "random", "numpy"],
)
def test_a_probe_point_started_from_copied_states_draws_what_followed_the_copy(draw):
    states = rng_states()
    drawn = draw()
    after = rng_states()
    with isolated_rng() as start:
        start(states)
        assert draw() == drawn
        start(1234)  # an int seeds every stream instead
        assert draw() != drawn
    continued = draw()  # the caller's streams continue where they were before the block
    restore_rng_states(after)
    assert draw() == continued


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


class SkipsABatch(Classifier):
    """Returns -1 from ``on_train_batch_start`` at epoch 0, batch 5 (Lightning skips the rest of the epoch):
    StableLR watched step 5 there, and epoch 1 starts at the same step 5 without a new watch."""

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        return -1 if (self.current_epoch, batch_idx) == (0, 5) else None


def test_a_watch_left_by_a_batch_that_never_stepped_is_not_used(tmp_path, monkeypatch):
    offered: list[bool] = []  # per check: was the training loss offered as L0?
    plan = TrainingLossReuse.plan

    def spy(self: TrainingLossReuse, training_loss: Tensor | None) -> Any:
        offered.append(training_loss is not None)
        return plan(self, training_loss)

    monkeypatch.setattr(TrainingLossReuse, "plan", spy)
    result = _fit(tmp_path, SkipsABatch(), monkeypatch, reverify=4, max_epochs=2)
    assert [step for step, *_ in result["checks"]][:CHECKS] == list(range(CHECKS))
    # step 5's watch (epoch 0, batch 5) does not match the batch that ran step 5 (epoch 1, batch 0): that
    # check replays L0 under probe_seed; every other check is offered the training loss
    assert offered[:CHECKS] == [step != 5 for step in range(CHECKS)] and all(offered[CHECKS:])
    assert not result["refuted"]


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "64-true"])
def test_the_replay_reproduces_the_training_loss_under_other_precisions(tmp_path, monkeypatch, precision):
    # The probe runs under the precision plugin's forward context, as training does: bit-identical L0 (with
    # dropout: the training step's own masks), so every check after the first reuses it.
    reused = _fit(tmp_path, Classifier(dropout=0.5), monkeypatch, reverify=16, precision=precision)
    replayed = _fit(tmp_path, Classifier(dropout=0.5), monkeypatch, reverify=1, precision=precision)
    assert not reused["refuted"] and reused["reused"] == reused["probes"] - 1 >= CHECKS - 1
    assert _same_run(reused, replayed)
