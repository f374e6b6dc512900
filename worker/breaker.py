"""Fleet-wide circuit breakers and limits, one Redis hash per upstream server.

Every transition happens inside one Lua script (``worker/lua/*.lua``), with
Redis ``TIME`` as the only clock, so all worker processes on all hosts share
one failure count and one probe lease. A call costs two round trips:
``admit`` before sending (breaker + concurrency slot + rate token) and
``complete`` after (outcome + slot release).

When Redis cannot be reached, calls go on under a per-process breaker with
the same rules (:class:`LocalBreaker`), the worker logs once that it is
degraded, and it returns to the shared state as soon as Redis answers again.
Fleet-wide limits cannot be enforced without Redis and are skipped then.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import redis

from mcpq.worker.contract.breaker_state import as_text
from mcpq.worker.contract.keys import Keys
from mcpq.worker.contract.scripts import load_script

log = logging.getLogger(__name__)

Outcome = Literal["success", "failure", "ignore"]
Decision = Literal["allow", "probe", "reject", "limited", "done", "busy", "orphaned", "cancelled"]

#: After Redis fails, wait this long before trying it again (calls in between
#: use the local breaker without paying a connect timeout each).
REDIS_RETRY_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """The settings of one server's breaker and limits (from its config)."""

    threshold: int = 5
    open_seconds: float = 60.0
    half_open_max_calls: int = 1
    failure_rate_threshold: float | None = None
    minimum_calls: int = 10
    window_seconds: float = 60.0
    slow_call_seconds: float | None = None
    max_concurrency: int | None = None
    rate: tuple[int, float] | None = None

    @classmethod
    def from_config(cls, config: Any) -> BreakerPolicy:
        return cls(
            threshold=config.circuit_breaker_threshold,
            open_seconds=config.circuit_breaker_timeout,
            half_open_max_calls=config.half_open_max_calls,
            failure_rate_threshold=config.failure_rate_threshold,
            minimum_calls=config.minimum_calls,
            window_seconds=config.window_seconds,
            slow_call_seconds=config.slow_call_seconds,
            max_concurrency=config.max_concurrency,
            rate=config.rate(),
        )


@dataclass(frozen=True, slots=True)
class Claim:
    """One delivery's execution claim: taken in ``admit``, closed in ``complete``."""

    key: str
    owner: str
    idempotent: bool
    lease: float  # seconds without a heartbeat before the owner counts as dead
    ttl: float  # how long a finished call's result is kept for redeliveries
    #: The call's cancel flag (``Keys.cancelled``), read by admit at no extra
    #: round trip; '' for a claim of a call that cannot be cancelled.
    cancel_key: str = ""


@dataclass(frozen=True, slots=True)
class Admission:
    decision: Decision
    state: str
    retry_after: float
    reason: str
    token: str
    shared: bool  # decided by the fleet's Redis state, not the local fallback
    stored: str = ""  # with decision "done": the finished call's ToolResult JSON

    @property
    def admitted(self) -> bool:
        return self.decision in ("allow", "probe")


class LocalBreaker:
    """The same state machine in process memory, for when Redis is down."""

    def __init__(self) -> None:
        self.state = "closed"
        self.failures = 0
        self.opened_at = 0.0
        self.open_until = 0.0
        self.leases: dict[str, float] = {}
        self.last_error = ""

    def admit(self, policy: BreakerPolicy, token: str, lease_ttl: float) -> tuple[Decision, str, float, str]:
        now = time.monotonic()
        if self.state == "open":
            if now < self.open_until:
                return "reject", "open", self.open_until - now, "open"
            self.state = "half_open"
        if self.state == "half_open":
            self.leases = {t: exp for t, exp in self.leases.items() if exp > now}
            if len(self.leases) >= policy.half_open_max_calls:
                return "reject", "half_open", min(self.leases.values()) - now, "probe_in_flight"
            self.leases[token] = now + lease_ttl
            return "probe", "half_open", 0.0, "probe"
        return "allow", "closed", 0.0, ""

    def complete(
        self, policy: BreakerPolicy, token: str, outcome: Outcome, probe: bool, error_code: str
    ) -> str:
        now = time.monotonic()
        if probe:
            expiry = self.leases.pop(token, None)
            if expiry is None or expiry <= now or self.state != "half_open":
                return self.state
            if outcome == "success":
                self.state, self.failures = "closed", 0
            elif outcome == "failure":
                self._trip(policy, now, error_code)
            return self.state
        if self.state != "closed" or outcome == "ignore":
            return self.state
        if outcome == "success":
            self.failures = 0
            return self.state
        self.failures += 1
        self.last_error = error_code
        if self.failures >= policy.threshold:
            self._trip(policy, now, error_code)
        return self.state

    def _trip(self, policy: BreakerPolicy, now: float, error_code: str) -> None:
        self.state = "open"
        self.opened_at = now
        self.open_until = now + policy.open_seconds
        self.last_error = error_code


