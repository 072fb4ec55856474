"""``python -m lightning_stablelr report RUN_DIR``: the ``stablelr`` command where its script is not on PATH."""

from __future__ import annotations

import sys

from lightning_stablelr.cli import main

if __name__ == "__main__":
    sys.exit(main())
