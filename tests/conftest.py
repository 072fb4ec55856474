"""Shared test configuration."""

from __future__ import annotations

import os

import matplotlib
import pytest

matplotlib.use("Agg")
os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(autouse=True)
def _quiet_lightning(monkeypatch):
    """Keep Lightning's tips and the tqdm bar out of test output."""
    monkeypatch.setenv("PL_DISABLE_FORK", os.environ.get("PL_DISABLE_FORK", "0"))
    yield
