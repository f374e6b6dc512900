"""The contract modules both sides import: ToolResult, error codes, settings, redaction."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mcpq.worker.config import MCPServerConfig
from mcpq.worker.config_loader import parse_config
from mcpq.worker.contract.errors import (
    ERROR_DESCRIPTIONS,
    AmbiguousToolError,
    ConfigError,
    ErrorCode,
    InternalError,
    MCPError,
    ToolExecutionError,
    error_class,
)
from mcpq.worker.contract.redact import redact_url
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.settings import Settings
from mcpq.worker.redact import scrub, secret_values

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[2]

#: The codes DESIGN.md promises; they may grow but never be renamed.
DESIGN_CODES = [
    "tool_not_found",
    "ambiguous_tool",
    "server_not_found",
    "server_disabled",
    "invalid_arguments",
    "tool_error",
    "circuit_open",
    "timeout",
    "connection_error",
    "protocol_error",
    "result_too_large",
    "outcome_unknown",
    "internal_error",
]

DATA = {
    "content": [
        {"type": "text", "text": "first"},
        {"type": "image", "data": "aGk=", "mimeType": "image/png"},
        {"type": "text", "text": "second"},
    ],
    "structuredContent": {"sum": 42, "parts": [40, 2]},
    "isError": False,
}


# --------------------------------------------------------------------------- ToolResult


def wire(result: ToolResult) -> ToolResult:
    """Through JSON and back, as the result backend carries it."""
    return ToolResult.from_dict(json.loads(json.dumps(result.to_dict())))


def test_ok_result_round_trips_through_json() -> None:
    result = ToolResult.ok("get_sum", "math", DATA, execution_time_ms=12.5, request_id="r-1", attempts=2)
    raw = result.to_dict()
    assert raw == {
        "success": True,
        "tool_name": "get_sum",
        "server_name": "math",
        "data": DATA,
        "error": None,
        "error_code": None,
        "execution_time_ms": 12.5,
        "request_id": "r-1",
        "attempts": 2,
        "details": {},
    }
    assert wire(result) == result


def test_failure_result_round_trips_through_json() -> None:
    err = AmbiguousToolError("two servers", details={"servers": ["a", "b"]})
    result = ToolResult.failure("tool", err, server_name=None, request_id="r-2")
    assert result.success is False
    assert result.error == "two servers"
    assert result.error_code == "ambiguous_tool"
    assert result.details == {"servers": ["a", "b"]}
    result.details["extra"] = 1
    assert err.details == {"servers": ["a", "b"]}  # a copy, not the error's own dict
    assert wire(result) == result


def test_tool_error_keeps_the_content() -> None:
    data = {"content": [{"type": "text", "text": "division by zero"}], "isError": True}
    result = ToolResult.failure("div", ToolExecutionError("div failed"), server_name="math", data=data)
    again = wire(result)
    assert again.error_code == "tool_error"
    assert again.data == data
    assert again.text == "division by zero"


def test_from_dict_ignores_unknown_keys_and_fills_defaults() -> None:
    # The seed's shape: no attempts, no details; plus a key from some future version.
    seed = {"success": True, "tool_name": "t", "data": None, "error": None, "future_field": 1}
    result = ToolResult.from_dict(seed)
    assert result == ToolResult(success=True, tool_name="t")
    assert result.attempts == 1
    assert result.details == {}


def test_helpers() -> None:
    result = ToolResult.ok("t", "s", DATA)
    assert result.text == "first\nsecond"
    assert result.structured == {"sum": 42, "parts": [40, 2]}
    assert result.content == DATA["content"]
    result.content.append({"type": "text", "text": "not kept"})
    assert len(result.content) == 3  # a copy


def test_helpers_without_data() -> None:
    empty = ToolResult(success=False, tool_name="t")
    assert empty.content == []
    assert empty.structured is None
    assert empty.text == ""
    images = ToolResult.ok("t", "s", {"content": [{"type": "image", "data": "x"}]})
    assert images.text == ""
    assert images.structured is None


def test_raise_for_error_returns_self_on_success() -> None:
    result = ToolResult.ok("t", "s", DATA)
    assert result.raise_for_error() is result


@pytest.mark.parametrize("code", list(ErrorCode))
def test_raise_for_error_raises_the_matching_class(code: ErrorCode) -> None:
    result = ToolResult(
        success=False, tool_name="t", error=f"failed: {code}", error_code=code.value, details={"k": "v"}
    )
    with pytest.raises(MCPError) as info:
        result.raise_for_error()
    exc = info.value
    assert type(exc) is error_class(code.value)
    assert exc.code == code
    assert exc.message == f"failed: {code}"
    assert exc.details["k"] == "v"
    assert exc.details["result"] == result.to_dict()


def test_raise_for_error_with_unknown_or_missing_code() -> None:
    with pytest.raises(InternalError, match=r"^from the future$"):
        ToolResult(
            success=False, tool_name="t", error="from the future", error_code="new_code"
        ).raise_for_error()
    with pytest.raises(InternalError, match=r"^unknown error$"):
        ToolResult(success=False, tool_name="t").raise_for_error()


# --------------------------------------------------------------------------- errors


def test_design_codes_exist() -> None:
    values = {c.value for c in ErrorCode}
    assert set(DESIGN_CODES) <= values


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_has_a_description_and_a_class(code: ErrorCode) -> None:
    description = ERROR_DESCRIPTIONS[code]
    assert description.strip()
    assert description.endswith(".")
    cls = error_class(code.value)
    assert issubclass(cls, MCPError)
    assert cls.code == code
    if code != ErrorCode.INTERNAL_ERROR:
        assert cls is not InternalError


def test_classes_are_distinct_per_code() -> None:
    classes = [error_class(c.value) for c in ErrorCode]
    assert len(set(classes)) == len(classes)


def test_unknown_code_maps_to_internal_error() -> None:
    assert error_class("no_such_code") is InternalError
    assert error_class("") is InternalError


@pytest.mark.parametrize("code", list(ErrorCode))
def test_errors_pickle_round_trip(code: ErrorCode) -> None:
    cls = error_class(code.value)
    original = cls(f"{code} happened", details={"server": "s", "n": [1, 2]})
    again = pickle.loads(pickle.dumps(original))
    assert type(again) is cls
    assert again.code == code
    assert again.message == original.message
    assert str(again) == original.message
    assert again.details == {"server": "s", "n": [1, 2]}


def test_error_defaults() -> None:
    err = MCPError("plain")
    assert err.code == ErrorCode.INTERNAL_ERROR
    assert err.details == {}
    assert str(err) == "plain"
    assert ErrorCode.TIMEOUT == "timeout"  # StrEnum: compares and serialises as the string
    assert json.dumps({"code": ErrorCode.TIMEOUT}) == '{"code": "timeout"}'


# --------------------------------------------------------------------------- settings

ALL_ENV = {
    "MCPQ_BROKER_URL": "redis://b:6379/5",
    "MCPQ_RESULT_BACKEND": "redis://r:6379/6",
    "MCPQ_REDIS_URL": "redis://:pw@s:6379/7",
    "MCPQ_CONFIG_PATH": "/etc/mcpq/servers.yaml",
    "MCPQ_KEY_PREFIX": "fleet1:",
    "MCPQ_QUEUE": "tools",
    "MCPQ_DEFAULT_TIMEOUT": "12.5",
    "MCPQ_WORKER_CONCURRENCY": "8",
    "MCPQ_RESULT_EXPIRES": "3600",
    "MCPQ_ADMIN_TOKEN": "tok-abc",
    "MCPQ_GATEWAY_TOKEN": "tok-gw",
    "MCPQ_SECRET_PATTERNS": "token, pin ,",
    "MCPQ_CLAIM_LEASE": "7.5",
    "MCPQ_SOFT_TIME_LIMIT": "100",
    "MCPQ_TIME_LIMIT": "110",
    "MCPQ_VISIBILITY_TIMEOUT": "120",
    "MCPQ_IDEMPOTENCY_WINDOW": "60",
    "MCPQ_RESTORE_INTERVAL": "2",
    "MCPQ_CHUNK_CONCURRENCY": "12",
    "MCPQ_TASK_EVENTS": "off",
    "MCPQ_SOCKET_TIMEOUT": "4",
    "MCPQ_METRICS_PORT": "9808",
    "MCPQ_METRICS_MAX_TOOLS": "20",
    "MCPQ_METRICS_HOST": "worker-7.internal",
}


def test_settings_defaults() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.broker_url == "redis://127.0.0.1:6379/0"
    assert settings.result_backend == "redis://127.0.0.1:6379/1"
    assert settings.redis_url == "redis://127.0.0.1:6379/2"
    assert settings.key_prefix == "mcpq:"
    assert settings.queue == "mcpq"
    assert settings.admin_token is None


def test_settings_read_every_variable() -> None:
    settings = Settings.from_env(ALL_ENV)
    assert (settings.chunk_concurrency, settings.task_events) == (12, False)
    assert (settings.socket_timeout, settings.connect_timeout) == (4.0, 4.0)
    assert settings.broker_url == "redis://b:6379/5"
    assert settings.result_backend == "redis://r:6379/6"
    assert settings.redis_url == "redis://:pw@s:6379/7"
    assert settings.config_path == "/etc/mcpq/servers.yaml"
    assert settings.key_prefix == "fleet1:"
    assert settings.queue == "tools"
    assert settings.default_timeout == 12.5
    assert isinstance(settings.default_timeout, float)
    assert settings.worker_concurrency == 8
    assert isinstance(settings.worker_concurrency, int)
    assert settings.result_expires == 3600
    assert settings.admin_token == "tok-abc"
    assert settings.gateway_token == "tok-gw"
    assert "tok-gw" not in repr(settings) and settings.redacted()["gateway_token"] == "set"
    assert settings.metrics_host == "worker-7.internal"
    assert settings.secret_pattern_list() == ["token", "pin"]
    assert (settings.claim_lease, settings.idempotency_window) == (7.5, 60.0)
    assert (settings.soft_time_limit, settings.time_limit, settings.visibility_timeout) == (
        100.0,
        110.0,
        120.0,
    )


def test_every_field_has_a_variable() -> None:
    # A new Settings field must be readable from the environment too.
    from dataclasses import fields

    assert {f"MCPQ_{f.name.upper()}" for f in fields(Settings)} == set(ALL_ENV)


def test_settings_from_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MCPQ_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MCPQ_QUEUE", "from-os")
    monkeypatch.setenv("MCPQ_CONFIG", "os.yaml")
    settings = Settings.from_env()
    assert settings.queue == "from-os"
    assert settings.config_path == "os.yaml"


def test_config_alias() -> None:
    assert Settings.from_env({"MCPQ_CONFIG": "alias.yaml"}).config_path == "alias.yaml"
    both = {"MCPQ_CONFIG": "alias.yaml", "MCPQ_CONFIG_PATH": "explicit.yaml"}
    assert Settings.from_env(both).config_path == "explicit.yaml"
    assert Settings.from_env({"MCPQ_CONFIG": ""}).config_path == "config/servers.yaml"


def test_empty_values_are_ignored() -> None:
    settings = Settings.from_env({"MCPQ_WORKER_CONCURRENCY": "", "MCPQ_QUEUE": ""})
    assert settings.worker_concurrency == 32
    assert settings.queue == "mcpq"


@pytest.mark.parametrize(
    ("name", "raw", "kind"),
    [
        ("MCPQ_WORKER_CONCURRENCY", "lots", "int"),
        ("MCPQ_RESULT_EXPIRES", "1.5", "int"),
        ("MCPQ_DEFAULT_TIMEOUT", "soon", "float"),
    ],
)
def test_bad_number_names_the_variable(name: str, raw: str, kind: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: raw})
    assert info.value.code == ErrorCode.CONFIG_ERROR
    assert info.value.message == f"{name}={raw!r} is not a valid {kind}"


@pytest.mark.parametrize(
    ("raw", "expected"), [("0", False), ("off", False), ("No", False), ("1", True), ("true", True)]
)
def test_task_events_switch(raw: str, expected: bool) -> None:
    from mcpq.worker.contract.app import make_app

    settings = Settings.from_env({"MCPQ_TASK_EVENTS": raw})
    assert settings.task_events is expected
    conf = make_app(settings).conf
    assert conf.worker_send_task_events is expected and conf.task_send_sent_event is expected


def test_claims_outlive_every_redelivery_but_not_the_results() -> None:
    default = Settings()
    # 2 x (2 x 3600 + 330 + 10): a chunk the ledger republishes still finds its calls' claims
    assert default.claim_ttl == 2 * default.ledger_grace == 15_080
    assert Settings(result_expires=3600).claim_ttl == 3600
    assert Settings(result_expires=1).claim_ttl == 60


def test_task_events_default_on_and_bad_boolean_named() -> None:
    assert Settings.from_env({}).task_events is True
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"MCPQ_TASK_EVENTS": "maybe"})
    assert "MCPQ_TASK_EVENTS='maybe' is not a boolean" in info.value.message


def test_chunk_tasks_and_describe_chunk() -> None:
    from mcpq.worker.contract.app import make_app
    from mcpq.worker.contract.redact import describe_chunk
    from mcpq.worker.contract.task_names import CALL_CHUNK

    assert make_app(Settings(queue="q1")).conf.task_routes[CALL_CHUNK] == {"queue": "q1"}
    labels = ["echo"] * 3 + ["local/add"] * 2 + [f"t{i}" for i in range(6)]
    shown = describe_chunk(labels)
    assert shown.startswith("11 calls: t") or shown.startswith("11 calls: echo x3, local/add x2")
    assert "echo x3" in shown and "local/add x2" in shown and "more tools" in shown


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:secret@host:6379/0", "redis://user:***@host:6379/0"),
        ("rediss://default:p4ss-w0rd@cache.example:6380/2", "rediss://default:***@cache.example:6380/2"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://host/0?note=a@b", "redis://host/0?note=a@b"),
        ("not a url", "not a url"),
        ("config/servers.yaml", "config/servers.yaml"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_url_password_with_at_sign() -> None:
    redacted = redact_url("redis://:p@ss-tail@host:6379/0")
    assert "ss-tail" not in redacted
    assert redacted.endswith("@host:6379/0")


def test_redacted_hides_token_and_passwords() -> None:
    settings = Settings.from_env(ALL_ENV | {"MCPQ_BROKER_URL": "redis://u:brokerpw@b:6379/5"})
    shown = settings.redacted()
    assert shown["admin_token"] == "set"
    assert shown["broker_url"] == "redis://u:***@b:6379/5"
    assert shown["redis_url"] == "redis://:***@s:6379/7"
    assert shown["result_backend"] == "redis://r:6379/6"
    assert shown["worker_concurrency"] == 8
    assert shown["config_path"] == "/etc/mcpq/servers.yaml"
    text = json.dumps(shown)
    assert "tok-abc" not in text
    assert "brokerpw" not in text
    assert "tok-abc" not in repr(settings)
    assert Settings().redacted()["admin_token"] == "unset"


# --------------------------------------------------------------------------- redact.scrub


def server(text: str) -> MCPServerConfig:
    config = parse_config(textwrap.dedent(text), source="servers.yaml", env={})
    return next(iter(config.mcp_servers.values()))


HTTP_SERVER = """
mcp_servers:
  remote:
    url: https://bob:url-pass-99@api.example/mcp
    headers:
      Authorization: Bearer tok-xyz-123
      X-Api-Key: key-456-abc
      X-Short: abc
