"""The chunk result writer against a real redis-server: what Celery readers see,
group commit under concurrency, and a clear error when Redis is gone."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
import redis
from celery import Celery

from mcpq.worker import result_writer
from mcpq.worker.result_writer import ResultWriter
from tests.support.procs import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def make_app(backend_url: str) -> Celery:
    app = Celery("writer-test", broker="memory://", backend=backend_url)
    app.conf.update(result_serializer="json", accept_content=["json"], result_accept_content=["json"])
    return app


def test_results_read_back_as_celery_results_and_are_published(redis_url: str) -> None:
    app = make_app(f"{redis_url}/1")
    writer = ResultWriter(app)
    task_id = f"writer-{uuid.uuid4()}"
    listener = redis.Redis.from_url(f"{redis_url}/1").pubsub()
    listener.subscribe(f"celery-task-meta-{task_id}")
    assert listener.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]

    writer.store(task_id, {"success": True, "tool_name": "echo"})

    meta = app.backend.get_task_meta(task_id)
    assert meta["status"] == "SUCCESS" and meta["result"] == {"success": True, "tool_name": "echo"}
    message = listener.get_message(timeout=5)
    assert message is not None and b'"task_id": "' + task_id.encode() in message["data"]
    ttl = redis.Redis.from_url(f"{redis_url}/1").ttl(f"celery-task-meta-{task_id}")
    assert 0 < ttl <= 86_400  # results expire like Celery's own


def test_concurrent_results_share_round_trips(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(f"{redis_url}/1")
    writer = ResultWriter(app)
    batches: list[int] = []
    write = ResultWriter._write

    def counting(self: ResultWriter, batch: list[Any]) -> Exception | None:
        batches.append(len(batch))
        return write(self, batch)

    monkeypatch.setattr(ResultWriter, "_write", counting)
    ids = [f"writer-{uuid.uuid4()}" for _ in range(200)]
    start = threading.Barrier(len(ids))

    def store(task_id: str) -> None:
        start.wait()
        writer.store(task_id, {"id": task_id})

    threads = [threading.Thread(target=store, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(batches) == 200
    assert len(batches) < 200  # some results went out together
    assert [app.backend.get_task_meta(i)["result"] for i in ids] == [{"id": i} for i in ids]


def test_unreachable_redis_raises_after_its_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(result_writer, "ATTEMPTS", 2)
    monkeypatch.setattr(result_writer, "PAUSE", 0.01)
    app = make_app(f"redis://127.0.0.1:{free_port()}/1")
    with pytest.raises(redis.ConnectionError):
        ResultWriter(app).store("nowhere", {"success": True})


def test_an_unexpected_error_reaches_the_caller_and_the_writer_goes_on(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(f"{redis_url}/1")
    writer = ResultWriter(app)

    def broken(*_: Any, **__: Any) -> Any:
        raise ValueError("not a Redis outage")

    with monkeypatch.context() as patched:
        patched.setattr(redis.Redis, "pipeline", broken)
        with pytest.raises(ValueError, match="not a Redis outage"):
            writer.store("writer-broken", {"success": True})
    task_id = f"writer-{uuid.uuid4()}"
    writer.store(task_id, {"after": True})  # the writer thread survived
    assert app.backend.get_task_meta(task_id)["result"] == {"after": True}
