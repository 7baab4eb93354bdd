"""The worker runtime: reads step dispatches, runs steps, persists results, heartbeats."""

from orchestrator.worker.runner import Worker

__all__ = ["Worker"]
