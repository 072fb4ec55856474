"""Two ways to train one benchmark run, with the same data order, initialisation and lr rules.

- :func:`run_lightning`: a real ``lightning.Trainer`` (CPU, no logger, checkpoint or progress bar) with the
  policy's callbacks: the StableLR **callback** itself, or the peer's torch scheduler stepped by Lightning.
- :func:`run_plain`: a plain PyTorch loop that reproduces what Lightning does for these runs, hook for hook,
  with StableLR as :class:`~lightning_stablelr.StableLRScheduler` (the same controller as the callback):
  lr set before every step, the three-point guard on the steps the callback checks
  (``StableLRScheduler.should_check``, the callback's rule: every step below ``dense_check_steps``, then
  every ``check_every_n_steps``-th), a step with non-finite gradients dropped and
  ``C`` halved, ``L_tr`` = mean of the finite step losses, ``G`` updated after each validation; the peers'
  schedulers stepped once per epoch after validation (``ReduceLROnPlateau`` with ``val_loss``).

The plain loop exists because Lightning's fixed cost per step and per epoch (hooks, result collection)
dominates runs this small: on 2 shared cores the full grid would not fit its time budget.
``tests/test_benchmarks_smoke.py`` checks that both engines give the same lr trajectory and losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import lightning as L
import torch

from benchmarks.common import tensor_loader
from benchmarks.policies import Policy, load_optimizer
from benchmarks.tasks import Task

__all__ = ["Outcome", "RunTracker", "run_lightning", "run_plain", "scheduler_arguments", "stable_step",
           "stablelr_cadence"]


@dataclass
class Outcome:
    """What one run produced; :func:`benchmarks.robustness.run_one` turns it into a results line."""

    val_curve: list[float] = field(default_factory=list)
    lr_trace: list[float] = field(default_factory=list)  # param group 0's lr before every optimizer step
    initial_train_loss: float = math.nan
    initial_val_loss: float = math.nan
    final_train_loss: float = math.nan
    steps: int = 0
    nonfinite_losses: int = 0
    nonfinite_weights: bool = False
    stablelr: dict[str, float] | None = None  # checks, nonfinite_steps, gap_factor, stability_factor


def stablelr_cadence(overrides: dict[str, Any]) -> tuple[int, int]:
    """``(check_every_n_steps, dense_check_steps)``: the overrides, else the library's defaults."""
    from lightning_stablelr.config import CheckCadence

    cadence = CheckCadence(**{f.name: overrides[f.name] for f in fields(CheckCadence) if f.name in overrides})
    return cadence.check_every_n_steps, cadence.dense_check_steps


def scheduler_arguments(overrides: dict[str, Any]) -> dict[str, Any]:
    """The StableLR callback ``overrides`` that ``StableLRScheduler`` takes too: the controller's
    :class:`~lightning_stablelr.config.StableLRConfig` fields and the check cadence (the rest, such as
    ``monitor`` or ``skip_nonfinite``, is Lightning-side behaviour that the plain loop reproduces itself)."""
    from lightning_stablelr.config import CheckCadence, config_field_names

    names = {*config_field_names(), *(f.name for f in fields(CheckCadence))}
    return {key: value for key, value in overrides.items() if key in names}


def _controller_stats(controller: Any) -> dict[str, float]:
    return {"checks": controller.checks, "nonfinite_steps": controller.nonfinite_steps,
            "gap_factor": controller.gap_factor, "stability_factor": controller.stability_factor}


def _params_finite(module: torch.nn.Module) -> bool:
    with torch.no_grad():
        return all(bool(torch.isfinite(param).all()) for param in module.parameters())


def _setup(task: Task, policy: Policy, optimizer: str, lr: float, seed: int) -> tuple[L.LightningModule, Outcome]:
    factory = load_optimizer(optimizer, lr, schedule_free=policy.schedule_free)
    L.seed_everything(seed, verbose=False)
    module = task.make_module(factory, policy.scheduler, policy.interval, policy.monitor)
    outcome = Outcome(initial_train_loss=task.full_loss(module, "train"),
                      initial_val_loss=task.full_loss(module, "val"))
    return module, outcome


def _loaders(task: Task, batch_size: int, seed: int) -> tuple[Any, Any]:
    x_train, y_train = task.splits["train"]
    x_val, y_val = task.splits["val"]
    return (tensor_loader(x_train, y_train, batch_size=batch_size, seed=seed),
            tensor_loader(x_val, y_val, batch_size=len(x_val), shuffle=False))


