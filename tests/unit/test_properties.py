"""Bad input, tried on purpose: random and malformed input to every parser
ends in a specific error, never a traceback or a hang."""

from __future__ import annotations

import json
from typing import Any

import click
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcpq.producer.cli import parse_arguments
from mcpq.worker.config import MCPQConfig
from mcpq.worker.config_loader import parse_config
from mcpq.worker.contract.errors import ConfigError, InvalidArgumentsError, MCPError
from mcpq.worker.validation import validate_arguments

pytestmark = pytest.mark.timeout(120)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    [
        "transport", "url", "command", "args", "env", "headers", "timeout", "connect_timeout", "enabled",
        "protocol", "max_sessions", "retry_attempts", "retry_delay", "retry_max_delay", "tools", "rate_limit",
        "max_concurrency", "on_open", "circuit_breaker_threshold", "type", "disabled", "cwd", "bogus",
    ]
)  # fmt: skip
server_entries = st.dictionaries(field_names, json_values, max_size=6)


def _config_outcome(text: str) -> MCPQConfig | ConfigError:
    try:
        return parse_config(text, source="fuzz.yaml", env={"SET": "value"})
    except ConfigError as exc:
        assert exc.message.startswith("fuzz.yaml"), exc.message
        assert "Traceback" not in exc.message
        return exc


@FAST
@given(st.text(max_size=300))
def test_config_loader_never_raises_anything_but_config_error_on_random_text(text: str) -> None:
    _config_outcome(text)


@FAST
@given(st.dictionaries(st.text(min_size=1, max_size=10), server_entries, max_size=3), json_values)
def test_config_loader_on_random_structures(servers: dict[str, Any], extra: Any) -> None:
    for doc in (
        {"mcp_servers": servers},
        {"mcpServers": servers},
        {"mcp_servers": servers, "defaults": extra},
    ):
        outcome = _config_outcome(yaml.safe_dump(doc))
        if isinstance(outcome, MCPQConfig):
            for name, server in outcome.mcp_servers.items():
                assert server.name == name and "/" not in name


@FAST
@given(st.text(alphabet=st.sampled_from(list("${}:-_ABCxyz$ ")), max_size=30))
def test_env_expansion_on_random_placeholders(value: str) -> None:
    outcome = _config_outcome(yaml.safe_dump({"mcp_servers": {"s": {"command": "x", "description": value}}}))
    if isinstance(outcome, ConfigError):
        # The only way a description can be wrong is a placeholder that does not expand.
        assert "${" in value or "$" in value, outcome.message
    else:
        assert "${SET}" not in outcome.mcp_servers["s"].description


SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    },
    {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "number"}}}}
        },
        "additionalProperties": False,
    },
    {"type": "object", "properties": {"mode": {"enum": ["a", "b"]}, "s": {"type": "string", "maxLength": 3}}},
    {"type": "object"},
]


@FAST
@given(st.sampled_from(SCHEMAS), json_values)
def test_validator_accepts_or_names_what_is_wrong(schema: dict[str, Any], arguments: Any) -> None:
    try:
        validate_arguments("tool", schema, arguments)
    except InvalidArgumentsError as exc:
        assert exc.message.startswith("arguments for 'tool'")
    else:
        assert isinstance(arguments, dict)


@FAST
@given(st.lists(st.text(max_size=30), max_size=5))
def test_cli_argument_parser(values: list[str]) -> None:
    try:
        parsed = parse_arguments(values)
    except click.UsageError as exc:
        assert exc.message
    else:
        assert isinstance(parsed, dict)
        json.dumps(parsed)


@FAST
@given(json_values, json_values, json_values, json_values)
def test_task_message_shape_check(tool: Any, arguments: Any, server: Any, timeout: Any) -> None:
    from mcpq.worker.tasks import _check_call_shape

    problem = _check_call_shape(tool, arguments, server, timeout)
    well_formed = (
        isinstance(tool, str)
        and tool != ""
        and (arguments is None or isinstance(arguments, dict))
        and (server is None or (isinstance(server, str) and server != ""))
        and (timeout is None or (type(timeout) in (int, float) and timeout > 0))
    )
    assert (problem is None) == well_formed
    if problem is not None:
        assert isinstance(problem, MCPError) and problem.code.value in ("internal_error", "invalid_arguments")
