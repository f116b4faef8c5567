"""Failure as the normal case: events, the engine's fault hook, heartbeats, the hang watchdog and
the ``apogee launch`` supervisor around torchrun's elastic agent."""
