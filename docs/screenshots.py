"""Screenshots of TensorBoard's Custom Scalars tab at its default settings, for docs/READING_CHARTS.md.

    python docs/screenshots.py            # writes docs/screenshots/custom_scalars*.png (about 2 minutes)

Steps: run the default job (``python -m recipes.train``, sharpness measured every 20 steps so the
Stability charts have points) into a temporary directory; start ``tensorboard --logdir <that directory>``
on 127.0.0.1; load the Custom Scalars tab in headless Chromium (Debian's ``chromium``, ``apt-get install -y
chromium``) and save full-window screenshots. Nothing in TensorBoard's settings is touched: what the PNGs show
is what a user sees on first opening the tab.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "screenshots"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    raise RuntimeError(f"TensorBoard did not answer at {url} within {timeout} s.")


def main() -> int:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("docs/screenshots.py needs Chromium: apt-get install -y chromium", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="stablelr-screens-"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "recipes.train", f"hydra.run.dir={work / 'default_job'}",
                    "monitor.sharpness_every_n_steps=20", "callbacks.progress_bar.refresh_rate=0"],
                   cwd=work, env=env, check=True)
    port = _free_port()
    tensorboard = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(work),
                                    "--host", "127.0.0.1", "--port", str(port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(f"http://127.0.0.1:{port}/data/plugins_listing")
        OUT.mkdir(parents=True, exist_ok=True)
        profile = tempfile.mkdtemp(prefix="chromium-")
        for name, height in (("custom_scalars.png", 2600),):
            subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size=1400,{height}",
                            "--virtual-time-budget=30000", f"--screenshot={OUT / name}",
                            f"http://127.0.0.1:{port}/#custom_scalars"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
            print(f"wrote {OUT / name}")
    finally:
        tensorboard.terminate()
        tensorboard.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
