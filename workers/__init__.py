"""Runnable worker apps of this repository (not part of the installed package).

- ``workers.agent``: the article's research agent, ready for ``orchestrator worker workers.agent:research``.
- ``workers.testflows``: deterministic workflows used by the tests, chaos runs and benchmarks.
"""
