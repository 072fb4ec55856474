"""The Lightning callbacks: :class:`StableLR`, :class:`StabilityMonitor` and their shared :class:`LineProbeSession`.

Imported lazily, so that the pure helpers in this package (``_monitor_config``, ``_governor``, ...) do not
pull in Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_stablelr._lazy import lazy_attributes

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


__getattr__, __dir__ = lazy_attributes('lightning_stablelr.callbacks', _LAZY, globals(), __all__)
