"""Chaos tooling: fault injection and the invariant checker behind `orchestrator chaos`."""
