"""No tensor the module owns changes during a probe: frozen parameters, plain tensor attributes (issue 9, item 1)."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
from torch import nn

from lightning_stablelr import StabilityMonitor, StableLR
from lightning_stablelr.probe import ObjectiveProbe, ProbeSideEffectError, ProbeSideEffectWarning
from tests.helpers import make_trainer, regression_loader


class MeanTeacher(L.LightningModule):
    """A student trained on MSE plus a consistency term; the frozen teacher is an EMA updated in training_step."""

    def __init__(self, *, with_probe_loss: bool = False, ema_every: int = 1) -> None:
        super().__init__()
        self.student = nn.Linear(4, 1)
        self.teacher = nn.Linear(4, 1)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.ema_every = ema_every
        self.calls = 0
        if with_probe_loss:
            self.probe_loss = self._loss  # the same loss, without the teacher update

    def _loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self.student(x), y) + 0.1 * nn.functional.mse_loss(self.student(x), self.teacher(x))

    def training_step(self, batch, batch_idx):
        self.calls += 1
        loss = self._loss(batch)
        if self.calls % self.ema_every == 0:
            with torch.no_grad():
                for t, s in zip(self.teacher.parameters(), self.student.parameters()):
                    t.mul_(0.9).add_(0.1 * s)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.05)


def _batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator)


def test_probe_leaves_a_frozen_teacher_updated_in_place_untouched_and_says_so_once():
    model = MeanTeacher()
    with torch.no_grad():
        model.student.weight.add_(1.0)  # student != teacher, so an EMA update would move the teacher
    teacher = {name: t.clone() for name, t in model.teacher.state_dict().items()}
    probe = ObjectiveProbe(model)
    shifted = {name: p + 0.5 for name, p in probe.parameters().items()}
    with pytest.warns(ProbeSideEffectWarning, match=r"training_step changes \['teacher.bias', 'teacher.weight'\]"):
        first = probe.losses(_batch(), [probe.parameters(), shifted])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shown once: later calls use the copies silently
        second = probe.losses(_batch(), [probe.parameters(), shifted])
    assert first == second  # the probe saw the same teacher both times
    for name, tensor in model.teacher.state_dict().items():
        assert torch.equal(tensor, teacher[name]), name
    assert model.calls == 4  # the probe replays training_step once per point


class PlainAttributeCounter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.seen = torch.zeros(())  # neither parameter nor buffer
        self.steps = torch.zeros(())

    def training_step(self, batch, batch_idx):
        self.seen.add_(1.0)  # in place
        self.steps = self.steps + 1  # rebound
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)


def test_plain_tensor_attributes_changed_in_place_or_rebound_are_restored():
    model = PlainAttributeCounter()
    seen, steps = model.seen, model.steps
    probe = ObjectiveProbe(model)
    with pytest.warns(ProbeSideEffectWarning, match=r"\['seen', 'steps'\]"):
        probe.losses(_batch(), [probe.parameters()] * 3)
    probe.losses(_batch(), [probe.parameters()] * 2)
    assert model.seen is seen and model.steps is steps
    assert model.seen.item() == 0.0 and model.steps.item() == 0.0


def test_an_update_first_seen_after_verification_stops_the_probe_with_the_tensor_named():
    model = MeanTeacher(ema_every=3)  # the first probe call (2 points) does not update the teacher
    with torch.no_grad():
        model.student.weight.add_(1.0)
    probe = ObjectiveProbe(model)
    probe.losses(_batch(), [probe.parameters()] * 2)
    with pytest.raises(ProbeSideEffectError, match=r"changed \['teacher.bias', 'teacher.weight'\] in place.*probe_loss"):
        probe.losses(_batch(), [probe.parameters()])
    calls = model.calls
    with pytest.raises(ProbeSideEffectError, match="stopped for the rest of the run"):
        probe.losses(_batch(), [probe.parameters()])
    assert model.calls == calls  # refused before replaying training_step again


def _fit(tmp_path, callbacks, *, with_probe_loss):
    L.seed_everything(0)
    model = MeanTeacher(with_probe_loss=with_probe_loss)
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=callbacks)
    trainer.fit(model, regression_loader(batch_size=4), regression_loader(num_samples=16, batch_size=8, seed=1))
    return model, trainer


def _monitor():
    return StabilityMonitor(certificate_every_n_steps=1, sharpness_every_n_steps=4, probe_every_n_epochs=1,
                            max_overhead=math.inf)


@pytest.mark.slow
def test_mean_teacher_weights_are_bit_identical_to_probes_without_the_update(tmp_path):
    with pytest.warns(ProbeSideEffectWarning, match="teacher.weight") as record:
        replayed, trainer = _fit(tmp_path, [StableLR(), _monitor()], with_probe_loss=False)
    assert sum(issubclass(w.category, ProbeSideEffectWarning) for w in record) == 1  # one warning per module
    reference, _ = _fit(tmp_path, [StableLR(), _monitor()], with_probe_loss=True)
    for (name, a), b in zip(replayed.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert trainer.global_step == 16
    # 16 real steps; StableLR probes every step < 20 (3 points each) and the monitor shares that probe.
    assert replayed.calls > 16


@pytest.mark.slow
def test_monitor_on_a_mean_teacher_has_no_observer_effect(tmp_path):
    plain, _ = _fit(tmp_path, [], with_probe_loss=False)
    monitored, _ = _fit(tmp_path, [_monitor()], with_probe_loss=False)
    for (name, a), b in zip(plain.state_dict().items(), monitored.state_dict().values()):
        assert torch.equal(a, b), name


class AliasedTied(nn.Module):
    """One Linear registered twice (``encoder`` and ``body[0]``) and a decoder tied to its weight."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.decoder = nn.Linear(4, 4), nn.Linear(4, 4)
        self.decoder.weight = self.encoder.weight
        self.body = nn.Sequential(self.encoder, nn.Tanh(), self.decoder)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.body(x), y.expand(-1, 4))


