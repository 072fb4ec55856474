"""One walk of the module tree per probe call: the same names as torch's own walks, and only one walk."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_stablelr._module_layout import module_layout
from lightning_stablelr.probe import ObjectiveProbe


class Tricky(nn.Module):
    """Tied weights, one submodule registered under two names, a None bias, BatchNorm and a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 3, bias=False)
        self.body = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.ReLU())
        self.shortcut = self.body[0]  # the same Linear under a second name
        self.decoder = nn.Linear(3, 4)
        self.decoder.weight = nn.Parameter(self.encoder.weight.detach().t().contiguous())
        self.tied = nn.Linear(3, 4, bias=False)
        self.tied.weight = self.decoder.weight  # tied: one tensor, two names
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        hidden = self.body(self.encoder(batch))
        hidden = hidden + self.shortcut(hidden)
        return ((self.decoder(hidden) + self.tied(hidden)) * self.scale).pow(2).mean()


def _aliases(module: nn.Module) -> dict[str, list[str]]:
    aliases: dict[str, list[str]] = {}
    for named in (module.named_parameters, module.named_buffers):
        first: dict[int, str] = {}
        for name, tensor in named(remove_duplicate=False):
            aliases.setdefault(first.setdefault(id(tensor), name), []).append(name)
    return aliases


def test_the_layout_has_torchs_names_order_and_every_alias() -> None:
    model = Tricky()
    layout = module_layout(model)
    assert list(layout.parameters) == [name for name, _ in model.named_parameters()]
    assert all(layout.parameters[name] is p for name, p in model.named_parameters())
    assert list(layout.buffers) == [name for name, _ in model.named_buffers()]
    assert all(layout.buffers[name] is b for name, b in model.named_buffers())
    assert [(prefix, id(m)) for prefix, m in layout.modules] == [(prefix, id(m)) for prefix, m in model.named_modules()]
    assert layout.submodules == list(model.modules())
    assert layout.aliases == _aliases(model)
    # the shared Linear's tensors and the tied weight carry both of their names
    assert layout.aliases["body.0.weight"] == ["body.0.weight", "shortcut.weight"]
    assert layout.aliases["decoder.weight"] == ["decoder.weight", "tied.weight"]
    assert "encoder.bias" not in layout.parameters  # a None slot is no parameter


def test_a_probe_call_walks_the_module_tree_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # On a 12-layer transformer (124 submodules) the probe's separate walks (guard, arguments, isolation, sharding
    # test) cost more than one forward pass per check; now one walk serves them all.
    model = Tricky()
    probe = ObjectiveProbe(model)
    batch = torch.randn(8, 4)
    theta = probe.parameters()
    before = probe.point_losses(batch, [theta, theta])
    walks = []
    original = nn.Module.named_modules

    def counting(self: nn.Module, *args, **kwargs):
        if self is model:
            walks.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "named_modules", counting)
    after = probe.point_losses(batch, [theta, {name: 2 * p for name, p in theta.items()}])
    assert len(walks) == 1
    assert torch.equal(after[0], before[0])  # the same loss at the same point: nothing leaked between calls
    assert not torch.equal(after[1], before[1])


def test_the_probe_cost_benchmark_measures_a_module_rich_model(capsys: pytest.CaptureFixture) -> None:
    from benchmarks.probe_cost import main

    assert main(["--calls", "3", "--no-report"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 12-layer"))
    assert "124 submodules, 146 parameter tensors" in row
    plain, probe, overhead = (float(cell) for cell in row.split("|")[2:5])
    assert probe > plain > 0 and overhead == pytest.approx(probe - plain, abs=0.011)
