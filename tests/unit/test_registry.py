"""mcpq.worker.registry: configs plus the fleet-wide tool map, against fakeredis and a real redis-server."""

from __future__ import annotations

import json
import logging
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest
import redis

import mcpq.worker.registry as registry_module
from mcpq.producer.embedded_redis import free_port
from mcpq.worker.config import MCPQConfig
from mcpq.worker.config_loader import parse_config
from mcpq.worker.contract.errors import ErrorCode, ServerDisabledError, ServerNotFoundError
from mcpq.worker.contract.keys import Keys
from mcpq.worker.registry import MCPServerRegistry, ToolSet

pytestmark = pytest.mark.timeout(30)

#: The real redis-server is shared with other tests: use a db of our own and a unique prefix.
REAL_DB = 11

CONFIG_YAML = """
mcp_servers:
  a:
    command: python
    args: ["-m", "server_a"]
  b:
    url: https://bob:pw-secret-1234@b.example/mcp
    headers:
      Authorization: Bearer sekrit-token-123
      X-Trace: visible-name-only
  c:
    command: python
    enabled: false
    env:
      API_KEY: hunter22-secret
"""

SECRETS = ("sekrit-token-123", "pw-secret-1234", "hunter22-secret", "visible-name-only")


def make_config(text: str = CONFIG_YAML) -> MCPQConfig:
    return parse_config(textwrap.dedent(text), source="servers.yaml", env={})


def tool(name: str, **schema: Any) -> dict[str, Any]:
    return {"name": name, "description": f"the {name} tool", "inputSchema": {"type": "object", **schema}}


def toolset(*names: str, at: float | None = None, info: dict[str, Any] | None = None) -> ToolSet:
    return ToolSet(
        tools={n: tool(n) for n in names},
        discovered_at=time.time() if at is None else at,
        info=info or {},
    )


Connect = Callable[[], redis.Redis]


@pytest.fixture()
def keys() -> Keys:
    return Keys(f"test-registry-{uuid.uuid4().hex[:8]}:")


@pytest.fixture(params=["fakeredis", "redis-server"])
def connect(request: pytest.FixtureRequest, keys: Keys) -> Iterator[Connect]:
    """New connections to one store (so two registries act like two processes)."""
    clients: list[redis.Redis] = []
    if request.param == "fakeredis":
        server = fakeredis.FakeServer()

        def make() -> redis.Redis:
            client = fakeredis.FakeRedis(server=server)
            clients.append(client)
            return client
    else:
        url = request.getfixturevalue("redis_url")

        def make() -> redis.Redis:
            client = redis.Redis.from_url(f"{url}/{REAL_DB}", socket_timeout=5, socket_connect_timeout=5)
            clients.append(client)
            return client

    yield make
    if clients:
        cleaner = clients[0]
        stale = list(cleaner.scan_iter(match=f"{keys.prefix}*"))
        if stale:
            cleaner.delete(*stale)
    for client in clients:
        client.close()


@pytest.fixture()
def client(connect: Connect) -> redis.Redis:
    return connect()


@pytest.fixture()
def registry(client: redis.Redis, keys: Keys) -> MCPServerRegistry:
    return MCPServerRegistry(make_config(), client, keys)


def tool_map(client: redis.Redis, keys: Keys) -> dict[str, list[str]]:
    raw = client.hgetall(keys.tool_map)
    return {k.decode(): json.loads(v) for k, v in raw.items()}


def version(client: redis.Redis, keys: Keys) -> int:
    return int(client.get(keys.tools_version))


# --------------------------------------------------------------------------- the shared tool map


def test_publish_discovery_builds_the_tool_map_in_config_order(
    registry: MCPServerRegistry, client: redis.Redis, keys: Keys
) -> None:
    # Published in reverse config order: the map still lists servers as the config does.
    registry.publish_discovery("b", toolset("add", "sub"))
    registry.publish_discovery("a", toolset("add", "mul"))
    assert tool_map(client, keys) == {"add": ["a", "b"], "mul": ["a"], "sub": ["b"]}
    stored = json.loads(client.get(keys.server_tools("a")))
    assert [t["name"] for t in stored["tools"]] == ["add", "mul"]
    assert stored["tools"][0]["inputSchema"] == {"type": "object"}
    assert stored["discovered_at"] > 0


