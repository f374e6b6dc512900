"""mcpq.producer.api without a worker: admin auth on every mutating endpoint, the
error body shape, request validation, and the status table.

Real Redis (the suite's private redis-server) behind a real ToolQueue; calls
that would need a worker are only enqueued, and the queue is dropped after.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from mcpq.producer.aio import AsyncToolQueue
from mcpq.producer.api import create_app
from mcpq.producer.api_errors import STATUS_BY_CODE, result_response
from mcpq.producer.queue import ToolQueue
from mcpq.worker.contract.errors import ErrorCode
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.settings import Settings
from mcpq.worker.contract.unreachable import unreachable_cause
from tests.support.procs import free_port

pytestmark = pytest.mark.timeout(30)

TOKEN = "s3cret-admin-token"
KNOWN = "known"

#: (method, path, json body) of every admin endpoint; the body is valid, and
#: the paths name a server the fixture publishes.
ADMIN_ENDPOINTS: list[tuple[str, str, Any]] = [
    ("POST", "/mcp/call", {"tool": f"{KNOWN}/add", "arguments": {"a": 1, "b": 2}, "wait": 0.3}),
    ("POST", "/mcp/calls", [{"tool": f"{KNOWN}/add", "arguments": {"a": 1, "b": 2}}]),
    ("GET", f"/mcp/calls/{uuid.uuid4()}", None),
    ("GET", f"/mcp/calls/{uuid.uuid4()}/events", None),
    ("DELETE", f"/mcp/calls/{uuid.uuid4()}", None),
    ("POST", f"/mcp/circuit-breakers/{KNOWN}/reset", None),
    ("POST", f"/mcp/servers/{KNOWN}/reconnect", None),
]
ADMIN_IDS = [
    f"{m} {p.split('/')[2]}{'/id' if p.count('/') > 2 else ''}{'/events' if p.endswith('events') else ''}"
    for m, p, _ in ADMIN_ENDPOINTS
]
#: What each admin endpoint answers with the right token and no worker running.
AUTHORIZED_STATUS = {
    "/mcp/call": 504,  # enqueued; no worker answered within "wait"
    "/mcp/calls": 202,
    "/mcp/calls/": 200,  # PENDING
    "reset": 200,
    "reconnect": 200,
}


def expected_authorized(method: str, path: str) -> int:
    if path.startswith("/mcp/calls/") and (method == "DELETE" or path.endswith("/events")):
        return 404  # call_not_found: nobody submitted that id
    if path.startswith("/mcp/calls/"):
        return AUTHORIZED_STATUS["/mcp/calls/"]
    return AUTHORIZED_STATUS.get(path) or AUTHORIZED_STATUS[path.rsplit("/", 1)[1]]


def make_settings(redis_url: str, tag: str, token: str | None) -> Settings:
    return Settings(
        broker_url=f"{redis_url}/0",
        result_backend=f"{redis_url}/1",
        redis_url=f"{redis_url}/2",
        key_prefix=f"mcpq-apitest-{tag}:",
        queue=f"mcpq-apitest-{tag}",
        admin_token=token,
    )


@pytest.fixture()
def queue(redis_url: str) -> Iterator[ToolQueue]:
    tag = uuid.uuid4().hex[:8]
    q = ToolQueue(make_settings(redis_url, tag, TOKEN))
    # What a worker publishes on start: one known server (with stdio args that
    # may hold secrets), no tools discovered yet.
    summary = {
        "name": KNOWN,
        "transport": "stdio",
        "command": "python",
        "args": ["server.py", "--api-key", "hunter2"],
        "enabled": True,
        "description": "a test server",
    }
    q.redis.hset(q.keys.servers, KNOWN, json.dumps(summary))
    try:
        yield q
    finally:
        for key in q.redis.scan_iter(f"{q.keys.prefix}*"):
            q.redis.delete(key)
        broker = redis.Redis.from_url(q.settings.broker_url)
        broker.delete(q.settings.queue, f"_kombu.binding.{q.settings.queue}")
        broker.close()
        q.close()


@pytest.fixture()
def client(queue: ToolQueue) -> Iterator[TestClient]:
    with TestClient(create_app(settings=queue.settings)) as c:
        yield c


@pytest.fixture()
def tokenless_client(queue: ToolQueue) -> Iterator[TestClient]:
    """The API with MCPQ_ADMIN_TOKEN unset."""
    settings = dataclasses.replace(queue.settings, admin_token=None)
    with TestClient(create_app(settings=settings)) as c:
        yield c


def send(
    client: TestClient, method: str, path: str, body: Any = None, headers: dict[str, Any] | None = None
) -> Any:
    return client.request(method, path, json=body, headers=headers or {})


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["error_code"] == code, body
    assert isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in response.text
    return body


# --------------------------------------------------------------------------- auth, per endpoint


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ENDPOINTS, ids=ADMIN_IDS)
def test_no_token_configured_refuses_with_a_hint(
    tokenless_client: TestClient, method: str, path: str, body: Any
) -> None:
    for headers in ({}, bearer(), bearer("anything")):
        answer = send(tokenless_client, method, path, body, headers)
        error = assert_error(answer, 403, "admin_disabled")
        assert "MCPQ_ADMIN_TOKEN" in error["error"]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ENDPOINTS, ids=ADMIN_IDS)
def test_missing_header_is_401(client: TestClient, method: str, path: str, body: Any) -> None:
    answer = send(client, method, path, body)
    assert_error(answer, 401, "unauthorized")
    assert answer.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ENDPOINTS, ids=ADMIN_IDS)
def test_wrong_token_is_401(client: TestClient, method: str, path: str, body: Any) -> None:
    for headers in (
        bearer("wrong"),
        bearer(TOKEN + "x"),
        bearer(TOKEN[:-1]),
        {"Authorization": TOKEN},  # no scheme
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer t\u00f6ken".encode("latin-1")},  # not ASCII: still 401, never 500
    ):
        answer = send(client, method, path, body, headers)
        assert_error(answer, 401, "unauthorized")
        assert answer.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ENDPOINTS, ids=ADMIN_IDS)
def test_right_token_passes(client: TestClient, method: str, path: str, body: Any) -> None:
    answer = send(client, method, path, body, bearer())
    assert answer.status_code not in (401, 403), answer.text
    assert answer.status_code == expected_authorized(method, path), answer.text
    # The scheme is case-insensitive (RFC 7235).
    again = send(client, method, path, body, {"Authorization": f"bearer {TOKEN}"})
    assert again.status_code not in (401, 403), again.text


def test_open_endpoints_need_no_token(client: TestClient, tokenless_client: TestClient) -> None:
    for c in (client, tokenless_client):
        servers = c.get("/mcp/servers")
        assert servers.status_code == 200
        (known,) = servers.json()
        assert known["name"] == KNOWN and known["description"] == "a test server"
        assert known["tools"] is None
        # stdio args may carry secrets expanded from ${VAR}: the open listing drops them.
        assert "args" not in known and "hunter2" not in servers.text
        assert c.get("/mcp/tools").json() == []
        assert c.get(f"/mcp/servers/{KNOWN}/tools").json() == []
        breakers = c.get("/mcp/circuit-breakers")
        assert breakers.status_code == 200 and breakers.json()[KNOWN]["state"] == "closed"


def test_auth_is_checked_before_the_body_is_parsed(client: TestClient) -> None:
    # An unauthenticated caller learns nothing from validation errors.
    answer = client.post("/mcp/call", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(answer, 401, "unauthorized")


# --------------------------------------------------------------------------- validation and errors


def test_malformed_json_is_422_invalid_arguments(client: TestClient) -> None:
    for path in ("/mcp/call", "/mcp/calls"):
        answer = client.post(
            path, content=b'{"tool": "add",', headers={"content-type": "application/json", **bearer()}
        )
        body = assert_error(answer, 422, "invalid_arguments")
        assert body["details"]["errors"][0]["type"] == "json_invalid"
        assert "JSON" in body["error"]


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"arguments": {"a": 1}},
        {"tool": ""},
        {"tool": "add", "arguments": "secret-value-123"},
        {"tool": "add", "arguments": [1, 2]},
        {"tool": "add", "timeout": -1},
        {"tool": "add", "wait": 0},
        {"tool": "add", "args": {"a": 1}},  # a typo of "arguments" is not silently ignored
        [{"tool": "add"}],  # /mcp/call takes one call
    ],
)
def test_invalid_call_bodies_are_422(client: TestClient, payload: Any) -> None:
    answer = client.post("/mcp/call", json=payload, headers=bearer())
    body = assert_error(answer, 422, "invalid_arguments")
    assert body["details"]["errors"]
    assert "secret-value-123" not in answer.text  # the input is never echoed back


def test_batch_validation(client: TestClient) -> None:
    assert_error(client.post("/mcp/calls", json=[], headers=bearer()), 422, "invalid_arguments")
    too_many = [{"tool": "add"}] * 1001
    assert_error(client.post("/mcp/calls", json=too_many, headers=bearer()), 422, "invalid_arguments")
    # One bad call refuses the whole batch: nothing is enqueued.
    mixed = [{"tool": "add"}, {"tool": "add", "arguments": 3}]
    body = assert_error(client.post("/mcp/calls", json=mixed, headers=bearer()), 422, "invalid_arguments")
    assert any(1 in e["loc"] for e in body["details"]["errors"])


def test_unknown_server_is_404_server_not_found(client: TestClient) -> None:
    for path in ("/mcp/circuit-breakers/nope/reset", "/mcp/servers/nope/reconnect"):
        body = assert_error(client.post(path, headers=bearer()), 404, "server_not_found")
        assert "nope" in body["error"]
    assert_error(client.get("/mcp/servers/nope/tools"), 404, "server_not_found")


def test_unknown_route_and_method_have_the_error_shape(client: TestClient) -> None:
    assert_error(client.get("/mcp/nothing-here"), 404, "not_found")
    answer = client.delete("/mcp/servers")
    assert_error(answer, 405, "method_not_allowed")
    assert "GET" in answer.headers["allow"]


def test_reset_and_reconnect_answers(client: TestClient, queue: ToolQueue) -> None:
    queue.redis.hset(queue.keys.breaker(KNOWN), mapping={"state": "open", "failures": 5})
    assert client.get("/mcp/circuit-breakers").json()[KNOWN]["state"] != "closed"
    reset = client.post(f"/mcp/circuit-breakers/{KNOWN}/reset", headers=bearer())
    assert reset.json() == {"server": KNOWN, "cleared": True, "state": "closed"}
    assert client.get("/mcp/circuit-breakers").json()[KNOWN]["state"] == "closed"
    again = client.post(f"/mcp/circuit-breakers/{KNOWN}/reset", headers=bearer())
    assert again.json()["cleared"] is False
    first = client.post(f"/mcp/servers/{KNOWN}/reconnect", headers=bearer()).json()
    second = client.post(f"/mcp/servers/{KNOWN}/reconnect", headers=bearer()).json()
    assert first["server"] == KNOWN and second["epoch"] == first["epoch"] + 1


def test_enqueue_returns_ids_and_unknown_ids_read_as_pending(client: TestClient) -> None:
    calls = [{"tool": f"{KNOWN}/add", "arguments": {"a": i, "b": 1}} for i in range(3)]
    answer = client.post("/mcp/calls", json=calls, headers=bearer())
    assert answer.status_code == 202, answer.text
    accepted = answer.json()["calls"]
    assert len({c["task_id"] for c in accepted}) == 3
    for call in accepted:
        assert call["url"] == f"/mcp/calls/{call['task_id']}"
        status = client.get(call["url"], headers=bearer()).json()
        assert status == {"task_id": call["task_id"], "state": "PENDING", "ready": False, "result": None}
    single = client.post("/mcp/calls", json=calls[0], headers=bearer())
    assert single.status_code == 202 and single.headers["location"] == single.json()["calls"][0]["url"]
    # Celery cannot tell an unknown id from a queued call.
    unknown = client.get("/mcp/calls/never-submitted", headers=bearer()).json()
    assert unknown["state"] == "PENDING" and unknown["ready"] is False


def test_idempotency_keys(client: TestClient) -> None:
    call = {"tool": f"{KNOWN}/add", "arguments": {"a": 1, "b": 2}, "idempotency_key": uuid.uuid4().hex}
    first = client.post("/mcp/calls", json=call, headers=bearer()).json()["calls"][0]["task_id"]
    second = client.post("/mcp/calls", json=call, headers=bearer()).json()["calls"][0]["task_id"]
    assert first == second
    other = {**call, "arguments": {"a": 9, "b": 9}}
    body = assert_error(
        client.post("/mcp/calls", json=[call, other], headers=bearer()), 422, "invalid_arguments"
    )
    assert body["details"]["index"] == 1 and body["details"]["enqueued"] == [first]


def test_call_without_a_worker_is_504_with_the_task_to_poll(client: TestClient) -> None:
    answer = client.post(
        "/mcp/call", json={"tool": f"{KNOWN}/add", "arguments": {"a": 1}, "wait": 0.3}, headers=bearer()
    )
    body = assert_error(answer, 504, "timeout")
    task_id = body["details"]["task_id"]
    assert body["success"] is False and body["request_id"] == task_id
    assert answer.headers["location"] == f"/mcp/calls/{task_id}"
    assert client.get(answer.headers["location"], headers=bearer()).json()["state"] == "PENDING"


def test_health_without_a_worker_is_503(client: TestClient) -> None:
    body = assert_error(client.get("/mcp/health", params={"wait": 0.5}), 503, "connection_error")
    assert "worker" in body["error"]
    assert_error(client.get("/mcp/health", params={"wait": 0}), 422, "invalid_arguments")
    assert_error(client.get("/mcp/health", params={"wait": 31}), 422, "invalid_arguments")  # open: capped


def test_health_of_an_unknown_server_is_404_at_once(client: TestClient) -> None:
    import time

    started = time.monotonic()
    body = assert_error(
        client.get("/mcp/health", params={"server": "nope", "wait": 20}), 404, "server_not_found"
    )
    assert time.monotonic() - started < 5  # no wait for a worker that would answer the same
    assert "nope" in body["error"]


def test_redis_and_broker_unreachable_are_503(redis_url: str) -> None:
    dead = f"redis://127.0.0.1:{free_port()}"
    # A live result backend keeps Celery's result consumer out of this: its
    # reconnect loop alone takes ~20 s (covered by test_unreachable_cause_*).
    settings = dataclasses.replace(make_settings(dead, "dead", TOKEN), result_backend=f"{redis_url}/1")
    queue = ToolQueue(settings)
    try:
        with TestClient(create_app(settings=settings)) as c:
            for path in ("/mcp/servers", "/mcp/tools", "/mcp/circuit-breakers"):
                body = assert_error(c.get(path), 503, "connection_error")
                assert "127.0.0.1" in body["error"]
            assert_error(c.post(f"/mcp/servers/{KNOWN}/reconnect", headers=bearer()), 503, "connection_error")
            body = assert_error(
                c.post("/mcp/calls", json={"tool": "add"}, headers=bearer()), 503, "connection_error"
            )
            assert body["details"]["enqueued"] == [] and body["details"]["index"] == 0
            body = assert_error(
                c.post("/mcp/call", json={"tool": "add"}, headers=bearer()), 503, "connection_error"
            )
            assert body["success"] is False and body["tool_name"] == "add"
    finally:
        queue.close()


def wrapped_unreachable() -> RuntimeError:
    """What Celery raises when its Redis connection is gone for good."""
    try:
        raise RuntimeError("Retry limit exceeded while trying to reconnect") from redis.ConnectionError(
            "Connection refused"
        )
    except RuntimeError as exc:
        return exc


def test_call_turns_a_wrapped_unreachable_enqueue_into_a_503_tool_result(
    client: TestClient, queue: ToolQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # POST /mcp/call goes through ToolQueue.call: an enqueue that fails because a
    # server is unreachable is a connection_error ToolResult, not an error body.
    def unreachable_submit(*args: Any, **kwargs: Any) -> Any:
        raise wrapped_unreachable()

    async def unreachable_async_submit(*args: Any, **kwargs: Any) -> Any:
        raise wrapped_unreachable()

    monkeypatch.setattr(queue, "submit", unreachable_submit)
    monkeypatch.setattr(AsyncToolQueue, "submit", unreachable_async_submit)
    answer = client.post("/mcp/call", json={"tool": "add", "server": KNOWN}, headers=bearer())
    body = assert_error(answer, 503, "connection_error")
    assert body["success"] is False and body["tool_name"] == f"{KNOWN}/add"
    assert "Connection refused" in body["error"]
    direct = queue.call("add", server=KNOWN)
    assert direct.error_code == "connection_error" and direct.error == body["error"]


def test_call_raises_what_is_not_unreachable(queue: ToolQueue, monkeypatch: pytest.MonkeyPatch) -> None:
    def buggy_submit(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    async def buggy_async_submit(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(queue, "submit", buggy_submit)
    monkeypatch.setattr(AsyncToolQueue, "submit", buggy_async_submit)
    with pytest.raises(RuntimeError, match="a bug"):
        queue.call("add")
    with TestClient(create_app(settings=queue.settings), raise_server_exceptions=False) as c:
        assert_error(c.post("/mcp/call", json={"tool": "add"}, headers=bearer()), 500, "internal_error")


def test_call_with_a_reused_idempotency_key_is_422(client: TestClient) -> None:
    key = uuid.uuid4().hex
    first = {"tool": f"{KNOWN}/add", "arguments": {"a": 1}, "idempotency_key": key}
    assert client.post("/mcp/calls", json=first, headers=bearer()).status_code == 202
    other = {**first, "arguments": {"a": 2}, "wait": 0.3}
    body = assert_error(client.post("/mcp/call", json=other, headers=bearer()), 422, "invalid_arguments")
    assert body["success"] is False and body["details"]["idempotency_key"] == key


def test_queue_call_timeout_names_the_task(queue: ToolQueue) -> None:
    timed_out = queue.call(f"{KNOWN}/add", {"a": 1}, wait=0.3)
    assert timed_out.error_code == "timeout"
    assert timed_out.request_id is not None and timed_out.request_id == timed_out.details["task_id"]
    # A caller's own request id is kept as given.
    mine = str(uuid.uuid4())
    assert queue.call(f"{KNOWN}/add", {"a": 1}, request_id=mine, wait=0.3).request_id == mine


def test_unreachable_cause_is_found_through_celery_wrappers() -> None:
    try:
        try:
            raise redis.ConnectionError("Connection refused")
        except redis.ConnectionError as exc:
            raise RuntimeError("Retry limit exceeded while trying to reconnect") from exc
    except RuntimeError as wrapped:
        cause = unreachable_cause(wrapped)
    assert isinstance(cause, redis.ConnectionError)
    assert unreachable_cause(RuntimeError("unrelated")) is None
    assert unreachable_cause(redis.ResponseError("WRONGTYPE")) is None


# --------------------------------------------------------------------------- the status table


def test_every_error_code_has_a_status() -> None:
    for code in ErrorCode:
        assert code.value in STATUS_BY_CODE, code
    assert STATUS_BY_CODE["tool_error"] == 200  # the tool ran; success=false says how
    assert {STATUS_BY_CODE[c] for c in ("tool_not_found", "server_not_found")} == {404}
    assert STATUS_BY_CODE["ambiguous_tool"] == 409
    assert STATUS_BY_CODE["invalid_arguments"] == 422
    assert STATUS_BY_CODE["circuit_open"] == STATUS_BY_CODE["connection_error"] == 503
    assert STATUS_BY_CODE["timeout"] == 504
    assert STATUS_BY_CODE["limit_exceeded"] == 429
    assert STATUS_BY_CODE["result_too_large"] == 413
    assert STATUS_BY_CODE["internal_error"] == 500


def test_result_status_and_retry_after() -> None:
    def failed(code: str, **details: Any) -> ToolResult:
        return ToolResult(success=False, tool_name="t", error="x", error_code=code, details=details)

    opened = result_response(failed("circuit_open", retry_after=2.3))
    assert opened.status_code == 503 and opened.headers["retry-after"] == "3"
    probing = result_response(failed("circuit_open", retry_after=0))
    assert probing.headers["retry-after"] == "1"
    limited = result_response(failed("limit_exceeded", retry_after=0.2))
    assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
    assert "retry-after" not in result_response(failed("circuit_open")).headers
    assert "retry-after" not in result_response(failed("timeout", retry_after=5)).headers
    assert result_response(failed("no_such_code")).status_code == 500
    tool_error = result_response(failed("tool_error"))
    assert tool_error.status_code == 200 and json.loads(tool_error.body)["success"] is False
    ok = ToolResult.ok("t", "s", {"content": [], "structuredContent": {"result": 1}, "isError": False})
    assert result_response(ok).status_code == 200


def test_openapi_lists_every_endpoint_and_marks_admin_ones(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    paths = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert paths == {
        ("GET", "/mcp/servers"),
        ("GET", "/mcp/servers/{name}/tools"),
        ("GET", "/mcp/tools"),
        ("GET", "/mcp/health"),
        ("GET", "/mcp/circuit-breakers"),
        ("POST", "/mcp/call"),
        ("POST", "/mcp/calls"),
        ("GET", "/mcp/calls/{task_id}"),
        ("GET", "/mcp/calls/{task_id}/events"),
        ("DELETE", "/mcp/calls/{task_id}"),
        ("POST", "/mcp/circuit-breakers/{name}/reset"),
        ("POST", "/mcp/servers/{name}/reconnect"),
    }
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            admin = method == "post" or path.startswith("/mcp/calls")
            assert bool(op.get("security")) == admin, (method, path)
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ('{"tool": "x", "arguments": {"d": ' + "[" * 5000 + "]" * 5000 + "}}", "could not be parsed"),
        ('{"tool": "x", "arguments": {"n": ' + "9" * 5000 + "}}", "could not be parsed"),
        ('{"tool": "x", "arguments": {"n": NaN}}', "not a JSON number"),
        ('{"tool": "x", "arguments": {"s": "\\ud800"}}', "lone surrogate"),
    ],
    ids=["deep", "huge-int", "nan", "surrogate"],
)
def test_bodies_the_api_cannot_carry_are_422(client: TestClient, body: str, says: str) -> None:
    response = client.post(
        "/mcp/calls", content=body, headers={**bearer(), "Content-Type": "application/json"}
    )
    error = assert_error(response, 422, "invalid_arguments")
    assert says in error["error"]
