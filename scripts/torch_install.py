"""Choose how to install torch on this machine: prints the ``pip install`` arguments, one per line.

Standard library only: ``run.sh`` calls it with the system Python before the virtualenv holds anything.

Rule, first match wins:

1. ``TORCH_SPEC`` set (e.g. ``TORCH_SPEC=torch==2.13.0``): that requirement, from the CPU index when the
   machine has no CUDA and the index is reachable, otherwise from pip's own indexes.
2. a CUDA machine (``nvidia-smi -L`` lists a GPU): ``torch``, as pip resolves it (CUDA builds on PyPI).
3. no CUDA, CPU index reachable: ``--index-url https://download.pytorch.org/whl/cpu torch``.
4. no CUDA, index unreachable, a CPU wheel ``torch-<version>+cpu-*.whl`` in pip's find-links
   (``PIP_FIND_LINKS`` or ``pip config``): ``torch==<version>`` (the newest such wheel).
5. otherwise: ``torch``, as pip resolves it.

``TORCH_INDEX_URL`` replaces the CPU index (a mirror); ``python scripts/torch_install.py --explain``
prints the decision in words on stderr as well.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
_CPU_WHEEL = re.compile(r"^torch-(\d+(?:\.\d+)*)\+cpu-.*\.whl$")


def has_cuda() -> bool:
    """True when ``nvidia-smi -L`` runs and lists at least one GPU."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listing.returncode == 0 and "GPU" in listing.stdout


def index_reachable(url: str, timeout: float = 5.0) -> bool:
    """True when ``url`` answers an HTTP request within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=timeout) as response:
            return response.status < 400
    except (OSError, ValueError):
        return False


def find_links_dirs() -> list[Path]:
    """Local directories in pip's find-links: ``PIP_FIND_LINKS`` and every ``*.find-links`` of ``pip config``."""
    entries = os.environ.get("PIP_FIND_LINKS", "").split()
    try:
        config = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                                text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        config = ""
    for line in config.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            entries += value.strip().strip("'\"").split()
    dirs = []
    for entry in entries:
        path = Path(entry.removeprefix("file://"))
        if path.is_dir() and path not in dirs:
            dirs.append(path)
    return dirs


def local_cpu_wheel_version(dirs: list[Path]) -> str | None:
    """The newest ``<version>`` of a ``torch-<version>+cpu-*.whl`` in ``dirs``, or None."""
    versions = [match.group(1) for directory in dirs for path in directory.iterdir()
                if (match := _CPU_WHEEL.match(path.name))]
    return max(versions, key=lambda version: tuple(int(part) for part in version.split("."))) if versions else None


def choose(spec: str | None, cuda: bool, cpu_index: str | None, local_version: str | None) -> tuple[list[str], str]:
    """Pure decision: ``(pip install arguments, reason)`` from what the machine offers.

    ``cpu_index`` is the CPU wheel index when reachable (else None); ``local_version`` the version of a CPU
    wheel in pip's find-links (else None).
    """
    if spec:
        if not cuda and cpu_index:
            return ["--index-url", cpu_index, spec], f"TORCH_SPEC={spec}, CPU build from {cpu_index}"
        return [spec], f"TORCH_SPEC={spec}, as pip resolves it"
    if cuda:
        return ["torch"], "CUDA GPU found: torch as pip resolves it (a CUDA build)"
    if cpu_index:
        return ["--index-url", cpu_index, "torch"], f"no CUDA GPU: CPU build from {cpu_index}"
    if local_version:
        return [f"torch=={local_version}"], (f"no CUDA GPU, CPU index unreachable: the local CPU wheel "
                                             f"torch {local_version}+cpu from pip's find-links")
    return ["torch"], "no CUDA GPU, CPU index unreachable, no local CPU wheel: torch as pip resolves it"


def main() -> int:
    spec = os.environ.get("TORCH_SPEC") or None
    cuda = has_cuda()
    index = None
    if not cuda:
        candidate = os.environ.get("TORCH_INDEX_URL") or CPU_INDEX
        index = candidate if index_reachable(candidate) else None
    local = None if (spec or cuda or index) else local_cpu_wheel_version(find_links_dirs())
    args, reason = choose(spec, cuda, index, local)
    print(f"torch: {reason}", file=sys.stderr)
    print("\n".join(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
