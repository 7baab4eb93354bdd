"""The article's research agent as a deployable worker app: ``orchestrator worker workers.agent:research``.

The workflow itself ships inside the package (``orchestrator.demo.agent``) so that
``orchestrator demo`` works from a plain ``pip install``; this module is the name to use in
deployments of this repository.
"""

from orchestrator.demo.agent import Research, research

__all__ = ["Research", "research"]
