"""The worker's pieces of cancellation and progress, without workers: the
admit script's cancel ordering (fakeredis with Lua, and a real redis-server),
the running-call watch and listener, and the progress coalescer."""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import fakeredis
import pytest
import redis

from mcpq.worker.breaker import BreakerPolicy, Claim, ServerGuard
from mcpq.worker.cancellation import CallWatch, CancelListener
from mcpq.worker.config import MCPQConfig
from mcpq.worker.contract.cancel import request_cancel
from mcpq.worker.contract.errors import CallCancelledError
from mcpq.worker.contract.keys import Keys
from mcpq.worker.contract.progress import ProgressUpdate
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.followup import next_step
from mcpq.worker.progress import ProgressPublisher, ProgressRelay
from tests.support.procs import wait_until

pytestmark = pytest.mark.timeout(60)

POLICY = BreakerPolicy(threshold=1, open_seconds=60)


@pytest.fixture(params=["fakeredis", "redis-server"])
def client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    if request.param == "fakeredis":
        yield fakeredis.FakeRedis()
        return
    url = request.getfixturevalue("redis_url")
    real = redis.Redis.from_url(f"{url}/5")
    yield real
    real.close()


@pytest.fixture()
def keys() -> Keys:
    return Keys(f"t{uuid.uuid4().hex[:6]}:")


def claim_for(keys: Keys, call_id: str, *, idempotent: bool = False, owner: str = "") -> Claim:
    return Claim(
        keys.claim(f"{call_id}:1"),
        owner or f"me#{uuid.uuid4().hex[:6]}",
        idempotent,
        lease=0.5,
        ttl=60,
        cancel_key=keys.cancelled(call_id),
    )


def admit(guard: ServerGuard, claim: Claim | None, policy: BreakerPolicy = POLICY) -> Any:
    return guard.admit("s", policy, uuid.uuid4().hex, 5.0, claim)


# -- the admit script ------------------------------------------------------------------


def test_a_flagged_call_is_cancelled_before_the_breaker_and_the_limits(
    client: redis.Redis, keys: Keys
) -> None:
    guard = ServerGuard(client, keys)
    limited = BreakerPolicy(threshold=1, open_seconds=60, max_concurrency=1)
    holder = admit(guard, None, limited)
    assert holder.admitted  # the one slot is taken
    request_cancel(client, keys, ["c1"], ttl=60)
    claim = claim_for(keys, "c1")
    first = admit(guard, claim, limited)
    assert (first.decision, first.reason) == ("cancelled", "")
    # It took no slot and no claim: the slot holder is still alone, the claim untouched.
    assert client.zcard(keys.inflight("s")) == 1
    assert not client.exists(claim.key)
    # An open breaker does not hide the flag either.
    client.hset(keys.breaker("s"), mapping={"state": "open", "open_until": int(time.time() * 1000) + 60_000})
    assert admit(guard, claim_for(keys, "c1")).decision == "cancelled"
    # Unflagged calls still meet the breaker.
    assert admit(guard, claim_for(keys, "c2")).decision == "reject"


def test_a_finished_call_answers_with_its_result_even_when_flagged(client: redis.Redis, keys: Keys) -> None:
    guard = ServerGuard(client, keys)
    claim = claim_for(keys, "c1")
    client.hset(claim.key, mapping={"state": "done", "owner": "old", "result": '{"success": true}'})
    request_cancel(client, keys, ["c1"], ttl=60)
    done = admit(guard, claim)
    assert (done.decision, done.stored) == ("done", '{"success": true}')


