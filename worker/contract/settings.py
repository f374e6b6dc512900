"""Process settings from the environment (``MCPQ_*``).

Kept apart from the YAML server config: settings say where the broker and the
shared state live; the YAML says which MCP servers exist.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from mcpq.worker.contract.errors import ConfigError
from mcpq.worker.contract.numbers import seconds
from mcpq.worker.contract.redact import DEFAULT_SECRET_PATTERNS, redact_url

DEFAULT_REDIS = "redis://127.0.0.1:6379"


@dataclass(frozen=True, slots=True)
class Settings:
    broker_url: str = f"{DEFAULT_REDIS}/0"
    result_backend: str = f"{DEFAULT_REDIS}/1"
    redis_url: str = f"{DEFAULT_REDIS}/2"
    config_path: str = "config/servers.yaml"
    key_prefix: str = "mcpq:"
    queue: str = "mcpq"
    default_timeout: float = 60.0
    worker_concurrency: int = 32
    #: Threads per worker process that run the calls of chunk tasks (fan-out).
    chunk_concurrency: int = 32
    result_expires: int = 86_400
    #: Seconds without a heartbeat before a running call's worker counts as dead.
    claim_lease: float = 30.0
    #: Celery limits (prefork enforces them; threads rely on each call's deadline)
    #: and the Redis transport's redelivery delay: call deadline < soft < hard < visibility.
    soft_time_limit: float = 300.0
    time_limit: float = 330.0
    visibility_timeout: float = 3600.0
    #: How often a Redis-broker worker looks for unacknowledged messages of dead
    #: workers (kombu's default sweep is about every 100 s).
    restore_interval: float = 10.0
    #: How long an idempotency key maps to its first call.
    idempotency_window: float = 86_400.0
    admin_token: str | None = field(default=None, repr=False)
    #: ``mcpq gateway``: the bearer token MCP clients send (unset: loopback only).
    gateway_token: str | None = field(default=None, repr=False)
    #: Celery task events (what Flower shows). Off saves a PUBLISH per task
    #: state change for fleets nobody watches.
    task_events: bool = True
    #: Argument names containing any of these (comma-separated, case-insensitive)
    #: have their values masked wherever a call is described (Flower, logs).
    secret_patterns: str = ",".join(DEFAULT_SECRET_PATTERNS)
    #: Longest wait for any one reply from the broker, the result backend or the
    #: state Redis: a host that accepts connections and never answers must end
    #: in ``connection_error``, not hang the caller (connects get at most 5 s).
    socket_timeout: float = 10.0
    #: Worker: serve Prometheus metrics on this TCP port (0: no metrics, no cost).
    metrics_port: int = 0
    #: Worker: distinct ``tool`` label values per server in the metrics; later tools count as ``other``.
    metrics_max_tools: int = 100
    #: Worker: the host in the metrics URL it announces in Redis (``mcpq top``); default: its FQDN.
    metrics_host: str = ""

    def __post_init__(self) -> None:
        for name in ("broker_url", "result_backend", "redis_url"):
            _check_url(f"MCPQ_{name.upper()}", getattr(self, name))
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(
                f"MCPQ_METRICS_PORT must be a TCP port (1-65535) or 0 (no metrics), got {self.metrics_port}",
                details={"setting": "MCPQ_METRICS_PORT"},
            )
        if self.metrics_max_tools < 1:
            raise ConfigError(
                f"MCPQ_METRICS_MAX_TOOLS must be 1 or more, got {self.metrics_max_tools}",
                details={"setting": "MCPQ_METRICS_MAX_TOOLS"},
            )

    @property
    def connect_timeout(self) -> float:
        """Longest wait for a TCP connection to the broker, result backend or state Redis."""
        return min(5.0, self.socket_timeout)

    @property
    def ledger_grace(self) -> float:
        """How long an enqueued call may go unfinished before a sweeper publishes it
        again: by then the broker would long have redelivered it, had it kept it."""
        return 2 * self.visibility_timeout + self.time_limit + self.restore_interval

    @property
    def claim_ttl(self) -> float:
        """How long a finished call's claim, and the result it holds, is kept:
        long enough to answer any redelivery (the ledger republishes after
        ``ledger_grace``), never longer than the results themselves. Claims
        hold a copy of each result, so this bounds their Redis memory."""
        return max(min(float(self.result_expires), 2 * self.ledger_grace), 60.0)

    def secret_pattern_list(self) -> list[str]:
        return [p.strip() for p in self.secret_patterns.split(",") if p.strip()]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"MCPQ_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            values[f.name] = _coerce(f.name, raw, type(getattr(cls(), f.name)))
        # The friendly spellings that Celery users already know.
        if "config_path" not in values and env.get("MCPQ_CONFIG"):
            values["config_path"] = env["MCPQ_CONFIG"]
        return cls(**values)

    def redacted(self) -> dict[str, Any]:
        """For logs and `mcpq info`: URLs without passwords, no token."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("admin_token", "gateway_token"):
                value = "set" if value else "unset"
            elif isinstance(value, str) and "://" in value:
                value = redact_url(value)
            out[f.name] = value
        return out


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
#: Integer settings where 0 means "off" (every other one must be 1 or more).
_ZERO_MEANS_OFF = frozenset({"metrics_port"})


def _coerce(name: str, raw: str, kind: type) -> Any:
    if kind is bool:
        if raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise ConfigError(
            f"MCPQ_{name.upper()}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off)"
        )
    setting = f"MCPQ_{name.upper()}"
    if kind is float:
        # Every float setting is a duration: one rule with every other entry point.
        try:
            float(raw)
        except ValueError:
            raise ConfigError(
                f"{setting}={raw!r} is not a valid float", details={"setting": setting}
            ) from None
        try:
            return seconds(raw, setting)
        except ValueError as exc:
            raise ConfigError(str(exc), details={"setting": setting}) from None
    if kind is int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{setting}={raw!r} is not a valid int", details={"setting": setting}) from None
        if value < (0 if name in _ZERO_MEANS_OFF else 1):
            least = "0 or more" if name in _ZERO_MEANS_OFF else "1 or more"
            raise ConfigError(f"{setting} must be {least}, got {raw!r}", details={"setting": setting})
        return value
    return raw


def _check_url(setting: str, url: str) -> None:
    """Refuse, at start-up and naming the setting, a URL that a transport would
    only trip over later (kombu's Redis transport crashes on ``?password=``)."""
    query = urlsplit(url).query if "://" in url else ""
    names = {piece.partition("=")[0].lower() for piece in query.split("&") if piece}
    for bad in sorted(names & {"password", "username"}):
        raise ConfigError(
            f"{setting}: a {bad} in the query string ({redact_url(url)}) is not supported; put the "
            "credentials in the URL itself: redis://:PASSWORD@host:6379/0 (or redis://USER:PASSWORD@host...)",
            details={"setting": setting},
        )
