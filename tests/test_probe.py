"""ObjectiveProbe: exact losses at given parameters, and zero observer effect."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stablelr.callbacks.line_probe_session import LineProbeSession, line_probe_session
from lightning_stablelr.line_probe import LineProbeResult, line_points, three_point_probe
from lightning_stablelr.probe import ObjectiveProbe, ProbeError
from tests.helpers import TinyClassifier, TinyRegression, make_trainer, regression_data


def _state(model: nn.Module) -> dict[str, object]:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "modes": [m.training for m in model.modules()],
    }


def _assert_same_state(before: dict, after: dict) -> None:
    for kind in ("params", "buffers"):
        assert before[kind].keys() == after[kind].keys()
        for name in before[kind]:
            assert torch.equal(before[kind][name], after[kind][name]), f"{kind} {name} changed"
    for name, grad in before["grads"].items():
        assert torch.equal(grad, after["grads"][name]), f"grad {name} changed"
    assert before["modes"] == after["modes"]


def test_probe_has_no_side_effects_on_dropout_batchnorm_model():
    model = TinyClassifier(dropout=0.5)
    model.train()
    model.net[3].eval()  # a mixed-mode module: the flags must come back exactly as they were
    x, y = TinyClassifier.batch()
    nn.functional.cross_entropy(model(x), y).backward()  # populated .grad that must survive
    log_calls: list[tuple] = []
    model.log = lambda *args, **kwargs: log_calls.append(args)  # instance attribute the probe must restore
    before = _state(model)
    assert before["buffers"]["net.1.num_batches_tracked"].item() == 1
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    rng_before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())

    probe = ObjectiveProbe(model)
    theta = probe.parameters()
    shifted = {name: p + 0.1 for name, p in theta.items()}
    losses = probe.losses((x, y), [theta, shifted], seed=3)
    probe.loss((x, y), shifted, seed=4)

    _assert_same_state(before, _state(model))
    assert torch.equal(torch.get_rng_state(), rng_before[0])
    assert random.getstate() == rng_before[1]
    assert np.array_equal(np.random.get_state()[1], rng_before[2])
    assert log_calls == []
    model.log(1)
    assert log_calls == [(1,)], "the user's instance attribute `log` was not restored"
    assert model.training_step_calls == 3
    assert losses[0] != losses[1]
    del model.log
    probe.loss((x, y), seed=0)
    assert "log" not in model.__dict__ and "log_dict" not in model.__dict__


def test_probe_matches_a_plain_training_step_under_the_same_seed():
    model = TinyClassifier(dropout=0.5)
    x, y = TinyClassifier.batch()
    reference = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        expected = nn.functional.cross_entropy(reference(x), y)
    got = ObjectiveProbe(model).loss((x, y), seed=11)
    assert got.dtype == torch.float32 and got.shape == ()
    assert torch.equal(got, expected)


def test_same_seed_gives_identical_loss_with_dropout_and_another_seed_does_not():
    model = TinyClassifier(dropout=0.5)
    batch = TinyClassifier.batch()
    probe = ObjectiveProbe(model)
    first = probe.loss(batch, seed=5)
    torch.rand(100)  # moving the global RNG must not matter
    second = probe.loss(batch, seed=5)
    third = probe.loss(batch, seed=6)
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


def test_given_parameters_are_used_linear_model_by_hand():
    model = TinyRegression(in_features=4, seed=1)
    with torch.no_grad():
        model.layer.bias.fill_(0.25)
    x, y = regression_data(8, 4, seed=2).tensors
    probe = ObjectiveProbe(model)
    doubled = {name: 2 * p for name, p in probe.parameters().items()}
    w, b = model.layer.weight.detach(), model.layer.bias.detach()
    by_hand_here = ((x @ w.T + b - y) ** 2).mean()
    by_hand_doubled = ((x @ (2 * w).T + 2 * b - y) ** 2).mean()
    assert probe.loss((x, y)).item() == pytest.approx(by_hand_here.item(), rel=1e-6)
    assert probe.loss((x, y), doubled).item() == pytest.approx(by_hand_doubled.item(), rel=1e-6)
    assert by_hand_doubled.item() != pytest.approx(by_hand_here.item(), rel=1e-3)
    # A partial mapping replaces only what it names: the bias stays the module's own.
    only_weight = {"layer.weight": 2 * w}
    by_hand_partial = ((x @ (2 * w).T + b - y) ** 2).mean()
    assert probe.loss((x, y), only_weight).item() == pytest.approx(by_hand_partial.item(), rel=1e-6)


def test_create_graph_gives_the_analytic_gradient_and_leaves_grad_untouched():
    model = TinyRegression(in_features=3, seed=4)
    x, y = regression_data(6, 3, seed=5).tensors
    probe = ObjectiveProbe(model)
    params = {name: p.clone().requires_grad_(True) for name, p in probe.parameters().items()}
    loss = probe.loss((x, y), params, create_graph=True)
    grad_w, grad_b = torch.autograd.grad(loss, [params["layer.weight"], params["layer.bias"]])
    residual = x @ model.layer.weight.detach().T + model.layer.bias.detach() - y
    assert torch.allclose(grad_w, 2 * (residual * x).mean(0, keepdim=True), atol=1e-6)
    assert torch.allclose(grad_b, 2 * residual.mean(0), atol=1e-6)
    assert model.layer.weight.grad is None and model.layer.bias.grad is None
    assert not probe.loss((x, y)).requires_grad


def test_probe_loss_method_takes_precedence_over_training_step():
    class WithProbeLoss(TinyRegression):
        def probe_loss(self, batch):
            return torch.tensor(42.0, dtype=torch.float64)

    batch = regression_data(4, 4).tensors
    loss = ObjectiveProbe(WithProbeLoss()).loss(batch)
    assert loss.dtype == torch.float32 and loss.item() == 42.0


def test_dict_output_and_training_step_without_batch_idx():
    class DictNoIndex(TinyRegression):
        def training_step(self, batch):
            return {"loss": 3 * self.objective(batch), "other": 1}

    model = DictNoIndex()
    batch = regression_data(4, 4).tensors
    assert ObjectiveProbe(model).loss(batch).item() == pytest.approx(
        3 * model.objective(batch).item(), rel=1e-6
    )


def test_training_step_that_switches_modes_is_undone():
    class Switcher(TinyClassifier):
        def training_step(self, batch, batch_idx):
            self.eval()
            return super().training_step(batch, batch_idx)

    model = Switcher()
    model.train()
    ObjectiveProbe(model).loss(TinyClassifier.batch())
    assert all(m.training for m in model.modules())


def test_errors_name_the_fix():
    class ReturnsNone(TinyRegression):
        def training_step(self, batch, batch_idx):
            return None

    class Manual(TinyRegression):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    class VectorLoss(TinyRegression):
        def training_step(self, batch, batch_idx):
            return torch.ones(3)

    batch = regression_data(4, 4).tensors
    with pytest.raises(
        ProbeError, match=r"ReturnsNone.training_step returned NoneType.*Implement `probe_loss"
    ):
        ObjectiveProbe(ReturnsNone()).loss(batch)
    with pytest.raises(
        ProbeError, match=r"Manual uses manual optimization.*Implement `probe_loss\(self, batch\)"
    ):
        ObjectiveProbe(Manual()).loss(batch)
    with pytest.raises(ProbeError, match=r"loss of shape \(3,\); the probe needs a scalar"):
        ObjectiveProbe(VectorLoss()).loss(batch)
    with pytest.raises(ProbeError, match="neither `probe_loss` nor `training_step`"):
        ObjectiveProbe(nn.Linear(2, 2)).loss(batch)
    with pytest.raises(ValueError, match=r"not parameters of TinyRegression: \['nope'\]"):
        ObjectiveProbe(TinyRegression()).loss(batch, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"`module` must be a torch\.nn\.Module, got str"):
        ObjectiveProbe("model")


def test_forward_context_wraps_every_evaluation():
    entered: list[int] = []

    class Counting:
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *exc):
            return False

    probe = ObjectiveProbe(TinyRegression(), forward_context=Counting)
    probe.losses(regression_data(4, 4).tensors, [probe.parameters()] * 3)
    assert len(entered) == 3


# ---------------------------------------------------------------------------------------------- line probe
def test_three_point_probe_is_exact_on_a_quadratic():
    # MSE of a linear model is quadratic in θ: a = gᵀΔθ and c = ΔθᵀHΔθ hold exactly (up to fp32 round-off).
    model = TinyRegression(in_features=3, seed=6)
    x, y = regression_data(10, 3, seed=7).tensors
    probe = ObjectiveProbe(model)
    before = {name: p.clone() for name, p in probe.parameters().items()}
    delta = {"layer.weight": torch.tensor([[0.1, -0.2, 0.05]]), "layer.bias": torch.tensor([-0.3])}
    after = {name: before[name] + delta[name] for name in before}
    result = three_point_probe(probe, (x, y), before, after, step=9, seed=1)

    xa = torch.cat([x, torch.ones(10, 1)], dim=1).double()
    theta = torch.cat([before["layer.weight"].flatten(), before["layer.bias"]]).double()
    step = torch.cat([delta["layer.weight"].flatten(), delta["layer.bias"]]).double()
    grad = 2 * xa.T @ (xa @ theta - y.double().flatten()) / 10
    hessian = 2 * xa.T @ xa / 10
    assert result.step == 9 and result.finite and not result.failed
    assert result.line.first_order == pytest.approx(float(grad @ step), rel=1e-5)
    assert result.line.curvature == pytest.approx(float(step @ hessian @ step), rel=1e-4)
    assert result.update_norm_sq == pytest.approx(float(step @ step), rel=1e-6)
    assert result.loss_after == pytest.approx(probe.loss((x, y), after).item(), rel=1e-7)
    assert result.loss_mirror == pytest.approx(
        probe.loss((x, y), {n: before[n] - delta[n] for n in before}).item(), rel=1e-7
    )
    assert torch.equal(model.layer.weight.detach(), before["layer.weight"])


def test_line_points_mirror_in_fp32_and_cast_back():
    before = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    after = {"w": torch.tensor([1.5, 1.0], dtype=torch.bfloat16)}
    mirror, norm_sq = line_points(before, after)
    assert mirror["w"].dtype == torch.bfloat16 and mirror["w"].tolist() == [0.5, 3.0]
    assert norm_sq.dtype == torch.float32 and norm_sq.item() == 0.25 + 1.0
    with pytest.raises(ValueError, match=r"must name the same parameters, got a difference in \['v', 'w'\]"):
        line_points(before, {"v": after["w"]})


def test_line_probe_result_flags_non_finite_and_failed():
    assert not LineProbeResult.from_losses(0, [1.0, math.nan, 1.0], 1.0).finite
    unavailable = LineProbeResult.unavailable(4)
    assert unavailable.step == 4 and unavailable.failed and not unavailable.finite


# ---------------------------------------------------------------------------------------------- session
class _Requester(Callback):
    """Requests the shared line probe on every step, like a second callback would, and keeps the results."""

    def __init__(self) -> None:
        self.results: list = []
        self.line_probe = LineProbeSession()  # the first requester's session is the one both use

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        line_probe_session(trainer).request(trainer.global_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        line_probe_session(trainer).snapshot(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.results.append(line_probe_session(trainer).result(trainer, pl_module, batch, batch_idx))


def _classifier_run(tmp_path, callbacks):
    model = TinyClassifier(dropout=0.3, seed=2)
    x, y = TinyClassifier.batch(num_samples=24, seed=3)
    loader = DataLoader(
        TensorDataset(x, y), batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    torch.manual_seed(123)  # dropout masks of the training itself
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=callbacks)
    trainer.fit(model, loader)
    return model, trainer


def test_session_probes_have_zero_observer_effect_on_training(tmp_path):
    plain, _ = _classifier_run(tmp_path / "plain", [])
    first, second = _Requester(), _Requester()
    probed, trainer = _classifier_run(tmp_path / "probed", [first, second])
    for (name, a), b in zip(plain.state_dict().items(), probed.state_dict().values()):
        assert torch.equal(a, b), name  # weights and BatchNorm statistics, bit for bit
    assert plain.training_step_calls == 8 and probed.training_step_calls == 8 + 3 * 8
    assert len(first.results) == 8 and all(r is not None and r.finite for r in first.results)
    assert [r.step for r in first.results] == list(range(8))
    # computed once per step; the second caller gets the very same object
    assert all(a is b for a, b in zip(first.results, second.results))
    assert line_probe_session(trainer).probes_run == 8


def test_session_result_is_none_for_unrequested_or_discarded_steps(tmp_path):
    class DiscardOdd(_Requester):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step != 2:
                super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
            if trainer.global_step == 5:
                line_probe_session(trainer).discard(5)

    requester = DiscardOdd()
    _classifier_run(tmp_path, [requester])
    assert [r is None for r in requester.results] == [False, False, True, False, False, True, False, False]


def test_the_gradient_is_kept_only_for_a_consumer_of_the_exact_derivative(tmp_path):
    # StableLR's guard reads the step margin only: alone, a check copies θ but not g. The monitor's
    # certificates report the Taylor error against gᵀΔθ, so it asks for g (reset(exact_derivative=True)).
    from lightning_stablelr import StabilityMonitor, StableLR

    class Recording(_Requester):
        def __init__(self, exact: bool) -> None:
            super().__init__()
            self.exact, self.kept = exact, []

        def setup(self, trainer, pl_module, stage) -> None:
            line_probe_session(trainer).reset(exact_derivative=self.exact)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
            self.kept.append(line_probe_session(trainer)._gradient is not None)

    x, y = TinyClassifier.batch(num_samples=24, seed=3)
    lines = {}
    for exact in (False, True):
        requester = Recording(exact)
        make_trainer(tmp_path / str(exact), max_epochs=1, callbacks=[requester]).fit(
            TinyClassifier(dropout=0.0, seed=2), DataLoader(TensorDataset(x, y), batch_size=6)
        )
        assert requester.kept == [exact] * 4
        lines[exact] = [r.line for r in requester.results]
    # The guard's input is the same either way; only the Taylor error's reference changes.
    assert [line.step_margin for line in lines[False]] == [line.step_margin for line in lines[True]]
    assert [line.taylor_error for line in lines[False]] != [line.taylor_error for line in lines[True]]
    for callbacks, expected in (([StableLR()], False), ([StableLR(), StabilityMonitor()], True)):
        trainer = make_trainer(tmp_path / str(expected) / "fit", max_epochs=1, callbacks=callbacks)
        trainer.fit(TinyClassifier(dropout=0.0, seed=2), DataLoader(TensorDataset(x, y), batch_size=6))
        assert line_probe_session(trainer).exact_derivative is expected
