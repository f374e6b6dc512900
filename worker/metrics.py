"""The worker's Prometheus metrics: what is recorded, under which labels.

Off (``MCPQ_METRICS_PORT`` unset or 0) the process's recorder is a
:class:`Metrics` whose methods do nothing, and ``prometheus_client`` is never
imported. On, :mod:`mcpq.worker.metrics_export` installs a
:class:`WorkerMetrics` and serves it (with the scrape-time collectors of
pooled sessions and fleet-wide breakers) over HTTP. docs/observability.md
lists every metric.

What counts:

* **An attempt** is one run of a call that ended with a result: the final
  one, or one that is retried (``mcpq_calls_total`` and
  ``mcpq_call_duration_seconds`` by ``outcome``: ``ok`` or the error code).
* **Waits** (a limit, an open breaker with ``on_open: defer``, a duplicate
  delivery still running) are not attempts: they count in
  ``mcpq_retries_total`` with reason ``limit``, ``circuit_open`` or ``busy``;
  a retry after a failed attempt counts there with the attempt's error code.
  A redelivery answered from an earlier delivery's claim counts nothing.
* **Queue wait** is enqueue (the producer's ``enqueued_at`` stamp) to the
  first time a worker starts the call: attempt 1, before any wait.

Labels are bounded: ``server`` is a configured server's name or
``unknown``; ``tool`` is one of the first ``MCPQ_METRICS_MAX_TOOLS`` tools
seen per server, else ``other``; ``outcome`` is ``ok`` or an error code.
Never an argument value, never a URL.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import threading
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from mcpq.worker.contract.errors import ErrorCode
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.followup import Again

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

#: Call durations: 1 ms to 5 min (the longest deadline a call usually gets).
CALL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
#: Queue waits: 1 ms to an hour (a backlog can be long), finer around the 30 s alert.
QUEUE_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 900.0, 3600.0,
)  # fmt: skip

UNKNOWN_SERVER = "unknown"
OTHER_TOOL = "other"
OK = "ok"
#: Retry reasons that are waits, not failed attempts.
WAIT_LIMIT, WAIT_CIRCUIT_OPEN, WAIT_BUSY = "limit", "circuit_open", "busy"

_CODES = frozenset(code.value for code in ErrorCode)
#: Results naming a tool nobody offers: their tool name is the caller's text.
_UNRESOLVED = frozenset({ErrorCode.TOOL_NOT_FOUND.value, ErrorCode.AMBIGUOUS_TOOL.value})
_NOTHING: AbstractContextManager[None] = contextlib.nullcontext()


def outcome_of(result: ToolResult) -> str:
    """``ok``, or the result's error code (an unexpected one as ``internal_error``)."""
    if result.success:
        return OK
    code = result.error_code or ErrorCode.INTERNAL_ERROR.value
    return code if code in _CODES else ErrorCode.INTERNAL_ERROR.value


def queue_wait(enqueued_at: float | None, started_at: float, *, attempt: int, waits: int) -> float | None:
    """Seconds from enqueue to ``started_at`` when this is the call's first start
    (attempt 1, no wait yet) and the message carries ``enqueued_at``; else None.
    A producer clock ahead of the worker's gives 0, not a negative wait."""
    if enqueued_at is None or attempt != 1 or waits != 0:
        return None
    return max(started_at - enqueued_at, 0.0)


def check_enqueued_at(value: Any) -> str | None:
    """What is wrong with a message's ``enqueued_at`` (epoch seconds), None if fine."""
    if value is None:
        return None
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        return f"'enqueued_at' must be epoch seconds (a positive number), got {value!r}"
    return None


