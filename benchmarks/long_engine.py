"""The policies of the long-horizon panels and the plain-PyTorch loop that trains one run.

Policies (``S`` = total optimizer steps, ``W = warmup_steps(S)`` = 5% of ``S``, the same for every policy
that has a warmup; multipliers of the base lr ``η0`` as a function of the steps ``k`` already taken):

- ``constant``: ``1`` (no warmup).
- ``cosine``: linear warmup ``(k+1)/W``, then cosine from 1 to **10% of the peak** at ``k = S``.
- ``wsd``: warmup-stable-decay: linear warmup, ``1``, then linear decay to **0** over the last 20% of ``S``.
- ``schedulefree``: ``schedulefree.AdamWScheduleFree`` (AdamW panels) or ``SGDScheduleFree`` (SGD panels)
  with ``warmup_steps=W``, the panel's weight decay and betas/momentum; ``optimizer.eval()`` around every
  evaluation (BatchNorm statistics recomputed at the averaged weights on 8 fixed training batches first).
- ``prodigy``: ``prodigyopt.Prodigy(lr=1.0)`` at its defaults (no weight decay, no schedule) on every panel,
  an Adam-like lr-free anchor: one point per seed, recorded at ``lr = 1``.
- ``stablelr``: :class:`lightning_stablelr.StableLRScheduler` at its **defaults** (its own warmup), with the
  guard on the callback's check steps, ``observe(train_loss=)`` every finite step and ``observe(val_loss=)``
  at every evaluation, as the Lightning callback does.

The recorded lr is the effective lr of param group 0 before the step: ``d·lr`` for Prodigy, the
scheduled lr for schedule-free (its internal warmup included).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.long_panels import Panel

__all__ = ["POLICIES", "lr_multiplier", "train_run", "warmup_steps"]

POLICIES = ("stablelr", "constant", "cosine", "wsd", "schedulefree", "prodigy")
SINGLE_POINT = ("prodigy",)  # lr-free: one run per seed at lr 1
TRACE_EVERY = 100
DIVERGE_RATIO = 1.5


def warmup_steps(total: int) -> int:
    """The shared warmup length: 5% of the run."""
    return max(1, round(0.05 * total))


def lr_multiplier(policy: str, total: int) -> Callable[[int], float] | None:
    """The peer's lr multiplier of step ``k`` (see the module docstring), or None for a constant lr."""
    warm = warmup_steps(total)
    if policy == "cosine":
        def cosine(k: int) -> float:
            if k < warm:
                return (k + 1) / warm
            progress = min(1.0, (k - warm) / max(1, total - warm))
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
        return cosine
    if policy == "wsd":
        decay_start = round(0.8 * total)

        def wsd(k: int) -> float:
            if k < warm:
                return (k + 1) / warm
            return 1.0 if k < decay_start else max(0.0, (total - k) / (total - decay_start))
        return wsd
    return None


def _optimizer(panel: Panel, policy: str, lr: float, params: Any, total: int) -> torch.optim.Optimizer:
    adamw = panel.optimizer == "adamw"
    if policy == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=1.0)
    if policy == "schedulefree":
        import schedulefree

        if adamw:
            return schedulefree.AdamWScheduleFree(params, lr=lr, betas=(0.9, 0.999), weight_decay=panel.weight_decay,
                                                  warmup_steps=warmup_steps(total))
        return schedulefree.SGDScheduleFree(params, lr=lr, momentum=0.9, weight_decay=panel.weight_decay,
                                            warmup_steps=warmup_steps(total))
    if adamw:
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=panel.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=panel.weight_decay)


def _effective_lr(opt: torch.optim.Optimizer, policy: str, step: int, total: int) -> float:
    group = opt.param_groups[0]
    if policy == "prodigy":
        return float(group["d"]) * float(group["lr"])
    if policy == "schedulefree":
        return float(group["lr"]) * min(1.0, (step + 1) / warmup_steps(total))
    return float(group["lr"])


def _stablelr(opt: torch.optim.Optimizer, panel: Panel, total: int) -> Any:
    """``StableLRScheduler`` at its defaults; the run's length is passed as ``total_steps`` where the
    scheduler takes it (a length-following default decay needs it, as the callback reads
    ``trainer.estimated_stepping_batches``)."""
    import inspect

    from lightning_stablelr import StableLRScheduler

    extra = {"total_steps": total} if "total_steps" in inspect.signature(StableLRScheduler).parameters else {}
    extra.update(stablelr_overrides())
    return StableLRScheduler(opt, steps_per_epoch=panel.steps_per_epoch, **extra)


