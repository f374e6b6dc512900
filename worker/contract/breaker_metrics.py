"""The fleet-wide breaker series, as the workers' and the API's ``/metrics`` both serve them.

One definition of the names, help texts and labels, so that a dashboard or an
alert reads the same series from either. prometheus-client is a dependency of
mcpq; only the two metrics endpoints import this module.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

#: The states of ``mcpq_breaker_state`` (one series each: 1 for the current one).
BREAKER_STATES = ("closed", "open", "half_open")


def breaker_families(status: dict[str, dict[str, Any]] | None, scrape_errors: int) -> list[Metric]:
    """``mcpq_breaker_state``, ``mcpq_breaker_failures`` and ``mcpq_metrics_scrape_errors``.

    :param status: ``breaker_status`` of every server, or None when it could not be
        read this scrape (the two breaker families are then left out).
    :param scrape_errors: scrapes so far that could not read the breakers.
    """
    out: list[Metric] = []
    if status is not None:
        state = GaugeMetricFamily(
            "mcpq_breaker_state",
            "Fleet-wide circuit breaker state per server: 1 for the current state, 0 for the others",
            labels=["server", "state"],
        )
        failures = GaugeMetricFamily(
            "mcpq_breaker_failures",
            "Consecutive failures the fleet-wide breaker has counted per server",
            labels=["server"],
        )
        for name, info in status.items():
            for each in BREAKER_STATES:
                state.add_metric([name, each], 1.0 if info.get("state") == each else 0.0)
            failures.add_metric([name], float(info.get("failures") or 0))
        out += [state, failures]
    out.append(
        CounterMetricFamily(
            "mcpq_metrics_scrape_errors",
            "Scrapes that could not read the fleet-wide breakers from Redis",
            value=scrape_errors,
        )
    )
    return out
