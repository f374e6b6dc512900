"""The shared rules under both faces, without a broker: call preparation,
chunk entries, the cancel decision, event statuses, and the asyncio
listener against a real redis-server (subscribes from many tasks while one
task reads)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio as aredis

from mcpq.producer.aio_listener import ChannelListener, same_server
from mcpq.producer.cancelling import CancelOutcome, cancel_step, checked_call_id, final_result
from mcpq.producer.events import status_of
from mcpq.producer.sending import plan_chunks
from mcpq.producer.submission import prepare_call
from mcpq.worker.contract.errors import InvalidArgumentsError
from mcpq.worker.contract.settings import Settings

pytestmark = pytest.mark.timeout(30)


def test_prepare_call_builds_kwargs_and_chunk_entries() -> None:
    call = prepare_call(Settings(), "add", {"a": 1}, server="s", timeout=5, progress=True)
    assert call.kwargs == {
        "tool": "add",
        "arguments": {"a": 1},
        "server": "s",
        "timeout": 5.0,
        "progress": True,
        "enqueued_at": pytest.approx(time.time(), abs=5),  # the worker's queue-wait metric
    }
    assert call.label == "s/add" and call.wait_hint == 15.0 and call.chunkable
    assert call.chunk_entry() == {"id": call.task_id, **call.kwargs}
    plain = prepare_call(Settings(), "add", None)
    assert "progress" not in plain.kwargs, "no progress field unless asked (older workers reject it)"
    keyed = prepare_call(Settings(), "add", {}, idempotency_key="k", request_id="r1")
    assert keyed.task_id == "r1" and not keyed.chunkable, "a chunk entry cannot carry an idempotency key"
    with pytest.raises(InvalidArgumentsError):
        prepare_call(Settings(), "add", {"a": float("inf")})
    with pytest.raises(InvalidArgumentsError):
        prepare_call(Settings(), "add", {}, timeout=0)


def test_plan_chunks_keeps_every_call_and_records_members() -> None:
    entries = [({"id": f"c{i}", "tool": "t"}, "t") for i in range(7)]
    chunks = plan_chunks(entries, 3)
    assert [len(c.calls) for c in chunks] == [3, 3, 1]
    assert [m for c in chunks for m, _ in c.members] == [f"c{i}" for i in range(7)]
    assert all(chunk_id == c.id for c in chunks for _, chunk_id in c.members)


def _meta(status: str, result: Any = None) -> dict[str, Any]:
    return {"status": status, "result": result}


@pytest.mark.parametrize(
    ("metas", "known", "expected", "requested"),
    [
        ([_meta("SUCCESS", {"success": True, "tool_name": "t"})], False, "finished", False),
        ([_meta("STARTED")], False, "requested", True),  # a non-final state says the call exists
        ([None], True, "requested", True),  # due in the ledger
        ([None, _meta("SUCCESS", {"success": True, "tool_name": "t"})], False, "finished", False),
        ([None, None], False, None, False),  # unknown: the caller waits briefly, then not found
    ],
)
def test_cancel_step(metas: list[Any], known: bool, expected: str | None, requested: bool) -> None:
    reads = iter(metas)
    asked: list[bool] = []
    outcome = cancel_step("id-1", lambda: next(reads), lambda: known, lambda: asked.append(True))
    assert (outcome.state if outcome else None) == expected
    assert bool(asked) is requested
    if expected == "finished":
        assert isinstance(outcome, CancelOutcome) and outcome.result is not None and outcome.result.success


def test_final_result_and_ids_and_statuses() -> None:
    assert final_result("x", None) is None and final_result("x", _meta("RETRY")) is None
    failed = final_result("x", _meta("FAILURE", "boom"))
    assert failed is not None and failed.error_code == "internal_error"
    with pytest.raises(InvalidArgumentsError):
        checked_call_id("has space")
    assert checked_call_id("abc-1") == "abc-1"
    assert [status_of(s) for s in ("PENDING", "STARTED", "RETRY", "SUCCESS", "FAILURE")] == [
        "queued", "started", "retrying", "finished", "finished",
    ]  # fmt: skip


def test_same_server_compares_host_not_database() -> None:
    a = aredis.Redis.from_url("redis://h:1/1")
    assert same_server(a, aredis.Redis.from_url("redis://h:1/2"))
    assert not same_server(a, aredis.Redis.from_url("redis://h:2/1"))
    assert not same_server(a, aredis.Redis.from_url("redis://:pw@h:1/1"))


def test_listener_takes_subscribes_from_many_tasks_while_one_reads(redis_url: str) -> None:
    """redis-py's asyncio PubSub only writes on subscribe; the reader task alone reads."""

    async def main() -> tuple[dict[str, bytes], int]:
        sub = aredis.Redis.from_url(f"{redis_url}/1")
        pub = aredis.Redis(
            connection_pool=aredis.BlockingConnectionPool.from_url(f"{redis_url}/2", max_connections=4)
        )
        got: dict[str, bytes] = {}
        arrived = asyncio.Event()
        n = 1500

        def on_message(channel: str, data: bytes) -> None:
            got[channel] = data
            if len(got) == n:
                arrived.set()

        listener = ChannelListener(
            sub, on_message, on_idle=lambda: None, on_reconnect=lambda: None, on_lost=lambda e: None
        )
        await listener.subscribe(["warm"])  # the reader task is running from here on

        async def one(i: int) -> None:
            await listener.subscribe([f"test-listener:{i}"])
            await pub.publish(f"test-listener:{i}", str(i))

        await asyncio.gather(*(one(i) for i in range(n)))
        async with asyncio.timeout(20):
            await arrived.wait()
        listener.unsubscribe([f"test-listener:{i}" for i in range(n)])
        await asyncio.sleep(0)  # let the batched UNSUBSCRIBE go out
        subscribers = len(listener.channels)
        await listener.close()
        await sub.aclose()
        await pub.aclose()
        return got, subscribers

    got, left = asyncio.run(main())
    assert got == {f"test-listener:{i}": str(i).encode() for i in range(1500)}
    assert left == 1  # only "warm"


def test_subscribes_that_overlap_the_first_connect_share_one_connection(redis_url: str) -> None:
    """Subscribes from tasks arriving while the first SUBSCRIBE still connects
    must not each open (and leak) a connection: the 48 requests of a cold API
    once took all four of a pool's connections and the next waited for none."""

    async def main() -> tuple[int, int]:
        pool = aredis.BlockingConnectionPool.from_url(f"{redis_url}/1", max_connections=4, timeout=2)
        client = aredis.Redis(connection_pool=pool)
        listener = ChannelListener(
            client, lambda c, d: None, on_idle=lambda: None, on_reconnect=lambda: None, on_lost=lambda e: None
        )

        async def one(i: int) -> None:
            for _ in range(i):  # arrive one loop iteration apart, during the first connect
                await asyncio.sleep(0)
            await listener.subscribe([f"test-overlap:{i}"])

        await asyncio.gather(*(one(i) for i in range(40)))
        subscribed = len(listener.channels)
        in_use = len(pool._in_use_connections)
        await listener.close()
        await client.aclose()
        return subscribed, in_use

    subscribed, in_use = asyncio.run(main())
    assert subscribed == 40
    assert in_use == 1, f"{in_use} connections taken for one pub/sub listener"
