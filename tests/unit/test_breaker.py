"""The breaker's Lua scripts, against fakeredis (with Lua) and a real redis-server,
plus the per-process fallback used while Redis is unreachable."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator

import fakeredis
import pytest
import redis

from mcpq.worker.breaker import Admission, BreakerPolicy, LocalBreaker, ServerGuard
from mcpq.worker.contract.breaker_state import breaker_status, reset_breaker
from mcpq.worker.contract.keys import Keys
from tests.support.procs import free_port, wait_until

pytestmark = pytest.mark.timeout(60)

POLICY = BreakerPolicy(threshold=3, open_seconds=0.3)


@pytest.fixture(params=["fakeredis", "redis-server"])
def client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    if request.param == "fakeredis":
        yield fakeredis.FakeRedis()
        return
    url = request.getfixturevalue("redis_url")
    real = redis.Redis.from_url(f"{url}/5")
    yield real
    real.flushdb()
    real.close()


@pytest.fixture()
def guard(client: redis.Redis) -> ServerGuard:
    return ServerGuard(client, Keys(f"t{uuid.uuid4().hex[:6]}:"))


def admit(
    guard: ServerGuard, policy: BreakerPolicy = POLICY, ttl: float = 5.0, server: str = "s"
) -> Admission:
    return guard.admit(server, policy, uuid.uuid4().hex, ttl)


def fail(guard: ServerGuard, policy: BreakerPolicy = POLICY, server: str = "s") -> str:
    a = admit(guard, policy, server=server)
    assert a.admitted, a
    return guard.complete(server, policy, a, "failure", 0.01, "connection_error")


def status(guard: ServerGuard, server: str = "s") -> dict[str, object]:
    return breaker_status(guard.redis, guard.keys, [server])[server]


def test_closed_allows_and_success_keeps_it_closed(guard: ServerGuard) -> None:
    a = admit(guard)
    assert (a.decision, a.state, a.shared) == ("allow", "closed", True)
    assert guard.complete("s", POLICY, a, "success", 0.01) == "closed"
    assert status(guard)["failures"] == 0


def test_opens_after_exactly_threshold_consecutive_failures(guard: ServerGuard) -> None:
    assert fail(guard) == "closed"
    assert fail(guard) == "closed"
    assert status(guard)["failures"] == 2
    assert fail(guard) == "open"
    s = status(guard)
    assert s["state"] == "open" and s["failures"] == 3 and s["last_error"] == "connection_error"
    assert s["opened_at"] is not None and s["next_probe_at"] > s["opened_at"]
    rejected = admit(guard)
    assert rejected.decision == "reject" and rejected.state == "open"
    assert 0 < rejected.retry_after <= POLICY.open_seconds


def test_success_resets_the_consecutive_count(guard: ServerGuard) -> None:
    fail(guard)
    fail(guard)
    a = admit(guard)
    guard.complete("s", POLICY, a, "success", 0.01)
    assert fail(guard) == "closed"
    assert status(guard)["failures"] == 1


def test_ignored_outcomes_count_neither_way(guard: ServerGuard) -> None:
    fail(guard)
    fail(guard)
    for _ in range(5):
        a = admit(guard)
        assert guard.complete("s", POLICY, a, "ignore", 0.01) == "closed"
    assert status(guard)["failures"] == 2


def open_and_wait(guard: ServerGuard, policy: BreakerPolicy = POLICY) -> None:
    for _ in range(policy.threshold):
        fail(guard, policy)
    wait_until(lambda: status(guard)["state"] == "half_open", 5, message="breaker never became half-open")


def test_half_open_grants_exactly_one_probe_and_success_closes(guard: ServerGuard) -> None:
    open_and_wait(guard)
    probe = admit(guard)
    assert probe.decision == "probe"
    others = [admit(guard) for _ in range(5)]
    assert all(o.decision == "reject" and o.reason == "probe_in_flight" for o in others)
    assert guard.complete("s", POLICY, probe, "success", 0.01) == "closed"
    assert admit(guard).decision == "allow"
    assert status(guard)["trips"] == 1


def test_failed_probe_reopens(guard: ServerGuard) -> None:
    open_and_wait(guard)
    probe = admit(guard)
    assert guard.complete("s", POLICY, probe, "failure", 0.01, "timeout") == "open"
    assert admit(guard).decision == "reject"
    assert status(guard)["trips"] == 2


def test_expired_probe_lease_frees_a_new_probe_and_its_late_outcome_is_ignored(guard: ServerGuard) -> None:
    open_and_wait(guard)
    stale = guard.admit("s", POLICY, "dead-worker", 0.05)
    assert stale.decision == "probe"
    # The worker holding the lease "dies"; once the lease expires a new probe is granted.
    fresh = wait_until(
        lambda: (a := admit(guard)).decision == "probe" and a, 5, message="expired lease never freed a probe"
    )
    # The dead worker's late report must not decide anything.
    assert guard.complete("s", POLICY, stale, "failure", 9.0) == "half_open"
    assert guard.complete("s", POLICY, fresh, "success", 0.01) == "closed"


def test_half_open_max_calls_allows_that_many_probes(guard: ServerGuard) -> None:
    policy = BreakerPolicy(threshold=1, open_seconds=0.2, half_open_max_calls=3)
    open_and_wait(guard, policy)
    decisions = [admit(guard, policy).decision for _ in range(5)]
    assert decisions == ["probe", "probe", "probe", "reject", "reject"]


def test_results_of_calls_admitted_before_opening_are_ignored(guard: ServerGuard) -> None:
    early = [admit(guard) for _ in range(3)]
    for _ in range(3):
        fail(guard)
    assert status(guard)["state"] == "open"
    assert guard.complete("s", POLICY, early[0], "success", 0.01) == "open"


def test_failure_rate_mode(guard: ServerGuard) -> None:
    policy = BreakerPolicy(threshold=1000, open_seconds=5, failure_rate_threshold=50, minimum_calls=10)
    outcomes = ["success", "failure"] * 4  # 50% but fewer than minimum_calls
    for outcome in outcomes:
        a = admit(guard, policy)
        assert guard.complete("s", policy, a, outcome, 0.01, "x") == "closed"  # type: ignore[arg-type]
    a = admit(guard, policy)
    assert guard.complete("s", policy, a, "success", 0.01) == "closed"  # 4/9
    a = admit(guard, policy)
    assert guard.complete("s", policy, a, "failure", 0.01, "x") == "open"  # 5/10 = 50%


def test_slow_calls_count_as_failures(guard: ServerGuard) -> None:
    policy = BreakerPolicy(threshold=2, open_seconds=5, slow_call_seconds=0.5)
    for expected in ("closed", "open"):
        a = admit(guard, policy)
        assert guard.complete("s", policy, a, "success", 0.9) == expected
    assert status(guard)["last_error"] == "slow_call"


def test_concurrent_failures_never_overshoot_or_get_lost(guard: ServerGuard) -> None:
    counting = BreakerPolicy(threshold=10**6, open_seconds=5)
    tripping = BreakerPolicy(threshold=100, open_seconds=60)
    threads = 16

    def hammer(policy: BreakerPolicy, server: str, n: int) -> None:
        for _ in range(n):
            a = admit(guard, policy, server=server)
            if a.admitted:
                guard.complete(server, policy, a, "failure", 0.0, "e")

    def run(policy: BreakerPolicy, server: str, n: int) -> None:
        workers = [threading.Thread(target=hammer, args=(policy, server, n)) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    run(counting, "count", 50)
    assert status(guard, "count")["failures"] == threads * 50  # none lost
    run(tripping, "trip", 20)
    s = status(guard, "trip")
    assert s["state"] == "open" and s["failures"] == 100 and s["trips"] == 1  # opened once, at exactly 100


def test_max_concurrency_slots_are_fleet_wide_and_released(guard: ServerGuard) -> None:
    policy = BreakerPolicy(max_concurrency=2)
    first, second = admit(guard, policy), admit(guard, policy)
    assert first.admitted and second.admitted
    third = admit(guard, policy)
    assert (third.decision, third.reason) == ("limited", "concurrency")
    assert status(guard)["in_flight"] == 2
    guard.complete("s", policy, first, "success", 0.01)
    assert admit(guard, policy).admitted


def test_concurrency_slot_of_a_dead_worker_expires(guard: ServerGuard) -> None:
    policy = BreakerPolicy(max_concurrency=1)
    assert guard.admit("s", policy, "dead", 0.05).admitted
    assert admit(guard, policy).decision == "limited"
    wait_until(lambda: admit(guard, policy).admitted, 5, message="a dead worker's slot never expired")


def test_rate_limit_allows_a_burst_then_spaces_calls(guard: ServerGuard) -> None:
    policy = BreakerPolicy(rate=(3, 1.0))
    assert [admit(guard, policy).decision for _ in range(3)] == ["allow"] * 3
    limited = admit(guard, policy)
    assert (limited.decision, limited.reason) == ("limited", "rate")
    assert 0 < limited.retry_after <= 0.34


def test_reset_closes_the_breaker(guard: ServerGuard) -> None:
    for _ in range(3):
        fail(guard)
    assert reset_breaker(guard.redis, guard.keys, "s") is True
    assert status(guard)["state"] == "closed"
    assert admit(guard).decision == "allow"
    assert reset_breaker(guard.redis, guard.keys, "s") is False


def test_unreachable_redis_falls_back_to_a_local_breaker(caplog: pytest.LogCaptureFixture) -> None:
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.2)
    guard = ServerGuard(dead, Keys("x:"))
    with caplog.at_level(logging.WARNING, logger="mcpq.worker.breaker"):
        a = admit(guard)
        assert a.admitted and not a.shared
        assert guard.degraded
        for _ in range(3):
            a = admit(guard)
            guard.complete("s", POLICY, a, "failure", 0.01, "e")
        assert admit(guard).decision == "reject"
    degraded_logs = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(degraded_logs) == 1  # said once, not per call


def test_local_breaker_state_machine() -> None:
    local = LocalBreaker()
    policy = BreakerPolicy(threshold=2, open_seconds=0.05)
    for expected in ("closed", "open"):
        local.admit(policy, "t", 1)
        assert local.complete(policy, "t", "failure", False, "e") == expected
    assert local.admit(policy, "x", 1)[0] == "reject"
    wait_until(
        lambda: local.admit(policy, "p", 1)[0] == "probe", 5, message="local breaker never half-opened"
    )
    assert local.admit(policy, "q", 1)[0] == "reject"
    assert local.complete(policy, "p", "success", True, "") == "closed"