def test_map_includes_disabled_servers_but_routing_does_not(
    registry: MCPServerRegistry, client: redis.Redis, keys: Keys
) -> None:
    registry.publish_discovery("a", toolset("add"))
    registry.publish_discovery("c", toolset("add", "only_c"))
    assert tool_map(client, keys) == {"add": ["a", "c"], "only_c": ["c"]}
    assert registry.servers_offering("add") == ["a"]
    assert registry.servers_offering("only_c") == []
    assert registry.known_tool_names() == ["add"]


def test_republishing_without_a_tool_drops_it(
    registry: MCPServerRegistry, client: redis.Redis, keys: Keys
) -> None:
    registry.publish_discovery("a", toolset("add", "mul"))
    registry.publish_discovery("b", toolset("add"))
    registry.publish_discovery("a", toolset("add"))
    assert tool_map(client, keys) == {"add": ["a", "b"]}
    assert registry.servers_offering("mul") == []
    registry.publish_discovery("b", toolset())
    assert tool_map(client, keys) == {"add": ["a"]}


def test_version_counter_increments_on_every_publish(
    registry: MCPServerRegistry, client: redis.Redis, keys: Keys
) -> None:
    assert client.get(keys.tools_version) is None
    registry.publish_discovery("a", toolset("add"))
    assert version(client, keys) == 1
    registry.publish_discovery("a", toolset("add"))
    registry.publish_discovery("b", toolset("sub"))
    assert version(client, keys) == 3


def test_publish_discovery_writes_info_when_present(
    registry: MCPServerRegistry, client: redis.Redis, keys: Keys
) -> None:
    registry.publish_discovery("a", toolset("add"))
    assert client.get(keys.server_info("a")) is None
    info = {"protocol_version": "2025-06-18", "server_info": {"name": "A"}}
    registry.publish_discovery("a", toolset("add", info=info))
    target = registry.get("a").target()
    assert json.loads(client.get(keys.server_info("a"))) == {**info, "target": target}
    registry.publish_info("a", {"protocol_version": "2025-11-25"})
    assert json.loads(client.get(keys.server_info("a"))) == {
        "protocol_version": "2025-11-25",
        "target": target,
    }
    local = registry.toolset("a")
    assert local is not None
    assert local.info == {"protocol_version": "2025-11-25"}


def test_malformed_tools_doc_does_not_break_the_map(
    registry: MCPServerRegistry, client: redis.Redis, keys: Keys
) -> None:
    client.set(keys.server_tools("b"), "{not json")
    registry.publish_discovery("a", toolset("add"))
    assert tool_map(client, keys) == {"add": ["a"]}


# --------------------------------------------------------------------------- other processes


def test_second_registry_sees_published_tools(connect: Connect, keys: Keys) -> None:
    first = MCPServerRegistry(make_config(), connect(), keys)
    second = MCPServerRegistry(make_config(), connect(), keys)
    first.publish_discovery("a", toolset("add", "mul"))
    first.publish_discovery("b", toolset("add"))
    assert second.servers_offering("add") == ["a", "b"]
    shared = second.toolset("a")
    assert shared is not None
    assert sorted(shared.tools) == ["add", "mul"]
    assert shared.tools["mul"]["description"] == "the mul tool"
    assert second.undiscovered() == []


def test_version_check_is_throttled_until_refresh(
    connect: Connect, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_module, "VERSION_CHECK_INTERVAL", 3600.0)
    first = MCPServerRegistry(make_config(), connect(), keys)
    second = MCPServerRegistry(make_config(), connect(), keys)
    first.publish_discovery("a", toolset("add"))
    assert second.servers_offering("add") == ["a"]  # the first look always checks
    first.publish_discovery("b", toolset("add", "sub"))
    # Within the interval the cached view is used: no Redis round trip per call.
    assert second.servers_offering("sub") == []
    assert second.servers_offering("sub", refresh=True) == ["b"]
    assert second.servers_offering("add") == ["a", "b"]


