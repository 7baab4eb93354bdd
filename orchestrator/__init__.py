"""Durable multi-step workflows on Redis Streams: a crashed worker loses no persisted step.

Define a :class:`Workflow` of plain Python steps, run :class:`Worker` processes and a
:class:`Supervisor`, and submit runs with a :class:`Client`.
"""

from orchestrator._version import __version__ as __version__
from orchestrator.children import ChildResult, ItemResult
from orchestrator.client import Client, Run
from orchestrator.context import ClaimLost, StepContext
from orchestrator.errors import (
    ConfigError,
    DefinitionError,
    InvalidTransition,
    NonRetryableError,
    OrchestratorError,
    PayloadTooLarge,
    RedisRefused,
    RedisUnavailable,
    RetryAfter,
    RunCancelled,
    RunConflict,
    RunFailed,
    RunNotFound,
    StepResultError,
    ValidationError,
    WaitTimeout,
)
from orchestrator.retry import Retry
from orchestrator.runs import RunHistory, RunInfo
from orchestrator.settings import Settings
from orchestrator.supervisor import Supervisor
from orchestrator.worker import Worker
from orchestrator.workflow import Child, End, Goto, Map, Sleep, StartChildren, WaitFor, Workflow

__all__ = [
    "Child",
    "ChildResult",
    "ClaimLost",
    "Client",
    "ConfigError",
    "DefinitionError",
    "End",
    "Goto",
    "InvalidTransition",
    "ItemResult",
    "Map",
    "NonRetryableError",
    "OrchestratorError",
    "PayloadTooLarge",
    "RedisRefused",
    "RedisUnavailable",
    "Retry",
    "RetryAfter",
    "Run",
    "RunCancelled",
    "RunConflict",
    "RunFailed",
    "RunHistory",
    "RunInfo",
    "RunNotFound",
    "Settings",
    "Sleep",
    "StartChildren",
    "StepContext",
    "StepResultError",
    "Supervisor",
    "ValidationError",
    "WaitFor",
    "WaitTimeout",
    "Worker",
    "Workflow",
]
