"""The ledger the test workflows write (see orchestrator/chaos/ledger.py)."""

from orchestrator.chaos.ledger import Ledger

__all__ = ["Ledger"]