def test_version_change_is_picked_up_after_the_interval(
    connect: Connect, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_module, "VERSION_CHECK_INTERVAL", 0.0)
    first = MCPServerRegistry(make_config(), connect(), keys)
    second = MCPServerRegistry(make_config(), connect(), keys)
    first.publish_discovery("a", toolset("add", "mul"))
    assert second.servers_offering("mul") == ["a"]
    first.publish_discovery("a", toolset("add", at=time.time() + 1))
    assert second.servers_offering("mul") == []
    assert second.servers_offering("add") == ["a"]


def test_newer_local_discovery_is_not_replaced_by_older_shared_one(connect: Connect, keys: Keys) -> None:
    first = MCPServerRegistry(make_config(), connect(), keys)
    first.publish_discovery("a", toolset("old", at=1000.0))
    # This process discovered "a" later but could not publish (Redis blip): keep its own view.
    other = MCPServerRegistry(make_config(), connect(), keys)
    other._toolsets["a"] = toolset("new", at=2000.0, info={"protocol_version": "x"})
    current = other.toolset("a", refresh=True)
    assert current is not None
    assert sorted(current.tools) == ["new"]
    # An even newer shared discovery wins, and keeps the local server info.
    first.publish_discovery("a", toolset("newest", at=3000.0))
    current = other.toolset("a", refresh=True)
    assert current is not None
    assert sorted(current.tools) == ["newest"]
    assert current.info == {"protocol_version": "x"}


def test_own_publish_does_not_hide_another_process_publish(
    connect: Connect, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_module, "VERSION_CHECK_INTERVAL", 0.0)
    first = MCPServerRegistry(make_config(), connect(), keys)
    second = MCPServerRegistry(make_config(), connect(), keys)
    first.publish_discovery("a", toolset("add"))  # version 1
    second.publish_discovery("b", toolset("sub"))  # version 2, first has not looked yet
    first.publish_discovery("a", toolset("add", "mul"))  # version 3
    assert first.servers_offering("sub") == ["b"]


def test_undiscovered_and_stale(registry: MCPServerRegistry) -> None:
    assert registry.undiscovered() == ["a", "b"]  # c is disabled
    assert registry.is_stale("a") is True
    registry.publish_discovery("a", toolset("add"))
    assert registry.undiscovered() == ["b"]
    assert registry.is_stale("a") is False
    registry.mark_stale("a")
    assert registry.is_stale("a") is True
    registry.publish_discovery("b", toolset("x", at=time.time() - 301))  # default discovery_ttl is 300 s
    assert registry.is_stale("b") is True


# --------------------------------------------------------------------------- configs


def test_get_unknown_server(registry: MCPServerRegistry) -> None:
    with pytest.raises(ServerNotFoundError) as info:
        registry.get("zzz")
    assert info.value.code == ErrorCode.SERVER_NOT_FOUND
    assert info.value.message == "no server named 'zzz' is configured (configured: a, b, c)"
    assert info.value.details == {"server": "zzz"}
    with pytest.raises(ServerNotFoundError):
        registry.get_enabled("zzz")


def test_get_with_no_servers(client: redis.Redis, keys: Keys) -> None:
    empty = MCPServerRegistry(make_config("mcp_servers: {}\n"), client, keys)
    with pytest.raises(ServerNotFoundError, match=r"\(configured: none\)"):
        empty.get("a")
    assert empty.undiscovered() == []
    assert empty.servers_offering("add", refresh=True) == []


def test_get_disabled_server(registry: MCPServerRegistry) -> None:
    assert registry.get("c").name == "c"  # get() does not care about enabled
    with pytest.raises(ServerDisabledError) as info:
        registry.get_enabled("c")
    assert info.value.code == ErrorCode.SERVER_DISABLED
    assert info.value.message == "server 'c' is disabled in config (enabled: false)"
    assert info.value.details == {"server": "c"}
    assert registry.get_enabled("a").name == "a"
    assert registry.enabled_names() == ["a", "b"]