class RunTracker(L.Callback):
    """Records the val-loss curve, the lr of each step and non-finite losses; stops once weights are non-finite."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.outcome.lr_trace.append(float(optimizer.param_groups[0]["lr"]))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and not math.isfinite(float(loss)):
            self.outcome.nonfinite_losses += 1

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            value = trainer.callback_metrics.get("val_loss")
            self.outcome.val_curve.append(math.nan if value is None else float(value))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not _params_finite(pl_module):  # NaN/Inf weights never recover: stop and save the time
            self.outcome.nonfinite_weights = True
            trainer.should_stop = True


def run_lightning(task: Task, policy: Policy, *, optimizer: str, lr: float, seed: int, epochs: int,
                  batch_size: int) -> Outcome:
    """Train with ``lightning.Trainer`` and the policy's real callbacks; see the module docstring."""
    module, outcome = _setup(task, policy, optimizer, lr, seed)
    train_loader, val_loader = _loaders(task, batch_size, seed)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[*policy.callbacks(), RunTracker(outcome)],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
    outcome.final_train_loss = task.full_loss(module, "train")
    outcome.steps = int(trainer.global_step)
    stable = next((cb for cb in trainer.callbacks if type(cb).__name__ == "StableLR"), None)
    if stable is not None:
        outcome.stablelr = _controller_stats(stable.controller)
    return outcome


def run_plain(task: Task, policy: Policy, *, optimizer: str, lr: float, seed: int, epochs: int,
              batch_size: int) -> Outcome:
    """Train in a plain loop that mirrors :func:`run_lightning` step for step; see the module docstring."""
    from lightning_stablelr import StableLRScheduler
    from lightning_stablelr.rng import probe_seed

    module, outcome = _setup(task, policy, optimizer, lr, seed)
    train_loader, _ = _loaders(task, batch_size, seed)
    configured = module.configure_optimizers()
    opt = configured["optimizer"] if isinstance(configured, dict) else configured
    scheduler = configured["lr_scheduler"]["scheduler"] if isinstance(configured, dict) else None
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    stable = None
    if policy.stablelr is not None:
        arguments = scheduler_arguments(dict(policy.stablelr))
        stable = StableLRScheduler(opt, steps_per_epoch=len(train_loader), total_steps=epochs * len(train_loader),
                                   **arguments)
    step = 0
    for epoch in range(epochs):
        train_loader.batch_sampler.sampler.set_epoch(epoch)
        if policy.schedule_free:
            opt.train()
        module.train()
        loss_sum, loss_count = 0.0, 0
        for batch in train_loader:
            outcome.lr_trace.append(float(opt.param_groups[0]["lr"]))
            opt.zero_grad(set_to_none=True)
            loss = module.probe_loss(batch)
            loss.backward()
            value = float(loss.detach())
            if math.isfinite(value):
                loss_sum, loss_count = loss_sum + value, loss_count + 1
            else:
                outcome.nonfinite_losses += 1
            if stable is not None:
                stable_step(stable, opt, lambda batch=batch: module.probe_loss(batch), stable.should_check(step),
                            probe_seed(step), loss=loss.detach())
            else:
                opt.step()
            step += 1
        module.eval()
        if policy.schedule_free:
            opt.eval()
        val_loss = task.full_loss(module, "val")
        outcome.val_curve.append(val_loss)
        if stable is not None:
            if loss_count:
                stable.controller.record_train_loss(loss_sum / loss_count, loss_count)
            stable.observe(val_loss=val_loss)
        elif scheduler is not None:
            scheduler.step(val_loss) if plateau else scheduler.step()
        if not _params_finite(module):
            outcome.nonfinite_weights = True
            break
    if policy.schedule_free:
        opt.eval()
    outcome.final_train_loss = task.full_loss(module, "train")
    outcome.steps = step
    if stable is not None:
        outcome.stablelr = _controller_stats(stable.controller)
    return outcome


def stable_step(stable: Any, opt: torch.optim.Optimizer, probe: Callable[[], torch.Tensor], check: bool,
                seed: int, module: torch.nn.Module | None = None, loss: torch.Tensor | None = None) -> None:
    """One optimizer step under StableLR, in the callback's order: finite check, snapshot, step, probe.

    ``probe()`` is the loss of the current batch at the current parameters; pass ``module`` when it runs
    BatchNorm in train mode, so that the probe restores its running statistics. ``loss``: the step's
    training loss, which stands in for the probe's L0 once a replay has reproduced it (as in the callback).
    """
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    if not all(bool(torch.isfinite(grad).all()) for grad in grads):
        stable.observe_nonfinite()  # the callback drops the step (grads set to None) and halves C
    else:
        if check:
            stable.snapshot()
        opt.step()
        if check:
            stable.check_step(probe, seed=seed, module=module, loss=loss)
    stable.step()