def test_a_live_duplicate_waits_and_a_dead_ones_call_ends_cancelled(client: redis.Redis, keys: Keys) -> None:
    guard = ServerGuard(client, keys)
    running = claim_for(keys, "c1", owner="host/pid1#abc")
    assert admit(guard, running).decision == "allow"  # the first delivery runs it
    request_cancel(client, keys, ["c1"], ttl=60)
    # A duplicate while the first is alive waits: the first is interrupted and writes the one result.
    assert admit(guard, claim_for(keys, "c1")).decision == "busy"
    # Once its heartbeat is stale (the worker died), the flag wins, naming the dead owner,
    # even for an idempotent call that would otherwise be taken over and run again.
    wait_until(lambda: admit(guard, claim_for(keys, "c1", idempotent=True)).decision == "cancelled", 5)
    died = admit(guard, claim_for(keys, "c1"))
    assert (died.decision, died.reason) == ("cancelled", "host/pid1#abc")
    assert client.hget(running.key, "owner") == b"host/pid1#abc"  # not taken over


def test_unflagged_calls_and_claimless_admits_are_unchanged(client: redis.Redis, keys: Keys) -> None:
    guard = ServerGuard(client, keys)
    request_cancel(client, keys, ["other"], ttl=60)
    assert admit(guard, claim_for(keys, "c1")).decision == "allow"
    assert admit(guard, None).decision == "allow"  # discovery admits carry no claim and no flag


# -- what follows a cancelled result ---------------------------------------------------------


def test_a_cancelled_result_is_final_even_if_marked_retry_safe() -> None:
    config = MCPQConfig.model_validate(
        {"mcp_servers": {"s": {"command": "true", "retry_attempts": 5, "retry_delay": 0}}}
    )
    err = CallCancelledError("cancelled", details={"retry_safe": True, "may_have_run": False})
    result = ToolResult.failure("t", err, server_name="s")
    assert next_step(config, result, attempt=1, waits=0, deadline_at=time.time() + 60) is None


# -- the running-call watch and the listener ---------------------------------------------------


def test_a_watch_cancels_its_request_whichever_comes_first() -> None:
    early: Future[None] = Future()
    fired_first = CallWatch("a")
    fired_first.fire()
    fired_first.attach(early)
    assert early.cancelled()

    late: Future[None] = Future()
    attached_first = CallWatch("b")
    attached_first.attach(late)
    assert not late.cancelled() and not attached_first.fired
    attached_first.fire()
    assert late.cancelled() and attached_first.fired

    finished: Future[None] = Future()
    finished.set_result(None)
    watch = CallWatch("c")
    watch.attach(finished)
    watch.fire()  # too late: the call's own result stands
    assert not finished.cancelled()


def test_the_listener_interrupts_watched_calls_and_catches_cancels_sent_before_it_listened(
    keys: Keys,
) -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    listener = CancelListener(lambda: fakeredis.FakeRedis(server=server), keys)
    try:
        # Flagged (and published) before this process listened: the message is lost to it.
        request_cancel(client, keys, ["early"], ttl=60)
        with (
            listener.watch("early") as early,
            listener.watch("later") as later,
            listener.watch("calm") as calm,
        ):
            assert early is not None and later is not None and calm is not None
            wait_until(lambda: early.fired, 10, message="the flag set before subscribing was missed")
            assert listener.subscribed.is_set()
            request_cancel(client, keys, ["later"], ttl=60)
            wait_until(lambda: later.fired, 10, message="a published cancel was not delivered")
            assert not calm.fired
            assert sorted(listener.running()) == ["calm", "early", "later"]
        assert listener.running() == []  # watches end with their block
        with listener.watch(None) as nothing:
            assert nothing is None
    finally:
        listener.stop()


