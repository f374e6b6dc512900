"""``mcpq top``: a live view of the fleet, per server.

Two sources, merged per server:

* **Redis** (always): the servers the workers published and their fleet-wide
  breakers, through the producer's plans (``producer/fleet_state.py``), and
  the metrics endpoints the workers announce (``Keys.metrics_endpoints``,
  written by ``mcpq.worker.metrics_announce``); entries older than
  :data:`STALE_AFTER` are skipped.
* **The workers' /metrics** (when they serve them, ``MCPQ_METRICS_PORT``):
  every announced endpoint is scraped; calls/s, error % and p50/p95 come from
  the difference between two scrapes (per endpoint, then summed, so one
  worker's restart does not count as negative calls), in flight and sessions
  from the latest one. An endpoint that does not answer is counted, never fatal.

The error % follows the ``MCPQServerErrorRatioHigh`` alert
(``docs/prometheus/alerts.yml``): failed attempts over attempts that went to
the server. The rate and quantile math are pure functions below.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NoReturn

import click

from mcpq.worker.contract.breaker_state import as_text
from mcpq.worker.contract.errors import MCPConnectionError, MCPTimeoutError
from mcpq.worker.contract.keys import Keys
from mcpq.worker.contract.plans import Plan, run_plan

EXIT_OK, EXIT_UNREACHABLE = 0, 3
#: Announcements older than this (seconds) are a worker that is gone.
STALE_AFTER = 60.0
#: Longest wait for one worker's /metrics.
SCRAPE_TIMEOUT = 2.0
#: Outcomes that are not the server's failure (the alert's rule): the tool's own
#: isError answer, the caller's mistakes, cancellations.
NOT_ERRORS = frozenset(
    {
        "ok",
        "tool_error",
        "invalid_arguments",
        "tool_not_found",
        "ambiguous_tool",
        "server_not_found",
        "server_disabled",
        "cancelled",
    }
)
#: Outcomes of calls that never went to the server: not attempts at all (nor in the latencies).
NOT_ATTEMPTS = frozenset({"circuit_open", "limit_exceeded"})
HINT = (
    "no worker announces metrics: start workers with MCPQ_METRICS_PORT=9808 (one port per worker "
    "process on a host) for calls/s, error %, latency, in flight and sessions"
)


# --------------------------------------------------------------------------- one scrape


@dataclass
class Scrape:
    """What ``mcpq top`` reads of one exposition (or a sum, or a difference, of several)."""

    #: (server, outcome) -> mcpq_calls_total, summed over tools.
    calls: dict[tuple[str, str], float] = field(default_factory=dict)
    #: (server, outcome, le) -> cumulative mcpq_call_duration_seconds_bucket, summed over tools.
    buckets: dict[tuple[str, str, float], float] = field(default_factory=dict)
    #: server -> mcpq_calls_in_flight.
    in_flight: dict[str, float] = field(default_factory=dict)
    #: server -> mcpq_pool_sessions.
    sessions: dict[str, float] = field(default_factory=dict)

    def servers(self) -> set[str]:
        return {s for s, _ in self.calls} | set(self.in_flight) | set(self.sessions)


def _add(into: dict[Any, float], key: Any, value: float) -> None:
    into[key] = into.get(key, 0.0) + value


def parse_metrics(text: str) -> Scrape:
    """The series ``mcpq top`` needs from one Prometheus text exposition.

    :raises ValueError: the text is not an exposition.
    """
    from prometheus_client.parser import text_string_to_metric_families

    out = Scrape()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            server = labels.get("server", "")
            if sample.name == "mcpq_calls_total":
                _add(out.calls, (server, labels.get("outcome", "")), sample.value)
            elif sample.name == "mcpq_call_duration_seconds_bucket":
                le = float(labels.get("le", "+Inf"))
                _add(out.buckets, (server, labels.get("outcome", ""), le), sample.value)
            elif sample.name == "mcpq_calls_in_flight":
                _add(out.in_flight, server, sample.value)
            elif sample.name == "mcpq_pool_sessions":
                _add(out.sessions, server, sample.value)
    return out


def counter_delta(before: Mapping[Any, float], after: Mapping[Any, float]) -> dict[Any, float]:
    """``after - before`` per series; a series that went down was reset (its process
    restarted), so all of ``after`` is new, as Prometheus's ``rate`` reads it."""
    out = {}
    for key, value in after.items():
        old = before.get(key, 0.0)
        out[key] = value - old if value >= old else value
    return out


