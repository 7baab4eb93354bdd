"""Fixtures of the script tests."""

from __future__ import annotations

import pytest
import redis

from orchestrator.settings import Settings
from tests.ops import Ops


@pytest.fixture
def ops(r: redis.Redis, settings: Settings) -> Ops:
    return Ops(r, settings)
