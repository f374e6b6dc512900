"""The MCP conformance suite's *client* side, played by mcpq through its queue.

``conformance client --command "python tests/conformance/client_adapter.py" --scenario S``
starts a test server and runs this script with the server's URL as the last
argument (``MCP_CONFORMANCE_SCENARIO``, ``MCP_CONFORMANCE_PROTOCOL_VERSION`` and,
for some scenarios, ``MCP_CONFORMANCE_CONTEXT`` in the environment). The script:

1. writes an mcpq config with one server, ``conformance``, at that URL over
   Streamable HTTP, in the era the suite asks for (``protocol: legacy`` for a
   handshake-era version, the version itself for ``2026-07-28``), plus the
   scenario's extra server fields (:data:`SERVER_FIELDS`);
2. starts one real worker (``celery -A mcpq.worker worker``, tests/support/stack.py)
   on a queue and key prefix of its own, against the Redis named by
   ``MCPQ_TEST_REDIS_URL``, else an embedded redis-server of its own;
3. has it discover the server's tools (``ToolQueue.discover``), then makes the
   scenario's calls **through the queue** (``ToolQueue.call``) and prints each
   result as one JSON line;
4. stops the worker and exits 0 when every call succeeded, 1 otherwise (2 when
   the stack itself could not be brought up).

Which calls a scenario gets (:func:`plan_calls`): the context's ``toolCalls``
when the suite names them; the schema round trip for
``json-schema-2020-12-preservation``; none for a scenario that checks only
the listing (:data:`LIST_ONLY`); otherwise every tool the fleet
discovered, in name order, with the smallest arguments its input schema
accepts. The last rule is what a scenario that lists tools and expects each to
be called checks (``tools_call``, ``sse-retry``, the elicitation and header
scenarios); it also means a tool mcpq dropped (an invalid ``x-mcp-header``) is
never called, which ``http-invalid-tool-headers`` checks.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run as a script by the suite: make `tests.support` importable
    sys.path.insert(0, str(REPO_ROOT))

from mcpq.producer.embedded_redis import EmbeddedRedis  # noqa: E402
from tests.support.stack import Stack  # noqa: E402

SERVER = "conformance"
MODERN = "2026-07-28"
#: Seconds one call may take on the worker; the suite gives the whole client 30 s by default.
CALL_TIMEOUT = 10.0
#: Seconds to wait for the worker's discovery of the scenario server.
DISCOVER_WAIT = 20.0
#: Server config fields a scenario needs beyond the URL and protocol.
SERVER_FIELDS: dict[str, dict[str, Any]] = {
    # SEP-1034: the scenario's tool elicits and expects an accept with the schema's defaults.
    "elicitation-sep1034-client-defaults": {"elicitation": "defaults"},
}
#: Scenarios that check only what the client does with a listing: their servers answer
#: no tools/call (json-schema-ref-no-deref: a network `$ref` must not be fetched).
LIST_ONLY = frozenset({"json-schema-ref-no-deref"})
#: The focal tool and the echo tool of json-schema-2020-12-preservation.
SCHEMA_FOCAL_TOOL = "json_schema_2020_12_tool"
SCHEMA_ECHO_TOOL = "json_schema_echo"


def server_config(url: str, scenario: str, protocol_version: str) -> dict[str, Any]:
    """The one server's config for a scenario.

    :param url: the scenario server's URL (the suite's last argument).
    :param scenario: the scenario's name (``MCP_CONFORMANCE_SCENARIO``).
    :param protocol_version: the spec version the suite runs (``MCP_CONFORMANCE_PROTOCOL_VERSION``).
    """
    # A pinned era: `auto` would probe server/discover first, which a handshake-era
    # test server may ignore for up to 10 s, and which is not what the scenario tests.
    protocol = MODERN if protocol_version == MODERN else "legacy"
    return {
        "transport": "http",
        "url": url,
        "protocol": protocol,
        # One attempt: a retried call would show the suite a second tools/call it did not ask for.
        "retry_attempts": 0,
        "timeout": CALL_TIMEOUT,
        "connect_timeout": 10.0,
        **SERVER_FIELDS.get(scenario, {}),
    }


def minimal_value(schema: Mapping[str, Any]) -> Any:
    """The smallest value a property schema plainly accepts: its default, its first enum
    or const value, else a value of its (first) type.

    :param schema: one property's JSON Schema.
    """
    for key in ("default", "const"):
        if key in schema:
            return schema[key]
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        return minimal_arguments(schema)
    return {"string": "mcpq", "integer": 1, "number": 1, "boolean": True, "array": [], "null": None}.get(
        str(kind), "mcpq"
    )


def minimal_arguments(schema: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments for a tool: a value for each required property, nothing else.

    :param schema: the tool's ``inputSchema``.
    """
    properties = schema.get("properties") or {}
    return {name: minimal_value(properties.get(name) or {}) for name in schema.get("required") or []}


