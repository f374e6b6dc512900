"""The worker's Celery signal handlers: refuse a bad config, warm up, close sessions.

Connected when ``mcpq.worker.celery`` (what ``celery -A mcpq.worker`` loads)
is imported; producers never import this module.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import signals

from mcpq.worker.contract.settings import Settings

log = logging.getLogger(__name__)


@signals.worker_init.connect
def _check_config(**_: Any) -> None:
    """Refuse to start with a config that cannot be served safely."""
    # The SDK's HTTP client logs every request at INFO: one line per call.
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "mcp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from mcpq.worker.budgets import check_time_budgets
    from mcpq.worker.config_loader import load_config
    from mcpq.worker.contract.errors import ConfigError

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


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _close_sessions(**_: Any) -> None:
    from mcpq.worker.manager import shutdown_manager

    shutdown_manager()
