"""Train a tiny deterministic regressor with ``StableLR`` and record the lr of every optimizer step.

Run by the integration tests as a real subprocess (``python tests/scripts/train_stablelr.py --out DIR``):

- ``tests/test_stable_lr_resume.py``: an uninterrupted run against one that SIGKILLs itself
  (``--kill-at-step``) and is resumed from ``last.ckpt`` (``--resume``);
- ``tests/test_stable_lr_ddp.py``: ``--strategy ddp|ddp_spawn --devices 2 --rank-scaled``, where every rank
  trains on its own data shard (different inputs and loss scale) and logs an unsynced ``val_loss``.

Files written into ``--out`` (``{r}`` is the global rank):

- ``lr_rank{r}.jsonl``: one line per optimizer step, ``{"step": global_step, "lrs": [lr per param group]}``,
  appended and flushed at once, read back *after* ``optimizer.step`` so it is the lr that step used;
- ``factors_rank{r}.jsonl``: ``stablelr/*``, ``train_loss``, ``val_loss`` of ``callback_metrics`` after every
  batch and epoch;
- ``sampler_epochs_rank{r}.jsonl``: every epoch that Lightning passed to ``EpochSeededSampler.set_epoch``;
- ``final_rank{r}.pt``: the final ``state_dict``; ``done_rank{r}.json``: global step and epoch at the end;
- ``probes_rank{r}.json``: StableLR's guard probes, how many took L0 from training, whether a replay refuted it;
- ``checkpoints/last.ckpt``: written by ``ModelCheckpoint(save_last=True, every_n_epochs=1)``.

Everything that decides the trajectory (weights, data, data order) depends only on ``--seed`` and the
epoch, so a run resumed from an epoch-end checkpoint must reproduce the uninterrupted one bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from _exit import leave_distributed_run  # a sibling module: this directory is sys.path[0]
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

NUM_FEATURES = 6


class EpochSeededSampler(Sampler[int]):
    """A random permutation of ``range(length)`` drawn from a generator seeded with ``seed + epoch``.

    Lightning calls ``set_epoch(epoch_progress.current.processed)`` on every training sampler that has it
    (``lightning.fabric.utilities.data._set_sampler_epoch``, from ``_FitLoop.on_advance_start``), and a
    resumed fit loop restores that counter, so the order of epoch ``e`` is the same in a resumed run.
    """

    def __init__(self, length: int, seed: int, record: Path | None = None) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0
        self.record = record

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.record is not None:
            _append_json(self.record, {"epoch": epoch})

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


def _append_json(path: Path, record: dict[str, Any]) -> None:
    # One open/flush per record: a SIGKILL must never lose a step that was already taken.
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def make_data(num: int, seed: int, scale: float, noise: float) -> TensorDataset:
    """``y = scale * (sin(x @ w) + noise * eps)``: a smooth target plus per-sample noise to memorize."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num, NUM_FEATURES, generator=generator)
    w = torch.randn(NUM_FEATURES, 1, generator=torch.Generator().manual_seed(1234))
    y = torch.sin(x @ w) + noise * torch.randn(num, 1, generator=generator)
    return TensorDataset(x * scale, y * scale)


