"""Serving the worker's metrics (``MCPQ_METRICS_PORT``): the HTTP endpoint and
the values read at scrape time.

Imported only when metrics are on (it imports ``prometheus_client``). Two
shapes, chosen at ``worker_init`` by the pool (``mcpq.worker.signals``):

* **one process** (threads, the default; solo): the process that runs the
  tasks serves its own registry, with the pool's sessions read from its
  ConnectionPool at each scrape.
* **prefork**: the children run the tasks and write their metrics to files
  in a private ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's
  multiprocess mode); the parent serves their sum. Each child sets its
  session gauges every second, and its live gauges are dropped when it
  exits (or, killed, at the next scrape after it is gone).

Either way the fleet-wide breakers are read from Redis at scrape time in one
round trip; a Redis that cannot be read skips those series and counts
``mcpq_metrics_scrape_errors_total``, it never fails the scrape.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from redis.backoff import NoBackoff
from redis.retry import Retry

from mcpq.worker import metrics as metrics_module
from mcpq.worker.config import MCPQConfig
from mcpq.worker.contract.breaker_metrics import breaker_families
from mcpq.worker.contract.breaker_state import breaker_status
from mcpq.worker.contract.keys import Keys
from mcpq.worker.contract.settings import Settings
from mcpq.worker.metrics import WorkerMetrics
from mcpq.worker.metrics_announce import Announcer

log = logging.getLogger(__name__)

#: How often a prefork child publishes its session counts.
POOL_REFRESH = 1.0

SessionCounts = Callable[[], dict[str, int]]


def pool_sessions() -> dict[str, int]:
    """Open sessions per server in this process's ConnectionPool (none before
    the first call made one). Never creates the manager."""
    from mcpq.worker import manager

    current = manager._manager
    if current is None or current.pool.pid != os.getpid():
        return {}
    for _ in range(3):  # the loop thread may add a server's slots meanwhile
        try:
            return current.pool.open_sessions()
        except RuntimeError:
            continue
    return {}


def stdio_servers(config: MCPQConfig) -> frozenset[str]:
    return frozenset(name for name, c in config.mcp_servers.items() if c.transport == "stdio")


class PoolCollector(Collector):
    """``mcpq_pool_sessions`` and ``mcpq_stdio_children`` at scrape time (one process)."""

    def __init__(self, servers: Iterable[str], stdio: frozenset[str], counts: SessionCounts) -> None:
        self.servers = list(servers)
        self.stdio = stdio
        self.counts = counts

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        counts = self.counts()
        sessions = GaugeMetricFamily(
            "mcpq_pool_sessions", "Open MCP sessions in this worker's pools", labels=["server"]
        )
        children = GaugeMetricFamily(
            "mcpq_stdio_children",
            "stdio server processes this worker runs (one per open session)",
            labels=["server"],
        )
        for name in self.servers:
            sessions.add_metric([name], counts.get(name, 0))
            if name in self.stdio:
                children.add_metric([name], counts.get(name, 0))
        return [sessions, children]


class BreakerCollector(Collector):
    """The fleet-wide breakers from the state Redis, read at scrape time in one round trip.

    :param client: a state Redis client with short timeouts.
    :param keys: the deployment's key layout.
    :param servers: configured servers, in order.
    """

    def __init__(self, client: redis.Redis, keys: Keys, servers: Iterable[str]) -> None:
        self.client = client
        self.keys = keys
        self.servers = list(servers)
        self.errors = 0
        self._failing = False
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        status: dict[str, dict[str, Any]] | None
        try:
            status = breaker_status(self.client, self.keys, self.servers) if self.servers else {}
        except Exception as exc:  # a scrape must never fail over the breakers
            status = None
            with self._lock:
                self.errors += 1
                first, self._failing = not self._failing, True
            if first:
                log.warning("metrics: cannot read the breakers from Redis (%s); skipping their series", exc)
        else:
            if self._failing:
                self._failing = False
                log.info("metrics: the breakers can be read from Redis again")
        return breaker_families(status, self.errors)


_PID_FILE = re.compile(r"_(\d+)\.db$")


class ChildrenCollector(Collector):
    """The prefork children's metric files, summed; the live gauges of children
    that are gone (killed without a clean exit) are dropped first."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._files = MultiProcessCollector(None, path)  # type: ignore[no-untyped-call]

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        for live in glob.glob(os.path.join(self.path, "gauge_live*_*.db")):
            match = _PID_FILE.search(live)
            if match and not _alive(int(match.group(1))):
                mark_process_dead(int(match.group(1)), self.path)  # type: ignore[no-untyped-call]
        found: Iterable[Metric] = self._files.collect()  # type: ignore[no-untyped-call]
        return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def scrape_redis(settings: Settings) -> redis.Redis:
    """A client for scrapes only: a dead Redis costs a scrape at most about a second."""
    return redis.Redis.from_url(
        settings.redis_url, socket_timeout=1.0, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 1)
    )


