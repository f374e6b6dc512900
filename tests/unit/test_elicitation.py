"""The elicitation and sampling policy (mcpq.worker.elicitation, docs/interactive.md)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import mcp_types as types
import pytest

from mcpq.worker.config import MCPServerConfig
from mcpq.worker.elicitation import (
    SAMPLING_REJECTED,
    defaults_content,
    elicitation_callback,
    sampling_callback,
)

pytestmark = pytest.mark.timeout(10)

#: The form of the conformance scenario elicitation-sep1034-client-defaults.
SEP1034_FORM: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "default": "John Doe"},
        "age": {"type": "integer", "default": 30},
        "score": {"type": "number", "default": 95.5},
        "status": {"type": "string", "enum": ["active", "inactive", "pending"], "default": "active"},
        "verified": {"type": "boolean", "default": True},
    },
    "required": [],
}

#: The callbacks never read the SDK's request context.
NO_CONTEXT: Any = None


def server(**fields: Any) -> MCPServerConfig:
    return MCPServerConfig(name="s", url="http://127.0.0.1:9/mcp", **fields)


def elicit(
    config: MCPServerConfig, params: types.ElicitRequestParams
) -> types.ElicitResult | types.ErrorData:
    return asyncio.run(elicitation_callback(config)(NO_CONTEXT, params))


def form(schema: dict[str, Any]) -> types.ElicitRequestFormParams:
    return types.ElicitRequestFormParams(message="Please confirm", requested_schema=schema)


def test_policies_default_to_decline() -> None:
    config = server()
    assert config.elicitation == "decline"
    assert config.sampling == "decline"


def test_unknown_policy_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="elicitation"):
        server(elicitation="ask")


def test_every_field_with_a_default_gets_it() -> None:
    content, reason = defaults_content(SEP1034_FORM)
    assert reason == ""
    assert content == {"name": "John Doe", "age": 30, "score": 95.5, "status": "active", "verified": True}


def test_optional_fields_without_a_default_are_left_out() -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "default": "x"}, "note": {"type": "string"}},
        "required": ["name"],
    }
    assert defaults_content(schema) == ({"name": "x"}, "")


def test_a_required_field_without_a_default_cannot_be_filled() -> None:
    schema = {
        "type": "object",
        "properties": {"email": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["email", "age"],
    }
    content, reason = defaults_content(schema)
    assert content is None
    assert reason == "required field(s) age, email have no default"


def test_a_form_with_no_fields_is_accepted_empty() -> None:
    # A bare confirmation: `defaults` accepts it (docs/interactive.md says so).
    assert defaults_content({"type": "object", "properties": {}}) == ({}, "")


@pytest.mark.parametrize(
    ("field", "says"),
    [
        ({"type": "string", "enum": ["a", "b"], "default": "c"}, "is invalid: 'c' is not one of"),
        ({"type": "integer", "default": "thirty"}, "is invalid: 'thirty' is not of type 'integer'"),
        ({"type": "string", "maxLength": 2, "default": "long"}, "is invalid: 'long' is too long"),
        ({"$ref": "http://127.0.0.1:9/field.json", "default": "x"}, "$ref"),
        ({"type": "no-such-type", "default": "x"}, "cannot be checked"),
    ],
)
def test_a_default_its_field_rejects_cannot_be_sent(field: dict[str, Any], says: str) -> None:
    content, reason = defaults_content({"type": "object", "properties": {"f": field}})
    assert content is None
    assert reason.startswith("the default of field 'f' ")
    assert says in reason


def test_a_schema_that_is_not_an_object_cannot_be_filled() -> None:
    assert defaults_content({"type": "string", "default": "x"})[0] is None
    assert defaults_content({"type": "object", "properties": ["a"]})[0] is None


def test_decline_policy_declines_even_a_fillable_form(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "mcpq.worker.elicitation"):
        result = elicit(server(), form(SEP1034_FORM))
    assert result == types.ElicitResult(action="decline")
    assert (
        "server 's' elicited 'Please confirm': declined (the server's config says `elicitation: decline`)"
        in (caplog.text)
    )


def test_defaults_policy_accepts_with_the_defaults() -> None:
    result = elicit(server(elicitation="defaults"), form(SEP1034_FORM))
    assert isinstance(result, types.ElicitResult)
    assert result.action == "accept"
    assert result.content == {
        "name": "John Doe",
        "age": 30,
        "score": 95.5,
        "status": "active",
        "verified": True,
    }


def test_defaults_policy_declines_what_it_cannot_fill_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    schema = {"type": "object", "properties": {"email": {"type": "string"}}, "required": ["email"]}
    with caplog.at_level(logging.WARNING, "mcpq.worker.elicitation"):
        result = elicit(server(elicitation="defaults"), form(schema))
    assert result == types.ElicitResult(action="decline")
    assert "declined (required field(s) email have no default)" in caplog.text


def test_defaults_policy_declines_a_url_elicitation(caplog: pytest.LogCaptureFixture) -> None:
    params = types.ElicitRequestURLParams(
        message="Sign in", url="https://example.com/login", elicitation_id="e1"
    )
    with caplog.at_level(logging.WARNING, "mcpq.worker.elicitation"):
        result = elicit(server(elicitation="defaults"), params)
    assert result == types.ElicitResult(action="decline")
    assert "URL-mode elicitation needs a person" in caplog.text


def test_sampling_is_refused_with_a_message_naming_the_server_and_the_setting() -> None:
    params = types.CreateMessageRequestParams(
        messages=[types.SamplingMessage(role="user", content=types.TextContent(type="text", text="hi"))],
        max_tokens=10,
    )
    result = asyncio.run(sampling_callback(server())(NO_CONTEXT, params))
    assert isinstance(result, types.ErrorData)
    assert result.code == SAMPLING_REJECTED
    assert "server 's'" in result.message
    assert "no model to sample with" in result.message
    assert "`sampling: decline`" in result.message
