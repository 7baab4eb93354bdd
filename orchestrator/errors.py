"""The exception tree: every error the library raises on purpose.

    OrchestratorError                 base; ``retryable`` says whether trying again can help
    ├── ConfigError                   a setting or URL is invalid (names the setting)
    ├── RedisUnavailable              Redis cannot be reached or did not answer (retryable)
    ├── RedisRefused                  Redis refused us: no or wrong password, a missing ACL
    │                                 permission, or an error reply that a retry will not fix
    ├── ValidationError               bad input at a boundary (names field, value, expectation)
    │   ├── PayloadTooLarge           a payload is over ``max_payload_bytes``
    │   └── StepResultError           a step returned something we cannot persist
    ├── DefinitionError               a workflow or step is defined wrongly
    ├── RunNotFound                   no run with that id
    ├── RunConflict                   the run id exists with another workflow or input
    ├── InvalidTransition             e.g. retrying a run that has not failed
    ├── RunFailed                     wait() on a run that failed (carries the step error)
    ├── RunCancelled                  wait() on a run that was cancelled
    ├── WaitTimeout                   wait() gave up before the run finished
    └── NonRetryableError             raise it from a step to fail without retries

Messages say what happened and what to do; structured fields (run id, step, attempt) ride
along so logs and the CLI can show them without parsing text.
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base class of every error raised on purpose by the orchestrator."""

    retryable: bool = False

    def __init__(self, message: str, *, run_id: str | None = None, step: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.run_id = run_id
        self.step = step


class ConfigError(OrchestratorError):
    """A setting, environment variable or URL is invalid."""


class RedisUnavailable(OrchestratorError):
    """Redis could not be reached, did not answer in time, or refused for a passing reason
    (loading, a failover, out of memory). Trying again later can help; the call may or may not
    have taken effect, and every call of the library is safe to repeat."""

    retryable = True


class RedisRefused(OrchestratorError):
    """Redis answered and refused: the URL has no password or a wrong one, the ACL user lacks
    a permission, or the reply is an error that the same call would get again."""


class ValidationError(OrchestratorError):
    """Input at a boundary (submit, stream entry, step result) failed validation."""


class PayloadTooLarge(ValidationError):
    """A JSON payload is larger than the configured ``max_payload_bytes``."""


class StepResultError(ValidationError):
    """A step returned a value that cannot become part of the run's state."""


class DefinitionError(OrchestratorError):
    """A workflow or step definition is invalid (caught at import or worker start)."""


class RunNotFound(OrchestratorError):
    """No run exists under the given id (never submitted, or purged)."""


class RunConflict(OrchestratorError):
    """A run with this id exists but belongs to another workflow or has another input."""


class InvalidTransition(OrchestratorError):
    """The requested operation does not apply to the run's current status."""


class RunFailed(OrchestratorError):
    """The awaited run ended in ``failed``; ``error`` holds the step's recorded error."""

    def __init__(self, message: str, *, run_id: str, step: str | None, error: dict[str, object]) -> None:
        super().__init__(message, run_id=run_id, step=step)
        self.error = error


class RunCancelled(OrchestratorError):
    """The awaited run was cancelled."""


class WaitTimeout(OrchestratorError, TimeoutError):
    """``Run.wait`` reached its timeout; the run itself goes on."""

    retryable = True


class NonRetryableError(Exception):
    """Raise from a step to fail the step at once, whatever its retry policy says."""


class RetryAfter(Exception):
    """Raise from a step when the other side said when to come back (an HTTP 429 or 503 with
    ``Retry-After``): the retry waits at least ``seconds``, however short the step's backoff.
    Any exception with a numeric ``retry_after`` attribute (seconds) is honoured the same way.
    It counts as a failed attempt against the step's ``max_attempts``."""

    def __init__(self, seconds: float, message: str = "") -> None:
        super().__init__(message or f"retry after {seconds} s")
        self.retry_after = seconds
