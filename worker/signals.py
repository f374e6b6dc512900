"""The worker's Celery signal handlers: refuse a bad config, start the metrics,
warm up, close sessions.

Connected when ``mcpq.worker.celery`` (what ``celery -A mcpq.worker`` loads)
is imported; producers never import this module.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from celery import signals

from mcpq.worker.contract.settings import Settings

if TYPE_CHECKING:
    from mcpq.worker.config import MCPQConfig
    from mcpq.worker.metrics_export import Exporter

log = logging.getLogger(__name__)

#: This worker's metrics endpoint (``MCPQ_METRICS_PORT``), once started.
_exporter: Exporter | None = None


@signals.worker_init.connect
def _check_config(sender: Any = None, **_: Any) -> None:
    """Refuse to start with a config that cannot be served safely."""
    # The SDK's HTTP client logs every request at INFO: one line per call.
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "mcp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from mcpq.worker.budgets import check_time_budgets
    from mcpq.worker.config_loader import load_config
    from mcpq.worker.contract.errors import ConfigError

    settings = Settings.from_env()
    try:
        config = load_config(settings.config_path)
        check_time_budgets(settings, config)
    except ConfigError as exc:
        log.critical("mcpq worker refused to start: %s", exc.message)
        raise SystemExit(2) from None
    if settings.metrics_port:
        _start_metrics(sender, settings, config)


def _start_metrics(sender: Any, settings: Settings, config: MCPQConfig) -> None:
    """Serve ``/metrics`` from this process, before any prefork child exists:
    a threads (or solo) worker runs its tasks right here; a prefork parent
    serves what its children write (multiprocess mode)."""
    global _exporter
    from mcpq.worker import metrics

    prefork = _is_prefork(sender)
    if prefork:
        metrics.prepare_multiprocess()  # before prometheus_client makes any value
    from mcpq.worker.metrics_export import start

    try:
        _exporter = start(settings, config, prefork=prefork)
    except OSError as exc:
        log.critical("mcpq worker refused to start: MCPQ_METRICS_PORT=%d: %s", settings.metrics_port, exc)
        raise SystemExit(2) from None


def _is_prefork(sender: Any) -> bool:
    """Whether this worker's tasks run in forked children."""
    from celery import concurrency
    from celery.concurrency.prefork import TaskPool

    try:
        pool = concurrency.get_implementation(getattr(sender, "pool_cls", None) or "prefork")
    except Exception:  # an unknown pool: Celery itself refuses it next
        return False
    return isinstance(pool, type) and issubclass(pool, TaskPool)


@signals.worker_process_init.connect
def _metrics_child_started(**_: Any) -> None:
    if _exporter is not None:
        _exporter.child_started()


@signals.worker_process_shutdown.connect
def _metrics_child_exiting(**_: Any) -> None:
    if _exporter is not None:
        _exporter.child_exiting()


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
        from mcpq.worker.manager import get_manager
        from mcpq.worker.tasks import start_sweeper

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


@signals.worker_ready.connect
def _announce_metrics(**_: Any) -> None:
    if _exporter is not None:  # said here: logging is not set up yet at worker_init
        shape = " (prefork: the sum of the children's)" if _exporter.multiproc_dir else ""
        log.info("mcpq: metrics on port %d, path /metrics%s", _exporter.port, shape)


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _close_sessions(**_: Any) -> None:
    from mcpq.worker.manager import shutdown_manager

    shutdown_manager()


@signals.worker_shutdown.connect
def _stop_metrics(**_: Any) -> None:
    global _exporter
    exporter, _exporter = _exporter, None
    if exporter is not None:
        exporter.close()


# -- traces (only when the OTEL_* environment asks: worker/contract/tracing.py) --------------


@signals.worker_init.connect
def _start_tracing(sender: Any = None, **_: Any) -> None:
    """Traces where the tasks run: in this process for the threads and solo
    pools; for prefork in each child (below), never in the parent."""
    if not _is_prefork(sender):
        from mcpq.worker.contract import tracing

        tracing.setup("worker")


@signals.worker_process_init.connect
def _start_tracing_in_child(**_: Any) -> None:
    from mcpq.worker.contract import tracing

    tracing.setup("worker")


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _flush_traces(**_: Any) -> None:
    """After the sessions closed (connected later): export what is buffered."""
    from mcpq.worker.contract import tracing

    tracing.shutdown()
