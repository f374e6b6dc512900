"""The MCP server config file: YAML (or a JSON ``mcpServers`` file) -> Pydantic models.

Three shapes are read by one loader, because JSON is valid YAML:

* mcpq's own: ``mcp_servers: {name: {...}}`` with optional ``defaults``,
  ``max_result_bytes`` and ``secret_patterns``;
* Claude Desktop / Cursor: ``{"mcpServers": {name: {"command": ...} | {"url": ...}}}``;
* VS Code: ``{"servers": {name: {"type": "stdio" | "http" | "sse", ...}}}``.

Every problem surfaces as :class:`~mcpq.worker.contract.errors.ConfigError` naming the file,
the line, the server and the field, because the person reading it is editing
a file, not debugging a traceback. Nothing here imports the MCP SDK, so the
producer and the CLI can read the file cheaply.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from mcpq.worker.contract.errors import ConfigError
from mcpq.worker.contract.redact import DEFAULT_SECRET_PATTERNS, redact_args, redact_url

__all__ = [
    "DEFAULT_SECRET_PATTERNS",
    "MCPQConfig",
    "MCPServerConfig",
    "ToolOverride",
    "load_config",
    "parse_config",
]

Transport = Literal["stdio", "http", "sse"]


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PROTOCOL_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_VAR_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# `$$`, `${...}`, or a `${` that is never closed (reported, not passed through).
_REF_RE = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<body>[^}]*)\}|(?P<open>\{))")

# The keys that hold the server mapping, in each supported file shape.
_SERVER_KEYS = ("mcp_servers", "mcpServers", "servers")
_TOP_LEVEL_KEYS = ("mcp_servers", "defaults", "max_result_bytes", "secret_patterns")
# `type` values seen in mcpServers / VS Code files.
_TYPE_TO_TRANSPORT: dict[str, Transport] = {
    "stdio": "stdio",
    "sse": "sse",
    "http": "http",
    "streamable-http": "http",
    "streamableHttp": "http",
    "streamable_http": "http",
}

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"

_Loc = tuple[str | int, ...]


class _FieldError(ValueError):
    """A cross-field check that knows which field to blame.

    Pydantic reports model-level validator errors at ``loc=()``; carrying the
    field lets the loader point at the right line instead of the server's.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


_RATE_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d*\.?\d*)\s*(s|sec|m|min|h)\s*$")


def parse_rate_limit(text: str) -> tuple[int, float]:
    """``"50/s"``, ``"100/m"``, ``"10/2s"`` -> (calls, period seconds)."""
    match = _RATE_RE.match(text)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"rate_limit must look like '50/s', '100/m' or '10/2s', got {text!r}")
    multiple = float(match.group(2)) if match.group(2) else 1.0
    if multiple <= 0:
        raise ValueError(f"rate_limit period must be positive, got {text!r}")
    return int(match.group(1)), multiple * _RATE_UNITS[match.group(3)]


class ToolOverride(BaseModel):
    """Per-tool settings under a server's ``tools:`` mapping."""

    model_config = ConfigDict(extra="forbid")

    idempotent: bool | None = None
    timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False)


