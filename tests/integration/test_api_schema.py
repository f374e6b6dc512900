"""Schemathesis against the HTTP API's own OpenAPI document: generated requests
(valid and not) never crash it, and every answer matches what the document
says (status codes, content types, response schemas).

The app runs in-process over ASGI with a real redis-server as broker, result
backend and state Redis, and no worker: the two endpoints that wait on a
worker (``POST /mcp/call``, ``GET /mcp/health``) are left to the integration
tests with real workers, since a generated ``wait`` would only measure the
wait. Examples are bounded so the run takes seconds.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from mcpq.producer.api import create_app
from mcpq.producer.queue import ToolQueue
from mcpq.worker.contract.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TOKEN = "schemathesis-admin-token-0123456789"
KNOWN = "known"
#: Never a 5xx, and every answer as documented. Not "schema-valid data is
#: accepted": a valid-looking request may rightly be refused by state (an
#: idempotency key reused by an earlier example) or by rules a schema cannot
#: state (arguments holding a lone surrogate). Generated requests carry the
#: token; refusing requests without it is test_api_auth.py's job.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def api(redis_url: str) -> Iterator[ToolQueue]:
    tag = uuid.uuid4().hex[:8]
    queue = ToolQueue(
        Settings(
            broker_url=f"{redis_url}/0",
            result_backend=f"{redis_url}/1",
            redis_url=f"{redis_url}/2",
            key_prefix=f"mcpq-schema-{tag}:",
            queue=f"mcpq-schema-{tag}",
            admin_token=TOKEN,
        )
    )
    state = redis.Redis.from_url(f"{redis_url}/2")
    summary = {"name": KNOWN, "transport": "stdio", "command": "python", "args": [], "enabled": True}
    state.hset(queue.keys.servers, KNOWN, json.dumps(summary))
    yield queue
    for key in state.scan_iter(f"{queue.keys.prefix}*"):
        state.delete(key)
    queue.close()


def test_api_answers_as_its_openapi_document_says(api: ToolQueue) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings=api.settings))
    operations = [r.ok() for r in schema.get_all_operations()]
    tested = []
    for operation in operations:
        if operation.path in ("/mcp/call", "/mcp/health"):
            continue
        tested.append(f"{operation.method.upper()} {operation.path}")

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)

        check()
    assert len(tested) >= 8, tested  # the document was read, and the operations with it
