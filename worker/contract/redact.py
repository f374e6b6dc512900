"""The one redaction: URLs, command arguments and call descriptions never show a secret.

Every URL shown anywhere (error messages, health bodies, ``mcpq info``, the
published server list) goes through :func:`redact_url`; call arguments shown
in Flower and logs go through :func:`describe_call`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

MASK = "***"

#: Names whose values are secret wherever they appear: argument keys, query
#: parameters, ``--flag value`` pairs. ``MCPQ_SECRET_PATTERNS`` and the config's
#: ``secret_patterns`` replace it for call arguments.
DEFAULT_SECRET_PATTERNS: tuple[str, ...] = (
    "token",
    "password",
    "passwd",
    "secret",
    "key",
    "authorization",
    "credential",
    "cookie",
)

#: Query parameters that carry credentials in broker and HTTP URLs, besides the patterns.
_SECRET_QUERY_NAMES = ("pass", "pwd", "auth", "sig")

#: A URL inside free text: scheme, then everything up to white space or a quote.
_URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def is_secret_key(key: str, patterns: Sequence[str] = DEFAULT_SECRET_PATTERNS) -> bool:
    """True when ``key`` contains any of ``patterns`` (case-insensitive).

    :param key: an argument, query parameter or flag name.
    :param patterns: substrings that mark a name as secret.
    """
    lowered = key.lower()
    return any(p and p.lower() in lowered for p in patterns)


def redact_url(url: str) -> str:
    """``url`` with its userinfo and secret-looking query values masked.

    ``redis://user:pw@h`` -> ``redis://user:***@h``; a bare ``redis://tok@h``
    -> ``redis://***@h`` (tokens are often passed as the user name);
    ``?password=pw`` -> ``?password=***``. Several URLs joined by ``;`` (kombu's
    failover form) are each redacted. Nothing that looks unparseable is shown.

    :param url: any URL, with or without credentials.
    """
    if ";" in url and "://" in url.split(";", 1)[1]:
        return ";".join(redact_url(part) for part in url.split(";"))
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url if "@" not in url and "=" not in url else MASK
    # The authority ends at the first '/' or '?'; its last '@' ends the
    # userinfo (a password may itself contain '@' or '#').
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        userinfo, _, host = authority.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        authority = f"{user}:{MASK}@{host}" if has_password else f"{MASK}@{host}"
    path, qmark, query = tail.partition("?")
    if qmark:
        query, hash_, fragment = query.partition("#")
        query = "&".join(_redact_query_piece(piece) for piece in query.split("&")) + hash_ + fragment
    return f"{scheme}://{authority}{path}{qmark}{query}"


def _redact_query_piece(piece: str) -> str:
    name, eq, _ = piece.partition("=")
    if eq and (is_secret_key(name) or is_secret_key(name, _SECRET_QUERY_NAMES)):
        return f"{name}={MASK}"
    return piece


def redact_urls_in(text: str) -> str:
    """``text`` with every URL in it redacted (for messages that quote a URL)."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def redact_args(args: Sequence[str]) -> list[str]:
    """Command arguments as shown: ``--token X``, ``--token=X`` and ``API_KEY=X`` show
    ``***`` for X, since a ``${VAR}`` expanded into an argument is as secret as the env."""
    out: list[str] = []
    hide_next = False
    for arg in args:
        name, eq, _ = arg.partition("=")
        if hide_next:
            out.append(MASK)
            hide_next = False
        elif eq and is_secret_key(name):
            out.append(f"{name}={MASK}")
        elif "://" in arg:
            out.append(redact_url(arg))
        else:
            out.append(arg)
            hide_next = arg.startswith("-") and not eq and is_secret_key(arg)
    return out


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
    """The short, secret-free summary of a call that Flower and logs show.

    :param label: the tool (``server/tool`` when the server is named).
    :param arguments: the call's arguments; values of secret-looking keys are masked.
    :param patterns: what makes a key secret-looking.
    :param limit: most characters of the arguments shown.
    """
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
