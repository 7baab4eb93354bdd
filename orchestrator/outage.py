"""Waiting out an unreachable Redis in a long-running process: one backoff, one kind of log line.

Workers and supervisors never exit because Redis is away or refuses them: they retry, with a
backoff of 0.1 s doubling to 5 s (with jitter, so a fleet does not come back in step), and say
so in one line that tells what failed, where (the redacted URL), since when, how many tries,
and when the next one is. The first failure is logged at once and later ones every 30 s while
it lasts; the recovery is logged once, with how long Redis was away. Client calls (submit,
status...) do not wait: they raise :class:`~orchestrator.errors.RedisUnavailable`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from orchestrator.connection import redis_failure
from orchestrator.errors import ConfigError, OrchestratorError, RedisUnavailable
from orchestrator.redact import redact_url

BASE_S = 0.1
CAP_S = 5.0
LOG_EVERY_S = 30.0


def _stamp(wall_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall_s))


class Outage:
    """One stretch of failed calls to Redis by one loop of a process (``what`` it was doing).

    Call :meth:`failed` with each error (it logs when due and returns how long to wait before
    the next try) and :meth:`recovered` after each success.
    """

    def __init__(
        self,
        log: logging.Logger,
        what: str,
        url: str,
        *,
        fields: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.what = what
        self.url = url
        self.fields = dict(fields or {})
        self.clock = clock
        self.attempts = 0
        self._since: float | None = None  # monotonic
        self._since_wall = 0.0
        self._logged = 0.0

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def failed(self, exc: BaseException) -> float:
        """Count a failure; log it when due; return the seconds to wait before the next try.

        Raises the :class:`~orchestrator.errors.ConfigError` that ``exc`` means when waiting
        cannot help (the URL names a Redis Cluster node): the process must stop and say so.
        """
        failure = exc if isinstance(exc, OrchestratorError) else redis_failure(exc, self.url)
        if isinstance(failure, ConfigError):
            raise failure from None
        now = self.clock()
        if self._since is None:
            self._since, self._since_wall, self._logged = now, time.time(), now - LOG_EVERY_S
        self.attempts += 1
        delay_s = min(CAP_S, BASE_S * 2.0 ** (self.attempts - 1)) * random.uniform(0.75, 1.0)
        if now - self._logged >= LOG_EVERY_S:
            self._logged = now
            unavailable = isinstance(failure, RedisUnavailable)
            self.log.log(
                logging.WARNING if unavailable else logging.ERROR,
                f"Redis {'unreachable' if unavailable else 'refused us'} while {self.what}; retrying until it answers",
                extra={
                    **self.fields,
                    "redis": redact_url(self.url),
                    "since": _stamp(self._since_wall),
                    "down_s": round(now - self._since, 1),
                    "attempts": self.attempts,
                    "next_try_s": round(delay_s, 2),
                    "error": failure.message,
                },
            )
        return delay_s

    def recovered(self) -> None:
        """Note a success; logs the end of an outage once."""
        if self._since is None:
            return
        self.log.info(
            f"Redis answers again; {self.what} goes on",
            extra={
                **self.fields,
                "redis": redact_url(self.url),
                "down_s": round(self.clock() - self._since, 1),
                "attempts": self.attempts,
            },
        )
        self._since, self.attempts = None, 0
