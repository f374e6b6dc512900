"""What a worker answers when a server asks *it* something in the middle of a call.

A handshake-era server may send ``elicitation/create`` (ask the user for input)
or ``sampling/createMessage`` (ask the client's model) while a queued call
holds its session; a 2026-07-28 server embeds the same requests in an
input-required result, which the SDK's ``Client.call_tool`` answers through the
same callbacks. Nobody is at the worker to ask, so the server's config decides
(docs/interactive.md):

* ``elicitation: decline`` (the default): every elicitation is declined.
* ``elicitation: defaults``: a form is accepted with the defaults its requested
  schema declares (SEP-1034), when those fill every required field and each one
  is valid for its field; any other form, and every URL-mode elicitation, is
  declined.
* ``sampling: decline`` (the only choice today): sampling is refused with an
  error that says why, since a worker has no model to sample with.

Every decline is logged with the server and the reason: an ``ElicitResult``
has no field to carry one back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import mcp_types as types
from jsonschema import exceptions as js_exceptions
from jsonschema import validators
from mcp.client.session import ClientRequestContext, ElicitationFnT, SamplingFnT

from mcpq.worker.config import MCPServerConfig

log = logging.getLogger(__name__)

#: The JSON-RPC error code the spec's sampling page shows for a request the client rejects.
SAMPLING_REJECTED = -1

#: What a form field's value may be (``ElicitResult.content``'s value types).
ContentValue = str | int | float | bool | list[str] | None


def defaults_content(requested_schema: Mapping[str, Any]) -> tuple[dict[str, ContentValue] | None, str]:
    """The content to accept a form with, from its schema's defaults, or why there is none.

    Each property with a ``default`` gets it; an optional property without one is
    left out (the server applies its own default, or none); a required property
    without one means the form cannot be filled. A default that its own property
    schema rejects (wrong type, not in the enum, too long) also means the form
    cannot be filled: sending it would only make the server fail later.

    :param requested_schema: the form's ``requestedSchema`` (an object schema of primitive fields).
    :returns: ``(content, "")``, or ``(None, reason)`` when the form cannot be accepted.
    """
    if requested_schema.get("type", "object") != "object":
        return None, f"the requested schema is of type {requested_schema.get('type')!r}, not an object"
    properties = requested_schema.get("properties") or {}
    if not isinstance(properties, Mapping):
        return None, "the requested schema's properties are not an object"
    required = requested_schema.get("required") or []
    missing = sorted(str(name) for name in required if "default" not in (properties.get(name) or {}))
    if missing:
        return None, f"required field(s) {', '.join(missing)} have no default"
    content: dict[str, ContentValue] = {}
    for name, schema in properties.items():
        if not isinstance(schema, Mapping) or "default" not in schema:
            continue
        problem = _invalid_default(schema)
        if problem:
            return None, f"the default of field {name!r} {problem}"
        content[str(name)] = schema["default"]
    return content, ""


def _invalid_default(schema: Mapping[str, Any]) -> str:
    """Why a property's ``default`` does not satisfy the property's own schema ("" if it does).

    :param schema: one property of a requested schema, with a ``default``.
    """
    if "$ref" in schema:
        # Elicitation fields are flat primitives; a reference is not one, and resolving
        # it could mean fetching a URL the server chose.
        return "belongs to a field with a $ref, which elicitation schemas do not allow"
    field = {k: v for k, v in schema.items() if k != "default"}
    try:
        cls = validators.validator_for(field)
        cls.check_schema(field)
        error = js_exceptions.best_match(cls(field).iter_errors(schema["default"]))
    except (js_exceptions.SchemaError, js_exceptions.ValidationError) as exc:
        return f"cannot be checked: {exc.message}"
    except Exception as exc:  # a schema jsonschema cannot work with at all: do not guess
        return f"cannot be checked: {exc}"
    return f"is invalid: {error.message}" if error is not None else ""


def elicitation_callback(config: MCPServerConfig) -> ElicitationFnT:
    """The SDK ``elicitation_callback`` for one server, by its ``elicitation`` policy.

    :param config: the server's config (its name goes into every log line).
    """
    server = config.name
    policy = config.elicitation

    async def answer(
        context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult | types.ErrorData:
        if policy == "defaults" and isinstance(params, types.ElicitRequestFormParams):
            content, reason = defaults_content(params.requested_schema)
            if content is not None:
                log.info("server %r elicited %r: accepted with the schema's defaults", server, params.message)
                return types.ElicitResult(action="accept", content=content)
        elif policy == "defaults":
            reason = "a URL-mode elicitation needs a person to open the URL"
        else:
            reason = "the server's config says `elicitation: decline`"
        log.warning("server %r elicited %r: declined (%s)", server, params.message, reason)
        return types.ElicitResult(action="decline")

    return answer


def sampling_callback(config: MCPServerConfig) -> SamplingFnT:
    """The SDK ``sampling_callback`` for one server: refuses with a message that says why.

    :param config: the server's config (its name goes into the message).
    """
    server = config.name

    async def answer(
        context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult | types.CreateMessageResultWithTools | types.ErrorData:
        message = (
            f"sampling/createMessage declined: server {server!r} asked an mcpq worker for a model "
            "completion while it ran a queued tool call; the worker has no model to sample with "
            "(server config `sampling: decline`)"
        )
        log.warning("%s", message)
        return types.ErrorData(code=SAMPLING_REJECTED, message=message)

    return answer
