"""The guard under low precision (issue 8): bf16-rounded probe losses are detected and skipped, not read as
overshoot, so a healthy run keeps C near its fp32 value instead of collapsing to the floor."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_stablelr import StableLR
from tests.helpers import TinyRegression, make_trainer, regression_loader


def _fit(tmp_path, precision: str, max_lr_boost: float) -> tuple[StableLR, list[str]]:
    torch.manual_seed(0)
    callback = StableLR(decay_rate=0.0, gap_strength=0.0, check_every_n_steps=1, dense_check_steps=0,
                        max_lr_boost=max_lr_boost)
    trainer = make_trainer(tmp_path / f"{precision}-{max_lr_boost}", max_epochs=6, precision=precision, callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyRegression(lr=0.05, in_features=16), regression_loader(128, 16, in_features=16, noise=1.0))
    return callback, [str(w.message) for w in caught if "rounded to" in str(w.message)]


@pytest.mark.slow
@pytest.mark.parametrize("max_lr_boost", [1.0, 10.0])
def test_bf16_true_keeps_the_stability_factor_of_fp32(tmp_path, max_lr_boost: float) -> None:
    fp32, fp32_warnings = _fit(tmp_path, "32-true", max_lr_boost)
    bf16, bf16_warnings = _fit(tmp_path, "bf16-true", max_lr_boost)
    # the healthy fp32 run: every check is resolved and C stays at 1 (max_lr_boost=1: the base lr is a
    # ceiling), or with the default boost climbs above 1 (this lr is below what the loss allows)
    assert fp32.controller.checks == 48
    assert fp32.controller.stability_factor == 1.0 if max_lr_boost == 1.0 else fp32.controller.stability_factor > 1.0
    assert fp32.controller.guard_counts["unresolved"] == 0 and fp32_warnings == []
    # bf16-true: the rounded checks are recognised as such (warned once) and C stays within 2x of fp32
    assert bf16.controller.guard_counts["unresolved"] > 0
    assert len(bf16_warnings) == 1 and "precision='bf16-true'" in bf16_warnings[0]
    assert bf16.controller.stability_factor >= 0.5 * fp32.controller.stability_factor
    assert min(bf16.controller.margins.margins or [float("inf")]) >= 0.0
