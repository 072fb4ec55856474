"""What :class:`~lightning_stablelr.StabilityMonitor` checkpoints and pickles (its hooks live in ``monitor.py``)."""

from __future__ import annotations

from typing import Any

__all__ = ["MonitorState"]


class MonitorState:
    """``state_dict``/``load_state_dict`` (Lightning checkpoints) and ``__getstate__`` (pickling, e.g. ddp_spawn)
    of the monitor: primitives of its instruments, governor and policy; never its runtime caches."""

    certificates: Any
    sharpness: Any
    connectivity: Any
    _governor: Any
    _policy: Any

    def state_dict(self) -> dict[str, Any]:
        """Primitives only: each instrument's state, the governor's deferred counts and the failed probes."""
        return {
            "version": 2,
            "certificates": self.certificates.state_dict(),
            "sharpness": self.sharpness.state_dict(),
            "connectivity": self.connectivity.state_dict(),
            "governor": self._governor.state_dict(),
            "failed_probes": self._policy.failed_probes,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; missing keys keep their defaults (snapshots are not checkpointed); the
        first release's layout (``window``, ``ema``, ``val_trend`` at the top) loads too."""
        self.certificates.load_state_dict(state_dict.get("certificates", state_dict))
        self.sharpness.load_state_dict(state_dict.get("sharpness", {}))
        self.connectivity.load_state_dict(state_dict.get("connectivity", {}))
        self._governor.load_state_dict(state_dict.get("governor", {}))
        self._policy.failed_probes = int(state_dict.get("failed_probes", 0))

    def __getstate__(self) -> dict[str, Any]:
        # Runtime caches (module references, batches, snapshots) never travel with a pickled callback.
        state = self.__dict__.copy()
        state.update(_probe=None, _writer=None, _train_batches=[])
        return state
