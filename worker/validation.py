"""Check arguments against a tool's inputSchema before anything is sent."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

from jsonschema import exceptions as js_exceptions
from jsonschema import validators
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource, Unresolvable

from mcpq.worker.contract.arguments import check_arguments
from mcpq.worker.contract.errors import InvalidArgumentsError
from mcpq.worker.contract.redact import is_secret_key

_MAX_LISTED = 5

_lock = threading.Lock()
_cache: dict[str, Any] = {}


def _refuse(uri: str) -> Resource[Any]:
    # A tool's schema is the server's: a `$ref` to a URL must never make a worker
    # fetch it (jsonschema would, by default), or any server could point the
    # fleet at any address. Only refs inside the schema resolve.
    raise NoSuchResource(ref=uri)  # type: ignore[call-arg]  # attrs field alias mypy does not see


#: Resolves nothing outside the schema itself.
_LOCAL_ONLY: Registry[Any] = Registry(retrieve=_refuse)  # type: ignore[call-arg]  # as above


def _validator_for(schema: dict[str, Any]) -> Any:
    key = json.dumps(schema, sort_keys=True)
    validator = _cache.get(key)
    if validator is None:
        cls = validators.validator_for(schema)
        try:
            cls.check_schema(schema)
        except js_exceptions.SchemaError:
            # A server with a broken schema should not block its own tool:
            # the server validates too, so fall back to no local check.
            validator = False
        else:
            validator = cls(schema, registry=_LOCAL_ONLY)
        with _lock:
            if len(_cache) > 4096:
                _cache.clear()
            _cache[key] = validator
    return validator


def _where(error: js_exceptions.ValidationError) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return f"at '{path.lstrip('.')}': " if path else ""


def _problem(error: js_exceptions.ValidationError, secret_patterns: Sequence[str]) -> str:
    path = [str(p) for p in error.absolute_path]
    if any(is_secret_key(p, secret_patterns) for p in path):
        # jsonschema quotes the offending value; a secret's value must not travel in a message.
        return f"{_where(error)}the value fails '{error.validator}' (not shown: the name looks secret)"
    return f"{_where(error)}{error.message}"


def validate_arguments(
    tool: str, schema: dict[str, Any] | None, arguments: Any, secret_patterns: Sequence[str] = ()
) -> None:
    """Raise InvalidArgumentsError listing what is wrong, or return.

    :param tool: the tool's name, for messages.
    :param schema: the tool's inputSchema (None or empty: no schema check).
    :param arguments: the call's arguments; first checked to be JSON the SDK can send.
    :param secret_patterns: argument names whose values messages must not quote.
    """
    check_arguments(arguments, tool, none_means_empty=False)
    if not schema:
        return
    validator = _validator_for(schema)
    if validator is False:
        return
    try:
        errors = sorted(validator.iter_errors(arguments), key=lambda e: list(e.absolute_path))
    except Unresolvable:
        # A `$ref` outside the schema: not fetched, so not checked here; the server validates.
        return
    if not errors:
        return
    problems = [_problem(e, secret_patterns) for e in errors]
    shown = "; ".join(problems[:_MAX_LISTED])
    more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
    raise InvalidArgumentsError(
        f"arguments for {tool!r} do not match its inputSchema: {shown}{more}",
        details={"tool": tool, "problems": problems[:20]},
    )
