"""The Celery app: ``celery -A worker worker`` finds it here.

Broker, result backend and shared-state Redis come from ``MCPQ_*`` settings.
JSON is the only serializer accepted anywhere.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, signals

from worker.settings import Settings
from worker.task_names import CALL_TOOL, DISCOVER, HEALTH, RECONNECT

log = logging.getLogger(__name__)


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings.from_env()
    app = Celery(
        "mcpq", broker=settings.broker_url, backend=settings.result_backend, include=["worker.tasks"]
    )
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_default_queue=settings.queue,
        task_routes={name: {"queue": settings.queue} for name in (CALL_TOOL, DISCOVER, HEALTH, RECONNECT)},
        result_expires=settings.result_expires,
        # Tool calls wait on I/O: many threads per process, multiplexed over
        # one MCP session per server, beat one process per call.
        worker_pool="threads",
        worker_concurrency=settings.worker_concurrency,
        broker_connection_retry_on_startup=True,
        # Flower sees every call: sent, started, succeeded (events are JSON;
        # the producer's kwargsrepr keeps argument secrets out of them).
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        result_extended=False,
    )
    return app


app = make_app()


@signals.worker_ready.connect
def _warm_up(sender: Any = None, **_: Any) -> None:
    """Connect and discover in the background so the first call finds a map.

    Only where tasks run in this very process (threads, solo): a prefork
    parent must not open sessions its children would inherit.
    """
    pool_name = type(getattr(sender, "pool", None)).__module__
    if "prefork" in pool_name:
        return

    def warm() -> None:
        from worker.manager import get_manager

        try:
            result = get_manager().discover()
        except Exception as exc:  # warm-up is best effort; calls discover on demand
            log.warning("mcpq warm-up discovery failed: %s", exc)
            return
        for server, outcome in result.items():
            if outcome["ok"]:
                log.info("mcpq: server %r offers %d tools", server, len(outcome["tools"]))
            else:
                log.warning("mcpq: server %r not reachable yet: %s", server, outcome["error"])

    threading.Thread(target=warm, name="mcpq-warmup", daemon=True).start()


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _close_sessions(**_: Any) -> None:
    from worker.manager import shutdown_manager

    shutdown_manager()
