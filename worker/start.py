"""What ``mcpq worker`` runs before it becomes a Celery worker.

The CLI (a producer-side module) imports this lazily, only for the command
that starts a worker: it is the one place outside ``mcpq.worker.contract``
that the producer may reach, and it imports no MCP SDK.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

from mcpq.worker.budgets import check_time_budgets
from mcpq.worker.config import MCPQConfig
from mcpq.worker.config_loader import load_config
from mcpq.worker.contract.settings import Settings

#: Celery worker options whose value is the next argument (or after ``=``).
_QUEUE_OPTIONS = ("-Q", "--queues")


def preflight(settings: Settings) -> MCPQConfig:
    """The config the worker would serve, checked as the worker itself checks it.

    :param settings: where the config file is, and the time budgets.
    :raises ConfigError: a config the worker would refuse to start with.
    """
    config = load_config(settings.config_path)
    check_time_budgets(settings, config)
    return config


def celery_worker_argv(
    settings: Settings,
    *,
    pool: str,
    concurrency: int | None,
    loglevel: str,
    mingle: bool,
    passthrough: Sequence[str],
) -> list[str]:
    """``python -m celery -A mcpq.worker worker ...`` with mcpq's defaults, then the
    user's own Celery options, so that ``mcpq worker -n w1@%h -Q q`` reads as
    ``celery worker`` users expect (their ``-Q`` replaces the configured queue).

    :param settings: the configured queue and default concurrency.
    :param pool: Celery pool name.
    :param concurrency: threads (or processes) per worker; None for the setting.
    :param loglevel: Celery log level.
    :param mingle: keep Celery's start-up mingle (off by default: about 1 s).
    :param passthrough: further Celery worker options, passed as they are.
    """
    own_queue = any(arg in _QUEUE_OPTIONS or arg.startswith(("--queues=", "-Q")) for arg in passthrough)
    argv = [sys.executable, "-m", "celery", "-A", "mcpq.worker", "worker"]
    # Celery's CLI reads "-P prefork" as "no pool given" and runs the app's
    # configured pool (threads) instead: ask for prefork by its other name.
    pool = "processes" if pool == "prefork" else pool
    argv += ["-P", pool, "-c", str(concurrency or settings.worker_concurrency)]
    argv += [] if own_queue else ["-Q", settings.queue]
    argv += ["--loglevel", loglevel]
    argv += [] if mingle else ["--without-mingle"]
    return argv + list(passthrough)


def worker_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The worker's environment: glibc's malloc gives every busy thread an arena of
    its own (up to 8 per core) and keeps each one's high-water mark; with ~60
    threads a worker's RSS grew 9-12 % over 20,000 calls, 4 % with two arenas
    and no measurable cost in throughput (docs/benchmarks.md). Set by the user: kept."""
    return {"MALLOC_ARENA_MAX": "2", **env}