# -- the progress relay ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Timers:
    """A stand-in for the loop's call_later: runs deferred flushes when told."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, Callable[[], None]]] = []

    def __call__(self, delay: float, fn: Callable[[], None]) -> None:
        self.pending.append((delay, fn))

    def fire(self) -> None:
        pending, self.pending = self.pending, []
        for _, fn in pending:
            fn()


class InlineExecutor(concurrent.futures.Executor):
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def make_relay(
    clock: Clock, timers: Timers, executor: concurrent.futures.Executor | None = None
) -> tuple[ProgressRelay, list[ProgressUpdate]]:
    written: list[ProgressUpdate] = []
    relay = ProgressRelay(
        "c1",
        lambda call_id, update: written.append(update),
        executor or InlineExecutor(),
        interval=0.1,
        schedule=timers,
        clock=clock,
    )
    return relay, written


def test_progress_is_coalesced_to_one_write_per_interval_latest_wins() -> None:
    clock, timers = Clock(), Timers()
    relay, written = make_relay(clock, timers)
    relay.offer(ProgressUpdate(1, 10))
    assert written == [ProgressUpdate(1, 10)]  # the first goes out at once
    for i in range(2, 6):  # a burst inside one interval
        clock.now += 0.01
        relay.offer(ProgressUpdate(i, 10))
    assert written == [ProgressUpdate(1, 10)] and len(timers.pending) == 1  # one deferred flush, armed once
    delay, _ = timers.pending[0]
    assert 0 < delay <= 0.1
    clock.now += delay
    timers.fire()
    assert written == [ProgressUpdate(1, 10), ProgressUpdate(5, 10)]  # only the latest of the burst
    clock.now += 0.5
    relay.offer(ProgressUpdate(6, 10))  # an interval has passed: at once again
    assert written[-1] == ProgressUpdate(6, 10) and not timers.pending


def test_the_last_update_is_flushed_when_the_call_ends_and_later_ones_dropped() -> None:
    clock, timers = Clock(), Timers()
    relay, written = make_relay(clock, timers)
    relay.offer(ProgressUpdate(1, 3))
    clock.now += 0.01
    relay.offer(ProgressUpdate(3, 3, "done"))
    relay.close()
    assert written == [ProgressUpdate(1, 3), ProgressUpdate(3, 3, "done")]
    timers.fire()  # the armed flush finds nothing left to write
    relay.offer(ProgressUpdate(4, 3))  # a server still reporting after the result
    assert written == [ProgressUpdate(1, 3), ProgressUpdate(3, 3, "done")]


def test_a_slow_write_is_never_queued_twice() -> None:
    clock, timers = Clock(), Timers()

    class Held(concurrent.futures.Executor):
        """Holds every write until released, like a Redis that is slow to answer."""

        def __init__(self) -> None:
            self.queued: list[tuple[Future[Any], Callable[[], Any]]] = []

        def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
            future: Future[Any] = Future()
            self.queued.append((future, lambda: fn(*args, **kwargs)))
            return future

        def release(self) -> None:
            queued, self.queued = self.queued, []
            for future, run in queued:
                future.set_result(run())

    held = Held()
    relay, written = make_relay(clock, timers, held)
    relay.offer(ProgressUpdate(1))
    clock.now += 1.0
    relay.offer(ProgressUpdate(2))  # an interval later, but the first write is still going
    assert len(held.queued) == 1
    timers.fire()  # the deferred flush sees it still going and waits another interval
    assert len(held.queued) == 1 and len(timers.pending) == 1
    held.release()
    timers.fire()
    held.release()
    assert written == [ProgressUpdate(1), ProgressUpdate(2)]


def test_the_publisher_writes_the_latest_and_publishes_it(keys: Keys) -> None:
    client = fakeredis.FakeRedis()
    pubsub = client.pubsub()
    pubsub.subscribe(keys.progress("c1"))
    assert pubsub.get_message(timeout=1)["type"] == "subscribe"  # type: ignore[index]
    publisher = ProgressPublisher(client, keys, InlineExecutor())
    publisher.write("c1", ProgressUpdate(2, 4, "half"))
    stored = client.get(keys.progress("c1"))
    assert stored is not None and ProgressUpdate.from_json(stored) == ProgressUpdate(2, 4, "half")
    assert 0 < client.ttl(keys.progress("c1")) <= 600
    message = wait_until(lambda: pubsub.get_message(timeout=0.1), 5)
    assert ProgressUpdate.from_json(message["data"]) == ProgressUpdate(2, 4, "half")
