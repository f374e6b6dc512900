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
from worker.task_names import CALL_CHUNK, CALL_TOOL, DISCOVER, HEALTH, RECONNECT

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
    )
    return app


def _transport_options(settings: Settings) -> dict[str, Any]:
    if not settings.broker_url.startswith(("redis://", "rediss://", "redis+socket://")):
        return {}  # AMQP redelivers at once when a consumer's connection drops
    return {
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": settings.restore_interval,
        "unacked_restore_throttle": 1,
    }


app = make_app()


@signals.worker_init.connect
def _check_config(**_: Any) -> None:
    """Refuse to start with a config that cannot be served safely."""
    # The SDK's HTTP client logs every request at INFO: one line per call.
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "mcp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from worker.budgets import check_time_budgets
    from worker.config import load_config
    from worker.errors import ConfigError

    settings = Settings.from_env()
    try:
        check_time_budgets(settings, load_config(settings.config_path))
    except ConfigError as exc:
        log.critical("mcpq worker refused to start: %s", exc.message)
        raise SystemExit(2) from None


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
        from worker.tasks import start_sweeper

        try:
            manager = get_manager()
            start_sweeper(manager)  # calls the broker lost are found even on an idle worker
            result = manager.discover()
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
