"""Helpers shared by the benchmarks: machine description, RESULTS.md sections, fast in-memory loaders.

- :func:`machine_info` / :func:`machine_line`: what a number was measured on (``nproc``, CPU model,
  torch/lightning versions, date, load average), written next to every table.
- :func:`replace_section`: rewrite the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->``
  in a Markdown file and keep everything else, so each benchmark owns only its own section.
- :func:`tensor_loader`: a ``DataLoader`` over in-memory tensors that indexes whole batches at once
  (one fancy-indexing call per batch instead of one ``__getitem__`` per sample), in the epoch-seeded order
  of :class:`recipes.samplers.EpochSeededSampler`; Lightning's ``set_epoch`` reaches the sampler.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import platform
import re
import shlex
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset

from recipes.samplers import EpochSeededSampler

__all__ = [
    "BENCH_DIR",
    "CONF_DIR",
    "REPO_ROOT",
    "RESULTS_PATH",
    "STABLELR_SOURCES",
    "WORK_DIR",
    "TensorBatches",
    "command_line",
    "machine_info",
    "machine_line",
    "quiet_lightning",
    "replace_section",
    "stablelr_source_hash",
    "tensor_loader",
]

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CONF_DIR = REPO_ROOT / "conf"
RESULTS_PATH = BENCH_DIR / "RESULTS.md"
WORK_DIR = BENCH_DIR / "_work"  # git-ignored: raw JSONL results of full runs

#: Sources whose change reruns StableLR's benchmark runs (long and robustness): the guard's math and the
#: scheduler that applies it.
STABLELR_SOURCES = ("schedule.py", "controller.py", "config.py", "scheduler.py", "curvature.py")


def stablelr_source_hash() -> str:
    """12 hex digits of SHA-1 over the bytes of :data:`STABLELR_SOURCES` (a run fingerprint's guard part)."""
    import lightning_stablelr

    digest = hashlib.sha1()
    for name in STABLELR_SOURCES:
        digest.update((Path(lightning_stablelr.__file__).parent / name).read_bytes())
    return digest.hexdigest()[:12]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """``nproc`` (CPUs this process may use), CPU model, Python/torch/lightning versions, UTC date, load average."""
    import lightning

    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        nproc = os.cpu_count() or 1
    try:
        load = tuple(round(value, 2) for value in os.getloadavg())
    except OSError:
        load = None
    return {
        "nproc": nproc,
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg": load,
    }


def machine_line(info: dict[str, Any]) -> str:
    """One Markdown line describing ``info`` (see :func:`machine_info`), or ``$BENCH_MACHINE`` when set: the
    description of the machine that produced the results when the report is written elsewhere (``--report-only``)."""
    if os.environ.get("BENCH_MACHINE"):
        return f"Machine (where the runs ran): {os.environ['BENCH_MACHINE']}"
    load = info.get("loadavg")
    load_text = "n/a" if load is None else " / ".join(f"{value:g}" for value in load)
    return (
        f"Machine: `nproc`={info['nproc']}, CPU {info['cpu']}, Python {info['python']}, torch {info['torch']}, "
        f"lightning {info['lightning']}; date {info['date']}; load average (1/5/15 min) at the end: {load_text}."
    )


def command_line(module: str, argv: Sequence[str]) -> str:
    """The shell command that reproduces a run: ``python -m <module> <argv...>`` (shell-quoted)."""
    return " ".join(["python", "-m", module, *(shlex.quote(arg) for arg in argv)])


def replace_section(path: Path, name: str, body: str, *, title: str = "# Benchmark results") -> None:
    """Put ``body`` between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in ``path``; keep the rest.

    A missing file is created with ``title``; a missing section is appended at the end. Only the text
    between the two markers changes, so several benchmarks can share one file.
    """
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else f"{title}\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def quiet_lightning() -> None:
    """Silence Lightning's per-fit banners and the warnings that tiny in-memory runs trigger."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # torch deprecation inside lightning's _pytree
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")


class TensorBatches(Dataset):
    """In-memory tensors indexed a whole batch at a time (``__getitems__``), for fast tiny benchmarks."""

    def __init__(self, *tensors: Tensor) -> None:
        if not tensors or any(len(tensor) != len(tensors[0]) for tensor in tensors):
            raise ValueError(f"`tensors` must be non-empty and of equal length, got {[len(t) for t in tensors]}.")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        return tuple(tensor[index] for tensor in self.tensors)

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(tensor[index] for tensor in self.tensors)


def _whole_batch(batch: Any) -> Any:
    return batch  # __getitems__ already returned stacked tensors


def tensor_loader(*tensors: Tensor, batch_size: int, seed: int = 0, shuffle: bool = True) -> DataLoader:
    """Batches of ``tensors`` in the order of ``EpochSeededSampler(len, seed, shuffle)``, last batch kept."""
    dataset = TensorBatches(*tensors)
    sampler = EpochSeededSampler(len(dataset), seed=seed, shuffle=shuffle)
    batches = BatchSampler(sampler, batch_size=batch_size, drop_last=False)
    return DataLoader(dataset, batch_sampler=batches, collate_fn=_whole_batch, num_workers=0)
