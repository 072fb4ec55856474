"""Test helpers for TensorBoard output: a real TensorBoard server on 127.0.0.1, and a synthetic run.

``tensorboard_server(logdir)`` starts ``python -m tensorboard.main`` on an ephemeral port and stops it
on exit, so that any test (for example one on a real training run with the monitor) can query the
HTTP API that the TensorBoard frontend itself uses.

``write_documented_run(save_dir)`` writes, through Lightning's ``TensorBoardLogger``, every documented
scalar tag with the known values of ``DOCUMENTED_SCALARS``, then simulates a resume: a second writer
rewrites step 30 of some tags (``RESUMED_SCALARS``) later in wall time.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_URL_LINE = re.compile(r"TensorBoard \S+ at (http://127\.0\.0\.1:(\d+)/)")

# tag -> {step: value}. Values are exact in float32 (TensorBoard stores simple_value as float32), so
# that tests can compare them with ==.
DOCUMENTED_SCALARS: dict[str, dict[int, float]] = {
    "stablelr/lr-0": {0: 0.5, 10: 0.25, 20: 0.125, 30: 0.0625},
    "stablelr/lr-head": {0: 1.0, 10: 0.5, 20: 0.25, 30: 0.125},
    "stablelr/decay": {0: 1.0, 10: 0.875, 20: 0.75, 30: 0.625},
    "stablelr/gap": {10: 0.125, 20: 0.375, 30: 0.5},
    "stablelr/gap_factor": {10: 1.0, 20: 0.75, 30: 0.5},
    "stablelr/stability_factor": {10: 1.0, 20: 0.5, 30: 0.75},
    "stablelr/step_margin": {10: 4.0, 20: 2.0, 30: 3.0},
    "stablelr/nonfinite_steps": {10: 0.0, 20: 1.0, 30: 1.0},
    "lyapunov/delta_v": {10: -0.25, 20: 0.125, 30: -0.5},
    "lyapunov/decrease": {10: 1.0, 20: 0.0, 30: 1.0},
    "lyapunov/first_order": {10: -0.5, 20: -0.25, 30: -0.75},
    "lyapunov/curvature": {10: 2.0, 20: 4.0, 30: 3.0},
    "lyapunov/step_margin": {10: 4.0, 20: 2.0, 30: 3.0},
    "lyapunov/taylor_error": {10: 0.0625, 20: 0.125, 30: 0.25},
    "lyapunov/certified_rate": {10: 0.75, 20: 1.0, 30: 0.5},
    "lyapunov/ema_decrease": {10: 1.0, 20: 1.0, 30: 0.0},
    "lyapunov/val_decrease": {10: 1.0, 20: 0.0, 30: 1.0},
    "lyapunov/sharpness": {10: 8.0, 30: 32.0},
    "lyapunov/stability_threshold": {10: 32.0, 30: 64.0},
    "lyapunov/eos_ratio": {10: 0.25, 30: 0.5},
    "lyapunov/max_stable_lr": {10: 0.5, 30: 0.125},
    # chart_tags.log10_comparison_tags of the four values above (lr = max_stable_lr * eos_ratio), same steps,
    # rounded to binary fractions so that they survive float32 exactly
    "lyapunov/log10_lr": {10: -0.875, 30: -1.25},
    "lyapunov/log10_max_stable_lr": {10: -0.25, 30: -0.875},
    "lyapunov/log10_sharpness": {10: 0.875, 30: 1.5},
    "lyapunov/log10_stability_threshold": {10: 1.5, 30: 1.75},
    "connectivity/barrier": {10: 0.0, 20: 0.25, 30: 0.125},
    "connectivity/sublevel_excess": {10: -0.5, 20: 0.0, 30: -0.25},
    "connectivity/superlevel_dip": {10: 0.0625, 20: 0.5, 30: 0.25},
    "connectivity/connected": {10: 1.0, 20: 0.0, 30: 1.0},
    "connectivity/equiconnectedness": {10: 0.0, 20: 0.5, 30: 0.375},
    "monitor/overhead": {10: 0.03125, 30: 0.046875},
    "monitor/deferred_probes": {10: 0.0, 30: 2.0},
    "train_loss": {0: 2.5, 10: 2.0, 20: 1.5, 30: 1.25},
    "val_loss": {10: 1.5, 20: 1.25, 30: 1.0},
    "val_acc": {10: 0.5, 20: 0.625, 30: 0.75},
}

# Rewritten after a simulated resume, at later wall times: these values must win.
RESUMED_SCALARS: dict[str, dict[int, float]] = {
    "stablelr/lr-0": {30: 0.03125},
    "val_loss": {30: 0.875},
    "lyapunov/certified_rate": {30: 0.25},
}


def write_documented_run(save_dir: Path, *, resume: bool = True) -> Path:
    """Write ``DOCUMENTED_SCALARS`` (and, if ``resume``, ``RESUMED_SCALARS``); return the run's log dir.

    The first pass uses Lightning's ``TensorBoardLogger`` (name ``lightning_logs``, version 0), the
    way the callbacks log; the resume uses a second ``SummaryWriter`` on the same directory, with wall
    times one hour later, as a run restarted from a checkpoint does.
    """
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.tensorboard import SummaryWriter

    logger = TensorBoardLogger(save_dir=str(save_dir), name="lightning_logs", version=0, default_hp_metric=False)
    steps = sorted({step for series in DOCUMENTED_SCALARS.values() for step in series})
    for step in steps:
        metrics = {tag: value for tag, series in DOCUMENTED_SCALARS.items() for s, value in series.items() if s == step}
        logger.log_metrics(metrics, step=step)
    logger.finalize("success")
    log_dir = Path(logger.log_dir)
    if resume:
        later = time.time() + 3600.0
        writer = SummaryWriter(log_dir=str(log_dir))
        for tag, series in RESUMED_SCALARS.items():
            for step, value in series.items():
                writer.add_scalar(tag, value, global_step=step, walltime=later)
        writer.close()
    return log_dir


def _no_proxy_opener() -> urllib.request.OpenerDirector:
    # An http_proxy in the environment must not capture requests to 127.0.0.1.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class TensorBoardServer:
    """A running TensorBoard: ``url`` (``http://127.0.0.1:PORT/``), ``port``, and HTTP helpers."""

    url: str
    port: int
    process: subprocess.Popen
    stderr_lines: list[str] = field(default_factory=list)

    def get(self, path: str, timeout: float = 10.0, **params: Any) -> bytes:
        """GET ``path`` (e.g. ``data/plugin/scalars/tags``) with query ``params``; return the body."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with _no_proxy_opener().open(self.url + path.lstrip("/") + query, timeout=timeout) as response:
            return response.read()

    def get_json(self, path: str, **params: Any) -> Any:
        """GET ``path`` and decode the JSON body."""
        return json.loads(self.get(path, **params))

    def wait_for(self, predicate: Callable[[TensorBoardServer], Any], what: str, timeout: float = 60.0) -> Any:
        """Poll ``predicate(self)`` until it returns something truthy; raise ``TimeoutError`` naming ``what``.

        TensorBoard loads event files in a background thread, so data appears some time after the
        server answers; exceptions from the predicate (e.g. a 400 while a run is not loaded) count
        as "not yet".
        """
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"TensorBoard exited with {self.process.returncode}: {''.join(self.stderr_lines)}")
            try:
                result = predicate(self)
                if result:
                    return result
            except Exception as error:  # "not ready yet"; reported at the deadline
                last_error = error
            time.sleep(0.25)
        raise TimeoutError(f"TensorBoard did not serve {what} within {timeout:.0f} s (last error: {last_error!r})")


@contextlib.contextmanager
def tensorboard_server(logdir: Path, *, startup_timeout: float = 60.0) -> Iterator[TensorBoardServer]:
    """Run ``python -m tensorboard.main --logdir LOGDIR --host 127.0.0.1 --port 0 --load_fast false``.

    The port is parsed from the server's "TensorBoard ... at http://127.0.0.1:PORT/" line on stderr
    (bounded by ``startup_timeout``). The process is always terminated (then killed if needed) on exit.
    """
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
               "--port", "0", "--load_fast", "false", "--reload_interval", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    found = threading.Event()
    match: list[re.Match[str]] = []

    def pump() -> None:
        # Keeps reading after the URL line so that a chatty server never blocks on a full pipe.
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            hit = _URL_LINE.search(line)
            if hit and not found.is_set():
                match.append(hit)
                found.set()
        found.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        if not found.wait(startup_timeout) or not match:
            raise RuntimeError(f"TensorBoard did not report its URL within {startup_timeout:.0f} s; "
                               f"exit code {process.poll()}, stderr: {''.join(lines)}")
        yield TensorBoardServer(url=match[0].group(1), port=int(match[0].group(2)), process=process,
                                stderr_lines=lines)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        reader.join(timeout=5)
        if process.stderr is not None:
            process.stderr.close()
