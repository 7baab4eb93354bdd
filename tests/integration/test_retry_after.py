"""A step told by its provider when to come back (HTTP 429 ``Retry-After``) raises ``RetryAfter``:
the retry waits at least that long on the Redis clock, however short the step's own backoff."""

from __future__ import annotations

from pydantic import BaseModel

from orchestrator import Client, Retry, RetryAfter, Settings, StepContext, Workflow
from tests.harness import worker_thread


class Call(BaseModel):
    answer: str = ""


polite = Workflow("polite", state=Call)


@polite.step(retry=Retry(max_attempts=3, backoff_s=0.01, jitter=0))
def call_provider(ctx: StepContext, state: Call) -> dict[str, str]:
    if ctx.attempt == 1:
        raise RetryAfter(1.0, "429 Too Many Requests (Retry-After: 1)")
    return {"answer": f"ok on attempt {ctx.attempt}"}


def test_the_retry_waits_what_the_provider_asked_not_the_short_backoff(client: Client, settings: Settings) -> None:
    with worker_thread([polite], settings):
        final = client.submit(polite, {}, run_id="p").wait(timeout_s=30)
    assert final.answer == "ok on attempt 2"
    events = client.events("p")
    failed = next(e for e in events if e.type == "error")
    done = next(e for e in events if e.type == "ok")
    assert failed.error is not None and "Retry-After: 1" in failed.error.message
    assert done.start_ms is not None and failed.end_ms is not None
    assert done.start_ms - failed.end_ms >= 1000  # never earlier than asked (0.01 s backoff otherwise)
