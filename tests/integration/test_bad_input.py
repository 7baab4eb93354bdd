"""Bad input at every boundary gets a clear error; the run fails where it applies; workers go on."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from orchestrator import (
    Client,
    PayloadTooLarge,
    RunFailed,
    Settings,
    StepContext,
    ValidationError,
    Workflow,
)
from orchestrator.keys import GROUP
from tests.harness import worker_thread
from tests.helpers import wait_until
from tests.ledger import Ledger
from workers.testflows import chain


class Order(BaseModel):
    sku: str
    qty: int = 1


order = Workflow("order", state=Order)


@order.step
def ship(ctx: StepContext, state: Order) -> dict[str, Any]:
    if state.sku == "object":
        return {"sku": object()}
    if state.sku == "unknown-field":
        return {"colour": "red"}
    if state.sku == "bad-type":
        return {"qty": "many"}
    if state.sku == "huge":
        return {"sku": "x" * 5000}
    if state.sku == "huge-stash":
        ctx.stash("y" * 5000)
    if state.sku == "list":
        return [1, 2]  # type: ignore[return-value]
    return {"qty": state.qty + 1}


def test_invalid_input_is_refused_naming_the_field_and_nothing_is_written(client: Client) -> None:
    with pytest.raises(ValidationError, match=r"input of workflow 'order' is invalid: sku: Field required"):
        client.submit(order, {"qty": 2}, run_id="bad1")
    with pytest.raises(ValidationError, match=r"qty: Input should be a valid integer.*\(got 'two'\)"):
        client.submit(order, {"sku": "a", "qty": "two"}, run_id="bad1")
    with pytest.raises(ValidationError, match="run_id 'has space' is invalid"):
        client.submit(order, {"sku": "a"}, run_id="has space")
    with pytest.raises(ValidationError, match=r"run_id 'a\{b\}' is invalid"):
        client.submit(order, {"sku": "a"}, run_id="a{b}")
    assert not client.redis.exists(client.keys.run("bad1").run)


def test_oversized_input_is_refused_before_any_write(settings: Settings) -> None:
    client = Client(settings.model_copy(update={"max_payload_bytes": 2048}))
    with pytest.raises(PayloadTooLarge, match="over the limit of 2048"):
        client.submit(order, {"sku": "x" * 4000}, run_id="big")
    assert not client.redis.exists(client.keys.run("big").run)


@pytest.mark.parametrize(
    "sku, expected",
    [
        ("object", r"StepResultError: .*field 'sku'.* not JSON-serializable|StepResultError: .*sku"),
        ("unknown-field", r"unknown field\(s\) \['colour'\]"),
        ("bad-type", r"qty: Input should be a valid integer"),
        ("list", r"returned list; expected a dict of state updates"),
        ("huge", r"PayloadTooLarge: update from step 'ship' .* over the limit of 2048"),
        ("huge-stash", r"PayloadTooLarge: stash of step 'ship' .* over the limit of 2048"),
    ],
)
def test_a_step_result_that_cannot_be_persisted_fails_the_run_clearly(
    client: Client, settings: Settings, sku: str, expected: str
) -> None:
    with worker_thread([order], settings.model_copy(update={"max_payload_bytes": 2048})):
        with pytest.raises(RunFailed, match=expected):
            client.submit(order, {"sku": sku}, run_id=f"r-{sku}").wait(timeout_s=10)
        assert client.submit(order, {"sku": "fine"}, run_id="fine").wait(timeout_s=10).qty == 2
    assert client.get(f"r-{sku}").status == "failed"
    assert client.results(f"r-{sku}") == {}


def test_a_run_of_a_workflow_the_worker_does_not_serve_fails_clearly(client: Client, settings: Settings) -> None:
    ghost = Workflow("ghost")

    @ghost.step
    def boo(ctx: StepContext, state: Any) -> None:
        return None

    with worker_thread([order], settings) as worker:
        with pytest.raises(RunFailed, match=rf"workflow 'ghost' is not served by worker {worker.id}.*serves: order"):
            client.submit(ghost, {}, run_id="g1").wait(timeout_s=10)
        assert client.submit(order, {"sku": "a"}, run_id="after").wait(timeout_s=10).qty == 2


def test_a_run_whose_step_no_longer_exists_fails_naming_the_known_steps(client: Client, settings: Settings) -> None:
    old = Workflow("order", state=Order)

    @old.step
    def legacy(ctx: StepContext, state: Order) -> None:
        return None

    expected = r"step 'legacy' is not in workflow 'order' \(steps: ship\)"
    with worker_thread([order], settings), pytest.raises(RunFailed, match=expected):
        client.submit(old, {"sku": "a"}, run_id="drift").wait(timeout_s=10)


def test_stored_state_that_no_longer_fits_the_model_fails_the_run_clearly(client: Client, settings: Settings) -> None:
    run = client.submit(order, {"sku": "a"}, run_id="corrupt")
    client.redis.hset(client.keys.run("corrupt").state, "qty", '"not a number"')
    with worker_thread([order], settings), pytest.raises(RunFailed, match=r"stored state of workflow 'order'.*qty"):
        run.wait(timeout_s=10)


MALFORMED: list[dict[str, str]] = [
    {"junk": "1"},
    {"run": "r", "wf": "chain", "step": "s0"},
    {"run": "r", "wf": "chain", "step": "s0", "visit": "first"},
    {"run": "r{x}", "wf": "chain", "step": "s0", "visit": "1"},
    {"run": "r", "wf": "chain", "step": "s0", "visit": "1", "extra": "x"},
    {"run": "r", "wf": "chain", "step": "not a step", "visit": "1"},
    {"run": "r", "wf": "chain", "step": "s0", "visit": "1" * 5000},
]


def test_malformed_stream_entries_are_set_aside_and_the_worker_keeps_serving(
    client: Client, settings: Settings, ledger: Ledger
) -> None:
    stream = client.keys.queue_of("default", "nobody").stream  # the stream of the run "nobody"'s partition
    client.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    for fields in MALFORMED:
        client.redis.xadd(stream, fields)  # type: ignore[arg-type]
    client.redis.xadd(stream, {"run": "nobody", "wf": "chain", "step": "s0", "visit": "1"})
    with worker_thread([chain], settings) as worker:
        wait_until(lambda: client.redis.xlen(client.keys.rejected) == len(MALFORMED), what="entries rejected")
        assert client.submit(chain, {}, run_id="ok").wait(timeout_s=20).i == 10
        wait_until(lambda: client.redis.xpending(stream, GROUP)["pending"] == 0, what="all acked")
    rejected = client.redis.xrange(client.keys.rejected)
    reasons = [fields["reason"] for _, fields in rejected]
    assert any("visit: Field required" in r for r in reasons)
    assert any("extra: Extra inputs are not permitted" in r for r in reasons)
    assert all(json.loads(f["fields"]) is not None for _, f in rejected)
    assert client.stats()["malformed"] == len(MALFORMED)
    assert worker.rt is not None and worker.rt.counts["malformed"] == len(MALFORMED)
