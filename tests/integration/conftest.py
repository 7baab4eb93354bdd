"""Fixtures of the script tests."""

from __future__ import annotations

import pytest
import redis

from orchestrator.settings import Settings
from tests.ops import Ops
from tests.secure_redis import certs, tls_redis_server  # noqa: F401  (TLS fixtures: certificates, a TLS-capable binary)


@pytest.fixture
def ops(r: redis.Redis, settings: Settings) -> Ops:
    return Ops(r, settings)