class TinyRegressor(L.LightningModule):
    """A 6-32-1 tanh MLP with two param groups (body at ``lr``, head at ``lr * head_lr_ratio``)."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        self.body = nn.Sequential(nn.Linear(NUM_FEATURES, 32), nn.Tanh())
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def _loss(self, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss)
        if self.args.rank_ramp:  # rank r's loss depends on global_step: a replay after the step differs
            loss = loss * (1.0 + self.args.rank_ramp * self.global_rank * self.global_step)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        # Deliberately not sync_dist: under --rank-scaled the ranks see different val losses, and StableLR
        # has to reduce them itself so that every rank makes the same gap decision.
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        args = self.args
        groups = [
            {"params": self.body.parameters(), "lr": args.lr},
            {"params": self.head.parameters(), "lr": args.lr * args.head_lr_ratio},
        ]
        if args.optimizer == "adam":
            return torch.optim.Adam(groups)
        return torch.optim.SGD(groups, momentum=args.momentum)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        optimizer.step(closure=optimizer_closure)
        # Read after the step: whatever a callback set before it, this is the lr the step used.
        lrs = [group["lr"] for group in optimizer.param_groups]
        _append_json(
            _rank_file(self.args, "lr", self.global_rank), {"step": self.trainer.global_step, "lrs": lrs}
        )

    def _dataset(self, split: str) -> TensorDataset:
        args = self.args
        rank = self.global_rank if args.rank_scaled else 0
        scale = 1.0 + 2.0 * rank if args.rank_scaled else 1.0
        if split == "train":
            return make_data(args.train_size, args.seed + 100 * rank, scale, args.noise)
        return make_data(args.val_size, args.seed + 100 * rank + 1, scale, args.val_noise)

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train")
        sampler = EpochSeededSampler(
            len(dataset), self.args.seed, record=_rank_file(self.args, "sampler_epochs", self.global_rank)
        )
        return DataLoader(dataset, batch_size=self.args.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("val"), batch_size=self.args.val_size)


def _rank_file(args: argparse.Namespace, stem: str, rank: int) -> Path:
    return Path(args.out) / f"{stem}_rank{rank}.jsonl"


class FactorRecorder(Callback):
    """Writes ``stablelr/*``, ``train_loss`` and ``val_loss`` of ``callback_metrics`` after every batch and epoch."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def _write(self, trainer: L.Trainer, where: str) -> None:
        # train_loss/val_loss are this rank's own (unsynced) values: the DDP test checks that they differ.
        values = {
            key: float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith("stablelr/") or key in ("train_loss", "val_loss")
        }
        record = {"where": where, "step": trainer.global_step, "epoch": trainer.current_epoch, **values}
        _append_json(self.out / f"factors_rank{trainer.global_rank}.jsonl", record)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._write(trainer, "batch")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer, "epoch")


class KillAtStep(Callback):
    """SIGKILLs this process right before optimizer step ``step``: no cleanup, no checkpoint, no flush."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--train-size", type=int, default=24)
    parser.add_argument("--val-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--noise", type=float, default=1.0, help="noise std of the training targets")
    parser.add_argument("--val-noise", type=float, default=1.0, help="noise std of the validation targets")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--head-lr-ratio", type=float, default=0.5)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--stablelr", default="{}", help="StableLR kwargs as JSON, or 'off' for no callback")
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument(
        "--resume", action="store_true", help="fit with ckpt_path=<out>/checkpoints/last.ckpt"
    )
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument(
        "--rank-scaled", action="store_true", help="per-rank data shards with scale 1 + 2 rank"
    )
    parser.add_argument(
        "--rank-ramp", type=float, default=0.0, help="multiply rank r's loss by 1 + RAMP * r * global_step"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(args.seed, workers=True, verbose=False)

    callbacks: list[Callback] = []
    if args.stablelr != "off":
        from lightning_stablelr import StableLR

        callbacks.append(StableLR(**json.loads(args.stablelr)))
    callbacks.append(FactorRecorder(out))
    callbacks.append(ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, every_n_epochs=1))
    if args.kill_at_step is not None:
        callbacks.append(KillAtStep(args.kill_at_step))

    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        max_epochs=args.epochs,
        deterministic=True,
        callbacks=callbacks,
        logger=False,
        log_every_n_steps=1,  # StableLR refreshes its metrics at logging steps; this harness reads every batch
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=1,
        default_root_dir=out,
    )
    model = TinyRegressor(args)
    ckpt_path = out / "checkpoints" / "last.ckpt" if args.resume else None
    trainer.fit(model, ckpt_path=ckpt_path)

    rank = trainer.global_rank
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / f"final_rank{rank}.pt")
    done = {"global_step": trainer.global_step, "current_epoch": trainer.current_epoch}
    if callbacks and hasattr(callbacks[0], "line_probe"):  # StableLR's guard probes: how many took L0 from training
        session = callbacks[0].line_probe
        probes = {"probes": session.probes_run, "losses_reused": session.reuse.reused, "refuted": session.reuse.refuted}
        (out / f"probes_rank{rank}.json").write_text(json.dumps(probes))
    (out / f"done_rank{rank}.json").write_text(json.dumps(done))


if __name__ == "__main__":
    main()
    leave_distributed_run()
