"""Invariants checked after every crash scenario, over what the run records and the ledger say."""

from __future__ import annotations

from orchestrator import Client
from tests.ledger import Ledger


def check_no_persisted_step_ran_again(client: Client, ledger: Ledger, run_id: str) -> dict[str, int]:
    """I2/I8: each committed step's record comes from the last execution of that key, and no
    execution started after the commit (its fence would be higher than the committed one).

    Returns executions per idempotency key of this run.
    """
    executions = {k: v for k, v in ledger.execution_counts().items() if k.startswith(f"{run_id}:")}
    results = client.results(run_id)
    for key, record in results.items():
        fences = ledger.fences(key)
        if not fences:
            continue  # a step that does not record itself in the ledger
        assert max(fences) == record.fence, f"{key}: executed with fences {fences}, committed {record.fence}"
        assert len(fences) == len(set(fences)), f"{key}: one claim executed twice: {fences}"
    return executions


def check_completed_chain(client: Client, ledger: Ledger, run_id: str) -> dict[str, int]:
    """I1 + the chain's own arithmetic: every step applied exactly once to the state."""
    info = client.get(run_id)
    assert info.status == "completed", info
    state = client.state(run_id)
    assert state["i"] == 10 and state["steps"] == [f"s{n}" for n in range(10)], state
    assert sorted(client.results(run_id)) == sorted(f"{run_id}:s{n}" for n in range(10))
    return check_no_persisted_step_ran_again(client, ledger, run_id)
