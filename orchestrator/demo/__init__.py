"""The demo shipped with the package: the article's research agent and ``orchestrator demo``."""
