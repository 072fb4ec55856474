"""ObjectiveProbe's `buffers=` and `training=` options, which the monitor's connectivity probes use.

The probe must evaluate in eval mode with BatchNorm statistics recalibrated into caller-owned copies,
while the module's own buffers, flags and the global RNG stay untouched.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_stablelr.probe import ObjectiveProbe
from tests.helpers import TinyClassifier


def _model() -> TinyClassifier:
    model = TinyClassifier(dropout=0.5)
    model.train()
    return model


def test_eval_mode_loss_uses_running_statistics_and_restores_flags():
    model = _model()
    x, y = TinyClassifier.batch()
    with torch.no_grad():
        model.net[1].running_mean.fill_(0.3)
        model.net[1].running_var.fill_(2.0)
    probe = ObjectiveProbe(model)
    rng_before = torch.get_rng_state()

    value = probe.loss((x, y), training=False)

    model.eval()
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(x), y)
    model.train()
    assert float(value) == pytest.approx(float(expected), rel=1e-6)
    assert all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert float(model.net[1].running_mean[0]) == pytest.approx(0.3)


def test_given_buffers_receive_batchnorm_updates_and_module_buffers_do_not():
    model = _model()
    x, y = TinyClassifier.batch(num_samples=32)
    own = {name: b.clone() for name, b in model.named_buffers()}
    hidden = 8
    buffers = {
        "net.1.running_mean": torch.zeros(hidden),
        "net.1.running_var": torch.ones(hidden),
        "net.1.num_batches_tracked": torch.zeros((), dtype=torch.long),
    }
    bn = model.net[1]
    bn.momentum = None  # cumulative average: after one batch the running mean is the batch mean
    ObjectiveProbe(model).loss((x, y), buffers=buffers, training=True)
    bn.momentum = 0.1

    pre_bn = model.net[0](x).detach()
    assert torch.allclose(buffers["net.1.running_mean"], pre_bn.mean(0), atol=1e-6)
    assert torch.allclose(buffers["net.1.running_var"], pre_bn.var(0, unbiased=True), atol=1e-5)
    assert int(buffers["net.1.num_batches_tracked"]) == 1
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, own[name]), name


def test_unknown_buffer_name_is_rejected_with_the_known_names_hint():
    model = _model()
    with pytest.raises(ValueError, match=r"buffers has names that are not buffers of TinyClassifier: \['nope'\]"):
        ObjectiveProbe(model).loss(TinyClassifier.batch(), buffers={"nope": torch.zeros(1)})