class ServerGuard:
    """Breakers and limits for every server, shared through Redis."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self._admit = load_script(client, "admit.lua")
        self._complete = load_script(client, "complete.lua")
        self._local: dict[str, LocalBreaker] = {}
        self._lock = threading.RLock()
        self._redis_down_until = 0.0
        self._degraded = False

    # -- Redis availability ----------------------------------------------------
    def _redis_usable(self) -> bool:
        return time.monotonic() >= self._redis_down_until

    def _redis_failed(self, exc: Exception) -> None:
        self._redis_down_until = time.monotonic() + REDIS_RETRY_INTERVAL
        if not self._degraded:
            self._degraded = True
            log.warning(
                "state Redis unreachable (%s): circuit breakers run per process and fleet-wide limits "
                "are not enforced until it is back",
                exc,
            )

    def _redis_ok(self) -> None:
        if self._degraded:
            self._degraded = False
            log.warning("state Redis reachable again: circuit breakers are shared by the fleet again")

    @property
    def degraded(self) -> bool:
        return self._degraded

    def _local_for(self, server: str) -> LocalBreaker:
        with self._lock:
            return self._local.setdefault(server, LocalBreaker())

    # -- the two round trips ---------------------------------------------------------
    def admit(
        self, server: str, policy: BreakerPolicy, token: str, lease_ttl: float, claim: Claim | None = None
    ) -> Admission:
        if self._redis_usable():
            rate_calls, rate_period = policy.rate or (0, 0.0)
            try:
                keys = [
                    self.keys.breaker(server),
                    self.keys.inflight(server),
                    self.keys.rate(server),
                    claim.key if claim else self.keys.breaker(server),
                ]
                if claim is not None and claim.cancel_key:
                    keys.append(claim.cancel_key)
                raw = self._admit(
                    keys=keys,
                    args=[
                        token,
                        int(lease_ttl * 1000) + 1,
                        policy.half_open_max_calls,
                        policy.max_concurrency or 0,
                        rate_calls,
                        int(rate_period * 1000),
                        claim.owner if claim else "",
                        int(claim.lease * 1000) if claim else 0,
                        int(claim.ttl * 1000) if claim else 0,
                        "1" if claim and claim.idempotent else "0",
                    ],
                )
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self._redis_failed(exc)
            else:
                self._redis_ok()
                decision, state, retry_ms, reason, stored = (as_text(v) for v in raw)
                return Admission(decision, state, int(retry_ms) / 1000, reason, token, True, stored)  # type: ignore[arg-type]
        with self._lock:
            decision, state, retry_after, reason = self._local_for(server).admit(policy, token, lease_ttl)
        return Admission(decision, state, retry_after, reason, token, False)

    def complete(
        self,
        server: str,
        policy: BreakerPolicy,
        admission: Admission,
        outcome: Outcome,
        elapsed: float,
        error_code: str = "",
        *,
        claim: Claim | None = None,
        result_json: str = "",
        finished_task: str = "",
    ) -> str:
        """Record the outcome; returns the breaker state after it."""
        if (
            outcome == "success"
            and policy.slow_call_seconds is not None
            and elapsed > policy.slow_call_seconds
        ):
            outcome, error_code = "failure", "slow_call"
        probe = admission.decision == "probe"
        if admission.shared and self._redis_usable():
            try:
                raw = self._complete(
                    keys=[
                        self.keys.breaker(server),
                        self.keys.inflight(server),
                        claim.key if claim else self.keys.breaker(server),
                        self.keys.ledger,
                        self.keys.ledger_messages,
                    ],
                    args=[
                        admission.token,
                        outcome,
                        1 if probe else 0,
                        policy.threshold,
                        int(policy.open_seconds * 1000),
                        policy.failure_rate_threshold or 0,
                        policy.minimum_calls,
                        int(policy.window_seconds * 1000),
                        error_code,
                        claim.owner if claim else "",
                        result_json,
                        int(claim.ttl * 1000) if claim else 0,
                        finished_task,
                    ],
                )
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self._redis_failed(exc)
            else:
                self._redis_ok()
                state, note = as_text(raw[0]), as_text(raw[2])
                if note in ("tripped", "rate_tripped", "probe_failed"):
                    log.warning("circuit breaker for %r opened (%s, last error %s)", server, note, error_code)
                elif note == "probe_succeeded":
                    log.warning("circuit breaker for %r closed: the probe succeeded", server)
                return state
        with self._lock:
            local = self._local_for(server)
            before = local.state
            state = local.complete(policy, admission.token, outcome, probe, error_code)
        if state != before:
            log.warning("circuit breaker for %r (this process only) is now %s", server, state)
        return state
