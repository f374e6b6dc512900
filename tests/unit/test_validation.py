"""mcpq.worker.validation: arguments are checked against the tool's inputSchema before sending."""

from __future__ import annotations

from typing import Any

import pytest
from jsonschema import validators

from mcpq.worker.contract.errors import ErrorCode, InvalidArgumentsError
from mcpq.worker.validation import _validator_for, validate_arguments

pytestmark = pytest.mark.timeout(30)

SUM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}


def rejected(schema: dict[str, Any] | None, arguments: Any, tool: str = "get_sum") -> InvalidArgumentsError:
    with pytest.raises(InvalidArgumentsError) as info:
        validate_arguments(tool, schema, arguments)
    err = info.value
    assert err.code == ErrorCode.INVALID_ARGUMENTS
    assert err.details["tool"] == tool
    return err


def test_valid_arguments_pass() -> None:
    assert validate_arguments("get_sum", SUM_SCHEMA, {"a": 1, "b": 2}) is None


def test_missing_required_field() -> None:
    err = rejected(SUM_SCHEMA, {"a": 1})
    assert err.message == "arguments for 'get_sum' do not match its inputSchema: 'b' is a required property"
    assert err.details["problems"] == ["'b' is a required property"]


def test_every_missing_required_field_is_listed() -> None:
    err = rejected(SUM_SCHEMA, {})
    assert "'a' is a required property" in err.message
    assert "'b' is a required property" in err.message
    assert len(err.details["problems"]) == 2


def test_wrong_type_names_the_field() -> None:
    err = rejected(SUM_SCHEMA, {"a": "one", "b": 2})
    assert err.details["problems"] == ["at 'a': 'one' is not of type 'integer'"]
    assert "at 'a': 'one' is not of type 'integer'" in err.message


def test_nested_object_and_array_paths() -> None:
    schema = {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"address": {"type": "object", "properties": {"zip": {"type": "string"}}}},
            },
            "items": {
                "type": "array",
                "items": {"type": "object", "properties": {"qty": {"type": "integer"}}},
            },
        },
    }
    args = {"user": {"address": {"zip": 12345}}, "items": [{"qty": 1}, {"qty": "two"}]}
    err = rejected(schema, args, tool="order")
    assert err.details["problems"] == [
        "at 'items[1].qty': 'two' is not of type 'integer'",
        "at 'user.address.zip': 12345 is not of type 'string'",
    ]
    assert err.message.startswith("arguments for 'order' do not match its inputSchema: at 'items[1].qty'")


def test_enum() -> None:
    schema = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}}}
    err = rejected(schema, {"unit": "k"})
    assert err.details["problems"] == ["at 'unit': 'k' is not one of ['c', 'f']"]


def test_additional_properties_false() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False}
    err = rejected(schema, {"a": 1, "zzz": 2})
    assert "'zzz' was unexpected" in err.message


@pytest.mark.parametrize(
    ("arguments", "kind"), [([1, 2], "list"), ("a=1", "str"), (None, "NoneType"), (3, "int")]
)
def test_non_dict_arguments(arguments: Any, kind: str) -> None:
    err = rejected(SUM_SCHEMA, arguments)
    assert err.message == f"arguments for 'get_sum' must be a JSON object, got {kind}"
    assert "problems" not in err.details


def test_non_dict_arguments_rejected_even_without_schema() -> None:
    err = rejected(None, ["x"])
    assert "must be a JSON object, got list" in err.message


def test_more_than_five_problems_are_summarised() -> None:
    names = [f"p{i}" for i in range(8)]
    schema = {"type": "object", "properties": {n: {"type": "integer"} for n in names}, "required": names}
    err = rejected(schema, {n: "x" for n in names})
    problems = err.details["problems"]
    assert len(problems) == 8
    for shown in problems[:5]:
        assert shown in err.message
    for hidden in problems[5:]:
        assert hidden not in err.message
    assert err.message.endswith(" (and 3 more)")


def test_exactly_five_problems_have_no_summary() -> None:
    names = [f"p{i}" for i in range(5)]
    schema = {"type": "object", "required": names}
    err = rejected(schema, {})
    assert "more)" not in err.message
    assert all(f"'{n}' is a required property" in err.message for n in names)


