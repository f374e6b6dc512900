"""``mcpq top``'s math without a fleet: parsing an exposition, differences between
scrapes (with a counter reset), summing workers, quantiles from buckets as
Prometheus computes them, the error rule, and stale announcements."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mcpq.producer.top import (
    HINT,
    Scrape,
    build_rows,
    delta,
    error_pct,
    live_endpoints,
    merge,
    parse_metrics,
    quantile,
    server_buckets,
)
from mcpq.worker.metrics_announce import endpoint_url

INF = math.inf


def exposition(calls: dict[tuple[str, str, str], int], durations: list[tuple[str, str, float]]) -> str:
    """A worker-like exposition: calls by (server, tool, outcome); durations observed."""
    registry = CollectorRegistry()
    counter = Counter("mcpq_calls", "calls", ["server", "tool", "outcome"], registry=registry)
    histogram = Histogram(
        "mcpq_call_duration_seconds",
        "durations",
        ["server", "tool", "outcome"],
        buckets=(0.01, 0.1, 1.0),
        registry=registry,
    )
    in_flight = Gauge("mcpq_calls_in_flight", "in flight", ["server"], registry=registry)
    sessions = Gauge("mcpq_pool_sessions", "sessions", ["server"], registry=registry)
    for labels, n in calls.items():
        counter.labels(*labels).inc(n)
    for server, outcome, seconds in durations:
        histogram.labels(server, "t", outcome).observe(seconds)
    in_flight.labels("a").set(2)
    sessions.labels("a").set(1)
    return generate_latest(registry).decode()


def test_parse_sums_over_tools() -> None:
    text = exposition(
        {("a", "x", "ok"): 3, ("a", "y", "ok"): 2, ("a", "x", "timeout"): 1},
        [("a", "ok", 0.005), ("a", "ok", 0.05)],
    )
    scrape = parse_metrics(text)
    assert scrape.calls == {("a", "ok"): 5.0, ("a", "timeout"): 1.0}
    assert scrape.buckets[("a", "ok", 0.01)] == 1.0
    assert scrape.buckets[("a", "ok", 0.1)] == 2.0
    assert scrape.buckets[("a", "ok", INF)] == 2.0
    assert scrape.in_flight == {"a": 2.0} and scrape.sessions == {"a": 1.0}


def test_delta_treats_a_counter_that_went_down_as_reset() -> None:
    before = Scrape(calls={("a", "ok"): 10.0, ("a", "timeout"): 4.0}, in_flight={"a": 5.0})
    after = Scrape(calls={("a", "ok"): 15.0, ("a", "timeout"): 1.0, ("b", "ok"): 2.0}, in_flight={"a": 1.0})
    window = delta(before, after)
    assert window.calls == {("a", "ok"): 5.0, ("a", "timeout"): 1.0, ("b", "ok"): 2.0}
    assert window.in_flight == {"a": 1.0}  # gauges: the latest value


def test_merge_sums_workers() -> None:
    one = Scrape(calls={("a", "ok"): 1.0}, sessions={"a": 1.0})
    two = Scrape(calls={("a", "ok"): 2.0, ("b", "ok"): 1.0}, sessions={"a": 2.0, "b": 1.0})
    total = merge([one, two])
    assert total.calls == {("a", "ok"): 3.0, ("b", "ok"): 1.0}
    assert total.sessions == {"a": 3.0, "b": 1.0}


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, {0.1: 10.0, 1.0: 10.0, INF: 10.0}, 0.05),  # all in the first bucket: linear from 0
        (0.5, {0.1: 0.0, 1.0: 10.0, INF: 10.0}, 0.55),  # within (0.1, 1]
        (0.95, {0.1: 50.0, 1.0: 100.0, INF: 100.0}, 0.1 + 0.9 * 45 / 50),
        (0.99, {0.1: 10.0, 1.0: 10.0, INF: 20.0}, 1.0),  # in +Inf: the highest finite bound
        (0.5, {0.1: 0.0, INF: 0.0}, None),  # nothing observed
        (0.5, {0.1: 1.0}, None),  # no +Inf bucket: not a histogram
    ],
)
def test_quantile_as_prometheus(q: float, buckets: dict[float, float], expected: float | None) -> None:
    got = quantile(q, buckets)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_quantile_from_the_difference_of_two_scrapes() -> None:
    """p50/p95 of what happened between the scrapes, not since the worker started."""
    before = parse_metrics(exposition({}, [("a", "ok", 0.005)] * 100))
    after = parse_metrics(exposition({}, [("a", "ok", 0.005)] * 100 + [("a", "ok", 0.5)] * 10))
    buckets = server_buckets(delta(before, after), "a")
    assert quantile(0.5, buckets) == pytest.approx(0.1 + 0.9 * 0.5)
    assert quantile(0.5, server_buckets(after, "a")) < 0.01


def test_latency_leaves_out_calls_that_never_went_to_the_server() -> None:
    scrape = parse_metrics(exposition({}, [("a", "ok", 0.5), ("a", "circuit_open", 0.0001)]))
    assert server_buckets(scrape, "a")[INF] == 1.0


def test_error_rule_is_the_alerts() -> None:
    assert error_pct({"ok": 8, "timeout": 1, "connection_error": 1}) == 20.0
    # The tool's own error, the caller's mistakes and cancellations are attempts, not errors.
    assert error_pct({"ok": 1, "tool_error": 1, "invalid_arguments": 1, "cancelled": 1}) == 0.0
    # Calls the breaker or a limit refused are not attempts at all.
    assert error_pct({"ok": 1, "circuit_open": 5, "limit_exceeded": 5}) == 0.0
    assert error_pct({"circuit_open": 3}) is None
    assert error_pct({"outcome_unknown": 1, "internal_error": 1}) == 100.0


def test_stale_announcements_are_ignored() -> None:
    now = 1_000_000.0
    raw = {
        "http://w1:9808/metrics": str(now - 5),
        "http://w2:9808/metrics": str(now - 61),
        "http://w3:9808/metrics": "garbage",
        "http://w0:9808/metrics": str(now - 60),
    }
    live, stale = live_endpoints(raw, now)
    assert live == ["http://w0:9808/metrics", "http://w1:9808/metrics"]
    assert stale == 2


def test_rows_without_metrics_still_list_servers_and_breakers() -> None:
    servers = [{"name": "a", "transport": "stdio", "enabled": True}, {"name": "b", "enabled": False}]
    breakers = {
        "a": {"state": "closed", "failures": 0, "in_flight": 0},
        "b": {"state": "open", "failures": 3},
    }
    rows = build_rows(servers, breakers, None, None, None)
    assert [(r["server"], r["breaker"], r["calls_per_s"], r["sessions"]) for r in rows] == [
        ("a", "closed", None, None),
        ("b", "open", None, None),
    ]
    assert "MCPQ_METRICS_PORT" in HINT


def test_rows_with_a_window() -> None:
    before = parse_metrics(exposition({("a", "t", "ok"): 10}, []))
    after = parse_metrics(
        exposition(
            {("a", "t", "ok"): 18, ("a", "t", "timeout"): 2, ("a", "t", "circuit_open"): 5},
            [("a", "ok", 0.05)] * 4,
        )
    )
    window = delta(before, after)
    (row,) = build_rows([{"name": "a"}], {"a": {"state": "closed", "failures": 0}}, after, window, 2.0)
    assert row["calls_per_s"] == pytest.approx((8 + 2 + 5) / 2.0)
    assert row["error_pct"] == pytest.approx(20.0)  # 2 of 10 attempts
    assert row["p50_ms"] == pytest.approx(55.0)  # linear in (10ms, 100ms]
    assert row["calls_total"] == 25.0
    assert row["outcomes_total"] == {"circuit_open": 5.0, "ok": 18.0, "timeout": 2.0}
    assert row["in_flight"] == 2.0 and row["sessions"] == 1.0


def test_announced_url() -> None:
    assert endpoint_url("10.0.0.7", 9808) == "http://10.0.0.7:9808/metrics"
    assert endpoint_url("::1", 9808) == "http://[::1]:9808/metrics"
    assert endpoint_url("", 9808).endswith(":9808/metrics")
