"""Extra memory each callback holds, as a multiple of the trainable parameters' size.

    python -m benchmarks.memory            # a 2.4M-parameter fp32 MLP, 6 epochs of 30 steps (17 for the last row)

How it is measured: just before every optimizer step (after the callbacks listed before the meter took
their snapshots), after every training batch and at the end of every epoch, the tensors reachable from
the callback object (its attributes, recursively, through dicts, lists, tuples, deques and dataclasses; the
trainer, the LightningModule, optimizers and loaders are not followed) are collected, and the bytes of
their distinct storages are summed, leaving out storages shared with the model's parameters, gradients or
buffers and the optimizer's state. The peak over the run and the value at the end are reported. Transient
tensors that live only inside a probe (the θ ± Δθ points of a line probe, a Hessian-vector product's
graph) are not held by the callback and are not counted here. tracemalloc does not see torch's CPU
allocator, so it cannot measure this.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import sys
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stablelr import StabilityMonitor, StableLR

_SKIP = (nn.Module, L.Trainer, torch.optim.Optimizer, DataLoader)


def held_bytes(root: Any, exclude: set[int]) -> int:
    """Bytes of the distinct tensor storages reachable from ``root`` whose data pointer is not in ``exclude``."""
    seen: set[int] = set()
    storages: dict[int, int] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _SKIP) or (callable(obj) and not hasattr(obj, "__dict__")):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in exclude:
                storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
            stack.extend(obj)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            stack.extend(getattr(obj, f.name) for f in dataclasses.fields(obj))
        elif hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__ != "builtins":
            stack.extend(vars(obj).values())
    return sum(storages.values())


class _Meter(Callback):
    """Samples :func:`held_bytes` of ``target`` after every batch and epoch."""

    def __init__(self, target: Callback) -> None:
        self.target, self.peak, self.last = target, 0, 0

    def _sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        exclude = {t.untyped_storage().data_ptr() for t in [*pl_module.parameters(), *pl_module.buffers()]}
        exclude |= {p.grad.untyped_storage().data_ptr() for p in pl_module.parameters() if p.grad is not None}
        for optimizer in trainer.optimizers:
            for state in optimizer.state.values():
                exclude |= {v.untyped_storage().data_ptr() for v in state.values() if isinstance(v, torch.Tensor)}
        self.last = held_bytes(self.target, exclude)
        self.peak = max(self.peak, self.last)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._sample(trainer, pl_module)  # after the callbacks before it took their snapshot of θ

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sample(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._sample(trainer, pl_module)


class _MLP(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                                 nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))  # fmt: skip

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def measure(name: str, callback: Callback, steps: int = 30, epochs: int = 6) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(steps * 16, 256, generator=generator), torch.randint(0, 10, (steps * 16,), generator=generator)
    model = _MLP()
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    meter = _Meter(callback)
    trainer = L.Trainer(max_epochs=epochs, logger=False, callbacks=[callback, meter], enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32))
    peak, last = meter.peak / parameter_bytes, meter.last / parameter_bytes
    print(f"| {name} | {peak:.2f} | {last:.2f} |", flush=True)
    return peak, last


def main() -> int:
    torch.set_num_threads(1)
    print(f"model: {sum(p.numel() for p in _MLP().parameters()):,} fp32 parameters; torch {torch.__version__}")
    print("| callback | peak held / parameter size | held at the end / parameter size |\n|---|---|---|")
    measure("`StableLR()`", StableLR())
    measure("`StabilityMonitor()`", StabilityMonitor())
    measure("`StabilityMonitor(max_overhead=math.inf)`", StabilityMonitor(max_overhead=math.inf))
    measure("`StabilityMonitor(snapshot_dtype='float32', snapshot_memory=17.0, connectivity_window=16, "
            "max_overhead=math.inf)` (the old layout)",
            StabilityMonitor(snapshot_dtype="float32", snapshot_memory=17.0, connectivity_window=16,
                             max_overhead=math.inf), steps=20, epochs=17)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