def test_details_list_at_most_twenty_problems() -> None:
    names = [f"p{i:02d}" for i in range(25)]
    err = rejected({"type": "object", "required": names}, {})
    assert len(err.details["problems"]) == 20
    assert err.message.endswith(" (and 20 more)")


@pytest.mark.parametrize("schema", [None, {}])
def test_no_schema_passes_anything(schema: dict[str, Any] | None) -> None:
    validate_arguments("free", schema, {"anything": [1, {"goes": True}]})


def test_invalid_schema_means_no_local_check() -> None:
    broken = {"type": "object", "properties": {"a": {"type": "no-such-type"}}, "required": ["a"]}
    cls = validators.validator_for(broken)
    with pytest.raises(Exception, match="no-such-type"):
        cls.check_schema(broken)
    # The server validates too; a broken schema must not block its own tool.
    validate_arguments("t", broken, {})
    validate_arguments("t", broken, {"a": "whatever"})
    assert _validator_for(broken) is False


def test_invalid_schema_still_requires_an_object() -> None:
    broken = {"type": 12}
    err = rejected(broken, "nope", tool="t")
    assert "must be a JSON object" in err.message


def test_validator_is_cached_for_equal_schemas() -> None:
    first = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    # Equal content, different object and key order.
    second = {"required": ["q"], "properties": {"q": {"type": "string"}}, "type": "object"}
    v1 = _validator_for(first)
    v2 = _validator_for(second)
    assert v1 is not False
    assert v1 is v2
    other = _validator_for({"type": "object", "required": ["r"]})
    assert other is not v1


def test_cached_validator_still_validates() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "number", "minimum": 0}}}
    validate_arguments("t", schema, {"n": 1})
    err = rejected(schema, {"n": -1}, tool="t")
    assert err.details["problems"] == ["at 'n': -1 is less than the minimum of 0"]
    validate_arguments("t", dict(schema), {"n": 2.5})


def test_draft_is_taken_from_the_schema() -> None:
    # draft-04 exclusiveMaximum is a boolean; a 2020-12 validator would reject the schema itself.
    schema = {
        "$schema": "http://json-schema.org/draft-04/schema#",
        "type": "object",
        "properties": {"n": {"type": "number", "maximum": 10, "exclusiveMaximum": True}},
    }
    validate_arguments("t", schema, {"n": 9})
    err = rejected(schema, {"n": 10}, tool="t")
    assert err.details["problems"][0].startswith("at 'n': 10 is greater than or equal to the maximum of 10")


def test_values_of_secret_looking_fields_are_not_quoted() -> None:
    schema = {"type": "object", "properties": {"api_key": {"type": "integer"}, "n": {"type": "integer"}}}
    with pytest.raises(InvalidArgumentsError) as caught:
        validate_arguments("t", schema, {"api_key": "SECRET-VALUE-1", "n": "visible"}, ["key", "token"])
    message = caught.value.message
    assert "SECRET-VALUE-1" not in message and "SECRET-VALUE-1" not in str(caught.value.details)
    assert "at 'api_key': the value fails 'type'" in message
    assert "'visible' is not of type 'integer'" in message  # other fields keep their detail


def test_a_remote_ref_is_never_fetched() -> None:
    """A server's schema must not make a worker fetch a URL: a canary server counts requests."""
    import http.server
    import threading

    hits: list[str] = []

    class Canary(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            body = b'{"type": "integer"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/schema+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Canary)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/canary.json"
        schema = {
            "type": "object",
            "properties": {"n": {"$ref": url}, "m": {"$ref": "#/$defs/small"}},
            "$defs": {"small": {"type": "integer", "maximum": 3}},
        }
        validate_arguments("remote", schema, {"n": 5, "m": 1}, ())
        # Refs inside the schema still resolve.
        assert rejected(schema, {"m": 9}).code == ErrorCode.INVALID_ARGUMENTS
    finally:
        server.shutdown()
        thread.join(5)
    assert hits == []
