"""The Celery app's configuration, shared by producers and workers.

Building the app imports no task module and connects no signal: the worker's
``mcpq.worker.celery`` adds those.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Celery

from mcpq.worker.contract.settings import Settings
from mcpq.worker.contract.task_names import CALL_CHUNK, CALL_TOOL, DISCOVER, HEALTH, RECONNECT


def make_app(settings: Settings | None = None, include: Sequence[str] = ()) -> Celery:
    """The Celery app mcpq's producers and workers share: JSON only, late ack, routes.

    :param settings: where the broker and result backend are; from the environment if None.
    :param include: task modules a worker imports at start (the producer sends by name).
    """
    settings = settings or Settings.from_env()
    app = Celery("mcpq", broker=settings.broker_url, backend=settings.result_backend, include=list(include))
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_default_queue=settings.queue,
        task_routes={
            name: {"queue": settings.queue} for name in (CALL_TOOL, CALL_CHUNK, DISCOVER, HEALTH, RECONNECT)
        },
        result_expires=settings.result_expires,
        # Tool calls wait on I/O: many threads per process, multiplexed over
        # one MCP session per server, beat one process per call.
        worker_pool="threads",
        worker_concurrency=settings.worker_concurrency,
        # Delivery: a message is acknowledged only after its call has a
        # terminal result; a worker that dies returns its calls to the queue.
        # Execution claims (worker/claims.py) make the redelivery safe.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_soft_time_limit=settings.soft_time_limit,
        task_time_limit=settings.time_limit,
        broker_transport_options=_transport_options(settings),
        broker_connection_retry_on_startup=True,
        # Flower sees every call: sent, started, succeeded (events are JSON;
        # the producer's kwargsrepr keeps argument secrets out of them).
        # MCPQ_TASK_EVENTS=0 turns them off where nobody watches.
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
        task_track_started=True,
        result_extended=False,
        # A result write that meets a dropped connection is retried, not turned
        # into a FAILURE of a call that succeeded.
        result_backend_always_retry=True,
        result_backend_max_retries=20,
        # Every socket to the broker and the result backend has a deadline: a
        # host that accepts and never answers (black-holed) is then a
        # connection error the caller hears about, not a hang. The result
        # consumer's pub/sub connection comes from the same pool.
        broker_connection_timeout=settings.connect_timeout,
        redis_socket_timeout=settings.socket_timeout,
        redis_socket_connect_timeout=settings.connect_timeout,
    )
    return app


def _transport_options(settings: Settings) -> dict[str, Any]:
    if not settings.broker_url.startswith(("redis://", "rediss://", "redis+socket://")):
        # AMQP redelivers at once when a consumer's connection drops; py-amqp's
        # own read/write deadlines bound a silent broker.
        return {"read_timeout": settings.socket_timeout, "write_timeout": settings.socket_timeout}
    return {
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.connect_timeout,
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": settings.restore_interval,
        "unacked_restore_throttle": 1,
    }
