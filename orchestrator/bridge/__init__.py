"""Bridges to RQ: steps that run on an RQ fleet, and workflows started from RQ code.

``@flow.step(executor=RQ("tools", timeout_s=60))`` runs that step in a work-horse of an RQ
worker started with ``rq worker tools -S rq.serializers.JSONSerializer`` (docs/from-rq.md);
``start_run`` (an RQ job), ``client_for`` and ``OnFinish`` start runs from RQ code and enqueue
an RQ job when a run finishes (``orchestrator.bridge.callback``).
"""

from typing import Any

from orchestrator.bridge.executor import RQ

__all__ = ["RQ", "OnFinish", "client_for", "start_run"]


def __getattr__(name: str) -> Any:
    """The callback half on first use: it imports the client, which imports the workflow
    module, which imports ``RQ`` from here (at import time that would be a cycle)."""
    if name in ("OnFinish", "client_for", "start_run"):
        from orchestrator.bridge import callback

        return getattr(callback, name)
    raise AttributeError(f"module 'orchestrator.bridge' has no attribute {name!r}")
