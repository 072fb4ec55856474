"""The Lightning callbacks: :class:`StableLR`, :class:`StabilityMonitor` and their shared :class:`LineProbeSession`.

Imported lazily, so that the pure helpers in this package (``_monitor_config``, ``_governor``, ...) do not
pull in Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "LineProbeSession": "lightning_stablelr.callbacks.line_probe_session",
    "line_probe_session": "lightning_stablelr.callbacks.line_probe_session",
    "StabilityMonitor": "lightning_stablelr.callbacks.monitor",
    "StableLR": "lightning_stablelr.callbacks.stable_lr",
}

__all__ = ["LineProbeSession", "StabilityMonitor", "StableLR", "line_probe_session"]

if TYPE_CHECKING:  # pragma: no cover
    from lightning_stablelr.callbacks.line_probe_session import LineProbeSession, line_probe_session
    from lightning_stablelr.callbacks.monitor import StabilityMonitor
    from lightning_stablelr.callbacks.stable_lr import StableLR


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_stablelr.callbacks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