"""

STDIO_SERVER = """
mcp_servers:
  local:
    command: python
    env:
      API_KEY: env-secret-777
      DEBUG: "1"
"""


def test_scrub_masks_header_values_and_url_password() -> None:
    config = server(HTTP_SERVER)
    text = (
        "failed: Authorization: Bearer tok-xyz-123; sent key-456-abc to https://bob:url-pass-99@api.example"
    )
    scrubbed = scrub(text, config)
    # The whole header value goes first, so no half of it ("Bearer ***") is left.
    assert scrubbed == "failed: Authorization: ***; sent *** to https://bob:***@api.example"


def test_scrub_masks_the_token_part_alone() -> None:
    config = server(HTTP_SERVER)
    assert scrub("server said: token tok-xyz-123 expired", config) == "server said: token *** expired"


def test_scrub_masks_env_values() -> None:
    config = server(STDIO_SERVER)
    assert scrub("child printed env-secret-777 on stderr", config) == "child printed *** on stderr"


def test_scrub_leaves_short_values_and_ordinary_text() -> None:
    config = server(HTTP_SERVER)
    assert scrub("abc is short, 1 is shorter", config) == "abc is short, 1 is shorter"
    assert "abc" not in secret_values(config)
    assert scrub("nothing secret here", server(STDIO_SERVER)) == "nothing secret here"


def test_secret_values_longest_first() -> None:
    values = secret_values(server(HTTP_SERVER))
    assert values == sorted(values, key=len, reverse=True)
    assert {"Bearer tok-xyz-123", "tok-xyz-123", "key-456-abc", "url-pass-99"} <= set(values)


# --------------------------------------------------------------------------- the producer stays light


def test_import_producer_does_not_import_the_mcp_sdk() -> None:
    code = (
        "import mcpq.producer, sys; "
        "assert 'mcp' not in sys.modules and not any(m.startswith('mcp.') for m in sys.modules), "
        "sorted(m for m in sys.modules if m == 'mcp' or m.startswith('mcp.'))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=25, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_producer_exports() -> None:
    import mcpq.producer as producer

    assert producer.ToolResult is ToolResult
    assert producer.ErrorCode is ErrorCode


@pytest.mark.parametrize("setting", ["MCPQ_BROKER_URL", "MCPQ_RESULT_BACKEND", "MCPQ_REDIS_URL"])
@pytest.mark.parametrize("query", ["password=pw-secret-9", "db=1&username=u"])
def test_credentials_in_a_url_query_are_refused_naming_the_setting(setting: str, query: str) -> None:
    # kombu's Redis transport crashes on ?password= (a traceback at every entry point).
    with pytest.raises(ConfigError) as info:
        Settings.from_env({setting: f"redis://h:6379/0?{query}"})
    assert info.value.message.startswith(f"{setting}: ")
    assert "redis://:PASSWORD@host" in info.value.message
    assert "pw-secret-9" not in info.value.message
    assert info.value.details["setting"] == setting


@pytest.mark.parametrize(
    ("name", "raw", "says"),
    [
        ("MCPQ_DEFAULT_TIMEOUT", "nan", "finite"),
        ("MCPQ_CLAIM_LEASE", "inf", "finite"),
        ("MCPQ_SOCKET_TIMEOUT", "0", "positive number"),
        ("MCPQ_VISIBILITY_TIMEOUT", "-5", "positive number"),
        ("MCPQ_WORKER_CONCURRENCY", "0", "1 or more"),
    ],
)
def test_numbers_out_of_range_name_the_variable(name: str, raw: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: raw})
    assert info.value.message.startswith(name) and says in info.value.message