def test_aliased_and_tied_modules_keep_their_own_parameter_objects_and_losses_are_exact():
    import copy

    model = AliasedTied()
    originals = {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)}
    values = {name: p.detach().clone() for name, p in model.named_parameters()}
    probe = ObjectiveProbe(model)
    shifted = {name: p + 0.25 for name, p in probe.parameters().items()}
    losses = probe.losses(_batch(), [probe.parameters(), shifted])
    # functional_call alone put the probe's tensors into the model here (the alias is swapped twice).
    assert {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)} == originals
    assert all(torch.equal(p, values[name]) for name, p in model.named_parameters())
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.25)
    assert losses == [model.training_step(_batch(), 0).item(), moved.training_step(_batch(), 0).item()]


class LateTeacher(MeanTeacher):
    """The EMA update starts at global_step 3: the first probe (step 0) cannot learn it."""

    def training_step(self, batch, batch_idx):
        self.ema_every = 1 if self.trainer.global_step >= 3 else 10**9
        return super().training_step(batch, batch_idx)


@pytest.mark.slow
def test_an_update_that_cannot_be_undone_stops_every_probe_with_one_warning(tmp_path):
    L.seed_everything(0)
    model = LateTeacher()
    monitor = StabilityMonitor(certificate_every_n_steps=1, sharpness_every_n_steps=0, probe_every_n_epochs=0,
                               max_overhead=math.inf)
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[StableLR(), monitor])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(model, regression_loader(batch_size=4), regression_loader(num_samples=16, batch_size=8, seed=1))
    stops = [w for w in record if "ProbeSideEffectError" in str(w.message)]
    assert len(stops) == 1 and "['teacher.bias', 'teacher.weight']" in str(stops[0].message)
    assert "probe_loss" in str(stops[0].message)
    # 8 real steps; the probes of steps 0, 1, 2 replayed training_step (step 2's, run at global_step 3,
    # made the update and was detected), then no probe replayed it again: step 0's probe 3 points (it verifies
    # that a replay reproduces the training loss), steps 1 and 2 two each (the training loss stands in for L0).
    assert (trainer.global_step, model.calls) == (8, 8 + 3 + 2 + 2)
