"""mcpq.worker.config: file shapes, ${VAR} expansion, validation messages, secret hygiene."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from mcpq.worker.config import MCPQConfig, MCPServerConfig, ToolOverride, parse_rate_limit
from mcpq.worker.config_loader import load_config, parse_config
from mcpq.worker.contract.errors import ConfigError, ErrorCode


def parse(text: str, env: dict[str, str] | None = None, source: str = "servers.yaml") -> MCPQConfig:
    return parse_config(textwrap.dedent(text), source=source, env={} if env is None else env)


def error(text: str, env: dict[str, str] | None = None, source: str = "servers.yaml") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, env, source)
    return info.value


def one(text: str, env: dict[str, str] | None = None) -> MCPServerConfig:
    servers = parse(text, env).mcp_servers
    assert len(servers) == 1
    return next(iter(servers.values()))


# --------------------------------------------------------------------------- defaults and values

EXPECTED_DEFAULTS: dict[str, Any] = {
    "elicitation": "decline",
    "sampling": "decline",
    "url": None,
    "args": [],
    "env": {},
    "cwd": None,
    "headers": {},
    "timeout": 30.0,
    "connect_timeout": 10.0,
    "enabled": True,
    "description": "",
    "retry_attempts": 3,
    "retry_delay": 1.0,
    "retry_max_delay": 30.0,
    "circuit_breaker_threshold": 5,
    "circuit_breaker_timeout": 60.0,
    "protocol": "auto",
    "max_sessions": 1,
    "idempotent": None,
    "tools": {},
    "discovery_ttl": 300.0,
    "idle_timeout": 600.0,
    "on_open": "fail",
    "half_open_max_calls": 1,
    "failure_rate_threshold": None,
    "minimum_calls": 10,
    "window_seconds": 60.0,
    "slow_call_seconds": None,
    "max_concurrency": None,
    "rate_limit": None,
}


def test_every_field_has_its_documented_default() -> None:
    server = one(
        """
        mcp_servers:
          local:
            command: python
        """
    )
    assert server.name == "local"
    assert server.transport == "stdio"
    assert server.command == "python"
    for field, expected in EXPECTED_DEFAULTS.items():
        assert getattr(server, field) == expected, field
    # Every model field is covered, so a new field without a test shows up here.
    assert set(MCPServerConfig.model_fields) == {*EXPECTED_DEFAULTS, "name", "transport", "command"}


def test_every_field_can_be_set() -> None:
    server = one(
        """
        mcp_servers:
          remote:
            transport: sse
            url: https://mcp.example.com/events
            headers: {X-Api-Key: k1}
            timeout: 12.5
            connect_timeout: 2
            enabled: false
            description: Remote tools
            retry_attempts: 0
            retry_delay: 0.5
            retry_max_delay: 4
            circuit_breaker_threshold: 2
            circuit_breaker_timeout: 9
            protocol: "2025-03-26"
            max_sessions: 64
            idempotent: true
            tools:
              search: {idempotent: false, timeout: 3}
            discovery_ttl: 15
            idle_timeout: 45
            on_open: defer
            half_open_max_calls: 2
            failure_rate_threshold: 50
            minimum_calls: 4
            window_seconds: 30
            slow_call_seconds: 5
            max_concurrency: 3
            rate_limit: 10/2s
        """
    )
    assert server.transport == "sse"
    assert server.url == "https://mcp.example.com/events"
    assert server.header_values() == {"X-Api-Key": "k1"}
    assert (server.timeout, server.connect_timeout) == (12.5, 2.0)
    assert server.enabled is False
    assert server.description == "Remote tools"
    assert (server.retry_attempts, server.retry_delay, server.retry_max_delay) == (0, 0.5, 4.0)
    assert (server.circuit_breaker_threshold, server.circuit_breaker_timeout) == (2, 9.0)
    assert server.protocol == "2025-03-26"
    assert server.max_sessions == 64
    assert server.idempotent is True
    assert server.tools == {"search": ToolOverride(idempotent=False, timeout=3.0)}
    assert (server.discovery_ttl, server.idle_timeout) == (15.0, 45.0)
    assert (server.on_open, server.half_open_max_calls) == ("defer", 2)
    assert (server.failure_rate_threshold, server.minimum_calls, server.window_seconds) == (50.0, 4, 30.0)
    assert (server.slow_call_seconds, server.max_concurrency) == (5.0, 3)
    assert server.rate() == (10, 2.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("50/s", (50, 1.0)),
        ("100/m", (100, 60.0)),
        ("10/2s", (10, 2.0)),
        ("5 / 1.5 min", (5, 90.0)),
        ("3/h", (3, 3600.0)),
    ],
)
def test_rate_limit_forms(text: str, expected: tuple[int, float]) -> None:
    assert parse_rate_limit(text) == expected


@pytest.mark.parametrize("text", ["fast", "0/s", "10/0s", "10/d", "/s"])
def test_bad_rate_limit_is_a_clear_error(text: str) -> None:
    with pytest.raises(
        ConfigError, match=r"field 'rate_limit': rate_limit must look like '50/s'|period must be"
    ):
        parse_config(f"mcp_servers:\n  a: {{command: x, rate_limit: '{text}'}}\n")


def test_stdio_fields_can_be_set() -> None:
    server = one(
        """
        mcp_servers:
          local:
            command: npx
            args: [-y, "@scope/server", --port, 8080, true]
            env: {API_TOKEN: abc, PORT: 8080, DEBUG: true}
            cwd: /srv/tools
        """
    )
    # YAML numbers and booleans in args/env become the text a process expects.
    assert server.args == ["-y", "@scope/server", "--port", "8080", "true"]
    assert server.env_values() == {"API_TOKEN": "abc", "PORT": "8080", "DEBUG": "true"}
    assert server.cwd == "/srv/tools"


def test_tool_override_defaults() -> None:
    assert ToolOverride().idempotent is None
    assert ToolOverride().timeout is None


@pytest.mark.parametrize(
    ("server_level", "tool_level", "expected"),
    [
        (None, None, None),
        (True, None, True),
        (False, None, False),
        (True, False, False),
        (False, True, True),
        (None, True, True),
    ],
)
def test_is_tool_idempotent_prefers_the_tool_then_the_server(
    server_level: bool | None, tool_level: bool | None, expected: bool | None
) -> None:
    server = MCPServerConfig(
        name="s",
        transport="stdio",
        command="x",
        idempotent=server_level,
        tools={"t": ToolOverride(idempotent=tool_level)},
    )
    assert server.is_tool_idempotent("t") is expected
    assert server.is_tool_idempotent("other") is server_level


def test_top_level_settings_defaults_and_values() -> None:
    empty = parse("mcp_servers: {}\n")
    assert empty.max_result_bytes == 4 * 1024 * 1024
    assert empty.secret_patterns == [
        "token",
        "password",
        "passwd",
        "secret",
        "key",
        "authorization",
        "credential",
        "cookie",
    ]
    custom = parse("max_result_bytes: 1024\nsecret_patterns: [cookie]\nmcp_servers: {}\n")
    assert custom.max_result_bytes == 1024
    assert custom.secret_patterns == ["cookie"]


@pytest.mark.parametrize("text", ["", "# only a comment\n", "mcp_servers:\n", "mcp_servers: {}\n", "{}"])
def test_empty_file_or_no_servers_is_valid(text: str) -> None:
    config = parse(text)
    assert config.mcp_servers == {}
    assert config.enabled_servers() == {}


def test_enabled_servers_keeps_file_order_and_skips_disabled() -> None:
    config = parse(
        """
        mcp_servers:
          b: {command: x}
          off: {command: x, enabled: false}
          a: {command: x}
        """
    )
    assert list(config.mcp_servers) == ["b", "off", "a"]
    assert list(config.enabled_servers()) == ["b", "a"]
    assert config.enabled_servers()["a"] is config.mcp_servers["a"]


def test_programmatic_config_takes_names_from_keys() -> None:
    config = MCPQConfig.model_validate({"mcp_servers": {"a": {"command": "x"}}})
    assert config.mcp_servers["a"].name == "a"
    assert config.mcp_servers["a"].transport == "stdio"


@pytest.mark.parametrize("protocol", ["auto", "legacy", "2025-06-18", "2024-11-05"])
def test_valid_protocol_values(protocol: str) -> None:
    server = one(f"mcp_servers:\n  a: {{command: x, protocol: '{protocol}'}}\n")
    assert server.protocol == protocol


def test_unquoted_protocol_date_is_read_as_text() -> None:
    # YAML turns 2025-06-18 into a date object; it must still be accepted.
    assert one("mcp_servers:\n  a: {command: x, protocol: 2025-06-18}\n").protocol == "2025-06-18"


def test_yaml_anchors_and_merge_keys_work() -> None:
    config = parse(
        """
        mcp_servers:
          a: &common
            command: x
            timeout: 7
          b:
            <<: *common
            timeout: 8
        """
    )
    assert config.mcp_servers["a"].timeout == 7.0
    # Overriding a merged key is not a duplicate key.
    assert (config.mcp_servers["b"].command, config.mcp_servers["b"].timeout) == ("x", 8.0)


# --------------------------------------------------------------------------- transport inference


@pytest.mark.parametrize(
    ("entry", "transport"),
    [
        ("{command: python}", "stdio"),
        ("{url: 'https://h.example/mcp'}", "http"),
        ("{url: 'https://h.example/sse'}", "sse"),
        ("{url: 'http://h.example/api/sse/'}", "sse"),
        ("{url: 'https://h.example/ssex'}", "http"),
        ("{url: 'https://h.example/nosse'}", "http"),
        ("{url: 'https://h.example/sse/more'}", "http"),
        ("{url: 'https://h.example/sse', transport: http}", "http"),
        ("{url: 'https://h.example/mcp', transport: sse}", "sse"),
    ],
)
def test_transport_is_inferred_when_omitted(entry: str, transport: str) -> None:
    assert one(f"mcp_servers:\n  a: {entry}\n").transport == transport


# --------------------------------------------------------------------------- other file shapes


def test_mcp_servers_json_file(tmp_path: Path) -> None:
    path = tmp_path / "claude_desktop_config.json"
    path.write_text(
        json.dumps(
            {
                "globalShortcut": "Ctrl+Space",
                "mcpServers": {
                    "files": {
                        "command": "npx",
                        "args": ["-y", "@modelcontextprotocol/server-filesystem", "/tmp"],
                        "env": {"API_KEY": "k"},
                        "cwd": "/work",
                    },
                    "remote": {
                        "url": "https://h.example/mcp",
                        "headers": {"Authorization": "Bearer t"},
                        "type": "sse",
                    },
                    "stream": {"url": "https://h.example/sse", "type": "streamable-http"},
                    "camel": {"url": "https://h.example/x", "type": "streamableHttp"},
                    "off": {"command": "x", "disabled": True},
                    "on": {"command": "x", "disabled": False},
                },
            },
            indent=2,
        )
    )
    config = load_config(path, env={})
    servers = config.mcp_servers
    assert list(servers) == ["files", "remote", "stream", "camel", "off", "on"]
    files = servers["files"]
    assert (files.transport, files.command, files.cwd) == ("stdio", "npx", "/work")
    assert files.args == ["-y", "@modelcontextprotocol/server-filesystem", "/tmp"]
    assert files.env_values() == {"API_KEY": "k"}
    remote = servers["remote"]
    assert (remote.transport, remote.url) == ("sse", "https://h.example/mcp")
    assert remote.header_values() == {"Authorization": "Bearer t"}
    # An explicit type wins over the /sse guess.
    assert servers["stream"].transport == "http"
    assert servers["camel"].transport == "http"
    assert servers["off"].enabled is False
    assert servers["on"].enabled is True
    assert list(config.enabled_servers()) == ["files", "remote", "stream", "camel", "on"]


def test_vscode_servers_file_with_type(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(
        json.dumps(
            {
                "inputs": [],
                "servers": {
                    "local": {"type": "stdio", "command": "uvx", "args": ["mcp-server-git"]},
                    "web": {"type": "http", "url": "https://h.example/sse"},
                    "events": {"type": "sse", "url": "https://h.example/events"},
                },
            }
        )
    )
    servers = load_config(path, env={}).mcp_servers
    assert servers["local"].transport == "stdio"
    assert servers["local"].args == ["mcp-server-git"]
    assert servers["web"].transport == "http"
    assert servers["events"].transport == "sse"


def test_tab_indented_json_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {"a": {"command": "x", "args": ["a\tb"]}}}, indent="\t"))
    server = load_config(path, env={}).mcp_servers["a"]
    assert server.args == ["a\tb"]


def test_json_unicode_escapes_outside_the_bmp_are_joined(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    path.write_text('{"mcpServers": {"a": {"command": "x", "description": "smile \\ud83d\\ude00"}}}')
    assert load_config(path, env={}).mcp_servers["a"].description == "smile \U0001f600"


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_load_yaml_files(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"servers{suffix}"
    path.write_text("mcp_servers:\n  a:\n    command: x\n")
    assert load_config(str(path), env={}).mcp_servers["a"].command == "x"


def test_unknown_mcp_servers_type_is_an_error() -> None:
    exc = error('{"mcpServers": {"a": {"url": "https://h", "type": "websocket"}}}')
    assert str(exc).startswith("servers.yaml:1: server 'a', field 'type': unknown type 'websocket'")
    assert "'streamable-http'" in str(exc)


def test_two_server_sections_are_an_error() -> None:
    exc = error("mcp_servers: {}\nmcpServers: {}\n")
    assert "servers.yaml:2:" in str(exc)
    assert "'mcp_servers', 'mcpServers'" in str(exc)


# --------------------------------------------------------------------------- defaults merging


def test_defaults_merge_under_each_server() -> None:
    config = parse(
        """
        defaults:
          timeout: 5
          retry_attempts: 0
          headers: {X-Team: core, X-Env: prod}
        mcp_servers:
          a:
            url: https://a.example/mcp
            timeout: 9
            headers: {X-Env: dev}
          b:
            url: https://b.example/mcp
        """
    )
    a, b = config.mcp_servers["a"], config.mcp_servers["b"]
    assert a.timeout == 9.0
    assert b.timeout == 5.0
    assert a.retry_attempts == b.retry_attempts == 0
    assert a.header_values() == {"X-Team": "core", "X-Env": "dev"}
    assert b.header_values() == {"X-Team": "core", "X-Env": "prod"}


def test_bad_default_is_reported_once_at_its_line() -> None:
    exc = error(
        """
        defaults:
          timeout: -1
        mcp_servers:
          a: {command: x}
          b: {command: x}
        """
    )
    assert str(exc) == "servers.yaml:3: field 'defaults.timeout': Input should be greater than 0 (got -1)"


def test_unknown_field_in_defaults() -> None:
    exc = error("defaults:\n  timout: 3\nmcp_servers: {}\n")
    assert str(exc) == "servers.yaml:2: field 'defaults': unknown field 'timout'; did you mean 'timeout'?"


# --------------------------------------------------------------------------- ${VAR} expansion


def test_env_var_expansion_forms() -> None:
    server = one(
        """
        mcp_servers:
          remote:
            url: "https://${HOST}/mcp"
            headers:
              Authorization: "Bearer ${TOKEN}"
              X-Both: "${A}-${B}:${A}"
              X-Unset: "${NOPE:-fallback}"
              X-Empty: "${EMPTY:-used}"
              X-Set: "${A:-unused}"
              X-Dollar: "$$HOME costs $$5 and ${A}$$"
              X-Plain: "a $ sign and $HOME stay"
              X-Vscode: "${env:A}"
        """,
        env={"HOST": "h.example", "TOKEN": "t0k", "A": "1", "B": "2", "EMPTY": ""},
    )
    assert server.url == "https://h.example/mcp"
    assert server.header_values() == {
        "Authorization": "Bearer t0k",
        "X-Both": "1-2:1",
        "X-Unset": "fallback",
        "X-Empty": "used",
        "X-Set": "1",
        "X-Dollar": "$HOME costs $5 and 1$",
        "X-Plain": "a $ sign and $HOME stay",
        "X-Vscode": "1",
    }


def test_env_var_expansion_in_nested_lists_and_dicts_but_not_keys() -> None:
    config = parse(
        """
        defaults:
          env: {SHARED: "${S}"}
        secret_patterns: ["${P}"]
        mcp_servers:
          local:
            command: "${BIN}"
            args: [--root, "${ROOT}/data", "${N:-3}"]
            env:
              ${S}: "${S}"
            description: ${S}
            timeout: ${TIMEOUT:-2.5}
            tools:
              t: {timeout: "${TT}"}
        """,
        env={"S": "s", "P": "cookie", "BIN": "/bin/tool", "ROOT": "/r", "TT": "4"},
    )
    server = config.mcp_servers["local"]
    assert server.command == "/bin/tool"
    assert server.args == ["--root", "/r/data", "3"]
    assert server.env_values() == {"SHARED": "s", "${S}": "s"}
    assert server.description == "s"
    assert server.timeout == 2.5
    assert server.tools["t"].timeout == 4.0
    assert config.secret_patterns == ["cookie"]


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCPQ_TEST_CMD", "from-os")
    config = parse_config("mcp_servers:\n  a: {command: '${MCPQ_TEST_CMD}'}\n")
    assert config.mcp_servers["a"].command == "from-os"


def test_missing_env_var_names_variable_server_field_and_line() -> None:
    exc = error(
        """\
        mcp_servers:
          local:
            command: x
          remote:
            url: https://h.example/mcp
            headers:
              Authorization: "Bearer ${REMOTE_MCP_TOKEN}"
        """,
        source="config/servers.yaml",
    )
    assert str(exc) == (
        "config/servers.yaml:7: environment variable REMOTE_MCP_TOKEN is not set "
        "(server 'remote', field 'headers.Authorization'); set it or write ${REMOTE_MCP_TOKEN:-default}"
    )
    assert exc.code is ErrorCode.CONFIG_ERROR
    assert exc.details == {
        "file": "config/servers.yaml",
        "line": 7,
        "field": "headers.Authorization",
        "server": "remote",
    }


def test_empty_env_var_without_default_is_an_error() -> None:
    exc = error("mcp_servers:\n  a:\n    command: x\n    args: ['${T}']\n", env={"T": ""})
    assert str(exc).startswith("servers.yaml:4: environment variable T is set but empty")
    assert "(server 'a', field 'args[0]')" in str(exc)


def test_missing_env_var_in_defaults_names_the_defaults_field() -> None:
    exc = error("defaults:\n  headers:\n    A: '${TOK}'\nmcp_servers: {}\n")
    assert str(exc) == (
        "servers.yaml:3: environment variable TOK is not set "
        "(field 'defaults.headers.A'); set it or write ${TOK:-default}"
    )


def test_every_missing_env_var_is_reported() -> None:
    exc = error("mcp_servers:\n  a: {command: '${ONE}'}\n  b: {command: '${TWO}'}\n")
    assert "variable ONE is not set" in str(exc)
    assert "variable TWO is not set" in str(exc)
    assert len(exc.details["problems"]) == 2


@pytest.mark.parametrize(
    ("value", "expected"),
    [("${1BAD}", "invalid variable reference '${1BAD}'"), ("cost ${unterminated", "unterminated '${'")],
)
def test_malformed_references_are_errors(value: str, expected: str) -> None:
    exc = error(f"mcp_servers:\n  a: {{command: x, description: '{value}'}}\n")
    assert str(exc).startswith("servers.yaml:2: server 'a', field 'description': has an")
    assert expected in str(exc)


# --------------------------------------------------------------------------- malformed files


def test_invalid_yaml_names_line() -> None:
    exc = error("mcp_servers:\n  a:\n    command: x\n   bad: [\n")
    assert str(exc).startswith("servers.yaml:4: invalid YAML: ")
    assert exc.details["line"] == 4
    assert exc.__cause__ is None
    assert exc.__suppress_context__


def test_invalid_json_file_names_line(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    path.write_text('{\n  "mcpServers": {\n    "a": {"command": "x"\n  }\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}:5: invalid JSON: Expecting ',' delimiter")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("!!python/object/apply:os.system ['echo hi']", "unsupported tag"),
        ("!!python/name:os.system ''", "could not determine a constructor"),
    ],
)
def test_unsafe_yaml_tags_are_refused(value: str, expected: str) -> None:
    exc = error(f"mcp_servers:\n  a: {value}\n")
    assert str(exc).startswith(f"servers.yaml:2: invalid YAML: {expected}")


def test_unknown_field_suggests_the_close_match() -> None:
    exc = error("mcp_servers:\n  remote:\n    url: https://h\n    timout: 3\n")
    assert str(exc) == "servers.yaml:4: server 'remote': unknown field 'timout'; did you mean 'timeout'?"
    assert exc.details["server"] == "remote"
    assert exc.details["line"] == 4


def test_unknown_field_without_a_close_match() -> None:
    exc = error("mcp_servers:\n  remote:\n    url: https://h\n    zzzqqq: 3\n")
    assert str(exc) == "servers.yaml:4: server 'remote': unknown field 'zzzqqq'"


def test_unknown_field_in_tool_override() -> None:
    exc = error("mcp_servers:\n  a:\n    command: x\n    tools:\n      t: {idempotnt: true}\n")
    assert str(exc) == (
        "servers.yaml:5: server 'a', field 'tools.t': unknown field 'idempotnt'; did you mean 'idempotent'?"
    )


def test_unknown_top_level_key_suggests_the_close_match() -> None:
    exc = error("mcp_server:\n  a: {command: x}\n")
    assert str(exc) == "servers.yaml:1: unknown field 'mcp_server'; did you mean 'mcp_servers'?"


def test_wrong_type_names_line_and_field() -> None:
    exc = error("mcp_servers:\n  remote:\n    url: https://h\n    timeout: 0\n")
    assert (
        str(exc) == "servers.yaml:4: server 'remote', field 'timeout': Input should be greater than 0 (got 0)"
    )
    exc = error("mcp_servers:\n  remote:\n    url: https://h\n\n    max_sessions: lots\n")
    assert str(exc).startswith(
        "servers.yaml:5: server 'remote', field 'max_sessions': Input should be a valid"
    )
    assert exc.details == {"file": "servers.yaml", "line": 5, "field": "max_sessions", "server": "remote"}


def test_several_errors_are_reported_in_file_order() -> None:
    exc = error("mcp_servers:\n  a:\n    url: https://h\n    timeout: 0\n    max_sessions: 0\n")
    lines = str(exc).splitlines()
    assert [line.split(":")[1] for line in lines] == ["4", "5"]
    assert [p["field"] for p in exc.details["problems"]] == ["timeout", "max_sessions"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timeout", 0),
        ("connect_timeout", 0),
        ("retry_attempts", -1),
        ("retry_delay", -0.1),
        ("retry_max_delay", -1),
        ("circuit_breaker_threshold", 0),
        ("circuit_breaker_timeout", 0),
        ("max_sessions", 0),
        ("max_sessions", 65),
        ("discovery_ttl", 0),
        ("idle_timeout", 0),
        ("timeout", ".inf"),
    ],
)
def test_out_of_range_values_are_rejected(field: str, value: object) -> None:
    exc = error(f"mcp_servers:\n  a:\n    command: x\n    {field}: {value}\n")
    assert str(exc).startswith(f"servers.yaml:4: server 'a', field '{field}': ")


def test_tool_override_timeout_must_be_positive() -> None:
    exc = error("mcp_servers:\n  a:\n    command: x\n    tools:\n      t:\n        timeout: 0\n")
    assert str(exc).startswith("servers.yaml:6: server 'a', field 'tools.t.timeout': Input should be greater")


def test_stdio_without_command() -> None:
    exc = error("mcp_servers:\n  a:\n    transport: stdio\n    args: [x]\n")
    assert (
        str(exc) == "servers.yaml:2: server 'a', field 'command': "
        "transport 'stdio' needs 'command' (the program to start)"
    )


def test_stdio_with_url() -> None:
    exc = error("mcp_servers:\n  a:\n    transport: stdio\n    command: x\n    url: https://h\n")
    assert str(exc).startswith("servers.yaml:5: server 'a', field 'url': transport 'stdio' ")


def test_http_without_url() -> None:
    exc = error("mcp_servers:\n  a:\n    transport: http\n")
    assert (
        str(exc)
        == "servers.yaml:2: server 'a', field 'url': transport 'http' needs 'url' (http:// or https://)"
    )


def test_http_with_command() -> None:
    exc = error("mcp_servers:\n  a:\n    transport: sse\n    url: https://h\n    command: x\n")
    assert str(exc).startswith("servers.yaml:5: server 'a', field 'command': transport 'sse' ")


def test_neither_command_nor_url() -> None:
    exc = error("mcp_servers:\n  a:\n    timeout: 3\n")
    assert str(exc) == (
        "servers.yaml:2: server 'a', field 'command': needs 'command' (a local stdio server to start) "
        "or 'url' (a remote http/sse server)"
    )


def test_both_command_and_url_without_transport() -> None:
    exc = error("mcp_servers:\n  a:\n    command: x\n    url: https://h\n")
    assert str(exc).startswith("servers.yaml:4: server 'a', field 'url': has both 'command' and 'url'")


@pytest.mark.parametrize("url", ["ftp://h.example/x", "h.example/mcp", "https://"])
def test_bad_url_scheme(url: str) -> None:
    exc = error(f"mcp_servers:\n  a:\n    url: '{url}'\n")
    assert str(exc) == (
        f"servers.yaml:3: server 'a', field 'url': url must start with http:// or https://, got '{url}'"
    )


def test_bad_url_error_hides_password() -> None:
    exc = error("mcp_servers:\n  a:\n    url: 'ftp://bob:hunter2@h.example/'\n")
    assert "hunter2" not in str(exc)
    assert "ftp://bob:***@h.example/" in str(exc)


@pytest.mark.parametrize("protocol", ["newest", "2025-13-01", "2025-6-18"])
def test_bad_protocol(protocol: str) -> None:
    exc = error(f"mcp_servers:\n  a:\n    command: x\n    protocol: '{protocol}'\n")
    assert str(exc) == (
        "servers.yaml:4: server 'a', field 'protocol': protocol must be 'auto', 'legacy' or an MCP "
        f"protocol version date YYYY-MM-DD (e.g. '2025-06-18'), got '{protocol}'"
    )


@pytest.mark.parametrize("name", ["team/search", "-lead", "has space", "ünï"])
def test_bad_server_name(name: str) -> None:
    exc = error(f"mcp_servers:\n  x: {{command: x}}\n  '{name}':\n    command: x\n")
    assert str(exc).startswith(
        f"servers.yaml:3: server '{name}', field 'name': server name '{name}' is invalid"
    )
    assert "'/' is reserved for 'server/tool' names" in str(exc)


@pytest.mark.parametrize("name", ["a", "A1", "my-server.v2", "0_tools"])
def test_good_server_names(name: str) -> None:
    assert one(f"mcp_servers:\n  '{name}': {{command: x}}\n").name == name


def test_retry_max_delay_below_retry_delay() -> None:
    exc = error("mcp_servers:\n  a:\n    command: x\n    retry_delay: 5\n    retry_max_delay: 2\n")
    assert (
        str(exc) == "servers.yaml:5: server 'a', field 'retry_max_delay': "
        "retry_max_delay (2) must be >= retry_delay (5)"
    )


def test_retry_max_delay_equal_to_retry_delay_is_fine() -> None:
    server = one("mcp_servers:\n  a: {command: x, retry_delay: 2, retry_max_delay: 2}\n")
    assert server.retry_max_delay == server.retry_delay == 2.0


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)
    assert "MCPQ_CONFIG" in str(info.value)
    assert info.value.details["file"] == str(path)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_top_level_must_be_a_mapping() -> None:
    exc = error("- a\n- b\n")
    assert str(exc) == (
        "servers.yaml:1: the top level must be a mapping with 'mcp_servers' (or 'mcpServers' / 'servers'), "
        "not a list"
    )


def test_mcp_servers_must_be_a_mapping() -> None:
    exc = error("max_result_bytes: 10\nmcp_servers:\n  - a\n")
    assert (
        str(exc) == "servers.yaml:2: 'mcp_servers' must be a mapping of server name to settings, not a list"
    )


def test_server_entry_must_be_a_mapping() -> None:
    exc = error("mcp_servers:\n  a: npx server\n")
    assert str(exc) == (
        "servers.yaml:2: server 'a': "
        "expected a mapping of settings (command/url, ...), not a string ('npx server')"
    )


def test_duplicate_keys_are_an_error() -> None:
    exc = error("mcp_servers:\n  a: {command: x}\n  a: {command: y}\n")
    assert str(exc) == "servers.yaml:3: duplicate key 'a' (first on line 2)"


def test_name_field_must_match_the_key() -> None:
    exc = error("mcp_servers:\n  a:\n    name: b\n    command: x\n")
    assert str(exc).startswith("servers.yaml:3: server 'a', field 'name': the name comes from the key")
    assert one("mcp_servers:\n  a: {name: a, command: x}\n").name == "a"


def test_bad_top_level_values() -> None:
    exc = error("max_result_bytes: 0\nmcp_servers: {}\n")
    assert str(exc) == "servers.yaml:1: field 'max_result_bytes': Input should be greater than 0 (got 0)"


def test_errors_never_leak_pydantic_text() -> None:
    exc = error("mcp_servers:\n  a:\n    command: x\n    timeout: abc\n    headers: {A: [1]}\n")
    assert "validation error" not in str(exc)
    assert "pydantic" not in str(exc)
    assert "errors.pydantic.dev" not in str(exc)


# --------------------------------------------------------------------------- secrets

SECRET_YAML = """
mcp_servers:
  remote:
    url: "https://alice:${URL_PASSWORD}@h.example/mcp?api_key=${QUERY_KEY}&page=1"
    headers:
      Authorization: "Bearer ${HEADER_SECRET}"
  local:
    command: server
    env:
      API_TOKEN: "${ENV_SECRET}"
