"""The fleet-state plans give the same answers through the sync and the asyncio driver."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import fakeredis
import pytest

from mcpq.producer.fleet_state import (
    breakers_plan,
    reconnect_plan,
    reset_plan,
    servers_plan,
    tools_plan,
)
from mcpq.worker.contract.errors import ServerNotFoundError
from mcpq.worker.contract.keys import Keys
from mcpq.worker.contract.plans import Plan, run_plan, run_plan_async

pytestmark = pytest.mark.timeout(30)

KEYS = Keys("t:")


def seed(client: Any) -> None:
    client.hset(KEYS.servers, "a", json.dumps({"name": "a", "transport": "stdio"}))
    client.hset(KEYS.servers, "b", json.dumps({"name": "b", "transport": "http"}))
    client.set(KEYS.server_info("a"), json.dumps({"protocol_version": "2025-11-25", "server_info": {"n": 1}}))
    client.set(
        KEYS.server_tools("a"),
        json.dumps({"tools": [{"name": "echo"}, {"name": "add"}], "discovered_at": 5.0}),
    )
    client.set(KEYS.server_tools("b"), json.dumps({"tools": [{"name": "echo"}]}))
    client.hset(KEYS.tool_map, mapping={"echo": json.dumps(["a", "b"]), "add": json.dumps(["a"])})
    client.hset(KEYS.breaker("b"), mapping={"state": "open", "failures": 3, "open_until": 10**15})


@pytest.fixture
def clients() -> tuple[fakeredis.FakeRedis, Any]:
    server = fakeredis.FakeServer()
    sync = fakeredis.FakeRedis(server=server, decode_responses=True)
    seed(sync)
    return sync, fakeredis.aioredis.FakeRedis(server=server, decode_responses=True)


def both(clients: tuple[fakeredis.FakeRedis, Any], make: Any) -> tuple[Any, Any]:
    sync, aio = clients
    plan: Plan[Any] = make()
    return run_plan(sync, plan), asyncio.run(run_plan_async(aio, make()))


def test_servers_are_listed_with_info_and_tool_counts(clients: Any) -> None:
    sync, aio = both(clients, lambda: servers_plan(KEYS))
    assert sync == aio
    assert [s["name"] for s in sync] == ["a", "b"]
    assert sync[0]["protocol_version"] == "2025-11-25" and sync[0]["tools"] == 2
    assert sync[0]["discovered_at"] == 5.0
    assert sync[1]["protocol_version"] is None and sync[1]["tools"] == 1


def test_tools_say_which_are_ambiguous(clients: Any) -> None:
    sync, aio = both(clients, lambda: tools_plan(KEYS))
    assert sync == aio
    assert {(t["server"], t["name"], t["ambiguous"]) for t in sync} == {
        ("a", "echo", True),
        ("a", "add", False),
        ("b", "echo", True),
    }
    only_b, _ = both(clients, lambda: tools_plan(KEYS, "b"))
    assert [t["name"] for t in only_b] == ["echo"]


def test_breakers_reset_and_reconnect(clients: Any) -> None:
    sync, aio = both(clients, lambda: breakers_plan(KEYS))
    assert sync == aio
    assert sync["a"]["state"] == "closed" and sync["b"]["state"] == "open"
    assert sync["b"]["failures"] == 3
    assert run_plan(clients[0], reset_plan(KEYS, "b")) is True
    assert asyncio.run(run_plan_async(clients[1], reset_plan(KEYS, "b"))) is False
    assert run_plan(clients[0], reconnect_plan(KEYS, "a")) == {"server": "a", "epoch": 1}
    assert asyncio.run(run_plan_async(clients[1], reconnect_plan(KEYS, "a"))) == {"server": "a", "epoch": 2}


def test_an_unknown_server_is_refused_by_both_drivers(clients: Any) -> None:
    with pytest.raises(ServerNotFoundError, match="no server named 'zz'"):
        run_plan(clients[0], reset_plan(KEYS, "zz"))
    with pytest.raises(ServerNotFoundError):
        asyncio.run(run_plan_async(clients[1], reconnect_plan(KEYS, "zz")))
    assert clients[0].hget(KEYS.epochs, "zz") is None