def test_publish_servers_writes_secret_free_summaries(
    registry: MCPServerRegistry, client: redis.Redis, keys: Keys
) -> None:
    registry.publish_servers()
    raw = client.hgetall(keys.servers)
    assert sorted(k.decode() for k in raw) == ["a", "b", "c"]
    blob = b" ".join(raw.values()).decode()
    for secret in SECRETS:
        assert secret not in blob
    b = json.loads(raw[b"b"])
    assert b["transport"] == "http"
    assert b["header_names"] == ["Authorization", "X-Trace"]
    assert b["url"] == "https://bob:***@b.example/mcp"
    c = json.loads(raw[b"c"])
    assert c["enabled"] is False
    assert c["env_names"] == ["API_KEY"]
    assert json.loads(raw[b"a"])["args"] == ["-m", "server_a"]


def test_publish_servers_replaces_the_previous_set(client: redis.Redis, keys: Keys) -> None:
    MCPServerRegistry(make_config(), client, keys).publish_servers()
    smaller = make_config("mcp_servers:\n  z:\n    command: python\n")
    MCPServerRegistry(smaller, client, keys).publish_servers()
    assert sorted(k.decode() for k in client.hgetall(keys.servers)) == ["z"]
    MCPServerRegistry(make_config("mcp_servers: {}\n"), client, keys).publish_servers()
    assert client.exists(keys.servers) == 0


# --------------------------------------------------------------------------- protocol memory


def test_protocol_memory_round_trip(connect: Connect, keys: Keys) -> None:
    writer = MCPServerRegistry(make_config(), connect(), keys)
    assert writer.load_protocols() == {}
    writer.save_protocol("a", {"mode": "legacy", "discover": True})
    writer.save_protocol("b", {"mode": "2025-06-18", "discover": False})
    writer.save_protocol("a", {"mode": "stateless", "discover": False})
    reader = MCPServerRegistry(make_config(), connect(), keys)
    assert reader.load_protocols() == {
        "a": {"mode": "stateless", "discover": False, "target": reader.get("a").target()},
        "b": {"mode": "2025-06-18", "discover": False, "target": reader.get("b").target()},
    }


def test_protocol_memory_skips_garbage(registry: MCPServerRegistry, client: redis.Redis, keys: Keys) -> None:
    registry.save_protocol("a", {"mode": "legacy"})
    client.hset(keys.protocols, "b", "not json")
    assert registry.load_protocols() == {"a": {"mode": "legacy", "target": registry.get("a").target()}}


# --------------------------------------------------------------------------- Redis unreachable


def closed_port_client() -> redis.Redis:
    # Built like the worker builds its state client (from_url): redis-py 8's plain constructor
    # adds ten connect retries with backoff (~4 s a command), which from_url does not.
    return redis.Redis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2, socket_timeout=0.2
    )


