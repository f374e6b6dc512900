"""mcpq.worker.router: resolving a tool name to one server, and call() failing cleanly before sending.

The registry and the breaker are real (over fakeredis with Lua). Discovery is
a small stand-in that records what it was asked; the real one is exercised by
the integration tests. The pool is None: nothing here may reach it except the
one test that shows call() survives even that.
"""

from __future__ import annotations

import logging
import textwrap
import time
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest

from mcpq.worker.breaker import BreakerPolicy, ServerGuard
from mcpq.worker.claims import ClaimKeeper
from mcpq.worker.config import MCPQConfig
from mcpq.worker.config_loader import parse_config
from mcpq.worker.contract.errors import (
    AmbiguousToolError,
    ErrorCode,
    LimitExceededError,
    MCPConnectionError,
    MCPError,
    ServerDisabledError,
    ServerNotFoundError,
    ToolNotFoundError,
)
from mcpq.worker.contract.keys import Keys
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.registry import MCPServerRegistry, ToolSet
from mcpq.worker.router import Target, ToolRouter, split_qualified

pytestmark = pytest.mark.timeout(30)

CONFIG = """
mcp_servers:
  a:
    command: python
    timeout: 12
    tools:
      ghost:
        timeout: 3
  b:
    url: http://b.example/mcp
    timeout: 20
    headers:
      Authorization: Bearer tok-router-secret
  off:
    command: python
    enabled: false
    timeout: 5
  late:
    command: python
    timeout: 7
  fragile:
    command: python
    circuit_breaker_threshold: 1
"""

SUM_SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}
ECHO_SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string", "maxLength": 8}},
    "required": ["text"],
}


def tool(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "description": f"{name} tool", "inputSchema": schema or {"type": "object"}}


def toolset(*tools: dict[str, Any], age: float = 0.0) -> ToolSet:
    return ToolSet(tools={t["name"]: t for t in tools}, discovered_at=time.time() - age)


@dataclass
class StandInDiscovery:
    """Records ensure() calls; optionally 'discovers' (publishes) toolsets or reports failures."""

    registry: MCPServerRegistry
    discovers: dict[str, ToolSet] = field(default_factory=dict)
    failures: dict[str, MCPError] = field(default_factory=dict)
    calls: list[tuple[list[str], float, bool]] = field(default_factory=list)

    def ensure(self, servers: list[str], deadline: float, force: bool = False) -> dict[str, MCPError]:
        self.calls.append((list(servers), deadline, force))
        for name in servers:
            if name in self.discovers:
                self.registry.publish_discovery(name, self.discovers[name])
        return {name: self.failures[name] for name in servers if name in self.failures}

    @property
    def asked(self) -> list[tuple[list[str], bool]]:
        return [(servers, force) for servers, _, force in self.calls]


@dataclass
class World:
    config: MCPQConfig
    registry: MCPServerRegistry
    discovery: StandInDiscovery
    guard: ServerGuard
    router: ToolRouter


@pytest.fixture()
def world() -> World:
    config = parse_config(textwrap.dedent(CONFIG), source="servers.yaml", env={})
    client = fakeredis.FakeRedis()
    keys = Keys("test-router:")
    registry = MCPServerRegistry(config, client, keys)
    registry.publish_discovery("a", toolset(tool("get_sum", SUM_SCHEMA), tool("tool"), tool("math.mul")))
    registry.publish_discovery("b", toolset(tool("tool"), tool("echo", ECHO_SCHEMA), tool("math.div")))
    registry.publish_discovery("off", toolset(tool("tool"), tool("secret_tool")))
    registry.publish_discovery("fragile", toolset(tool("fragile_tool")))
    # "late" is configured and enabled but not discovered yet.
    discovery = StandInDiscovery(registry)
    guard = ServerGuard(client, keys)
    claims = ClaimKeeper(client, keys, lease=30, ttl=60)
    router = ToolRouter(config, registry, None, discovery, guard, claims)  # type: ignore[arg-type]
    return World(config, registry, discovery, guard, router)


def deadline() -> float:
    return time.monotonic() + 10


def resolve(world: World, name: str, server: str | None = None) -> Target:
    return world.router.resolve(name, server, deadline())


# --------------------------------------------------------------------------- split_qualified


