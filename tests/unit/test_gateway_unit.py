"""The gateway's pure parts: the naming rule, the result table, who may call, and its docs."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import click.testing
import httpx
import pytest
from mcp.shared.exceptions import MCPError as ProtocolLevelError
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from mcpq.gateway.catalog import Catalog, Exposure, build_catalog
from mcpq.gateway.http import BearerToken, check_exposure, is_loopback, security_for
from mcpq.gateway.results import CALL_META, ERROR_META, to_mcp
from mcpq.producer.cli import cli
from mcpq.worker.contract.errors import (
    AmbiguousToolError,
    CircuitOpenError,
    ConfigError,
    ErrorCode,
    InvalidArgumentsError,
)
from mcpq.worker.contract.result import ToolResult

pytestmark = pytest.mark.timeout(30)

DOC = Path(__file__).resolve().parents[2] / "docs" / "gateway.md"


def row(server: str, name: str, **fields: Any) -> dict[str, Any]:
    return {"server": server, "ambiguous": False, "name": name, "inputSchema": {"type": "object"}, **fields}


# --------------------------------------------------------------------------- naming


def test_a_tool_of_one_server_keeps_its_name_and_its_definition() -> None:
    tool = row("alpha", "add", description="adds", outputSchema={"type": "object"}, annotations={"x": 1})
    catalog = build_catalog([tool])
    assert list(catalog) == ["add"]
    entry = catalog["add"]
    assert (entry.server, entry.tool) == ("alpha", "add")
    # mcpq's own fields are not the server's: never shown.
    assert entry.definition == {k: v for k, v in tool.items() if k not in ("server", "ambiguous")}


def test_a_tool_of_several_servers_is_qualified_per_server() -> None:
    catalog = build_catalog([row("beta", "echo"), row("alpha", "echo"), row("alpha", "add")])
    assert list(catalog) == ["add", "alpha__echo", "beta__echo"]
    assert (catalog["beta__echo"].server, catalog["beta__echo"].tool) == ("beta", "echo")
    assert catalog["beta__echo"].definition["name"] == "beta__echo"


def test_the_server_filter_is_applied_before_naming() -> None:
    exposure = Exposure(servers=frozenset({"beta"}))
    catalog = build_catalog([row("alpha", "echo"), row("beta", "echo")], exposure)
    assert list(catalog) == ["echo"] and catalog["echo"].server == "beta"


def test_tool_patterns_match_the_bare_or_the_server_qualified_name() -> None:
    tools = [row("alpha", "get_a"), row("alpha", "put_a"), row("beta", "get_b"), row("beta", "put_b")]
    assert list(build_catalog(tools, Exposure(tools=("get_*",)))) == ["get_a", "get_b"]
    assert list(build_catalog(tools, Exposure(tools=("beta/*", "put_a")))) == ["get_b", "put_a", "put_b"]
    both = Exposure(servers=frozenset({"alpha"}), tools=("get_*",))
    assert list(build_catalog(tools, both)) == ["get_a"]


def test_a_qualified_name_never_shadows_a_bare_one_nor_exceeds_128() -> None:
    tools = [row("a", "x"), row("b", "x"), row("c", "a__x"), row("s" * 100, "y" * 30), row("t", "y" * 30)]
    catalog = build_catalog(tools)
    assert catalog["a__x"].server == "c", "the bare name wins"
    assert "b__x" in catalog
    assert all(len(name) <= 128 for name in catalog)
    assert "t__" + "y" * 30 in catalog and not any(name.startswith("s" * 100) for name in catalog)


def test_the_catalog_rereads_only_when_the_version_moves() -> None:
    reads: list[int] = []
    version = [1]

    async def tools() -> list[dict[str, Any]]:
        reads.append(version[0])
        return [row("alpha", f"t{version[0]}")]

    async def read_version() -> int:
        return version[0]

    async def main() -> None:
        catalog = Catalog(tools, read_version, recheck=0)
        assert list(await catalog.entries()) == ["t1"]
        assert not await catalog.refresh()
        version[0] = 2
        assert await catalog.find("t2") is not None, "a miss re-checks the fleet"
        assert await catalog.find("nope") is None

    asyncio.run(main())
    assert reads == [1, 2]


def test_servers_no_worker_published_are_named_once(caplog: pytest.LogCaptureFixture) -> None:
    version = [1]

    async def tools() -> list[dict[str, Any]]:
        return [row("alpha", "add")]

    async def read_version() -> int:
        return version[0]

    async def main() -> None:
        catalog = Catalog(tools, read_version, Exposure(servers=frozenset({"alpha", "alpah"})), recheck=0)
        assert list(await catalog.entries()) == ["add"]
        version[0] = 2
        await catalog.refresh()

    with caplog.at_level("WARNING", logger="mcpq.gateway"):
        asyncio.run(main())
    named = [r.getMessage() for r in caplog.records if "--servers" in r.getMessage()]
    assert len(named) == 1 and "alpah" in named[0] and "alpha," not in named[0], named


# --------------------------------------------------------------------------- results


def test_a_result_that_ran_passes_through_unchanged() -> None:
    data = {
        "content": [{"type": "text", "text": "42"}],
        "structuredContent": {"result": 42},
        "isError": False,
    }
    result = to_mcp(ToolResult.ok("add", "alpha", data, request_id="c1"))
    dumped = result.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert {k: dumped[k] for k in data} == data
    assert dumped["_meta"][CALL_META] == {"id": "c1", "server": "alpha", "attempts": 1}


def test_a_tool_error_keeps_the_upstream_content() -> None:
    data = {"content": [{"type": "text", "text": "boom"}], "isError": True}
    failed = ToolResult.failure("fail", InvalidArgumentsError("x"), server_name="alpha", data=data)
    failed.error_code = ErrorCode.TOOL_ERROR
    result = to_mcp(failed)
    assert result.is_error and result.content[0].text == "boom"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "error", [InvalidArgumentsError("at 'a': 'x' is not an integer"), AmbiguousToolError("several")]
)
def test_refused_requests_are_invalid_params_errors(error: Exception) -> None:
    with pytest.raises(ProtocolLevelError) as raised:
        to_mcp(ToolResult.failure("add", error))  # type: ignore[arg-type]
    assert raised.value.error.code == -32602
    assert raised.value.error.data["mcpq_code"] == error.code  # type: ignore[attr-defined]
    assert raised.value.error.message == str(error)


def test_other_failures_are_is_error_results_with_the_code() -> None:
    result = to_mcp(ToolResult.failure("add", CircuitOpenError("alpha is open"), request_id="c2"))
    assert result.is_error
    assert result.content[0].text == "mcpq error circuit_open: alpha is open"  # type: ignore[union-attr]
    assert result.meta is not None and result.meta[ERROR_META]["code"] == "circuit_open"


# --------------------------------------------------------------------------- who may call


def test_the_network_needs_a_token_loopback_does_not() -> None:
    check_exposure("127.0.0.1", None)
    check_exposure("::1", None)
    check_exposure("0.0.0.0", "t")
    with pytest.raises(ConfigError, match="MCPQ_GATEWAY_TOKEN"):
        check_exposure("0.0.0.0", None)
    assert is_loopback("localhost") and not is_loopback("10.0.0.1") and not is_loopback("gateway")


def test_allowed_hosts_get_the_port_unless_they_name_one() -> None:
    hosts = security_for("0.0.0.0", 8800, ["gateway", "mcp.example:443", "x:*"]).allowed_hosts
    assert {"127.0.0.1:8800", "gateway:8800", "mcp.example:443", "x:*"} <= set(hosts)
    assert "0.0.0.0:8800" not in hosts


def test_the_bearer_check_is_exact_and_spares_health() -> None:
    async def ok(_: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = BearerToken(
        Starlette(routes=[Route("/mcp", ok, methods=["POST"]), Route("/healthz", ok)]), "s3cret"
    )

    async def main() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [
                (await client.post("/mcp")).status_code,
                (await client.post("/mcp", headers={"Authorization": "Bearer s3cre"})).status_code,
                (await client.post("/mcp", headers={"Authorization": "bearer s3cret"})).status_code,
                (await client.post("/mcp", headers={"Authorization": "Bearer s3cret"})).status_code,
                (await client.get("/healthz")).status_code,
            ]

    assert asyncio.run(main()) == [401, 401, 401, 200, 200]


# --------------------------------------------------------------------------- docs


def test_the_docs_snippets_are_valid_json_and_their_commands_exist() -> None:
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 3
    docs = [json.loads(b) for b in blocks]
    stdio = docs[0]["mcpServers"]["mcpq"]
    assert stdio["command"] == "mcpq" and stdio["args"] == ["gateway", "--stdio"]
    runner = click.testing.CliRunner()
    shown = runner.invoke(cli, ["gateway", "--help"])
    assert shown.exit_code == 0
    for option in re.findall(r"^\| `(--[a-z-]+)", DOC.read_text(), re.M):
        assert option in shown.output, f"docs/gateway.md documents {option}, which mcpq gateway lacks"