@dataclass
class Exporter:
    """What a worker process started to serve its metrics."""

    port: int
    registry: CollectorRegistry
    metrics: WorkerMetrics
    multiproc_dir: str | None = None
    stdio: frozenset[str] = frozenset()
    server: Any = None
    announcer: Announcer | None = None
    _refresher: tuple[int, threading.Event] | None = field(default=None, repr=False)

    def close(self) -> None:
        """At the worker's shutdown, in the process that started it."""
        if self.announcer is not None:
            self.announcer.stop()
            self.announcer = None
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if self.multiproc_dir:
            shutil.rmtree(self.multiproc_dir, ignore_errors=True)

    # -- prefork children ---------------------------------------------------------
    def child_started(self) -> None:
        """In a new prefork child: publish its session counts every second."""
        if self.multiproc_dir is None:
            return
        if self.server is not None:
            # The parent's listening socket came along with the fork: only the parent serves.
            self.server.socket.close()
            self.server = None
        stop = threading.Event()
        self._refresher = (os.getpid(), stop)

        def refresh() -> None:
            while not stop.wait(POOL_REFRESH):
                try:
                    self.metrics.set_pool(pool_sessions(), self.stdio)
                except Exception:  # metrics must never take a child down
                    log.exception("metrics: could not record the pool's sessions")

        threading.Thread(target=refresh, name="mcpq-metrics-pool", daemon=True).start()

    def child_exiting(self) -> None:
        """In a prefork child that exits cleanly: its live gauges go with it."""
        if self.multiproc_dir is None:
            return
        if self._refresher is not None and self._refresher[0] == os.getpid():
            self._refresher[1].set()
        mark_process_dead(os.getpid(), self.multiproc_dir)  # type: ignore[no-untyped-call]


def start(settings: Settings, config: MCPQConfig, *, prefork: bool) -> Exporter:
    """Install the recorder and serve ``/metrics`` on ``MCPQ_METRICS_PORT``.

    :param prefork: children will run the tasks (multiprocess mode); call
        this before they fork, after :func:`mcpq.worker.metrics.prepare_multiprocess`.
    :raises OSError: the port cannot be bound.
    """
    servers = list(config.mcp_servers)
    stdio = stdio_servers(config)
    registry = CollectorRegistry()
    multiproc_dir = os.environ.get(metrics_module.MULTIPROC_ENV) if prefork else None
    if multiproc_dir:
        metrics = WorkerMetrics(servers, settings.metrics_max_tools, registry=None, multiprocess=True)
        registry.register(ChildrenCollector(multiproc_dir))
    else:
        # One process: values in memory, even where PROMETHEUS_MULTIPROC_DIR is set
        # (files there would only pile up, one set per start).
        values.ValueClass = values.MutexValue
        metrics = WorkerMetrics(servers, settings.metrics_max_tools, registry=registry)
        registry.register(PoolCollector(servers, stdio, pool_sessions))
        ProcessCollector(registry=registry)
    registry.register(BreakerCollector(scrape_redis(settings), Keys(settings.key_prefix), servers))
    server, _thread = start_http_server(settings.metrics_port, registry=registry)
    metrics_module.install(metrics)
    announcer = Announcer(
        scrape_redis(settings), Keys(settings.key_prefix), settings.metrics_host, settings.metrics_port
    )
    return Exporter(settings.metrics_port, registry, metrics, multiproc_dir, stdio, server, announcer.start())