@pytest.mark.parametrize(
    ("tool_name", "server", "expected"),
    [
        ("get_sum", None, ("get_sum", None)),
        ("a/get_sum", None, ("get_sum", "a")),
        ("a/math.mul", None, ("math.mul", "a")),
        ("math.mul", None, ("math.mul", None)),
        ("a/b/c", None, ("b/c", "a")),
        ("/tool", None, ("/tool", None)),
        ("a/", None, ("a/", None)),
        ("tool", "b", ("tool", "b")),
        # An explicit server wins; the name is then taken as it is.
        ("a/tool", "b", ("a/tool", "b")),
    ],
)
def test_split_qualified(tool_name: str, server: str | None, expected: tuple[str, str | None]) -> None:
    assert split_qualified(tool_name, server) == expected


# --------------------------------------------------------------------------- resolve


def test_bare_name_offered_by_one_server(world: World) -> None:
    target = resolve(world, "get_sum")
    assert target.server.name == "a"
    assert target.tool == "get_sum"
    assert target.definition["inputSchema"] == SUM_SCHEMA
    # Only "late", never listed, is asked: it might offer the same name.
    assert [servers for servers, *_ in world.discovery.calls] == [["late"]]


def test_ambiguous_name_lists_the_candidates(world: World) -> None:
    with pytest.raises(AmbiguousToolError) as info:
        resolve(world, "tool")
    err = info.value
    assert err.code == ErrorCode.AMBIGUOUS_TOOL
    assert "'a/tool'" in err.message
    assert "'b/tool'" in err.message
    assert "'off/tool'" not in err.message  # disabled servers are no candidates
    assert "offered by 2 servers (a, b)" in err.message
    assert err.details == {"tool": "tool", "servers": ["a", "b"]}
    assert [servers for servers, *_ in world.discovery.calls] == [["late"]]


@pytest.mark.parametrize(("name", "server"), [("a/tool", "a"), ("b/tool", "b"), ("b/echo", "b")])
def test_qualified_name(world: World, name: str, server: str) -> None:
    target = resolve(world, name)
    assert target.server.name == server
    assert target.tool == name.split("/", 1)[1]


@pytest.mark.parametrize(
    ("name", "server", "expected_server", "expected_tool"),
    [
        ("math.mul", None, "a", "math.mul"),
        ("math.div", None, "b", "math.div"),
        ("a/math.mul", None, "a", "math.mul"),
        ("math.mul", "a", "a", "math.mul"),
    ],
)
def test_dotted_tool_names(
    world: World, name: str, server: str | None, expected_server: str, expected_tool: str
) -> None:
    target = resolve(world, name, server)
    assert (target.server.name, target.tool) == (expected_server, expected_tool)


@pytest.mark.parametrize("server", ["a", "b"])
def test_server_argument_settles_ambiguity(world: World, server: str) -> None:
    target = resolve(world, "tool", server)
    assert target.server.name == server
    assert target.tool == "tool"
    assert world.discovery.calls == []


def test_unknown_tool_suggests_close_names_and_asks_discovery(world: World) -> None:
    with pytest.raises(ToolNotFoundError) as info:
        resolve(world, "get_summ")
    err = info.value
    assert err.code == ErrorCode.TOOL_NOT_FOUND
    assert err.message == "no enabled server offers a tool named 'get_summ'; did you mean 'get_sum'?"
    assert err.details == {"tool": "get_summ", "suggestions": ["get_sum"], "unreachable": []}
    # Only the undiscovered enabled server is asked (not the disabled one, not the known ones).
    assert world.discovery.asked == [(["late"], False)]


def test_unknown_tool_without_close_names(world: World) -> None:
    with pytest.raises(ToolNotFoundError) as info:
        resolve(world, "zzzzzz")
    assert info.value.message == "no enabled server offers a tool named 'zzzzzz'"
    assert info.value.details["suggestions"] == []


def test_tools_of_disabled_servers_are_neither_routed_nor_suggested(world: World) -> None:
    with pytest.raises(ToolNotFoundError) as info:
        resolve(world, "secret_tool")
    assert "'secret_tool'?" not in info.value.message
    assert "secret_tool" not in info.value.details["suggestions"]
    with pytest.raises(ToolNotFoundError) as info:
        resolve(world, "secret_too")
    assert "secret_tool" not in info.value.details["suggestions"]


def test_discovery_of_an_undiscovered_server_finds_the_tool(world: World) -> None:
    world.discovery.discovers["late"] = toolset(tool("late_tool"))
    target = resolve(world, "late_tool")
    assert target.server.name == "late"
    assert world.discovery.asked == [(["late"], False)]
    # Known now: no second discovery.
    assert resolve(world, "late_tool").server.name == "late"
    assert len(world.discovery.calls) == 1


