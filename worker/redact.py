"""Keep a server's secrets from config out of messages, logs and results.

The general redaction (URLs, arguments, call descriptions) is in
``mcpq.worker.contract.redact``; this module knows a server's own secret values."""

from __future__ import annotations

from urllib.parse import urlsplit

from mcpq.worker.config import MCPServerConfig
from mcpq.worker.contract.redact import MASK

_SCHEMES = {"bearer", "basic", "token", "digest", "apikey"}
_MIN_SECRET_LEN = 4  # shorter values would mask ordinary words


def secret_values(config: MCPServerConfig) -> list[str]:
    values = [*config.header_values().values(), *config.env_values().values()]
    if config.url:
        password = urlsplit(config.url).password
        if password:
            values.append(password)
    # A header like "Bearer abc123" leaks through its token alone too; the
    # scheme word itself is not secret, and masking it would garble messages.
    values += [part for v in list(values) for part in v.split() if part != v and part.lower() not in _SCHEMES]
    return sorted({v for v in values if len(v) >= _MIN_SECRET_LEN}, key=len, reverse=True)


def scrub(text: str, config: MCPServerConfig) -> str:
    for secret in secret_values(config):
        text = text.replace(secret, MASK)
    return text
