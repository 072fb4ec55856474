"""The recipes' terminal: known third-party noise filtered, and a progress bar whose ``v_num`` names the run.

Filters are installed by the recipes only; the library itself never touches warning filters.

Filtered:

- torch >= 2.10 deprecates ``LeafSpec``, which Lightning 2.6's ``lightning.pytorch.utilities._pytree`` still
  uses: a ``FutureWarning`` at every fit/validate/test that the user cannot act on;
- Lightning's "💡 Tip:" adverts for its cloud products (litlogger, litmodels), logged at INFO.

Each filter matches one exact message, so any other warning still shows.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override

__all__ = ["PYTREE_DEPRECATION", "TIP_PREFIX", "RunProgressBar", "TipFilter", "quiet_third_party"]

#: Start of torch's deprecation message for ``LeafSpec`` (a regular expression for ``warnings.filterwarnings``).
PYTREE_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
#: Start of Lightning's product tips.
TIP_PREFIX = "\N{ELECTRIC LIGHT BULB} Tip:"
_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"


class TipFilter(logging.Filter):
    """Drop log records whose message starts with :data:`TIP_PREFIX`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP_PREFIX)


def quiet_third_party() -> None:
    """Install both filters in this process (idempotent: a second call adds nothing)."""
    warnings.filterwarnings("ignore", message=PYTREE_DEPRECATION, category=FutureWarning)
    logger = logging.getLogger(_RANK_ZERO_LOGGER)
    if not any(isinstance(existing, TipFilter) for existing in logger.filters):
        logger.addFilter(TipFilter())


class RunProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` whose ``v_num`` is the run directory's name (the recipes' loggers all write
    under it), instead of the last four characters of the logger's version string ("tensorboard" -> "oard")."""

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        if "v_num" in items and trainer.loggers and trainer.loggers[0].save_dir:
            items["v_num"] = Path(trainer.loggers[0].save_dir).name
        return items
