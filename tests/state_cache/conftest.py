from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.state_cache.redis_proc import RedisProcess


@pytest.fixture(scope="session")
def redis_proc() -> Iterator[RedisProcess]:
    """One redis-server for the session; tests isolate themselves with their own key prefix."""
    proc = RedisProcess()
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    """A redis-server this test may kill and restart."""
    proc = RedisProcess()
    proc.start()
    yield proc
    proc.stop()
