"""The HTTP API's own Prometheus metrics, on its open ``GET /metrics``.

* ``mcpq_api_requests_total{route,method,status}`` and
  ``mcpq_api_request_duration_seconds{route,method}``, recorded by an ASGI
  middleware once the response is sent. ``route`` is the matched route's
  template (``/mcp/calls/{task_id}``), ``unmatched`` for anything else, so a
  caller cannot add series by inventing paths; an unusual method is ``other``.
* The fleet-wide breakers (``mcpq_breaker_state``, ``mcpq_breaker_failures``),
  read at each scrape with the app's :class:`AsyncToolQueue` (the producer's
  ``breakers_plan``), and ``mcpq_metrics_scrape_errors_total`` for the scrapes
  that could not read them: the same series the workers serve.

Each app has its own registry (tests make many apps in one process).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from mcpq.worker.contract.breaker_metrics import breaker_families

log = logging.getLogger("mcpq.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Request durations, seconds: from a cached listing to a long ``POST /mcp/call``.
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class BreakerSnapshot(Collector):
    """Serves the breakers read just before the scrape (the read is async; collecting is not)."""

    def __init__(self) -> None:
        self.status: dict[str, dict[str, Any]] | None = None
        self.errors = 0

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        return breaker_families(self.status, self.errors)


class FleetMetrics:
    """A registry of its own with the fleet-wide breaker series, read at each scrape
    (:meth:`exposition`); the API's and the gateway's metrics add their own series."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.breakers = BreakerSnapshot()
        self.registry.register(self.breakers)
        self._failing = False

    async def exposition(self, read_breakers: Callable[[], Awaitable[dict[str, dict[str, Any]]]]) -> bytes:
        """The text to serve: the breakers are read first; failing that, their series are left out."""
        try:
            status: dict[str, dict[str, Any]] | None = await read_breakers()
        except Exception as exc:  # a scrape never fails over the breakers
            status = None
            self.breakers.errors += 1
            if not self._failing:
                log.warning("metrics: cannot read the breakers from Redis (%s); skipping their series", exc)
            self._failing = True
        else:
            self._failing = False
        # No await from here on: the snapshot is the one this scrape serves.
        self.breakers.status = status
        return generate_latest(self.registry)


class APIMetrics(FleetMetrics):
    """One app's registry, request metrics and breaker snapshot."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = Counter(
            "mcpq_api_requests",
            "HTTP requests the API answered, by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "mcpq_api_request_duration_seconds",
            "Time from a request's arrival to its response's end, by route template and method",
            ["route", "method"],
            buckets=BUCKETS,
            registry=self.registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else "other"
        self.requests.labels(route, method, str(status)).inc()
        self.duration.labels(route, method).observe(seconds)


class MetricsMiddleware:
    """The ASGI middleware that records every HTTP request in ``metrics``."""

    def __init__(self, app: ASGIApp, metrics: APIMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception before any response

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            # The router leaves the matched route in the scope: its template, never the path.
            template = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe(
                template, str(scope.get("method", "")), status, time.perf_counter() - started
            )


__all__ = ["BUCKETS", "CONTENT_TYPE_LATEST", "APIMetrics", "FleetMetrics", "MetricsMiddleware"]
