"""ObjectiveProbe on FSDP2-sharded (DTensor) parameters, in one process (a gloo group of size 1).

The probe writes each point into the shards in place and copies parameters and buffers back: its losses
equal those of the same model unsharded (functional_call), the module ends bit-identical (BatchNorm
running statistics included), also when the loss raises, and a differentiable probe is refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_stablelr.probe import ObjectiveProbe, ShardedProbeError

fsdp = pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 (fully_shard) needs torch >= 2.6")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 2))
        self.fail = False

    def probe_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("injected")
        x, y = batch
        return nn.functional.mse_loss(self.body(x), y)


@pytest.fixture()
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _state(module: nn.Module) -> list[torch.Tensor]:
    tensors = [*module.parameters(), *module.buffers()]
    return [(t.to_local() if hasattr(t, "to_local") else t).detach().clone() for t in tensors]


def test_sharded_points_match_the_unsharded_probe_and_leave_the_module_untouched(one_process_group):
    torch.manual_seed(0)
    plain = Net()
    sharded = copy.deepcopy(plain)
    for layer in sharded.body:
        if isinstance(layer, nn.Linear):
            fsdp.fully_shard(layer)
    fsdp.fully_shard(sharded.body)  # the unit whose forward the loss calls (its hooks gather the shards)
    assert all(hasattr(p, "placements") for p in sharded.parameters())
    batch = (torch.randn(12, 5), torch.randn(12, 2))
    moved = {name: p.detach() + 0.1 for name, p in plain.named_parameters()}
    moved_sharded = {name: p.detach() + 0.1 for name, p in sharded.named_parameters()}

    expected = ObjectiveProbe(plain).losses(batch, [dict(plain.named_parameters()), moved], seed=3)
    probe = ObjectiveProbe(sharded)
    with torch.no_grad():
        sharded.body(batch[0])  # FSDP2 keeps the root unit's parameters gathered after a forward
    before = _state(sharded)
    live = probe.parameters()  # references to the live shards: read from a copy, not overwritten mid-probe
    got = probe.losses(batch, [live, moved_sharded, live], seed=3)
    assert got[0] == pytest.approx(expected[0], abs=1e-6) and got[1] == pytest.approx(expected[1], abs=1e-6)
    assert got[2] == got[0]
    assert all(torch.equal(a, b) for a, b in zip(before, _state(sharded), strict=True))

    sharded.fail = True
    with pytest.raises(RuntimeError, match="injected"):
        probe.losses(batch, [moved_sharded])
    assert all(torch.equal(a, b) for a, b in zip(before, _state(sharded), strict=True))
    with pytest.raises(ShardedProbeError, match=r"sharded \(DTensor, e\.g\. FSDP2\) parameters"):
        probe.loss(batch, create_graph=True)