def stablelr_overrides() -> dict[str, Any]:
    """StableLR overrides for a sweep of the defaults (``--stablelr KEY=VALUE`` sets ``OVERRIDES_ENV``)."""
    import json
    import os

    return json.loads(os.environ.get(OVERRIDES_ENV, "{}"))


OVERRIDES_ENV = "STABLELR_BENCH_OVERRIDES"


def _recalibrate_batchnorm(model: nn.Module, panel: Panel, batches: int = 8) -> None:
    """Running statistics of every BatchNorm recomputed (cumulative mean) on ``batches`` fixed training batches."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    generator = torch.Generator().manual_seed(999)
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(panel.train_batch(generator)[0])
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


def _evaluate(model: nn.Module, panel: Panel, opt: torch.optim.Optimizer, policy: str) -> float:
    if policy == "schedulefree":
        opt.eval()
        if panel.batchnorm:
            _recalibrate_batchnorm(model, panel)
    model.eval()
    with torch.no_grad():
        value = panel.val_loss(model)
    model.train()
    if policy == "schedulefree":
        opt.train()
    return value


def _finite_params(model: nn.Module) -> bool:
    with torch.no_grad():
        return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train_run(panel: Panel, policy: str, lr: float, seed: int, *, steps: int, eval_every: int) -> dict[str, Any]:
    """Train one run; return its measurements (see :func:`benchmarks.long.run_one` for the fields)."""
    from benchmarks.engines import stable_step
    from lightning_stablelr.rng import probe_seed

    torch.manual_seed(seed)
    model = panel.make_model()
    generator = torch.Generator().manual_seed(seed)
    opt = _optimizer(panel, policy, lr, model.parameters(), steps)
    multiplier = lr_multiplier(policy, steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, multiplier) if multiplier else None
    stable = _stablelr(opt, panel, steps) if policy == "stablelr" else None
    if policy == "schedulefree":
        opt.train()
    initial = _evaluate(model, panel, opt, policy)
    out: dict[str, Any] = {"initial_val_loss": initial, "val_curve": [], "lr_trace": [], "c_trace": [],
                           "nonfinite_losses": 0, "c_min": None}
    if stable is not None:
        out["margins"] = []
    started, step = time.perf_counter(), 0
    for step in range(steps):
        if step % TRACE_EVERY == 0:
            out["lr_trace"].append(_effective_lr(opt, policy, step, steps))
            if stable is not None:
                out["c_trace"].append(stable.controller.stability_factor)
        model.train()
        batch = panel.train_batch(generator)
        opt.zero_grad(set_to_none=True)
        loss = panel.loss(model, batch)
        loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            out["nonfinite_losses"] += 1
        if stable is not None:
            if math.isfinite(value):
                stable.observe(train_loss=value)
            checks = stable.controller.checks
            check = stable.should_check(step)  # the callback's cadence and the guard's confirmation checks
            stable_step(stable, opt, lambda batch=batch: panel.loss(model, batch), check,
                        probe_seed(step), module=model if panel.batchnorm else None, loss=loss.detach())
            if stable.controller.checks > checks:  # the guard ran: keep its step margin s_max
                out["margins"].append(stable.controller.last_step_margin)
            factor = stable.controller.stability_factor
            out["c_min"] = factor if out["c_min"] is None else min(out["c_min"], factor)
        else:
            opt.step()
            if schedule is not None:
                schedule.step()
        if (step + 1) % eval_every == 0:
            val = _evaluate(model, panel, opt, policy)
            out["val_curve"].append(val)
            if stable is not None:
                stable.observe(val_loss=val)
            if not _finite_params(model):  # NaN/Inf weights never recover: stop and save the time
                break
    out["steps"] = step + 1
    out["wall_s"] = time.perf_counter() - started
    if stable is not None:
        controller = stable.controller
        out.update(stability_factor=controller.stability_factor, gap_factor=controller.gap_factor,
                   checks=controller.checks, nonfinite_steps=controller.nonfinite_steps)
    evals = steps // eval_every
    out["val_curve"] += [math.nan] * (evals - len(out["val_curve"]))
    final = out["val_curve"][-1] if out["val_curve"] else math.nan
    out["final_val_loss"] = final
    finite = [v for v in out["val_curve"] if math.isfinite(v)]
    out["best_val_loss"] = min(finite) if finite else math.nan
    out["diverged"] = not math.isfinite(final) or final > DIVERGE_RATIO * initial
    return out
