"""lightning-stablelr: a stable learning-rate controller and a stability monitor for Lightning.

.. code-block:: python

    import lightning as L
    from lightning_stablelr import StableLR, StabilityMonitor

    trainer = L.Trainer(callbacks=[StableLR(), StabilityMonitor()])

The public names are imported lazily, so ``import lightning_stablelr.schedule`` (pure math)
does not pull in Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "StableLR": "lightning_stablelr.callbacks.stable_lr",
    "StabilityMonitor": "lightning_stablelr.callbacks.monitor",
    "StableLRScheduler": "lightning_stablelr.scheduler",
    "ObjectiveProbe": "lightning_stablelr.probe",
}

__all__ = ["ObjectiveProbe", "StabilityMonitor", "StableLR", "StableLRScheduler", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from lightning_stablelr.callbacks.monitor import StabilityMonitor
    from lightning_stablelr.callbacks.stable_lr import StableLR
    from lightning_stablelr.probe import ObjectiveProbe
    from lightning_stablelr.scheduler import StableLRScheduler


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_stablelr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
