"""The MCP server config as Pydantic models: what one server and the whole file may say.

Reading the file (YAML or JSON ``mcpServers``, ``${VAR}`` expansion, errors
with file, line and field) is ``mcpq.worker.config_loader``; the YAML document
with its line locator is ``mcpq.worker.config_yaml``. Nothing here imports
YAML or the MCP SDK.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from datetime import date, datetime
from typing import Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_serializer,
    field_validator,
    model_validator,
)

from mcpq.worker.contract.redact import DEFAULT_SECRET_PATTERNS, redact_args, redact_url

__all__ = [
    "DEFAULT_SECRET_PATTERNS",
    "FieldError",
    "MCPQConfig",
    "MCPServerConfig",
    "ToolOverride",
    "Transport",
    "parse_rate_limit",
]

Transport = Literal["stdio", "http", "sse"]


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PROTOCOL_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class FieldError(ValueError):
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
    # What the worker answers a server's own elicitation/create or sampling/createMessage
    # while a call holds the session (no caller is there to ask): docs/interactive.md.
    elicitation: Literal["decline", "defaults"] = "decline"
    sampling: Literal["decline"] = "decline"

    @model_validator(mode="before")
    @classmethod
    def _infer_transport(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("transport") is not None:
            return data
        has_command = data.get("command") is not None
        has_url = data.get("url") is not None
        if has_command and has_url:
            raise FieldError(
                "url",
                "has both 'command' and 'url'; keep 'command' for a local stdio server "
                "or 'url' for a remote one (or set transport explicitly)",
            )
        if not has_command and not has_url:
            raise FieldError(
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
                raise FieldError("command", "transport 'stdio' needs 'command' (the program to start)")
            if self.url is not None:
                raise FieldError(
                    "url", "transport 'stdio' starts a local command and takes no 'url'; remove one of them"
                )
        else:
            if not self.url:
                raise FieldError("url", f"transport '{self.transport}' needs 'url' (http:// or https://)")
            if self.command is not None:
                raise FieldError(
                    "command",
                    f"transport '{self.transport}' connects to 'url' and takes no 'command'; "
                    "remove one of them",
                )
        if self.retry_max_delay < self.retry_delay:
            raise FieldError(
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

    def target(self) -> str:
        """What this config points at, as a short stable fingerprint: the transport
        and URL, or the command, arguments, environment names and cwd.

        Fleet memory about a server (its negotiated protocol, its published
        tools) is valid only for the target it was learnt from: after the
        server's URL or command changes, or while old and new workers of a
        rolling deploy disagree, a worker must not route by another target's
        memory. Secrets are left out (redacted first), so changing a token
        keeps the target.
        """
        shape = {
            "transport": self.transport,
            "url": None if self.url is None else redact_url(self.url),
            "command": self.command,
            "args": redact_args(self.args),
            "env_names": sorted(self.env),
            "cwd": self.cwd,
        }
        digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()
        return digest[:16]

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
            "target": self.target(),
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
