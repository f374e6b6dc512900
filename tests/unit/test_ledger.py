"""The ledger's scripts, against fakeredis (with Lua) and a real redis-server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import fakeredis
import pytest
import redis

from mcpq.worker.contract.keys import Keys
from mcpq.worker.contract.ledger import Ledger
from mcpq.worker.ledger import LedgerSweeper
from tests.support.procs import wait_until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(params=["fakeredis", "redis-server"])
def client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    if request.param == "fakeredis":
        yield fakeredis.FakeRedis()
        return
    real = redis.Redis.from_url(f"{request.getfixturevalue('redis_url')}/6")
    yield real
    real.flushdb()
    real.close()


def ledger(client: redis.Redis, grace: float) -> Ledger:
    return Ledger(client, Keys(f"l{uuid.uuid4().hex[:6]}:"), grace)


def test_entries_are_handed_out_only_when_overdue_and_to_one_sweeper(client: redis.Redis) -> None:
    book = ledger(client, grace=0.05)
    book.record(
        [("t1", {"kwargs": {"tool": "a"}, "queue": "q"}), ("t2", {"kwargs": {"tool": "b"}, "queue": "q"})]
    )
    assert book.take_overdue() == []  # not due yet
    due = wait_until(book.take_overdue, 5, message="entries never became due")
    assert sorted(task_id for task_id, _ in due) == ["t1", "t2"]
    assert dict(due)["t1"] == {"kwargs": {"tool": "a"}, "queue": "q"}
    assert book.take_overdue() == []  # pushed back by a grace: no second sweeper gets them


def test_cleared_entries_are_never_republished(client: redis.Redis) -> None:
    book = ledger(client, grace=0.02)
    book.record([("done", {"kwargs": {}, "queue": "q"}), ("lost", {"kwargs": {}, "queue": "q"})])
    book.clear("done")
    due = wait_until(book.take_overdue, 5, message="the lost entry never became due")
    assert [task_id for task_id, _ in due] == ["lost"]


def test_sweeper_publishes_what_is_overdue(client: redis.Redis) -> None:
    book = ledger(client, grace=0.02)
    published: list[str] = []
    sweeper = LedgerSweeper(book, lambda task_id, message: published.append(task_id), interval=60)
    book.record([("x", {"kwargs": {"tool": "t"}, "queue": "q"})])
    wait_until(lambda: sweeper.sweep_once() > 0, 5, message="nothing was swept")
    assert published == ["x"]