class ToolLabels:
    """Bounded ``server`` and ``tool`` label values.

    :param servers: the configured servers; any other name is ``unknown``.
    :param max_tools: distinct tools per server; later ones fold into ``other``.
    """

    def __init__(self, servers: Iterable[str], max_tools: int) -> None:
        self.servers = frozenset(servers)
        self.max_tools = max_tools
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def server(self, name: str | None) -> str:
        return name if name is not None and name in self.servers else UNKNOWN_SERVER

    def tool(self, server: str, tool: str | None) -> str:
        """``tool`` if it is (or now becomes) one of ``server``'s labelled tools."""
        if server == UNKNOWN_SERVER or not tool:
            return OTHER_TOOL
        seen = self._seen.get(server)
        if seen is not None and tool in seen:
            return tool
        with self._lock:
            seen = self._seen.setdefault(server, set())
            if tool in seen:
                return tool
            if len(seen) >= self.max_tools:
                return OTHER_TOOL
            seen.add(tool)
            return tool


def hinted_labels(tool: Any, server: Any) -> tuple[str | None, str | None]:
    """(server, tool) as a message names them, for a call without a result yet."""
    if not isinstance(tool, str):
        return (server if isinstance(server, str) else None), None
    if server is None and "/" in tool:
        prefix, _, name = tool.partition("/")
        if prefix and name:
            return prefix, name
    return (server if isinstance(server, str) else None), tool


class Metrics:
    """The recorder while metrics are off: every method does nothing."""

    enabled = False

    def attempt(
        self,
        result: ToolResult | None,
        step: Again | None,
        *,
        tool: Any = None,
        server: Any = None,
        queue_wait: float | None = None,
    ) -> None:
        """After one run of a call: ``result`` (None when a duplicate delivery
        is still running it) and what :func:`~mcpq.worker.followup.next_step`
        decided (None: final). ``tool``/``server`` as the message named them
        label a call without a result; ``queue_wait`` from :func:`queue_wait`."""

    def in_flight(self, server: str) -> AbstractContextManager[Any]:
        """Around a request sent to ``server``'s session."""
        return _NOTHING


