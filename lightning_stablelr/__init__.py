"""lightning-stablelr: a stable learning-rate controller and a stability monitor for Lightning.

.. code-block:: python

    import lightning as L
    from lightning_stablelr import StableLR, StabilityMonitor

    trainer = L.Trainer(callbacks=[StableLR(), StabilityMonitor()])

The public names are imported lazily, so ``import lightning_stablelr.schedule`` (pure math)
does not pull in Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_stablelr._lazy import lazy_attributes

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


__getattr__, __dir__ = lazy_attributes('lightning_stablelr', _LAZY, globals(), __all__)