def plan_calls(
    scenario: str, context: Mapping[str, Any], tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The calls to make, each ``{"name": ..., "arguments": {...}}``.

    :param scenario: the scenario's name.
    :param context: ``MCP_CONFORMANCE_CONTEXT`` (``{}`` when unset).
    :param tools: what the fleet discovered (``ToolQueue.tools``).
    """
    if context.get("toolCalls"):
        return [{"name": c["name"], "arguments": c.get("arguments") or {}} for c in context["toolCalls"]]
    if scenario in LIST_ONLY:
        return []
    by_name = {t["name"]: t for t in tools}
    if scenario == "json-schema-2020-12-preservation":
        # The scenario compares the schema echoed back with the one it served: what mcpq
        # stored and published is what a producer sees.
        focal = by_name.get(SCHEMA_FOCAL_TOOL, {}).get("inputSchema")
        return [{"name": SCHEMA_ECHO_TOOL, "arguments": {"schema": focal}}] if focal else []
    return [
        {"name": n, "arguments": minimal_arguments(by_name[n].get("inputSchema") or {})}
        for n in sorted(by_name)
    ]


@contextmanager
def redis_url() -> Iterator[str]:
    """``MCPQ_TEST_REDIS_URL`` when the test suite passes one, else an embedded redis-server."""
    existing = os.environ.get("MCPQ_TEST_REDIS_URL")
    if existing:
        yield existing.rstrip("/")
        return
    with EmbeddedRedis() as server:
        yield server.url


def log(event: str, **fields: Any) -> None:
    """One JSON line on stdout (the suite saves it as the client's output).

    :param event: what happened.
    :param fields: its details.
    """
    print(json.dumps({"event": event, **fields}, default=str), flush=True)


def run(url: str, scenario: str, protocol_version: str, context: Mapping[str, Any]) -> int:
    """Bring a stack up against ``url``, make the scenario's calls through the queue, take it down.

    :param url: the scenario server's URL.
    :param scenario: the scenario's name.
    :param protocol_version: the spec version the suite runs.
    :param context: the scenario's context (``{}`` when none).
    :returns: the exit code: 0 all calls succeeded, 1 one did not, 2 the stack did not come up.
    """
    started = time.monotonic()
    config = server_config(url, scenario, protocol_version)
    with redis_url() as redis, tempfile.TemporaryDirectory(prefix="mcpq-conformance-") as workdir:
        # Stack gives the run its own queue and key prefix, so runs never see each other's state.
        stack = Stack(redis, Path(workdir), {SERVER: config})
        try:
            try:
                worker = stack.start_worker(concurrency=4)
            except AssertionError as exc:
                log("worker_failed", error=str(exc)[-3000:])
                return 2
            log("worker_up", seconds=round(time.monotonic() - started, 2), config=config)
            discovered = stack.queue.discover(SERVER, wait=DISCOVER_WAIT)
            tools = stack.queue.tools(SERVER)
            log("discovered", result=discovered, tools=[t["name"] for t in tools])
            failed = 0
            for call in plan_calls(scenario, context, tools):
                result = stack.queue.call(
                    call["name"], call["arguments"], server=SERVER, timeout=CALL_TIMEOUT
                )
                failed += not result.success
                log("call", tool=call["name"], result=result.to_dict())
            if failed:
                log("worker_log", tail=worker.log_tail(4000))
            return 1 if failed else 0
        finally:
            stack.close()
            log("done", seconds=round(time.monotonic() - started, 2))


def main(argv: list[str]) -> int:
    """The suite's entry point: the URL is the last argument.

    :param argv: ``sys.argv``.
    """
    if len(argv) < 2:
        print("usage: client_adapter.py [ignored ...] SERVER_URL", file=sys.stderr)
        return 2
    context = json.loads(os.environ.get("MCP_CONFORMANCE_CONTEXT") or "{}")
    return run(
        argv[-1],
        os.environ.get("MCP_CONFORMANCE_SCENARIO", ""),
        os.environ.get("MCP_CONFORMANCE_PROTOCOL_VERSION", "2025-11-25"),
        context,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv))