def delta(before: Scrape, after: Scrape) -> Scrape:
    """What happened between two scrapes of one endpoint; the gauges are ``after``'s."""
    return Scrape(
        calls=counter_delta(before.calls, after.calls),
        buckets=counter_delta(before.buckets, after.buckets),
        in_flight=dict(after.in_flight),
        sessions=dict(after.sessions),
    )


def merge(scrapes: Iterable[Scrape]) -> Scrape:
    """The sum of several workers' scrapes (or differences)."""
    out = Scrape()
    for one in scrapes:
        for name in ("calls", "buckets", "in_flight", "sessions"):
            into: dict[Any, float] = getattr(out, name)
            for key, value in getattr(one, name).items():
                _add(into, key, value)
    return out


# --------------------------------------------------------------------------- the math


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """``histogram_quantile(q, ...)`` over cumulative bucket counts (upper bound -> count),
    as Prometheus computes it: linear within the bucket holding the rank; the highest
    finite bound when the rank falls in ``+Inf``. None without observations."""
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if math.isinf(upper):
                return lower
            if upper <= 0 or count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def server_buckets(scrape: Scrape, server: str) -> dict[float, float]:
    """One server's duration buckets, summed over the outcomes of attempts that went to it."""
    out: dict[float, float] = {}
    for (name, outcome, le), value in scrape.buckets.items():
        if name == server and outcome not in NOT_ATTEMPTS:
            _add(out, le, value)
    return out


def outcomes(scrape: Scrape, server: str) -> dict[str, float]:
    return {o: v for (s, o), v in sorted(scrape.calls.items()) if s == server and v}


def error_pct(by_outcome: Mapping[str, float]) -> float | None:
    """Failed attempts over attempts that went to the server, in %: the alert's rule.
    None when no attempt went to it."""
    attempts = sum(v for o, v in by_outcome.items() if o not in NOT_ATTEMPTS)
    if attempts <= 0:
        return None
    errors = sum(v for o, v in by_outcome.items() if o not in NOT_ERRORS and o not in NOT_ATTEMPTS)
    return 100.0 * errors / attempts


def live_endpoints(raw: Mapping[str, str], now: float, max_age: float = STALE_AFTER) -> tuple[list[str], int]:
    """The announced endpoints seen within ``max_age`` seconds of ``now`` (Redis time),
    sorted, and how many were stale (or unreadable)."""
    live, stale = [], 0
    for url, seen in raw.items():
        try:
            fresh = now - float(seen) <= max_age
        except ValueError:
            fresh = False
        if fresh:
            live.append(url)
        else:
            stale += 1
    return sorted(live), stale


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def build_rows(
    servers: list[dict[str, Any]],
    breakers: Mapping[str, Mapping[str, Any]],
    latest: Scrape | None,
    window: Scrape | None,
    seconds: float | None,
) -> list[dict[str, Any]]:
    """One row per server: Redis's view, plus the metrics when there are any.

    :param latest: the current scrapes, summed (None: no endpoint answered).
    :param window: the sum of every endpoint's difference between its last two
        scrapes, ``seconds`` apart (None: no two scrapes yet).
    """
    known = {str(s["name"]): s for s in servers if "name" in s}
    names = sorted(set(known) | set(breakers) | (latest.servers() if latest else set()))
    rows = []
    for name in names:
        breaker = breakers.get(name) or {}
        summary = known.get(name) or {}
        row: dict[str, Any] = {
            "server": name,
            "transport": summary.get("transport"),
            "enabled": summary.get("enabled"),
            "breaker": breaker.get("state"),
            "breaker_failures": breaker.get("failures"),
            "in_flight": breaker.get("in_flight"),
            "sessions": None,
            "calls_per_s": None,
            "error_pct": None,
            "p50_ms": None,
            "p95_ms": None,
            "calls_total": None,
            "outcomes_total": None,
        }
        if latest is not None:
            row["in_flight"] = latest.in_flight.get(name, 0.0)
            row["sessions"] = latest.sessions.get(name, 0.0)
            total = outcomes(latest, name)
            row["outcomes_total"] = total
            row["calls_total"] = sum(total.values())
        if window is not None and seconds:
            recent = outcomes(window, name)
            row["calls_per_s"] = round(sum(recent.values()) / seconds, 3)
            pct = error_pct(recent)
            row["error_pct"] = None if pct is None else round(pct, 2)
            buckets = server_buckets(window, name)
            row["p50_ms"] = _ms(quantile(0.5, buckets))
            row["p95_ms"] = _ms(quantile(0.95, buckets))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- reading the fleet


