"""Reading and resetting a server's fleet-wide breaker: what the producer and
the admin operations need, without the breaker's scripts (``worker/breaker.py``)."""

from __future__ import annotations

from typing import Any

import redis

from mcpq.worker.contract.keys import Keys


def as_text(value: Any) -> str:
    """A Redis reply (bytes or not) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def breaker_status(client: redis.Redis, keys: Keys, servers: list[str]) -> dict[str, dict[str, Any]]:
    """State, consecutive failures, opened at, next probe at (epoch seconds) per server."""
    pipe = client.pipeline()
    pipe.time()
    for name in servers:
        pipe.hgetall(keys.breaker(name))
        pipe.zcard(keys.inflight(name))
    replies = pipe.execute()
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
    return bool(client.delete(keys.breaker(server)))
