"""check_arguments: the JSON values every hop can carry, refused with the path of the bad value."""

from __future__ import annotations

import json
from typing import Any

import pydantic_core
import pytest

from mcpq.worker.contract.arguments import MAX_ARGUMENT_DEPTH, check_arguments
from mcpq.worker.contract.errors import ErrorCode, InvalidArgumentsError

pytestmark = pytest.mark.timeout(10)


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def refused(arguments: Any) -> InvalidArgumentsError:
    with pytest.raises(InvalidArgumentsError) as info:
        check_arguments(arguments, "t")
    assert info.value.code is ErrorCode.INVALID_ARGUMENTS
    return info.value


@pytest.mark.parametrize(
    ("arguments", "path", "says"),
    [
        ({"text": "ok \ud800"}, "text", "lone surrogate"),
        ({"a": {"b": ["x", "\udfff"]}}, "a.b[1]", "lone surrogate"),
        ({"k\ud800": 1}, "k\ud800", "key holds a lone surrogate"),
        ({"x": float("nan")}, "x", "not a JSON number"),
        ({"x": [float("inf")]}, "x[0]", "not a JSON number"),
        ({"x": -float("inf")}, "x", "not a JSON number"),
        ({"n": 10**5000}, "n", "digits"),
        ({"d": {1: "a"}}, "d", "keys must be strings"),
        ({"s": {1, 2}}, "s", "a set is not a JSON value"),
        ({"b": b"raw"}, "b", "a bytes is not a JSON value"),
        ({"deep": nested(MAX_ARGUMENT_DEPTH + 5)}, None, f"deeper than {MAX_ARGUMENT_DEPTH}"),
    ],
)
def test_values_the_sdk_cannot_send_are_refused(arguments: Any, path: str | None, says: str) -> None:
    err = refused(arguments)
    assert says in err.message
    if path is not None:
        assert err.details["path"] == path
    assert err.details["tool"] == "t"


def test_what_is_refused_really_breaks_the_sdks_serializer_or_json() -> None:
    # The reason for the rule: each of these fails (or is silently changed) downstream.
    with pytest.raises(pydantic_core.PydanticSerializationError):
        pydantic_core.to_json({"text": "\ud800"})
    import mcp_types

    request = mcp_types.CallToolRequest(
        params=mcp_types.CallToolRequestParams(name="t", arguments={"x": float("nan")})
    )
    assert '"arguments":{"x":null}' in request.model_dump_json(by_alias=True)  # NaN sent as null, silently
    with pytest.raises(ValueError):
        json.dumps({"n": 10**5000})
    with pytest.raises(pydantic_core.PydanticSerializationError):
        pydantic_core.to_json({"params": {"arguments": {"deep": nested(255)}}})


@pytest.mark.parametrize(
    "arguments",
    [
        None,
        {},
        {"text": "emoji \U0001f600 and accents é"},
        {"n": 10**300, "f": 1e308, "neg": -0.0, "b": True, "z": None},
        {"list": [1, "two", [3.5, {"four": 4}]], "tuple": (1, 2)},
        {"deep": nested(MAX_ARGUMENT_DEPTH - 2)},
    ],
)
def test_json_values_pass(arguments: Any) -> None:
    check_arguments(arguments, "t")
    pydantic_core.to_json(arguments)  # and the SDK's serializer agrees


def test_non_objects_are_refused() -> None:
    assert "must be a JSON object, got list" in refused([1]).message
    with pytest.raises(InvalidArgumentsError, match="got NoneType"):
        check_arguments(None, "t", none_means_empty=False)


def test_a_value_nested_thousands_deep_costs_no_recursion() -> None:
    assert "deeper than" in refused({"deep": nested(50_000)}).message