def test_unreachable_redis_never_raises_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mcpq.worker.registry")
    down = closed_port_client()
    registry = MCPServerRegistry(make_config(), down, Keys("test-registry-down:"))
    registry.publish_servers()
    registry.publish_discovery("a", toolset("add", "mul"))
    registry.publish_discovery("b", toolset("add"))
    registry.publish_info("a", {"protocol_version": "2025-06-18"})
    registry.save_protocol("a", {"mode": "legacy"})
    assert registry.load_protocols() == {}
    # Routing falls back to what this process discovered itself.
    assert registry.servers_offering("add", refresh=True) == ["a", "b"]
    assert registry.servers_offering("mul") == ["a"]
    ts = registry.toolset("a", refresh=True)
    assert ts is not None
    assert sorted(ts.tools) == ["add", "mul"]
    assert ts.info == {"protocol_version": "2025-06-18"}
    assert registry.undiscovered() == []
    warnings = [
        r for r in caplog.records if r.name == "mcpq.worker.registry" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "state Redis unavailable" in warnings[0].getMessage()
    assert "using this process's own view" in warnings[0].getMessage()
    down.close()


def test_recovery_is_logged_and_the_next_outage_is_logged_again(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mcpq.worker.registry")
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    keys = Keys("test-registry-flap:")
    registry = MCPServerRegistry(make_config(), client, keys)
    server.connected = False
    registry.publish_discovery("a", toolset("add"))
    registry.publish_discovery("a", toolset("add"))
    server.connected = True
    registry.publish_discovery("a", toolset("add", "mul"))
    assert json.loads(client.hget(keys.tool_map, "mul")) == ["a"]
    server.connected = False
    assert registry.servers_offering("mul", refresh=True) == ["a"]
    messages = [r.getMessage() for r in caplog.records if r.name == "mcpq.worker.registry"]
    assert [m.split(" (")[0] for m in messages] == [
        "state Redis unavailable",
        "state Redis reachable again",
        "state Redis unavailable",
    ]


# --------------------------------------------------------------------------- ToolSet


def test_toolset_json_round_trip() -> None:
    original = ToolSet(tools={"add": tool("add"), "a.b": tool("a.b")}, discovered_at=123.5, info={"x": 1})
    again = ToolSet.from_json(original.to_json())
    assert again.tools == original.tools
    assert again.discovered_at == 123.5
    assert again.info == {}  # info travels under its own key
    assert ToolSet.from_json(b'{"tools": [{"name": "t"}, {"nameless": 1}, "junk"]}').tools == {
        "t": {"name": "t"}
    }
    assert ToolSet.from_json("{}").discovered_at == 0.0


# --------------------------------------------------------------------------- memory keyed by target


def moved_config() -> MCPQConfig:
    """The same server names, with ``a`` pointing somewhere else."""
    config = make_config()
    moved = config.mcp_servers["a"].model_copy(update={"args": [*config.mcp_servers["a"].args, "--moved"]})
    return config.model_copy(update={"mcp_servers": {**config.mcp_servers, "a": moved}})


def test_tools_published_for_another_target_are_not_this_servers(connect: Connect, keys: Keys) -> None:
    old = MCPServerRegistry(make_config(), connect(), keys)
    old.publish_discovery("a", toolset("old_tool"))
    old.publish_discovery("b", toolset("shared"))
    new = MCPServerRegistry(moved_config(), connect(), keys)
    assert new.config.mcp_servers["a"].target() != old.config.mcp_servers["a"].target()
    # `a` moved: the old worker's list is not routed by; `b` did not: its list is.
    assert new.toolset("a", refresh=True) is None
    assert "a" in new.undiscovered()
    assert new.servers_offering("old_tool") == []
    assert new.servers_offering("shared") == ["b"]
    # Once the new worker discovers `a` itself, the old worker stops trusting that list in turn.
    new.publish_discovery("a", toolset("new_tool"))
    assert new.servers_offering("new_tool") == ["a"]
    assert old.servers_offering("old_tool", refresh=True) == ["a"]  # its own discovery, still held
    fresh_old = MCPServerRegistry(make_config(), connect(), keys)
    assert fresh_old.toolset("a", refresh=True) is None


def test_protocol_memory_of_another_target_is_forgotten(connect: Connect, keys: Keys) -> None:
    old = MCPServerRegistry(make_config(), connect(), keys)
    old.save_protocol("a", {"mode": "2026-07-28", "discover": {"x": 1}})
    old.save_protocol("b", {"mode": "legacy", "discover": None})
    new = MCPServerRegistry(moved_config(), connect(), keys)
    assert set(new.load_protocols()) == {"b"}


def test_memory_written_before_targets_existed_is_not_trusted(
    registry: MCPServerRegistry, client: redis.Redis, keys: Keys
) -> None:
    client.hset(keys.protocols, "a", json.dumps({"mode": "2026-07-28"}))
    client.set(keys.server_tools("a"), json.dumps({"tools": [tool("ghost")], "discovered_at": time.time()}))
    client.incr(keys.tools_version)
    assert registry.load_protocols() == {}
    assert registry.servers_offering("ghost", refresh=True) == []
