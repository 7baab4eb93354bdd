"""Per-step retry policy: how many attempts, how long to wait between them, what not to retry.

Pure logic, no I/O: the worker asks :meth:`Retry.decide` after a step raised and gets back
either a delay or "give up".
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from orchestrator.errors import DefinitionError, NonRetryableError, ValidationError


@dataclass(frozen=True)
class Retry:
    """Exponential backoff with jitter.

    ``max_attempts`` counts attempts that ended in an error or timeout (a worker crash is
    counted separately, against ``Settings.max_crashes``). The n-th retry waits
    ``min(backoff_max_s, backoff_s * multiplier ** (n - 1))``, of which a random ``jitter``
    fraction is taken off so that many runs failing together do not retry together.
    """

    max_attempts: int = 3
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    multiplier: float = 2.0
    jitter: float = 0.5
    non_retryable: tuple[type[BaseException], ...] = field(default=())

    def __post_init__(self) -> None:
        problems = []
        if self.max_attempts < 1:
            problems.append(f"max_attempts={self.max_attempts} (expected >= 1)")
        if self.backoff_s < 0 or self.backoff_max_s < 0:
            problems.append(f"backoff_s={self.backoff_s}, backoff_max_s={self.backoff_max_s} (expected >= 0)")
        if self.multiplier < 1:
            problems.append(f"multiplier={self.multiplier} (expected >= 1)")
        if not 0 <= self.jitter <= 1:
            problems.append(f"jitter={self.jitter} (expected between 0 and 1)")
        for exc_type in self.non_retryable:
            if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
                problems.append(f"non_retryable entry {exc_type!r} (expected an exception class)")
        if problems:
            raise DefinitionError("invalid Retry: " + "; ".join(problems))

    def is_retryable(self, exc: BaseException) -> bool:
        """False for :class:`NonRetryableError`, validation errors and listed types."""
        if isinstance(exc, NonRetryableError | ValidationError):
            return False
        return not isinstance(exc, self.non_retryable)

    def delay_s(self, failures: int, rng: random.Random | None = None) -> float:
        """Backoff before the attempt that follows the ``failures``-th failure (1-based)."""
        base = min(self.backoff_max_s, self.backoff_s * self.multiplier ** max(0, failures - 1))
        jitter = (rng or random).random() * self.jitter * base
        return base - jitter

    def decide(self, exc: BaseException, failures: int, rng: random.Random | None = None) -> float | None:
        """Seconds to wait before retrying, or ``None`` when the step should fail the run.

        ``failures`` includes the failure being decided on. An exception that carries
        ``retry_after`` (seconds, e.g. :class:`~orchestrator.errors.RetryAfter` from a 429's
        ``Retry-After``) makes the wait at least that long, never shorter (at most a day).
        """
        if not self.is_retryable(exc) or failures >= self.max_attempts:
            return None
        return max(self.delay_s(failures, rng), retry_after_s(exc))


MAX_RETRY_AFTER_S = 86400.0


def retry_after_s(exc: BaseException) -> float:
    """The ``retry_after`` an exception carries, in seconds (0 without one or when it is not a
    finite number >= 0; capped at a day)."""
    value = getattr(exc, "retry_after", None)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return 0.0
    return min(float(value), MAX_RETRY_AFTER_S)