class WorkerMetrics(Metrics):
    """The recorder while metrics are on.

    :param servers: configured server names (the ``server`` label's values).
    :param max_tools: ``MCPQ_METRICS_MAX_TOOLS``.
    :param registry: where the metrics register; None in multiprocess mode,
        where the parent serves what the children write to files.
    :param multiprocess: also keep session gauges, set by each prefork child
        (:meth:`set_pool`), since the parent cannot ask the children's pools.
    """

    enabled = True

    def __init__(
        self,
        servers: Iterable[str],
        max_tools: int,
        *,
        registry: CollectorRegistry | None,
        multiprocess: bool = False,
    ) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.labels = ToolLabels(servers, max_tools)
        by_call = ["server", "tool", "outcome"]
        self.calls = Counter(
            "mcpq_calls", "Call attempts that ended, by outcome (ok or the error code)", by_call,
            registry=registry,
        )  # fmt: skip
        self.duration = Histogram(
            "mcpq_call_duration_seconds", "How long call attempts took on the worker, by outcome", by_call,
            buckets=CALL_BUCKETS, registry=registry,
        )  # fmt: skip
        self.waited = Histogram(
            "mcpq_queue_wait_seconds", "From enqueue to the first start of a call on a worker", ["server"],
            buckets=QUEUE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.retries = Counter(
            "mcpq_retries",
            "Calls sent back to the queue: after a failed attempt (reason: its error code) or to wait "
            "(limit, circuit_open, busy)",
            ["server", "tool", "reason"],
            registry=registry,
        )
        self.cancelled = Counter(
            "mcpq_cancelled", "Calls that ended cancelled by a caller", ["server"], registry=registry
        )
        self.inflight = Gauge(
            "mcpq_calls_in_flight", "Requests sent to a server and not answered yet", ["server"],
            registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self.sessions: Gauge | None = None
        self.children: Gauge | None = None
        if multiprocess:
            self.sessions = Gauge(
                "mcpq_pool_sessions", "Open MCP sessions in this worker's pools", ["server"],
                registry=registry, multiprocess_mode="livesum",
            )  # fmt: skip
            self.children = Gauge(
                "mcpq_stdio_children", "stdio server processes this worker runs (one per open session)",
                ["server"], registry=registry, multiprocess_mode="livesum",
            )  # fmt: skip
        # Children by label values, looked up once (labels() costs more than the update);
        # as bounded as the labels themselves.
        self._by_call: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._in_flight = {name: _Tracked(self.inflight.labels(name)) for name in self.labels.servers}

    def attempt(
        self,
        result: ToolResult | None,
        step: Again | None,
        *,
        tool: Any = None,
        server: Any = None,
        queue_wait: float | None = None,
    ) -> None:
        try:
            self._attempt(result, step, tool, server, queue_wait)
        except Exception:  # a metric must never change what happens to a call
            log.exception("metrics: could not record a call")

    def _attempt(
        self, result: ToolResult | None, step: Again | None, tool: Any, server: Any, queue_wait: float | None
    ) -> None:
        if result is None:  # a duplicate delivery: wait for the one that runs it
            hint_server, hint_tool = hinted_labels(tool, server)
            name = self.labels.server(hint_server)
            self.retries.labels(name, self.labels.tool(name, hint_tool), WAIT_BUSY).inc()
            return
        if result.details.get("redelivered"):
            return  # answered from the claim: the delivery that ran it counted it
        name = self.labels.server(result.server_name)
        outcome = outcome_of(result)
        tool_label = OTHER_TOOL if outcome in _UNRESOLVED else self.labels.tool(name, result.tool_name)
        if queue_wait is not None:
            self.waited.labels(name).observe(queue_wait)  # once per call: no cache needed
        if step is not None and "waits" in step.changes:  # not an attempt: a wait off the slot
            reason = WAIT_LIMIT if outcome == ErrorCode.LIMIT_EXCEEDED.value else WAIT_CIRCUIT_OPEN
            self.retries.labels(name, tool_label, reason).inc()
            return
        key = (name, tool_label, outcome)
        children = self._by_call.get(key)
        if children is None:
            children = self._by_call[key] = (self.calls.labels(*key), self.duration.labels(*key))
        children[0].inc()
        children[1].observe(max(result.execution_time_ms, 0.0) / 1000)
        if step is not None:
            self.retries.labels(name, tool_label, outcome).inc()
        elif outcome == ErrorCode.CANCELLED.value:
            self.cancelled.labels(name).inc()

    def in_flight(self, server: str) -> AbstractContextManager[Any]:
        found = self._in_flight.get(server)  # every configured server has its series from the start
        return found if found is not None else _Tracked(self.inflight.labels(UNKNOWN_SERVER))

    def set_pool(self, sessions: dict[str, int], stdio: frozenset[str]) -> None:
        """Multiprocess mode: this child's open sessions per server."""
        if self.sessions is None or self.children is None:
            return
        for name in self.labels.servers:
            self.sessions.labels(name).set(sessions.get(name, 0))
            if name in stdio:
                self.children.labels(name).set(sessions.get(name, 0))


class _Tracked:
    """``with``: one more in flight on a gauge child, for the block's duration."""

    __slots__ = ("_gauge",)

    def __init__(self, gauge: Any) -> None:
        self._gauge = gauge

    def __enter__(self) -> None:
        self._gauge.inc()

    def __exit__(self, *_: object) -> None:
        self._gauge.dec()


_current: Metrics = Metrics()


def current() -> Metrics:
    """This process's recorder (the no-op one unless metrics were started)."""
    return _current


def install(metrics: Metrics) -> None:
    global _current
    _current = metrics


# ----------------------------------------------------------------- multiprocess

#: The environment variable prometheus_client reads when it is imported.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess() -> str:
    """Before any prefork child exists: a fresh directory for the children's
    metric files, in ``PROMETHEUS_MULTIPROC_DIR`` (inside the one the user set,
    if any, so old files never mix in), and prometheus_client switched to it.

    prometheus_client picks its value class when it is imported, so this runs
    before :mod:`mcpq.worker.metrics_export` imports it; if something imported
    it earlier, its choice is made again here."""
    path = tempfile.mkdtemp(prefix="mcpq-metrics-", dir=os.environ.get(MULTIPROC_ENV) or None)
    os.environ[MULTIPROC_ENV] = path
    import prometheus_client.values as values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    return path
