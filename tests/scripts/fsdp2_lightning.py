"""StableLR and StabilityMonitor on a model sharded with FSDP2 through Lightning's ``ModelParallelStrategy``.

``python tests/scripts/fsdp2_lightning.py OUT {sharded,ddp}``: 2 CPU processes over gloo (Lightning
relaunches this script as rank 1). ``sharded`` applies ``fully_shard`` to every layer in
``configure_model`` (its parameters are DTensor shards); ``ddp`` trains the same model unsharded with
``strategy="ddp"``, the reference. Rank 0's loss is NaN at step ``NAN_STEP``. Each rank writes
``OUT/{mode}_rank{r}.json``: every logged metric per step, its warnings, whether its parameters are
finite, sharded, and the sum of its local shard values.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stablelr import StabilityMonitor, StableLR
from tests.scripts._exit import leave_distributed_run
from tests.test_monitor_support import RecordingLogger

torch.set_num_threads(1)
NAN_STEP = 7


class Net(L.LightningModule):
    def __init__(self, shard: bool) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
        self.shard = shard

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def objective(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        loss = self.objective(batch)
        if self.global_step == NAN_STEP and self.global_rank == 0 and torch.is_grad_enabled():  # not in a probe
            loss = loss * math.nan
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.objective(batch), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.9)


def loaders() -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(160, 6, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return (DataLoader(TensorDataset(x[:128], y[:128]), batch_size=8),
            DataLoader(TensorDataset(x[128:], y[128:]), batch_size=8))  # fmt: skip


def main(out: Path, mode: str) -> None:
    shard = mode == "sharded"
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if shard else "ddp"
    recorder = RecordingLogger()
    stable = StableLR(check_every_n_steps=2, dense_check_steps=4, warmup_steps=4)
    monitor = StabilityMonitor(
        certificate_every_n_steps=2, sharpness_every_n_steps=4, sharpness_iters=5, connectivity_every_n_epochs=1,
        certificate_window=3, connectivity_window=3, connectivity_batches=2, max_overhead=math.inf,
    )  # fmt: skip
    trainer = L.Trainer(
        strategy=strategy, accelerator="cpu", devices=2, max_epochs=3, logger=[recorder], callbacks=[stable, monitor],
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=1,
    )  # fmt: skip
    model = Net(shard)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, *loaders())
    parameters = list(model.parameters())
    local = [p.to_local() if hasattr(p, "to_local") else p for p in parameters]
    dump = {
        "records": recorder.records,
        "warnings": [str(w.message) for w in caught],
        "sharded": all(hasattr(p, "placements") for p in parameters),
        "finite": all(bool(torch.isfinite(t).all()) for t in local),
        "local_sum": float(sum(t.double().sum() for t in local)),
        "nonfinite_steps": stable.controller.nonfinite_steps,
        "stability_factor": stable.controller.stability_factor,
        "global_step": trainer.global_step,
    }
    (out / f"{mode}_rank{trainer.global_rank}.json").write_text(json.dumps(dump))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    leave_distributed_run()
