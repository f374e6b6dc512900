"""Reading and resetting a server's fleet-wide breaker: what the producer and
the admin operations need, without the breaker's scripts (``worker/breaker.py``)."""

from __future__ import annotations

from typing import Any

import redis

from mcpq.worker.contract.keys import Keys
from mcpq.worker.contract.plans import Plan, run_plan


def as_text(value: Any) -> str:
    """A Redis reply (bytes or not) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def breaker_status(client: redis.Redis, keys: Keys, servers: list[str]) -> dict[str, dict[str, Any]]:
    """State, consecutive failures, opened at, next probe at (epoch seconds) per server."""
    return run_plan(client, breaker_status_plan(keys, servers))


def breaker_status_plan(keys: Keys, servers: list[str]) -> Plan[dict[str, dict[str, Any]]]:
    """:func:`breaker_status` as a plan (``contract/plans.py``): one round trip.

    :param keys: the deployment's key layout.
    :param servers: the servers to report, in order.
    """
    commands: list[tuple[str, tuple[Any, ...]]] = [("time", ())]
    for name in servers:
        commands += [("hgetall", (keys.breaker(name),)), ("zcard", (keys.inflight(name),))]
    replies = yield commands
    seconds, micros = replies[0]
    now_ms = seconds * 1000 + micros // 1000
    out: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(servers):
        raw = {as_text(k): as_text(v) for k, v in replies[1 + 2 * i].items()}
        state = raw.get("state", "closed")
        open_until = int(raw.get("open_until", 0) or 0)
        if state == "open" and now_ms >= open_until:
            state = "half_open"  # the next call will be the probe
        leases = sum(1 for k, v in raw.items() if k.startswith("lease:") and int(v) > now_ms)
        out[name] = {
            "state": state,
            "failures": int(raw.get("failures", 0) or 0),
            "opened_at": int(raw["opened_at"]) / 1000 if "opened_at" in raw and state != "closed" else None,
            "next_probe_at": open_until / 1000 if state != "closed" and open_until else None,
            "probe_in_flight": leases,
            "last_error": raw.get("last_error") or None,
            "trips": int(raw.get("trips", 0) or 0),
            "in_flight": int(replies[2 + 2 * i]),
        }
    return out


def reset_breaker(client: redis.Redis, keys: Keys, server: str) -> bool:
    """Close the server's breaker fleet-wide; True if there was state to clear."""
    return run_plan(client, reset_breaker_plan(keys, server))


def reset_breaker_plan(keys: Keys, server: str) -> Plan[bool]:
    """:func:`reset_breaker` as a plan."""
    replies = yield [("delete", (keys.breaker(server),))]
    return bool(replies[0])
