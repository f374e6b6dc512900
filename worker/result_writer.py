"""Stores the results of chunk calls in the result backend, many per round trip.

A chunk's calls finish on many threads at once. Celery's ``store_result``
costs each of them a GET (Celery's guard against a late duplicate overwriting
a SUCCESS) and a SETEX+PUBLISH pipeline: the largest single cost of a chunk
call in the worker (py-spy, docs/benchmarks.md). Here each call hands its
result to one writer thread and waits until it is written (so a chunk is
acknowledged only after its results are stored); the writer writes whatever
has piled up in one pipeline: group commit. At low load a batch is one
result and nothing waits longer than before; under load, N results share one
round trip. The messages are exactly what Celery's Redis backend writes and
publishes, so producers read them as any task result. A duplicate final
result for a call is the one its claim already holds, so overwriting is safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import states
from celery.backends.redis import RedisBackend

log = logging.getLogger(__name__)

#: Results written per pipeline at most.
MAX_BATCH = 256
#: Attempts per batch when Redis is unreachable, with this pause between them.
ATTEMPTS = 20
PAUSE = 0.25


@dataclass(slots=True)
class _Pending:
    key: bytes
    value: str
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None


class ResultWriter:
    """One per worker process (for one Celery app's result backend)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._queue: deque[_Pending] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._redis: RedisBackend | None = None

    def store(self, task_id: str, result: dict[str, Any]) -> None:
        """Store ``result`` as task ``task_id``'s SUCCESS; return once written.
        Raises the last Redis error if it could not be written."""
        backend = self.app.backend
        if not isinstance(backend, RedisBackend):  # other backends: Celery's own path
            backend.store_result(task_id, result, states.SUCCESS)
            return
        meta = {
            "status": states.SUCCESS,
            "result": result,
            "traceback": None,
            "children": [],
            "date_done": self.app.now().isoformat(),
            "task_id": task_id,
        }
        pending = _Pending(backend.get_key_for_task(task_id), backend.encode(meta))
        with self._wake:
            if self._thread is None:
                self._redis = backend
                self._thread = threading.Thread(target=self._run, name="mcpq-results", daemon=True)
                self._thread.start()
            self._queue.append(pending)
            self._wake.notify()
        pending.done.wait()
        if pending.error is not None:
            raise pending.error

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue:
                    self._wake.wait()
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
            try:
                error = self._write(batch)
            except Exception as exc:  # not a Redis outage: no retry, but never leave a caller waiting
                log.exception("could not store %d result(s)", len(batch))
                error = exc
            for item in batch:
                item.error = error
                item.done.set()

    def _write(self, batch: list[_Pending]) -> Exception | None:
        """Write a batch, retrying while Redis is unreachable; the last error, if it never got through."""
        assert self._redis is not None
        backend = self._redis
        error: Exception | None = None
        for attempt in range(ATTEMPTS):
            try:
                with backend.client.pipeline(transaction=False) as pipe:
                    for item in batch:
                        pipe.set(item.key, item.value, ex=backend.expires or None)
                        pipe.publish(item.key, item.value)
                    pipe.execute()
                error = None
                break
            except (redis.RedisError, OSError) as exc:
                error = exc
                if attempt == 0:
                    log.warning("could not store %d result(s), retrying: %s", len(batch), exc)
                time.sleep(PAUSE)
        return error