"""
SECRETS = {
    "URL_PASSWORD": "urlpass-4471",
    "QUERY_KEY": "querykey-9912",
    "HEADER_SECRET": "headersecret-1234",
    "ENV_SECRET": "envsecret-5678",
}


def test_secrets_are_usable() -> None:
    config = parse(SECRET_YAML, env=SECRETS)
    remote, local = config.mcp_servers["remote"], config.mcp_servers["local"]
    assert remote.header_values() == {"Authorization": "Bearer headersecret-1234"}
    assert local.env_values() == {"API_TOKEN": "envsecret-5678"}
    assert remote.url == "https://alice:urlpass-4471@h.example/mcp?api_key=querykey-9912&page=1"


def test_secrets_do_not_leak_into_repr_str_summary_or_json() -> None:
    config = parse(SECRET_YAML, env=SECRETS)
    summaries = [s.summary() for s in config.mcp_servers.values()]
    renderings = {
        "repr(config)": repr(config),
        "str(config)": str(config),
        "repr(server)": repr(config.mcp_servers["remote"]),
        "str(server)": str(config.mcp_servers["remote"]),
        "summary": json.dumps(summaries),
        "model_dump_json": config.model_dump_json(),
    }
    for label, text in renderings.items():
        for secret in SECRETS.values():
            assert secret not in text, f"{secret} leaked via {label}"
    # The shape is still there, just masked.
    assert "https://alice:***@h.example/mcp?api_key=***&page=1" in renderings["repr(config)"]
    assert "https://alice:***@h.example/mcp?api_key=***&page=1" in renderings["model_dump_json"]


def test_summary_is_json_safe_and_names_header_and_env_keys() -> None:
    config = parse(SECRET_YAML, env=SECRETS)
    remote = config.mcp_servers["remote"].summary()
    assert json.loads(json.dumps(remote)) == remote
    assert remote == {
        "name": "remote",
        "transport": "http",
        "url": "https://alice:***@h.example/mcp?api_key=***&page=1",
        "command": None,
        "args": [],
        "enabled": True,
        "description": "",
        "timeout": 30.0,
        "protocol": "auto",
        "max_sessions": 1,
        "header_names": ["Authorization"],
        "env_names": [],
        "target": config.mcp_servers["remote"].target(),
    }
    local = config.mcp_servers["local"].summary()
    assert (local["command"], local["env_names"], local["url"]) == ("server", ["API_TOKEN"], None)


def test_url_user_without_password_is_hidden() -> None:
    # A token passed as the URL user name is as secret as a password.
    server = one("mcp_servers:\n  a: {url: 'https://ghp_tokenvalue@h.example/mcp'}\n")
    assert server.summary()["url"] == "https://***@h.example/mcp"
    assert "ghp_tokenvalue" not in repr(server)


def test_python_dump_keeps_the_real_url_for_rebuilding() -> None:
    server = one("mcp_servers:\n  a: {url: 'https://u:pw@h.example/mcp'}\n")
    rebuilt = MCPServerConfig.model_validate(server.model_dump())
    assert rebuilt.url == "https://u:pw@h.example/mcp"


def test_summary_hides_secret_looking_args() -> None:
    server = one(
        """
        mcp_servers:
          gh:
            command: npx
            args: [-y, pkg, --api-key, "${K}", "--token=${K}", "GITHUB_TOKEN=${K}", --port, "8080"]
        """,
        env={"K": "s3cr3t-value"},
    )
    assert server.args[3] == "s3cr3t-value"  # the process still gets the real value
    published = server.summary()["args"]
    assert published == ["-y", "pkg", "--api-key", "***", "--token=***", "GITHUB_TOKEN=***", "--port", "8080"]
    assert "s3cr3t-value" not in str(server.summary())


# --------------------------------------------------------------------------- hostile files


@pytest.mark.parametrize(
    ("command", "env", "expected"),
    [
        ("${A:-${B}}", {"B": "b"}, "b"),
        ("${A:-${B}}", {"A": "a", "B": "b"}, "a"),
        ("${A:-${B:-c}}/bin", {}, "c/bin"),
        ("pre-${A:-x${B:-y}z}-post", {}, "pre-xyz-post"),
        ("${A:-{literal}}", {}, "{literal}"),
        ("$${A}", {}, "${A}"),
    ],
)
def test_nested_defaults(command: str, env: dict[str, str], expected: str) -> None:
    assert one(f"mcp_servers:\n  s: {{command: '{command}'}}\n", env).command == expected


def test_nested_default_naming_a_missing_variable_names_that_variable() -> None:
    exc = error("mcp_servers:\n  s: {command: '${A:-${B}}'}\n")
    assert "environment variable B is not set" in str(exc)
    assert "}" not in one("mcp_servers:\n  s: {command: '${A:-${B:-ok}}'}\n").command


def test_unterminated_nested_reference_is_an_error() -> None:
    assert "unterminated '${'" in str(error("mcp_servers:\n  s: {command: '${A:-${B}'}\n"))


def test_alias_bomb_is_refused_quickly_and_says_why() -> None:
    import time

    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    text = "\n".join(lines) + "\nmcp_servers: {}\n"
    assert len(text) < 600  # stands for 9**10 values
    started = time.monotonic()
    exc = error(text)
    assert time.monotonic() - started < 10
    assert "alias bomb" in str(exc)
    assert exc.code is ErrorCode.CONFIG_ERROR


@pytest.mark.parametrize("depth", [70, 5000])
def test_deep_nesting_is_a_config_error_not_a_recursion_error(depth: int) -> None:
    exc = error("mcp_servers:\n  s:\n    command: x\n    args: " + "[" * depth + "]" * depth + "\n")
    assert "nested more than 64 levels deep" in str(exc)


def test_deep_json_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    path.write_text('{"mcpServers": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(ConfigError, match="nested more than 64 levels deep"):
        load_config(path)


def test_target_follows_what_the_config_points_at_not_its_secrets() -> None:
    def target(**fields: Any) -> str:
        return MCPServerConfig(name="s", **fields).target()

    http = target(url="https://a.example/mcp")
    assert http == target(url="https://a.example/mcp", timeout=99, description="other")  # tuning: same
    assert target(url="https://a.example/mcp?token=old") == target(url="https://a.example/mcp?token=new")
    assert http != target(url="https://b.example/mcp")
    assert http != target(url="https://a.example/sse", transport="sse")
    stdio = target(command="srv", args=["--port", "1"])
    assert stdio != target(command="srv", args=["--port", "2"])
    assert stdio != target(command="other", args=["--port", "1"])
    assert stdio != target(command="srv", args=["--port", "1"], env={"MODE": "x"})  # env names count
    assert target(command="srv", env={"MODE": "x"}) == target(
        command="srv", env={"MODE": "y"}
    )  # values do not
    assert stdio != target(command="srv", args=["--port", "1"], cwd="/elsewhere")
