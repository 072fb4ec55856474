"""Lightning callbacks: :class:`StableLR` (controls the lr) and :class:`StabilityMonitor` (observes)."""
