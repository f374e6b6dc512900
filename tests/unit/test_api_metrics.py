"""The HTTP API's own ``GET /metrics``: open, out of the OpenAPI document, request
counts and durations by route template (never the raw path), and the fleet-wide
breakers read through the producer's plans. Real Redis behind a real queue."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from mcpq.producer.api import create_app
from mcpq.producer.queue import ToolQueue
from tests.support.procs import free_port
from tests.unit.test_api_auth import KNOWN, TOKEN, bearer

pytestmark = pytest.mark.timeout(30)

# The fixtures of test_api_auth.py: a queue on the suite's Redis with one known server.
from tests.unit.test_api_auth import queue  # noqa: E402, F401


@pytest.fixture()
def client(queue: ToolQueue) -> Iterator[TestClient]:  # noqa: F811
    with TestClient(create_app(settings=queue.settings)) as c:
        yield c


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_count_requests_by_route_template(client: TestClient) -> None:
    assert client.get("/mcp/servers").status_code == 200
    assert client.get("/mcp/servers").status_code == 200
    for _ in range(3):
        task = uuid.uuid4()
        assert client.get(f"/mcp/calls/{task}", headers=bearer()).status_code == 200
    assert client.get(f"/mcp/calls/{uuid.uuid4()}").status_code == 401  # no token
    assert client.get("/mcp/servers/nope/tools").status_code == 404
    assert client.get(f"/no/such/{uuid.uuid4()}").status_code == 404

    answer = client.get("/metrics")  # open: no token
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    text = answer.text
    requests = samples(text, "mcpq_api_requests_total")
    key = lambda route, method, status: (("method", method), ("route", route), ("status", status))  # noqa: E731
    assert requests[key("/mcp/servers", "GET", "200")] == 2
    assert requests[key("/mcp/calls/{task_id}", "GET", "200")] == 3
    assert requests[key("/mcp/calls/{task_id}", "GET", "401")] == 1
    assert requests[key("/mcp/servers/{name}/tools", "GET", "404")] == 1
    assert requests[key("unmatched", "GET", "404")] == 1
    # Bounded labels: no raw path, no id.
    assert "nope" not in text and "/no/such" not in text
    durations = samples(text, "mcpq_api_request_duration_seconds_count")
    assert durations[(("method", "GET"), ("route", "/mcp/calls/{task_id}"))] == 4
    # The fleet-wide breakers, as the workers serve them.
    states = samples(text, "mcpq_breaker_state")
    assert states[(("server", KNOWN), ("state", "closed"))] == 1.0
    assert states[(("server", KNOWN), ("state", "open"))] == 0.0
    assert samples(text, "mcpq_metrics_scrape_errors_total") == {(): 0.0}
    # The scrape itself is counted by the next one.
    again = samples(client.get("/metrics").text, "mcpq_api_requests_total")
    assert again[key("/metrics", "GET", "200")] == 1


def test_metrics_are_not_in_the_openapi_document(client: TestClient) -> None:
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]


def test_metrics_survive_a_dead_state_redis(queue: ToolQueue) -> None:  # noqa: F811
    settings = dataclasses.replace(
        queue.settings, redis_url=f"redis://127.0.0.1:{free_port()}/2", socket_timeout=1.0, admin_token=TOKEN
    )
    with TestClient(create_app(settings=settings)) as c:
        assert c.get("/mcp/servers").status_code == 503
        answer = c.get("/metrics")
        assert answer.status_code == 200
        assert samples(answer.text, "mcpq_breaker_state") == {}
        assert samples(answer.text, "mcpq_metrics_scrape_errors_total") == {(): 1.0}
        requests = samples(answer.text, "mcpq_api_requests_total")  # the rest is served
        assert requests == {(("method", "GET"), ("route", "/mcp/servers"), ("status", "503")): 1.0}
