"""The gateway's Prometheus metrics, on its open ``GET /metrics`` (docs/observability.md).

* ``mcpq_gateway_calls_total{tool,outcome}`` and
  ``mcpq_gateway_call_duration_seconds{tool,outcome}``: every ``tools/call``,
  from its arrival to its answer. ``tool`` is the exposed name when the
  catalog has it (``unknown`` otherwise, so a client cannot add series by
  inventing names; beyond ``MCPQ_METRICS_MAX_TOOLS`` names, ``other``).
  ``outcome`` is ``ok``, an mcpq error code (``tool_error``,
  ``invalid_arguments``, ``circuit_open``, ...), ``task`` (handed back as an
  MCP task) or ``abandoned`` (the request ended before its answer).
* ``mcpq_gateway_calls_in_flight``: requests being answered now.
* ``mcpq_gateway_sessions``: open handshake-era sessions (2026-07-28 ones keep none).
* The fleet-wide breakers, as the workers and the API serve them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from mcpq.producer.api_metrics import BUCKETS, FleetMetrics

UNKNOWN = "unknown"
OTHER = "other"
#: Outcomes besides ``ok`` and the error codes.
TASK = "task"
ABANDONED = "abandoned"


class GatewayMetrics(FleetMetrics):
    """One gateway's registry.

    :param max_tools: distinct ``tool`` label values; later names count as ``other``.
    """

    def __init__(self, max_tools: int = 100) -> None:
        super().__init__()
        self.max_tools = max_tools
        self._tools: set[str] = set()
        self.calls = Counter(
            "mcpq_gateway_calls",
            "tools/call requests the gateway answered, by exposed tool and outcome",
            ["tool", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "mcpq_gateway_call_duration_seconds",
            "Time from a tools/call request's arrival to its answer, by exposed tool and outcome",
            ["tool", "outcome"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "mcpq_gateway_calls_in_flight", "tools/call requests being answered", registry=self.registry
        )
        self.sessions = Gauge(
            "mcpq_gateway_sessions",
            "Open handshake-era sessions the gateway notifies of tool changes",
            registry=self.registry,
        )

    def tool_label(self, name: str | None) -> str:
        """The ``tool`` label for an exposed name (None: not in the catalog)."""
        if name is None:
            return UNKNOWN
        if name in self._tools:
            return name
        if len(self._tools) >= self.max_tools:
            return OTHER
        self._tools.add(name)
        return name

    def observe(self, tool: str, outcome: str, seconds: float) -> None:
        """Record one answered (or abandoned) call.

        :param tool: the label from :meth:`tool_label`.
        :param outcome: ``ok``, an error code, ``task`` or ``abandoned``.
        :param seconds: arrival to answer.
        """
        self.calls.labels(tool, outcome).inc()
        self.duration.labels(tool, outcome).observe(seconds)
