"""Keep secrets from config out of messages, logs and results."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from worker.config import MCPServerConfig

MASK = "***"
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


def is_secret_key(key: str, patterns: Sequence[str]) -> bool:
    lowered = key.lower()
    return any(p and p.lower() in lowered for p in patterns)


def redact_arguments(value: Any, patterns: Sequence[str]) -> Any:
    """A copy of ``value`` with the values of secret-looking keys masked, at any depth."""
    if isinstance(value, dict):
        return {
            k: MASK if is_secret_key(str(k), patterns) else redact_arguments(v, patterns)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact_arguments(v, patterns) for v in value]
    return value


def describe_call(label: str, arguments: Any, patterns: Sequence[str], limit: int = 200) -> str:
    """The short, secret-free summary of a call that Flower and logs show."""
    shown = json.dumps(redact_arguments(arguments, patterns), separators=(",", ":"), default=str)
    if len(shown) > limit:
        shown = shown[: limit - 3] + "..."
    return f"{label} {shown}"


def describe_chunk(labels: Sequence[str], shown: int = 5) -> str:
    """What a chunk task holds, for Flower: how many calls of which tools (no arguments)."""
    counts = Counter(labels).most_common()
    parts = [f"{label} x{n}" for label, n in counts[:shown]]
    if len(counts) > shown:
        parts.append(f"{len(counts) - shown} more tools")
    return f"{len(labels)} calls: {', '.join(parts)}"


def scrub(text: str, config: MCPServerConfig) -> str:
    for secret in secret_values(config):
        text = text.replace(secret, MASK)
    return text
