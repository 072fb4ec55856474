"""Helpers shared by the recipe tests (no tests here; the name keeps it among the test_recipes_* files)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

#: Overrides that make any trainer config run on one CPU process (for in-process instantiation).
CPU_TRAINER = [
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.num_nodes=1",
    "trainer.strategy=auto",
    "trainer.precision=32-true",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
]

#: The small, fast job of conf/debug/fast.yaml: 64 training images, 16 per batch (4 steps per epoch on one
#: process), 2 epochs, no test pass, no progress bar. Later overrides (trainer.max_epochs=3) still apply.
FAST = "debug=fast"


def compose_train(overrides: Sequence[str] = (), config_name: str = "train", hydra_cfg: bool = False) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with ``overrides`` (no ``@hydra.main``, nothing runs)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=hydra_cfg)


def with_output_dir(cfg: DictConfig, path: Path) -> DictConfig:
    """Point ``paths.output_dir`` (``${hydra:runtime.output_dir}`` by default) at ``path``."""
    with open_dict(cfg):
        cfg.paths.output_dir = str(path)
    return cfg


def run_module(
    args: Sequence[str], cwd: Path, timeout: float, module: str = "recipes.train", env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m <module> <args>`` from ``cwd`` with the repo on ``PYTHONPATH``.

    The child gets its own process group, so that on a timeout every process it started (the DDP ranks)
    is killed too; a timeout then fails the test with the output so far (a hang is a failure).
    """
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("LOCAL_RANK", None)
    process = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(
            f"`python -m {module} {' '.join(args)}` did not finish within {timeout} s (a hang).\n"
            f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def describe(result: subprocess.CompletedProcess) -> str:
    """The tail of a finished process's output, for assertion messages."""
    return f"exit code {result.returncode}\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