def endpoints_plan(keys: Keys) -> Plan[tuple[float, dict[str, str]]]:
    """Redis's time and the announced metrics endpoints (URL -> last seen), one round trip."""
    replies = yield [("time", ()), ("hgetall", (keys.metrics_endpoints,))]
    seconds, micros = replies[0]
    raw = {as_text(k): as_text(v) for k, v in replies[1].items()}
    return float(seconds) + int(micros) / 1e6, raw


class Sampler:
    """Takes snapshots of the fleet; each one's rates cover the time since the one before."""

    def __init__(self, queue: Any) -> None:
        import httpx

        self.queue = queue
        self.http = httpx.Client(timeout=SCRAPE_TIMEOUT, follow_redirects=False)
        self.previous: dict[str, Scrape] = {}
        self.previous_at: float | None = None

    def close(self) -> None:
        self.http.close()

    def _scrape(self, url: str) -> Scrape | None:
        try:
            response = self.http.get(url)
            response.raise_for_status()
            return parse_metrics(response.text)
        except Exception:  # down, refused, not an exposition: a footnote, never a crash
            return None

    def sample(self) -> dict[str, Any]:
        """One snapshot (JSON-ready). Redis errors propagate: the caller decides."""
        servers = self.queue.servers()
        breakers = self.queue.breakers()
        now, raw = run_plan(self.queue.redis, endpoints_plan(self.queue.keys))
        urls, stale = live_endpoints(raw, now)
        if urls:
            with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
                scraped = dict(zip(urls, pool.map(self._scrape, urls), strict=True))
        else:
            scraped = {}
        at = time.monotonic()
        current = {url: s for url, s in scraped.items() if s is not None}
        differences = [delta(self.previous[url], s) for url, s in current.items() if url in self.previous]
        seconds = at - self.previous_at if self.previous_at is not None else None
        window = merge(differences) if differences and seconds else None
        latest = merge(current.values()) if current else None
        self.previous, self.previous_at = current, at
        return {
            "time": time.time(),
            "window_seconds": round(seconds, 3) if window is not None and seconds else None,
            "endpoints": {
                "announced": len(urls),
                "scraped": len(current),
                "unreachable": sorted(url for url, s in scraped.items() if s is None),
                "stale": stale,
            },
            "servers": build_rows(servers, breakers, latest, window, seconds),
            "hint": None if urls else HINT,
        }


# --------------------------------------------------------------------------- the view


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value / 1000:.2f}s"
    return f"{value:.1f}ms" if value < 10 else f"{value:.0f}ms"


def _fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


_BREAKER_STYLE = {"closed": "green", "open": "bold red", "half_open": "yellow"}


