"""StableLRScheduler on an FSDP2 model (``fully_shard``), 2 CPU processes over gloo, in a plain torch loop.

``python tests/scripts/fsdp2_scheduler.py OUT_DIR [--nan-step K] [--port P] [--no-protect] [--pass-loss all|rank0]``
writes ``OUT_DIR/rank{r}.json`` (and ``error_rank{r}.txt`` when a check refuses its arguments on every rank):
the lr of every step, C, the counters, and whether every local shard stayed finite. Rank ``r`` trains on
its own batches with inputs scaled by ``1 + 2r`` (its losses differ from the other rank's), so a decision
taken from one rank's losses alone would make the lrs differ. At step ``K`` rank 0's loss is NaN.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from _exit import leave_distributed_run  # a sibling module: this directory is sys.path[0]
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lightning_stablelr import StableLRScheduler

STEPS = 16


def worker(rank: int, world: int, out: Path, nan_step: int, port: int, protect: bool, pass_loss: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train(rank, out, nan_step, protect, pass_loss)
    except ValueError as error:  # a refusal every rank raises alike: recorded, and the ranks still leave together
        (out / f"error_rank{rank}.txt").write_text(str(error))
    leave_distributed_run()  # both ranks meet, gloo is torn down, and the worker leaves (see _exit.py)


def train(rank: int, out: Path, nan_step: int, protect: bool, pass_loss: str) -> None:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    scheduler = StableLRScheduler(
        optimizer, steps_per_epoch=8, decay_rate=0.1, warmup_steps=0, check_every_n_steps=2,
        dense_check_steps=4, safety=0.25, recover_above=8.0, guard_window=1,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1 + rank)
    lrs = []
    for step in range(STEPS):
        x = torch.randn(8, 4, generator=generator) * (1 + 2 * rank)
        y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(8, 1, generator=generator)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if step == nan_step and rank == 0:
            loss = loss * math.nan
        loss.backward()
        if protect:
            scheduler.protect(loss)
        check = scheduler.should_check()
        if check:
            scheduler.snapshot()
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if check:
            given = pass_loss == "all" or (pass_loss == "rank0" and rank == 0)
            scheduler.check_step(
                lambda x=x, y=y: nn.functional.mse_loss(model(x), y), module=model,
                loss=loss.detach() if given else None,
            )  # fmt: skip
        scheduler.step()
    scheduler.state_dict()  # reads the counts that are still on the device
    controller = scheduler.controller
    result = {
        "sharded": sharded,
        "lrs": lrs,
        "stability_factor": controller.stability_factor,
        "nonfinite_steps": controller.nonfinite_steps,
        "checks": controller.checks,
        "losses_reused": scheduler.loss_reuse.reused,
        "finite": all(bool(torch.isfinite(p.to_local()).all()) for p in model.parameters()),
        "local_sum": float(sum(p.detach().to_local().double().sum() for p in model.parameters())),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--nan-step", type=int, default=-1)
    parser.add_argument("--port", type=int, default=29541)
    parser.add_argument("--no-protect", action="store_true", help="the control: no scheduler.protect()")
    parser.add_argument("--pass-loss", choices=("none", "all", "rank0"), default="none",
                        help="which ranks pass check_step(loss=...)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.multiprocessing.spawn(
        worker, args=(2, args.out, args.nan_step, args.port, not args.no_protect, args.pass_loss), nprocs=2
    )


if __name__ == "__main__":
    main()
