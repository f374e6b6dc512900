"""What a call's arguments may hold: JSON values that every hop can carry.

One rule for every entry point (``ToolQueue``, fan-out, ``mcpq batch``, the
HTTP API) and again in the worker before anything is sent, because a value
the MCP SDK cannot serialize fails *inside* the session: the session ends,
the call looks like a connection failure, and the fleet-wide breaker opens
for every caller of that server. Such a value is the caller's mistake:
``invalid_arguments``, never a breaker failure.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from mcpq.worker.contract.errors import InvalidArgumentsError

#: Deepest nesting accepted. The SDK's serializer (pydantic-core) gives up at
#: 255 levels for the whole JSON-RPC message, whose envelope takes a few.
MAX_ARGUMENT_DEPTH = 200


def check_arguments(arguments: Any, tool: str = "", *, none_means_empty: bool = True) -> None:
    """Raise :class:`InvalidArgumentsError` unless ``arguments`` is a JSON object of
    values that JSON (RFC 8259) and the SDK can carry.

    Refused, each with the path of the first offending value: strings or keys
    holding a lone UTF-16 surrogate (not encodable as UTF-8), NaN and
    infinities (not JSON; Python's encoder would send them as ``NaN`` and
    the SDK as ``null``), integers too long to print, non-string keys,
    non-JSON types, and nesting deeper than :data:`MAX_ARGUMENT_DEPTH`.

    :param arguments: the call's arguments.
    :param tool: the tool's name, for the message.
    :param none_means_empty: whether ``None`` stands for ``{}`` (callers) or is refused (the wire).
    """
    if arguments is None and none_means_empty:
        return
    where = f" for {tool!r}" if tool else ""
    if not isinstance(arguments, dict):
        raise InvalidArgumentsError(
            f"arguments{where} must be a JSON object, got {type(arguments).__name__}",
            details={"tool": tool, "path": ""},
        )
    problem = _first_problem(arguments)
    if problem is not None:
        path, text = problem
        raise InvalidArgumentsError(
            f"arguments{where} cannot be sent: {'at ' + repr(path) + ': ' if path else ''}{text}",
            details={"tool": tool, "path": path},
        )


def _first_problem(root: dict[str, Any]) -> tuple[str, str] | None:
    # Iterative, so a value nested thousands deep costs no recursion.
    stack: list[tuple[Any, str, int]] = [(root, "", 0)]
    max_bits = _max_int_bits()
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_ARGUMENT_DEPTH:
            return path, f"nested deeper than {MAX_ARGUMENT_DEPTH} levels"
        if isinstance(value, str):
            if not _utf8_encodable(value):
                return (
                    path,
                    "the string holds a lone surrogate (not valid Unicode; it cannot be sent as UTF-8)",
                )
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if value.bit_length() > max_bits:
                return path, f"the integer has more than {sys.get_int_max_str_digits()} digits"
        elif isinstance(value, float):
            if not math.isfinite(value):
                return path, f"{value!r} is not a JSON number (RFC 8259 has no NaN or Infinity)"
        elif isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    return path, f"object keys must be strings, got {_kind(key)}"
                child = f"{path}.{key}" if path else key
                if not _utf8_encodable(key):
                    return child, "the key holds a lone surrogate (not valid Unicode)"
                stack.append((item, child, depth + 1))
        elif isinstance(value, list | tuple):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
        else:
            return path, f"{_kind(value)} is not a JSON value"
    return None


def _utf8_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _max_int_bits() -> int:
    digits = sys.get_int_max_str_digits()
    # 0 means unlimited; otherwise the largest integer printable in `digits` digits.
    return sys.maxsize if digits == 0 else int(digits * math.log2(10))


def _kind(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"