def render(snapshot: Mapping[str, Any], interval: float) -> Any:
    """The snapshot as a rich renderable: the table and its footnotes."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title="mcpq top", title_justify="left", expand=False)
    for column in ("server", "breaker", "calls/s", "err %", "p50", "p95", "in flight", "sessions"):
        table.add_column(column, justify="left" if column in ("server", "breaker") else "right")
    for row in snapshot["servers"]:
        state = row["breaker"] or "-"
        name = row["server"] if row["enabled"] is not False else f"{row['server']} (disabled)"
        table.add_row(
            name,
            Text(state, style=_BREAKER_STYLE.get(state, "")),
            _fmt(row["calls_per_s"]),
            _fmt(row["error_pct"]),
            _fmt_ms(row["p50_ms"]),
            _fmt_ms(row["p95_ms"]),
            _fmt(row["in_flight"], ".0f"),
            _fmt(row["sessions"], ".0f"),
        )
    endpoints = snapshot["endpoints"]
    notes = [
        f"{endpoints['scraped']} of {endpoints['announced']} worker endpoints scraped"
        + (f", {len(endpoints['unreachable'])} unreachable" if endpoints["unreachable"] else "")
        + (f" ({endpoints['stale']} stale announcements skipped)" if endpoints["stale"] else "")
        + f"; every {interval:g}s; Ctrl-C quits"
    ]
    if endpoints["scraped"] and snapshot["window_seconds"] is None:
        notes.append("rates after the next refresh")
    if not snapshot["servers"]:
        notes.append("no servers published yet: start a worker with `mcpq worker`")
    if snapshot["hint"]:
        notes.append(snapshot["hint"])
    return Group(table, *(Text(n, style="dim") for n in notes))


def _queue() -> Any:
    from mcpq.producer.queue import ToolQueue

    return ToolQueue.from_env()


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.RedisError, MCPConnectionError, MCPTimeoutError)


def _unreachable(exc: BaseException) -> NoReturn:
    click.echo(f"mcpq: {exc}", err=True)
    sys.exit(EXIT_UNREACHABLE)


@click.command()
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=None,
    help="Seconds between refreshes (default 2; with --once, between its two scrapes: default 1).",
)
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot as JSON (implies --once).")
def top(interval: float | None, once: bool, as_json: bool) -> None:
    """A live view of the fleet per server: calls/s, error %, p50/p95, breaker, in flight, sessions.

    Scrapes the /metrics every worker announces in Redis (MCPQ_METRICS_PORT) and
    reads the servers and breakers from Redis. The error % counts what the
    MCPQServerErrorRatioHigh alert counts: failed attempts that went to the server.
    """
    once = once or as_json
    interval = interval if interval is not None else (1.0 if once else 2.0)
    errors = _unreachable_errors()
    try:
        queue = _queue()
        sampler = Sampler(queue)
    except errors as exc:
        _unreachable(exc)
    try:
        if once:
            _once(sampler, interval, as_json, errors)
        else:
            _live(sampler, interval, errors)
    finally:
        sampler.close()
        queue.close()


def _once(sampler: Sampler, interval: float, as_json: bool, errors: tuple[type[BaseException], ...]) -> None:
    try:
        snapshot = sampler.sample()
        if snapshot["endpoints"]["announced"]:  # rates need a second scrape
            time.sleep(interval)
            snapshot = sampler.sample()
    except errors as exc:
        _unreachable(exc)
    if as_json:
        click.echo(json.dumps(snapshot, indent=2, default=str))
    else:
        from rich.console import Console

        Console().print(render(snapshot, interval))


def _live(sampler: Sampler, interval: float, errors: tuple[type[BaseException], ...]) -> None:
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    try:
        snapshot = sampler.sample()
    except errors as exc:
        _unreachable(exc)
    try:
        with Live(render(snapshot, interval), auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(interval)
                try:
                    snapshot = sampler.sample()
                    live.update(render(snapshot, interval), refresh=True)
                except errors as exc:  # keep the last view; say why it is not moving
                    note = Text(f"Redis unreachable, showing the last snapshot: {exc}", style="bold red")
                    live.update(Group(render(snapshot, interval), note), refresh=True)
    except KeyboardInterrupt:
        sys.exit(EXIT_OK)
