"""DDP inside a Hydra sweep: each sweep job runs as a single-run child process in its own job directory.

Why: with ``strategy=ddp`` Lightning starts ranks 1..N-1 by re-running the command line
(``_SubprocessScriptLauncher``). Under Hydra it appends ``hydra.run.dir=<run dir>`` and
``hydra.output_subdir=null`` (``_hydra_subprocess_cmd``), which is right for a single run: all ranks share
one output directory and only rank 0 writes ``.hydra/``. In a sweep (``-m``) the command line still holds
``-m`` and the sweep lists, so every relaunched rank would start its own sweep, into the single-run
directory, and rank 0 would wait for peers that never join (pytorch-lightning #11300, #15737, #18175).

What we do instead: when a sweep job would use that launcher, the job process does not train. It runs

    python -m recipes.train hydra.run.dir="<job dir>" hydra.output_subdir=null hydra.mode=RUN <job overrides>

and waits. The child is a plain single run, so Lightning's own Hydra handling applies: its ranks all write
into the job directory, and the sweep job's ``.hydra/`` (written by the sweep) is the only one there. The
child's ``metrics.json`` becomes the job's return value. Strategies that need no relaunch (``ddp_spawn``,
SLURM via the submitit launcher, torchrun) train in the job process as usual.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from recipes.errors import RecipeError, build
from recipes.summary import METRICS_FILE, read_metrics

__all__ = [
    "SpawnedGroupTeardown", "finish_distributed", "relaunches_script", "run_job_in_child", "single_run_command",
    "sweep_job_needs_child",
]  # fmt: skip

log = logging.getLogger(__name__)

# A sweep job process never is a DDP rank itself; these would make the child believe it is one.
_DISTRIBUTED_ENV = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def relaunches_script(trainer_cfg: DictConfig) -> bool:
    """Whether a Trainer built from ``trainer_cfg`` would start its ranks by re-running the command line.

    Decided by building a bare Trainer (no callbacks, no logger) and asking its strategy, so every way of
    spelling DDP (``strategy: ddp``, a ``DDPStrategy`` node, ``devices: -1``) and every cluster environment
    (SLURM and torchrun create processes themselves) is judged exactly as Lightning will judge it.
    """
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the bare Trainer would print "GPU available: ..." a second time
    try:
        trainer = build(
            trainer_cfg,
            "trainer",
            callbacks=[],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    finally:
        quiet.setLevel(level)
    strategy = trainer.strategy
    launcher = getattr(strategy, "launcher", None)
    environment = getattr(strategy, "cluster_environment", None)
    return isinstance(launcher, _SubprocessScriptLauncher) and not (
        environment is not None and environment.creates_processes_externally
    )


def sweep_job_needs_child(cfg: DictConfig) -> bool:
    """True inside a Hydra sweep job whose trainer would relaunch the script (see the module docstring)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    return relaunches_script(cfg.trainer)


def _entry_command() -> list[str]:
    """How this process was started, as Lightning's relaunch spells it: ``-m <module>`` or the script path."""
    import __main__

    spec = getattr(__main__, "__spec__", None)
    if spec is not None and spec.name:
        return [sys.executable, "-m", spec.name.removesuffix(".__main__")]
    return [sys.executable, str(Path(sys.argv[0]).resolve())]


def single_run_command(job_dir: str | Path, hydra_cfg: Any, entry: list[str] | None = None) -> list[str]:
    """The command that re-runs one sweep job as a single run writing into ``job_dir``.

    ``hydra_cfg`` is ``HydraConfig.get()``: it gives the config name, a ``--config-dir`` from the command
    line if one was used, and the job's own task overrides (one value per swept key). ``entry`` is the
    start of the command (default: how this process was started, e.g. ``python -m recipes.train``).
    """
    command = list(entry) if entry is not None else _entry_command()
    for source in hydra_cfg.runtime.config_sources:
        if source.provider == "command-line":
            command += ["--config-dir", str(source.path).removeprefix("file://")]
    command += ["--config-name", str(hydra_cfg.job.config_name)]
    command += [f'hydra.run.dir="{job_dir}"', "hydra.output_subdir=null", "hydra.mode=RUN"]
    command += [str(override) for override in hydra_cfg.overrides.task]
    return command


def finish_distributed() -> None:
    """Tear the process group down in order once every rank is done; every rank calls it after its fit.

    Left to the interpreter's exit, gloo's threads can abort ("terminate called without an active exception",
    exit status -6) after a run that succeeded: a DDP sweep job then reads as failed. Meeting at a barrier and
    destroying the group first made that rare in the test scripts (2 of 10 runs without, about 1 in 20 with).
    A later fit in the same process initialises a new group.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class SpawnedGroupTeardown(L.Callback):
    """Under ``ddp_spawn`` (Lightning's ``_MultiProcessingLauncher``), ends each spawned rank's process group in its
    ``teardown`` hook: :func:`finish_distributed`, inside the worker.

    A spawned rank exits as soon as Lightning has collected its results, which needs no collective (rank 0 saves
    its weights to a temporary file), so the recipe's own :func:`finish_distributed` after ``trainer.fit`` runs in
    the main process, where no group exists. Left to the worker's interpreter exit, gloo's threads could abort it
    (exit status -6 after a fit that succeeded) and ``torch.multiprocessing`` then failed the whole fit. The
    recipes append it after their own callbacks, but that is not the last ``teardown`` to run: Lightning moves
    checkpoint callbacks to the end of the list, and calls the LightningModule's ``teardown`` after the callbacks'
    (the datamodule's runs before them) and then finalizes the loggers. None of those in the recipes runs a collective; a module whose
    ``teardown`` does would find the group gone. Other strategies are left alone: their ranks go on after the fit
    (``trainer.test``) in the same group.
    """

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

        if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
            finish_distributed()


def run_job_in_child(job_dir: str | Path) -> dict[str, Any]:
    """Run the current sweep job as a single-run child process and return its ``metrics.json``."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    command = single_run_command(job_dir, hydra_cfg)
    env = {key: value for key, value in os.environ.items() if key not in _DISTRIBUTED_ENV}
    log.info("sweep job %s uses a relaunching DDP strategy: running it as a single run: %s",
             hydra_cfg.job.num, shlex.join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    returncode = subprocess.call(command, env=env, cwd=hydra_cfg.runtime.cwd)
    if returncode != 0:
        raise RecipeError(
            f"Sweep job {hydra_cfg.job.num} failed: its DDP single run exited with code {returncode} (its output "
            f"is above and in {job_dir}). Rerun it alone with: {shlex.join(command)}"
        )
    if not (Path(job_dir) / METRICS_FILE).exists():
        raise RecipeError(f"Sweep job {hydra_cfg.job.num} finished without writing {Path(job_dir) / METRICS_FILE}.")
    return read_metrics(job_dir)