class MCPServerConfig(BaseModel):
    """One MCP server: how to reach it and how hard to try."""

    model_config = ConfigDict(extra="forbid")

    name: str
    transport: Transport
    url: str | None = None
    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, SecretStr] = Field(default_factory=dict)
    cwd: str | None = None
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    timeout: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    connect_timeout: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    enabled: bool = True
    description: str = ""
    retry_attempts: int = Field(default=3, ge=0)
    retry_delay: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    retry_max_delay: float = Field(default=30.0, ge=0, allow_inf_nan=False)
    circuit_breaker_threshold: int = Field(default=5, ge=1)
    circuit_breaker_timeout: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    protocol: str = "auto"
    max_sessions: int = Field(default=1, ge=1, le=64)
    idempotent: bool | None = None
    tools: dict[str, ToolOverride] = Field(default_factory=dict)
    discovery_ttl: float = Field(default=300.0, gt=0, allow_inf_nan=False)
    idle_timeout: float = Field(default=600.0, gt=0, allow_inf_nan=False)
    # Breaker extras (resilience4j's vocabulary): an optional failure-rate
    # mode over a sliding time window, and slow calls counted as failures.
    on_open: Literal["fail", "defer"] = "fail"
    half_open_max_calls: int = Field(default=1, ge=1, le=100)
    failure_rate_threshold: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False)
    minimum_calls: int = Field(default=10, ge=1)
    window_seconds: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    slow_call_seconds: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    # Fleet-wide limits, enforced in Redis.
    max_concurrency: int | None = Field(default=None, ge=1)
    rate_limit: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _infer_transport(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("transport") is not None:
            return data
        has_command = data.get("command") is not None
        has_url = data.get("url") is not None
        if has_command and has_url:
            raise _FieldError(
                "url",
                "has both 'command' and 'url'; keep 'command' for a local stdio server "
                "or 'url' for a remote one (or set transport explicitly)",
            )
        if not has_command and not has_url:
            raise _FieldError(
                "command",
                "needs 'command' (a local stdio server to start) or 'url' (a remote http/sse server)",
            )
        data = dict(data)
        data["transport"] = "stdio" if has_command else _transport_for_url(data["url"])
        return data

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(
                f"server name {value!r} is invalid: use letters, digits, '_', '.' and '-', "
                "starting with a letter or digit ('/' is reserved for 'server/tool' names)"
            )
        return value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            raise ValueError(f"url must start with http:// or https://, got {redact_url(value)!r}")
        return value

    @field_validator("args", mode="before")
    @classmethod
    def _stringify_args(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [_scalar_text(v) for v in value]
        return value

    @field_validator("env", "headers", mode="before")
    @classmethod
    def _stringify_values(cls, value: Any) -> Any:
        # YAML turns `PORT: 8080` and `DEBUG: true` into int/bool; the process
        # and the HTTP request need text, so accept them rather than fail.
        if isinstance(value, dict):
            return {k: _scalar_text(v) for k, v in value.items()}
        return value

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_from_date(cls, value: Any) -> Any:
        # An unquoted `protocol: 2025-06-18` is a YAML date, not a string.
        if isinstance(value, date) and not isinstance(value, datetime):
            return value.isoformat()
        return value

    @field_validator("protocol")
    @classmethod
    def _check_protocol(cls, value: str) -> str:
        if value in ("auto", "legacy"):
            return value
        if _PROTOCOL_DATE_RE.match(value):
            try:
                date.fromisoformat(value)
            except ValueError:
                pass
            else:
                return value
        raise ValueError(
            "protocol must be 'auto', 'legacy' or an MCP protocol version date "
            f"YYYY-MM-DD (e.g. '2025-06-18'), got {value!r}"
        )

    @field_validator("rate_limit")
    @classmethod
    def _check_rate_limit(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate_limit(value)
        return value

    def rate(self) -> tuple[int, float] | None:
        """``rate_limit`` as (calls, period in seconds), or None."""
        return parse_rate_limit(self.rate_limit) if self.rate_limit else None

    @model_validator(mode="after")
    def _check_transport_fields(self) -> Self:
        if self.transport == "stdio":
            if not self.command:
                raise _FieldError("command", "transport 'stdio' needs 'command' (the program to start)")
            if self.url is not None:
                raise _FieldError(
                    "url", "transport 'stdio' starts a local command and takes no 'url'; remove one of them"
                )
        else:
            if not self.url:
                raise _FieldError("url", f"transport '{self.transport}' needs 'url' (http:// or https://)")
            if self.command is not None:
                raise _FieldError(
                    "command",
                    f"transport '{self.transport}' connects to 'url' and takes no 'command'; "
                    "remove one of them",
                )
        if self.retry_max_delay < self.retry_delay:
            raise _FieldError(
                "retry_max_delay",
                f"retry_max_delay ({self.retry_max_delay:g}) must be >= retry_delay ({self.retry_delay:g})",
            )
        return self

    @field_serializer("url", when_used="json")
    def _serialize_url(self, value: str | None) -> str | None:
        # JSON dumps get published and logged; Python dumps keep the real URL
        # (as SecretStr keeps its value) so they can rebuild a config.
        return None if value is None else redact_url(value)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for key, value in super().__repr_args__():
            if key == "url" and isinstance(value, str):
                value = redact_url(value)
            yield key, value

    def header_values(self) -> dict[str, str]:
        """The HTTP headers to send, secrets unwrapped."""
        return {k: v.get_secret_value() for k, v in self.headers.items()}

    def env_values(self) -> dict[str, str]:
        """The environment for the stdio process, secrets unwrapped."""
        return {k: v.get_secret_value() for k, v in self.env.items()}

    def is_tool_idempotent(self, tool: str) -> bool | None:
        """The tool's own setting, else the server's, else None (unknown)."""
        override = self.tools.get(tool)
        if override is not None and override.idempotent is not None:
            return override.idempotent
        return self.idempotent

    def summary(self) -> dict[str, Any]:
        """JSON-safe and secret-free: header and env names only, never values."""
        return {
            "name": self.name,
            "transport": self.transport,
            "url": None if self.url is None else redact_url(self.url),
            "command": self.command,
            "args": redact_args(self.args),
            "enabled": self.enabled,
            "description": self.description,
            "timeout": self.timeout,
            "protocol": self.protocol,
            "max_sessions": self.max_sessions,
            "header_names": sorted(self.headers),
            "env_names": sorted(self.env),
        }


class MCPQConfig(BaseModel):
    """The whole file: the servers plus limits that apply to all of them."""

    model_config = ConfigDict(extra="forbid")

    mcp_servers: dict[str, MCPServerConfig] = Field(default_factory=dict)
    max_result_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    secret_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_SECRET_PATTERNS))

    @model_validator(mode="before")
    @classmethod
    def _names_from_keys(cls, data: Any) -> Any:
        # Lets code build a config as {"mcp_servers": {"a": {...}}} without repeating the name.
        if not isinstance(data, dict) or not isinstance(data.get("mcp_servers"), dict):
            return data
        servers = {
            key: {**entry, "name": key} if isinstance(entry, dict) and "name" not in entry else entry
            for key, entry in data["mcp_servers"].items()
        }
        return {**data, "mcp_servers": servers}

    @model_validator(mode="after")
    def _check_names_match_keys(self) -> Self:
        for key, server in self.mcp_servers.items():
            if server.name != key:
                raise ValueError(f"server under key {key!r} is named {server.name!r}; they must match")
        return self

    def enabled_servers(self) -> dict[str, MCPServerConfig]:
        """The servers with ``enabled: true``, in file order."""
        return {name: s for name, s in self.mcp_servers.items() if s.enabled}


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> MCPQConfig:
    """Read and validate a config file (``.yaml``, ``.yml`` or ``.json``)."""
    source = os.fspath(path)
    hint = "set MCPQ_CONFIG to the path of your servers file"
    try:
        # utf-8-sig: editors on Windows save JSON with a BOM.
        text = Path(source).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise _file_error(source, None, f"config file not found; {hint}") from None
    except IsADirectoryError:
        raise _file_error(source, None, f"is a directory, not a config file; {hint}") from None
    except UnicodeDecodeError as exc:
        raise _file_error(
            source, None, f"config file is not UTF-8 text (bad byte at offset {exc.start})"
        ) from None
    except OSError as exc:
        raise _file_error(source, None, f"cannot read config file: {exc.strerror or exc}") from None
    return parse_config(text, source=source, env=env)


def parse_config(text: str, source: str = "<string>", env: Mapping[str, str] | None = None) -> MCPQConfig:
    """Validate config text; ``source`` is only used in error messages."""
    doc = _Document.parse(text, source)
    return _Builder(doc, os.environ if env is None else env).build()


@dataclass(frozen=True, slots=True)
class _Problem:
    file: str
    line: int | None
    text: str
    server: str | None = None
    field: str | None = None
    # The text already says which server and field (the env-var message wants them mid-sentence).
    inline: bool = False

    def render(self) -> str:
        prefix = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.inline:
            return f"{prefix}: {self.text}"
        where = []
        if self.server is not None:
            where.append(f"server '{self.server}'")
        if self.field:
            where.append(f"field '{self.field}'")
        if where:
            return f"{prefix}: {', '.join(where)}: {self.text}"
        return f"{prefix}: {self.text}"

    def details(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "field": self.field, "server": self.server}


def _to_error(problems: list[_Problem]) -> ConfigError:
    # File order reads best; pydantic reports in field-declaration order.
    problems = sorted(problems, key=lambda p: p.line if p.line is not None else 0)
    details = problems[0].details()
    if len(problems) > 1:
        details["problems"] = [p.details() | {"message": p.render()} for p in problems]
    return ConfigError("\n".join(p.render() for p in problems), details=details)


def _file_error(source: str, line: int | None, text: str) -> ConfigError:
    return _to_error([_Problem(source, line, text)])


class _Document:
    """Plain data from the YAML plus the node behind every path, for line numbers."""

    def __init__(self, source: str, data: Any, nodes: dict[_Loc, tuple[yaml.Node | None, yaml.Node]]) -> None:
        self.source = source
        self.data = data
        self.nodes = nodes

    @classmethod
    def parse(cls, text: str, source: str) -> _Document:
        try:
            return cls._compose(text, source)
        except yaml.YAMLError as first:
            # Tab-indented JSON is valid JSON but not YAML; outside strings a
            # tab is only whitespace, so spaces keep the meaning and the lines.
            if "\t" in text and (source.endswith(".json") or text.lstrip().startswith("{")):
                try:
                    return cls._compose(text.replace("\t", " "), source)
                except yaml.YAMLError:
                    pass
            raise cls._yaml_error(first, text, source) from None

    @classmethod
    def _compose(cls, text: str, source: str) -> _Document:
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
            nodes: dict[_Loc, tuple[yaml.Node | None, yaml.Node]] = {}
            data = None if root is None else _Walker(loader, source, nodes).walk(root, (), None)
            return cls(source, data, nodes)
        finally:
            loader.dispose()

    @staticmethod
    def _yaml_error(exc: yaml.YAMLError, text: str, source: str) -> ConfigError:
        line: int | None = None
        problem = str(exc)
        if isinstance(exc, yaml.MarkedYAMLError):
            mark = exc.problem_mark or exc.context_mark
            if mark is not None:
                line = mark.line + 1
            problem = exc.problem or exc.context or problem
            if mark is not None:
                problem = f"{problem} (column {mark.column + 1})"
        language = "YAML"
        if source.endswith(".json"):
            # JSON's own parser names the problem in JSON terms (a missing brace, say).
            try:
                json.loads(text)
            except json.JSONDecodeError as jexc:
                language, line, problem = "JSON", jexc.lineno, f"{jexc.msg} (column {jexc.colno})"
            except ValueError:
                pass
        return _file_error(source, line, f"invalid {language}: {problem}")

    def line(self, path: _Loc) -> int | None:
        """The line of ``path``, or of its nearest ancestor present in the file."""
        for n in range(len(path), -1, -1):
            entry = self.nodes.get(path[:n])
            if entry is None:
                continue
            key_node, node = entry
            # For a block mapping or list the key's line reads better than the first child's.
            mark = (
                node.start_mark
                if key_node is None or isinstance(node, yaml.ScalarNode)
                else key_node.start_mark
            )
            return int(mark.line) + 1
        return None


class _Walker:
    def __init__(
        self, loader: yaml.SafeLoader, source: str, nodes: dict[_Loc, tuple[yaml.Node | None, yaml.Node]]
    ) -> None:
        self.loader = loader
        self.source = source
        self.nodes = nodes
        self.checked: set[int] = set()

    def fail(self, node: yaml.Node, text: str) -> ConfigError:
        return _file_error(self.source, node.start_mark.line + 1, text)

    def walk(
        self, node: yaml.Node, path: _Loc, key_node: yaml.Node | None, seen: frozenset[int] = frozenset()
    ) -> Any:
        self.nodes[path] = (key_node, node)
        if isinstance(node, yaml.ScalarNode):
            value = self.loader.construct_object(node, deep=True)
            if isinstance(value, str) and any("\ud800" <= c <= "\udfff" for c in value):
                # JSON spells non-BMP characters as \\ud83d\\ude00 pairs; YAML leaves them split.
                value = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return value
        if node.tag not in (_MAP_TAG, _SEQ_TAG):
            raise self.fail(node, f"invalid YAML: unsupported tag '{node.tag}' on a mapping or list")
        if id(node) in seen:
            raise self.fail(node, "invalid YAML: an alias refers to a node that contains it")
        seen = seen | {id(node)}
        if isinstance(node, yaml.SequenceNode):
            return [self.walk(child, (*path, i), None, seen) for i, child in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode):
            return self.walk_mapping(node, path, seen)
        raise self.fail(node, f"invalid YAML: unexpected node {type(node).__name__}")

    def walk_mapping(self, node: yaml.MappingNode, path: _Loc, seen: frozenset[int]) -> dict[str, Any]:
        if id(node) not in self.checked:
            # Merged (`<<`) keys may be overridden; only keys written twice are mistakes.
            first_line: dict[str, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                    continue
                if key_node.value in first_line:
                    raise self.fail(
                        key_node,
                        f"duplicate key '{key_node.value}' (first on line {first_line[key_node.value]})",
                    )
                first_line[key_node.value] = key_node.start_mark.line + 1
            self.loader.flatten_mapping(node)
            self.checked.add(id(node))
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.fail(key_node, "keys must be plain strings, not lists or mappings")
            # The key's text, so `8080:` or `yes:` stay what was written.
            key = str(key_node.value)
            out[key] = self.walk(value_node, (*path, key), key_node, seen)
        return out


class _Builder:
    """Turns the document's plain data into MCPQConfig, collecting every problem."""

    def __init__(self, doc: _Document, env: Mapping[str, str]) -> None:
        self.doc = doc
        self.env = env
        self.problems: list[_Problem] = []

    def problem(
        self,
        path: _Loc,
        text: str,
        *,
        server: str | None = None,
        field: str | None = None,
        inline: bool = False,
    ) -> _Problem:
        p = _Problem(self.doc.source, self.doc.line(path), text, server, field, inline)
        # A bad value in `defaults` fails the same way in every server that inherits it.
        if p not in self.problems:
            self.problems.append(p)
        return p

    def fatal(self, path: _Loc, text: str) -> ConfigError:
        """Record a problem the build cannot continue past; the caller raises the result."""
        self.problem(path, text)
        return _to_error(self.problems)

    def build(self) -> MCPQConfig:
        data = self.doc.data
        if data is None:
            return MCPQConfig()
        if not isinstance(data, dict):
            raise self.fatal(
                (),
                "the top level must be a mapping with 'mcp_servers' (or 'mcpServers' / 'servers'), "
                f"not {_kind(data)}",
            )
        present = [k for k in _SERVER_KEYS if k in data]
        if len(present) > 1:
            raise self.fatal(
                (present[1],), f"use one of {', '.join(repr(k) for k in present)} at the top level, not both"
            )
        servers_key = present[0] if present else "mcp_servers"
        if servers_key == "mcp_servers":
            for key in data:
                if key not in _TOP_LEVEL_KEYS:
                    self.problem((key,), _unknown_field(key, (*_TOP_LEVEL_KEYS, "mcpServers", "servers")))
        # Other keys in a Claude Desktop / VS Code file (globalShortcut, inputs...) belong to that app.

        servers_raw = data.get(servers_key)
        if servers_raw is None:
            servers_raw = {}
        elif not isinstance(servers_raw, dict):
            raise self.fatal(
                (servers_key,),
                f"'{servers_key}' must be a mapping of server name to settings, not {_kind(servers_raw)}",
            )

        defaults, defaults_origin = self.defaults(data.get("defaults"))
        servers: dict[str, MCPServerConfig] = {}
        for name, entry in servers_raw.items():
            server = self.server(servers_key, name, entry, defaults, defaults_origin)
            if server is not None:
                servers[name] = server

        top: dict[str, Any] = {}
        for key in ("max_result_bytes", "secret_patterns"):
            if key in data:
                top[key] = self.expand(data[key], (key,))
        try:
            config = MCPQConfig.model_validate({"mcp_servers": servers, **top})
        except ValidationError as exc:
            for err in exc.errors():
                loc = tuple(err["loc"])
                self.problem(loc, _error_text(err), field=_fmt_path(loc))
            raise _to_error(self.problems) from None
        if self.problems:
            raise _to_error(self.problems)
        return config

    def defaults(self, raw: Any) -> tuple[dict[str, Any], dict[_Loc, _Loc]]:
        if raw is None:
            return {}, {}
        if not isinstance(raw, dict):
            raise self.fatal(
                ("defaults",), f"'defaults' must be a mapping of server settings, not {_kind(raw)}"
            )
        fields, origin = self.translate(raw, ("defaults",), None)
        known = set(MCPServerConfig.model_fields) - {"name"}
        for key in list(fields):
            if key == "name":
                self.problem(origin.get((key,), ("defaults", key)), "'defaults' cannot set a server's name")
                del fields[key]
            elif key not in known:
                self.problem(
                    origin.get((key,), ("defaults", key)),
                    _unknown_field(key, (*known, "type", "disabled")),
                    field="defaults",
                )
                del fields[key]
        return fields, origin

    def translate(
        self, raw: dict[str, Any], base: _Loc, server: str | None
    ) -> tuple[dict[str, Any], dict[_Loc, _Loc]]:
        """Expand ${VARS} and map the mcpServers/VS Code spellings onto field names.

        ``origin`` maps a field's loc to where it was written, for error lines.
        """
        fields: dict[str, Any] = {}
        origin: dict[_Loc, _Loc] = {}
        for key, value in raw.items():
            path = (*base, key)
            value = self.expand(value, path)
            if key == "type":
                if "transport" in raw:
                    self.problem(path, "set 'transport' or 'type', not both", server=server, field="type")
                    continue
                transport = _TYPE_TO_TRANSPORT.get(value) if isinstance(value, str) else None
                if transport is None:
                    allowed = ", ".join(repr(t) for t in _TYPE_TO_TRANSPORT)
                    self.problem(
                        path, f"unknown type {value!r}; use one of {allowed}", server=server, field="type"
                    )
                    continue
                fields["transport"], origin[("transport",)] = transport, path
            elif key == "disabled":
                if "enabled" in raw:
                    self.problem(
                        path, "set 'enabled' or 'disabled', not both", server=server, field="disabled"
                    )
                    continue
                if not isinstance(value, bool):
                    self.problem(path, "must be true or false", server=server, field="disabled")
                    continue
                fields["enabled"], origin[("enabled",)] = not value, path
            else:
                fields[key] = value
                origin[(key,)] = path
        return fields, origin

    def server(
        self,
        servers_key: str,
        name: str,
        entry: Any,
        defaults: dict[str, Any],
        defaults_origin: dict[_Loc, _Loc],
    ) -> MCPServerConfig | None:
        base: _Loc = (servers_key, name)
        if not isinstance(entry, dict):
            self.problem(
                base,
                f"expected a mapping of settings (command/url, ...), not {_kind(entry)}",
                server=name,
            )
            return None
        before = len(self.problems)
        fields, origin = self.translate(entry, base, name)
        if len(self.problems) > before:
            # An unset ${VAR} left an empty string behind; validating it would only add noise.
            return None
        if "name" in fields:
            if fields["name"] != name:
                self.problem(
                    origin[("name",)],
                    f"the name comes from the key ('{name}'); remove 'name' or rename the key",
                    server=name,
                    field="name",
                )
                return None
            del fields["name"]
        for key, value in defaults.items():
            mine = fields.get(key)
            if key not in fields:
                fields[key] = value
                origin.update({loc: where for loc, where in defaults_origin.items() if loc[0] == key})
            elif isinstance(mine, dict) and isinstance(value, dict):
                # Mappings merge key by key so a server can add one header to the defaults' set.
                fields[key] = {**value, **mine}
                for sub in value:
                    if sub not in mine:
                        origin[(key, sub)] = (*defaults_origin[(key,)], sub)
        fields["name"] = name
        origin[("name",)] = base
        origin[()] = base
        try:
            return MCPServerConfig.model_validate(fields)
        except ValidationError as exc:
            for err in exc.errors():
                self.pydantic_problem(err, name, base, origin)
            return None

    def pydantic_problem(self, err: Any, name: str, base: _Loc, origin: dict[_Loc, _Loc]) -> None:
        loc: _Loc = tuple(err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        if not loc and isinstance(cause, _FieldError):
            loc = (cause.field,)
        for n in range(len(loc), -1, -1):
            if loc[:n] in origin:
                path = (*origin[loc[:n]], *loc[n:])
                break
        else:  # pragma: no cover - origin[()] always matches
            path = (*base, *loc)
        where = path[len(base) :] if path[: len(base)] == base else path
        if err["type"] == "extra_forbidden":
            known: tuple[str, ...]
            if len(loc) >= 3 and loc[0] == "tools":
                known = tuple(ToolOverride.model_fields)
            else:
                known = (*(set(MCPServerConfig.model_fields) - {"name"}), "type", "disabled")
            parent = where[:-1]
            self.problem(
                path, _unknown_field(str(loc[-1]), known), server=name, field=_fmt_path(parent) or None
            )
            return
        field = _fmt_path(where) or _fmt_path(loc) or None
        if path[0] == "defaults" and err["loc"]:
            # A field-level error in `defaults` is not this server's fault; report it once.
            self.problem(path, _error_text(err), field=field)
            return
        self.problem(path, _error_text(err), server=name, field=field)

    def expand(self, value: Any, path: _Loc) -> Any:
        if isinstance(value, str):
            return self.expand_str(value, path)
        if isinstance(value, list):
            return [self.expand(v, (*path, i)) for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: self.expand(v, (*path, k)) for k, v in value.items()}
        return value

    def expand_str(self, text: str, path: _Loc) -> str:
        if "$" not in text:
            return text

        def substitute(match: re.Match[str]) -> str:
            if match.group("dollar"):
                return "$"
            if match.group("open"):
                self.var_problem(path, "has an unterminated '${'; write '$$' for a literal '$'")
                return ""
            body = match.group("body")
            name, sep, default = body.partition(":-")
            # VS Code writes ${env:NAME}.
            name = name.removeprefix("env:")
            if not _VAR_NAME_RE.match(name):
                self.var_problem(
                    path,
                    f"has an invalid variable reference '${{{body}}}': use ${{NAME}} or ${{NAME:-default}}, "
                    "and '$$' for a literal '$'",
                )
                return ""
            value = self.env.get(name)
            if value:
                return value
            if sep:
                return default
            state = "is not set" if value is None else "is set but empty"
            server, field = _where(path)
            context = f"server '{server}', field '{field}'" if server is not None else f"field '{field}'"
            self.problem(
                path,
                f"environment variable {name} {state} ({context}); set it or write ${{{name}:-default}}",
                server=server,
                field=field,
                inline=True,
            )
            return ""

        return _REF_RE.sub(substitute, text)

    def var_problem(self, path: _Loc, text: str) -> None:
        server, field = _where(path)
        self.problem(path, text, server=server, field=field)


# --------------------------------------------------------------------------- helpers


def _where(path: _Loc) -> tuple[str | None, str]:
    if len(path) >= 2 and path[0] in _SERVER_KEYS:
        return str(path[1]), _fmt_path(path[2:])
    return None, _fmt_path(path)


def _fmt_path(path: _Loc) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _kind(value: Any) -> str:
    if value is None:
        return "empty (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})" if len(value) <= 40 else "a string"
    return f"a {type(value).__name__} ({value!r})"


def _unknown_field(key: str, known: tuple[str, ...] | list[str]) -> str:
    text = f"unknown field '{key}'"
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    if close:
        text += f"; did you mean '{close[0]}'?"
    return text


# Input values shown in messages only for fields that cannot hold a secret.
_SAFE_TO_ECHO = frozenset(
    set(MCPServerConfig.model_fields) - {"url", "command", "args", "env", "headers", "cwd", "description"}
) | {"max_result_bytes"}


def _error_text(err: Any) -> str:
    cause = (err.get("ctx") or {}).get("error")
    if err["type"] == "value_error" and isinstance(cause, Exception):
        return str(cause)
    text = str(err["msg"])
    loc = err["loc"]
    value = err.get("input")
    if (
        loc
        and loc[0] in _SAFE_TO_ECHO
        and err["type"] not in ("missing", "extra_forbidden")
        and isinstance(value, str | int | float | bool)
    ):
        shown = repr(value)
        text += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
    return text


def _scalar_text(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


def _transport_for_url(url: Any) -> Transport:
    if isinstance(url, str) and urlsplit(url).path.rstrip("/").endswith("/sse"):
        return "sse"
    return "http"