def test_unreachable_servers_are_named_when_a_tool_is_unknown(world: World) -> None:
    world.discovery.failures["late"] = MCPConnectionError("server 'late': cannot connect")
    with pytest.raises(ToolNotFoundError) as info:
        resolve(world, "late_tool")
    assert info.value.message.endswith("(not reachable to list their tools: late)")
    assert info.value.details["unreachable"] == ["late"]


def test_a_server_at_its_limit_is_busy_not_unreachable(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # Listing a server's tools takes a slot of its limits like a call; a full
    # server must make the call wait, not report the tool as unknown.
    def at_limit(config: Any, deadline: float, claim: Any = None) -> Any:
        raise LimitExceededError(
            f"server {config.name!r} is at its concurrency limit", details={"retry_after": 0.1}
        )

    monkeypatch.setattr(world.router, "_admit", at_limit)
    world.discovery.discovers["late"] = toolset(tool("late_tool"))
    with pytest.raises(LimitExceededError):
        resolve(world, "late_tool")
    monkeypatch.undo()
    # Nothing was remembered as unreachable: the next call lists the server at once.
    assert resolve(world, "late_tool").server.name == "late"


@pytest.mark.parametrize(("name", "server"), [("x", "nope"), ("nope/x", None)])
def test_unknown_server(world: World, name: str, server: str | None) -> None:
    with pytest.raises(ServerNotFoundError) as info:
        resolve(world, name, server)
    assert info.value.code == ErrorCode.SERVER_NOT_FOUND
    assert "no server named 'nope'" in info.value.message
    assert "configured: a, b, fragile, late, off" in info.value.message
    assert world.discovery.calls == []


@pytest.mark.parametrize(("name", "server"), [("tool", "off"), ("off/secret_tool", None)])
def test_disabled_server(world: World, name: str, server: str | None) -> None:
    with pytest.raises(ServerDisabledError) as info:
        resolve(world, name, server)
    assert info.value.code == ErrorCode.SERVER_DISABLED
    assert info.value.message == "server 'off' is disabled in config (enabled: false)"
    assert world.discovery.calls == []


def test_named_server_that_cannot_be_reached_raises_its_failure(world: World) -> None:
    failure = MCPConnectionError("server 'late': cannot connect (ConnectError: refused)")
    world.discovery.failures["late"] = failure
    with pytest.raises(MCPConnectionError) as info:
        resolve(world, "anything", "late")
    assert info.value is failure
    assert world.discovery.asked == [(["late"], False)]


def test_named_server_discovered_without_the_tool(world: World) -> None:
    world.discovery.discovers["late"] = toolset(tool("late_tool"))
    with pytest.raises(ToolNotFoundError) as info:
        resolve(world, "late_too", "late")
    assert info.value.message == "server 'late' offers no tool named 'late_too'; did you mean 'late_tool'?"
    assert info.value.details == {"tool": "late_too", "server": "late", "suggestions": ["late_tool"]}


def test_tool_missing_on_a_known_server_forces_rediscovery(world: World) -> None:
    with pytest.raises(ToolNotFoundError) as info:
        resolve(world, "a/get_summ")
    assert info.value.message == "server 'a' offers no tool named 'get_summ'; did you mean 'get_sum'?"
    assert world.discovery.asked == [(["a"], True)]


def test_tool_added_since_last_discovery_is_found_on_rediscovery(world: World) -> None:
    world.discovery.discovers["a"] = toolset(tool("get_sum", SUM_SCHEMA), tool("brand_new"))
    target = resolve(world, "brand_new", "a")
    assert (target.server.name, target.tool) == ("a", "brand_new")
    assert world.discovery.asked == [(["a"], True)]


def test_stale_tool_list_is_refreshed(world: World) -> None:
    world.registry.publish_discovery("a", toolset(tool("get_sum", SUM_SCHEMA), age=10_000))
    world.discovery.discovers["a"] = toolset(tool("get_sum", SUM_SCHEMA))
    target = resolve(world, "get_sum")
    assert target.server.name == "a"
    assert world.discovery.asked == [(["late"], False), (["a"], True)]
    assert world.registry.is_stale("a") is False


# --------------------------------------------------------------------------- call: clean failures, no raise


def call(world: World, name: str, arguments: Any, **kw: Any) -> ToolResult:
    result = world.router.call(name, arguments, request_id="rid-1", **kw)
    assert isinstance(result, ToolResult)
    assert result.success is False
    assert result.data is None
    assert result.request_id == "rid-1"
    assert result.execution_time_ms >= 0
    return result


def test_call_unknown_tool(world: World) -> None:
    result = call(world, "get_summ", {"a": 1})
    assert result.error_code == "tool_not_found"
    assert result.tool_name == "get_summ"
    assert result.server_name is None
    assert "did you mean 'get_sum'?" in (result.error or "")
    assert result.details["suggestions"] == ["get_sum"]


def test_call_ambiguous_tool(world: World) -> None:
    result = call(world, "tool", {})
    assert result.error_code == "ambiguous_tool"
    assert result.details["servers"] == ["a", "b"]
    assert "'a/tool'" in (result.error or "")


def test_call_with_invalid_arguments(world: World) -> None:
    result = call(world, "get_sum", {"a": "one", "b": 2})
    assert result.error_code == "invalid_arguments"
    assert result.tool_name == "get_sum"
    assert result.server_name == "a"
    assert "at 'a': 'one' is not of type 'integer'" in (result.error or "")


def test_call_with_no_arguments_checks_required_fields(world: World) -> None:
    result = call(world, "get_sum", None)
    assert result.error_code == "invalid_arguments"
    assert "'a' is a required property" in (result.error or "")


def test_call_with_non_object_arguments(world: World) -> None:
    result = call(world, "get_sum", [1, 2])
    assert result.error_code == "invalid_arguments"
    assert "must be a JSON object, got list" in (result.error or "")


def test_call_qualified_with_invalid_arguments(world: World) -> None:
    result = call(world, "b/echo", {})
    assert result.error_code == "invalid_arguments"
    assert result.tool_name == "echo"
    assert result.server_name == "b"


def test_call_message_is_scrubbed_of_the_servers_secrets(world: World) -> None:
    result = call(world, "b/echo", {"text": "tok-router-secret"})
    assert result.error_code == "invalid_arguments"
    assert "tok-router-secret" not in (result.error or "")
    assert "'***' is too long" in (result.error or "")


@pytest.mark.parametrize(("name", "server"), [("x", "nope"), ("nope/x", None)])
def test_call_unknown_server(world: World, name: str, server: str | None) -> None:
    result = call(world, name, {}, server=server)
    assert result.error_code == "server_not_found"
    assert result.tool_name == "x"
    assert result.server_name == "nope"


def test_call_disabled_server(world: World) -> None:
    result = call(world, "off/secret_tool", {})
    assert result.error_code == "server_disabled"
    assert result.tool_name == "secret_tool"
    assert result.server_name == "off"


def test_call_with_open_circuit_is_not_sent(world: World) -> None:
    policy = BreakerPolicy.from_config(world.config.mcp_servers["fragile"])
    admission = world.guard.admit("fragile", policy, "t-1", 5.0)
    assert admission.admitted
    assert world.guard.complete("fragile", policy, admission, "failure", 0.01, "connection_error") == "open"
    result = call(world, "fragile_tool", {})
    assert result.error_code == "circuit_open"
    assert result.server_name == "fragile"
    assert "circuit breaker for server 'fragile' is open" in (result.error or "")


def test_call_never_raises_even_when_sending_fails(world: World, caplog: pytest.LogCaptureFixture) -> None:
    # Resolved and valid, so the router reaches for the pool, which is None here.
    caplog.set_level(logging.CRITICAL, logger="mcpq.worker.router")
    result = call(world, "get_sum", {"a": 1, "b": 2})
    assert result.error_code == "internal_error"
    assert result.server_name == "a"
    assert "mcpq failed while calling 'get_sum'" in (result.error or "")


@pytest.mark.parametrize(
    ("name", "timeout", "expected"),
    [
        ("no_such_tool", 5.0, 5.0),  # explicit
        ("no_such_tool", None, 30.0),  # unknown server: the largest configured timeout
        ("a/no_such_tool", None, 12.0),  # the server's timeout
        ("a/ghost", None, 3.0),  # the tool's own override
    ],
)
def test_call_deadline(world: World, name: str, timeout: float | None, expected: float) -> None:
    before = time.monotonic()
    result = call(world, name, {}, timeout=timeout)
    after = time.monotonic()
    assert result.error_code == "tool_not_found"
    assert world.discovery.calls
    for _, seen_deadline, _ in world.discovery.calls:
        assert before + expected <= seen_deadline <= after + expected
