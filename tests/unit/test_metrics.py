"""mcpq.worker.metrics and metrics_export: label folding, outcome labels, what
counts as an attempt, a retry or a wait, queue wait on the first start only,
the scrape-time collectors (breakers over fakeredis, a Redis error included),
the tasks' ``enqueued_at`` field, the settings, and no cost while off."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from mcpq.worker import metrics
from mcpq.worker.contract.errors import ConfigError, ErrorCode
from mcpq.worker.contract.keys import Keys
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.settings import Settings
from mcpq.worker.followup import Again
from mcpq.worker.metrics import OTHER_TOOL, UNKNOWN_SERVER, ToolLabels, WorkerMetrics, outcome_of, queue_wait
from mcpq.worker.metrics_export import BreakerCollector, PoolCollector

pytestmark = pytest.mark.timeout(30)


@dataclass
class Recorded:
    registry: CollectorRegistry
    metrics: WorkerMetrics

    def value(self, name: str, **labels: str) -> float:
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found


@pytest.fixture()
def recorded() -> Iterator[Recorded]:
    registry = CollectorRegistry()
    worker_metrics = WorkerMetrics(["s", "t"], 3, registry=registry)
    metrics.install(worker_metrics)
    try:
        yield Recorded(registry, worker_metrics)
    finally:
        metrics.install(metrics.Metrics())


def ok(tool: str = "echo", server: str = "s", ms: float = 12.0) -> ToolResult:
    return ToolResult.ok(tool, server, {"content": []}, execution_time_ms=ms)


def failed(code: str, tool: str = "echo", server: str | None = "s", **details: Any) -> ToolResult:
    return ToolResult(
        success=False, tool_name=tool, server_name=server, error="x", error_code=code, details=details
    )


# --------------------------------------------------------------------------- labels


def test_tools_beyond_the_limit_fold_into_other_per_server() -> None:
    labels = ToolLabels(["s", "t"], max_tools=2)
    assert [labels.tool("s", name) for name in ("a", "b", "c", "a", "d")] == [
        "a",
        "b",
        OTHER_TOOL,
        "a",
        "other",
    ]
    assert labels.tool("t", "c") == "c", "each server has its own budget"
    assert labels.server("s") == "s"
    assert labels.server("not-configured") == UNKNOWN_SERVER and labels.server(None) == UNKNOWN_SERVER
    assert labels.tool(UNKNOWN_SERVER, "anything") == OTHER_TOOL
    assert labels.tool("s", None) == OTHER_TOOL


def test_outcome_is_ok_or_a_known_error_code() -> None:
    assert outcome_of(ok()) == "ok"
    assert outcome_of(failed("tool_error")) == "tool_error"
    assert outcome_of(failed("circuit_open")) == "circuit_open"
    assert outcome_of(failed("made_up_code")) == "internal_error", "outcome values stay a closed set"
    assert outcome_of(ToolResult(success=False, tool_name="x")) == "internal_error"


def test_attempts_count_by_server_tool_and_outcome(recorded: Recorded) -> None:
    m = recorded.metrics
    m.attempt(ok(ms=250.0), None)
    m.attempt(ok(), None)
    m.attempt(failed("tool_error"), None)
    m.attempt(failed("timeout", server="t", tool="slow"), None)
    assert recorded.value("mcpq_calls_total", server="s", tool="echo", outcome="ok") == 2
    assert recorded.value("mcpq_calls_total", server="s", tool="echo", outcome="tool_error") == 1
    assert recorded.value("mcpq_calls_total", server="t", tool="slow", outcome="timeout") == 1
    assert recorded.value("mcpq_call_duration_seconds_count", server="s", tool="echo", outcome="ok") == 2
    assert recorded.value(
        "mcpq_call_duration_seconds_sum", server="s", tool="echo", outcome="ok"
    ) == pytest.approx(0.262)
    buckets = [
        recorded.value("mcpq_call_duration_seconds_bucket", server="s", tool="echo", outcome="ok", le=le)
        for le in ("0.01", "0.025", "0.25", "0.5")
    ]
    assert buckets == [0, 1, 2, 2], "12 ms and 250 ms, in seconds, in cumulative buckets"


def test_unresolved_calls_never_label_the_callers_text(recorded: Recorded) -> None:
    m = recorded.metrics
    for name in ("typo-1", "typo-2", "typo-3", "typo-4"):
        m.attempt(failed("tool_not_found", tool=name, server="s"), None)
    m.attempt(failed("server_not_found", tool="x", server="nobody-configured-this"), None)
    m.attempt(failed("internal_error", tool="x", server=None), None)
    assert recorded.value("mcpq_calls_total", server="s", tool="other", outcome="tool_not_found") == 4
    assert recorded.value("mcpq_calls_total", server="unknown", tool="other", outcome="server_not_found") == 1
    assert recorded.value("mcpq_calls_total", server="unknown", tool="other", outcome="internal_error") == 1
    text = generate_latest(recorded.registry).decode()
    assert "typo" not in text and "nobody-configured-this" not in text
    # The typos took none of s's three tool labels.
    for name in ("a", "b", "c"):
        m.attempt(ok(tool=name), None)
    assert recorded.value("mcpq_calls_total", server="s", tool="c", outcome="ok") == 1


def test_retries_waits_and_redeliveries(recorded: Recorded) -> None:
    m = recorded.metrics
    # A failed attempt that is retried: an attempt, and a retry for its error code.
    m.attempt(failed("connection_error"), Again(0.5, {"attempt": 2, "deadline_at": None}))
    assert recorded.value("mcpq_calls_total", server="s", tool="echo", outcome="connection_error") == 1
    assert recorded.value("mcpq_retries_total", server="s", tool="echo", reason="connection_error") == 1
    # Waits are not attempts.
    m.attempt(failed("limit_exceeded"), Again(0.1, {"waits": 1}))
    m.attempt(failed("circuit_open", defer=True), Again(3.0, {"waits": 2}))
    assert recorded.value("mcpq_retries_total", server="s", tool="echo", reason="limit") == 1
    assert recorded.value("mcpq_retries_total", server="s", tool="echo", reason="circuit_open") == 1
    assert recorded.value("mcpq_calls_total", server="s", tool="echo", outcome="limit_exceeded") == 0
    # A duplicate delivery while the first runs: labelled by what the message named.
    m.attempt(None, Again(0.2), tool="s/echo")
    m.attempt(None, Again(0.2), tool="echo", server="t")
    assert recorded.value("mcpq_retries_total", server="s", tool="echo", reason="busy") == 1
    assert recorded.value("mcpq_retries_total", server="t", tool="echo", reason="busy") == 1
    # Answered from the claim: counted by the delivery that ran it, not again.
    again = ok()
    again.details["redelivered"] = True
    m.attempt(again, None)
    assert recorded.value("mcpq_calls_total", server="s", tool="echo", outcome="ok") == 0
    # A final circuit_open (on_open: fail) is an attempt that ended.
    m.attempt(failed("circuit_open"), None)
    assert recorded.value("mcpq_calls_total", server="s", tool="echo", outcome="circuit_open") == 1


def test_cancelled_calls_count_in_both(recorded: Recorded) -> None:
    recorded.metrics.attempt(failed(ErrorCode.CANCELLED.value), None)
    assert recorded.value("mcpq_cancelled_total", server="s") == 1
    assert recorded.value("mcpq_calls_total", server="s", tool="echo", outcome="cancelled") == 1


def test_in_flight_gauge(recorded: Recorded) -> None:
    assert recorded.value("mcpq_calls_in_flight", server="t") == 0, "every server has its series"
    with recorded.metrics.in_flight("s"), recorded.metrics.in_flight("s"):
        assert recorded.value("mcpq_calls_in_flight", server="s") == 2
    assert recorded.value("mcpq_calls_in_flight", server="s") == 0


def test_a_failing_metric_never_reaches_the_call(recorded: Recorded, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any) -> None:
        raise ValueError("broken metric")

    monkeypatch.setattr(recorded.metrics, "_attempt", broken)
    recorded.metrics.attempt(ok(), None)  # logged, not raised


def test_off_is_a_no_op() -> None:
    off = metrics.Metrics()
    off.attempt(ok(), None, queue_wait=1.0)
    with off.in_flight("s"):
        pass
    assert metrics.current().enabled is False


def test_off_never_imports_prometheus_client() -> None:
    code = "import sys, mcpq.worker.tasks, mcpq.worker.router; print('prometheus_client' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# --------------------------------------------------------------------------- queue wait


def test_queue_wait_only_on_the_first_start() -> None:
    now = time.time()
    assert queue_wait(now - 2.5, now, attempt=1, waits=0) == pytest.approx(2.5)
    assert queue_wait(now - 2.5, now, attempt=2, waits=0) is None, "a retry waited for its backoff"
    assert queue_wait(now - 2.5, now, attempt=1, waits=1) is None, "a wait for a limit is not queueing"
    assert queue_wait(None, now, attempt=1, waits=0) is None, "older producers do not stamp"
    assert queue_wait(now + 3, now, attempt=1, waits=0) == 0.0, "a producer clock ahead: no negative wait"


@dataclass
class FakeRouter:
    def default_timeout(self, tool: str, server: str | None) -> float:
        return 30.0


@dataclass
class FakeManager:
    """What the tasks use of MCPClientManager when a call succeeds."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    router: FakeRouter = field(default_factory=FakeRouter)
    sweeper: object = field(default_factory=object)
    config: Any = None

    def call_tool(self, tool: str, arguments: Any, **kw: Any) -> ToolResult:
        self.calls.append({"tool": tool, **kw})
        return ok(tool="echo", server="s")


@dataclass
class FakeWriter:
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)

    def store(self, call_id: str, result: dict[str, Any]) -> None:
        self.stored[call_id] = result


@pytest.fixture()
def manager(monkeypatch: pytest.MonkeyPatch) -> FakeManager:
    from mcpq.worker import tasks

    fake = FakeManager()
    monkeypatch.setattr(tasks, "get_manager", lambda: fake)
    return fake


def test_call_tool_accepts_enqueued_at_and_observes_the_first_start(
    recorded: Recorded, manager: FakeManager
) -> None:
    from mcpq.worker.tasks import call_tool

    waited = "mcpq_queue_wait_seconds_count"
    assert call_tool("s/echo", {}, enqueued_at=time.time() - 2)["success"]
    assert recorded.value(waited, server="s") == 1
    assert recorded.value("mcpq_queue_wait_seconds_sum", server="s") == pytest.approx(2, abs=0.5)
    assert call_tool("s/echo", {}, enqueued_at=time.time() - 2, attempt=2)["success"]
    assert call_tool("s/echo", {}, enqueued_at=time.time() - 2, waits=3)["success"]
    assert call_tool("s/echo", {})["success"], "a message without the stamp is still a call"
    assert recorded.value(waited, server="s") == 1
    assert recorded.value("mcpq_calls_total", server="s", tool="echo", outcome="ok") == 4
    assert len(manager.calls) == 4


@pytest.mark.parametrize("bad", ["soon", True, -1, 0, float("inf"), float("nan"), [1]])
def test_call_tool_rejects_a_malformed_enqueued_at(
    recorded: Recorded, manager: FakeManager, bad: Any
) -> None:
    from mcpq.worker.tasks import call_tool

    result = call_tool("s/echo", {}, enqueued_at=bad)
    assert result["error_code"] == "internal_error" and "'enqueued_at'" in result["error"]
    assert manager.calls == [], "a malformed message never reaches the manager"
    assert recorded.value("mcpq_calls_total", server="unknown", tool="other", outcome="internal_error") == 1


def test_chunk_calls_accept_enqueued_at_and_reject_a_malformed_one(
    recorded: Recorded, manager: FakeManager
) -> None:
    from mcpq.worker.tasks import _run_chunk_call

    writer = FakeWriter()
    entry = {"id": "c1", "tool": "echo", "server": "s", "arguments": {}, "enqueued_at": time.time() - 1}
    assert _run_chunk_call(manager, writer, entry, "q") == "succeeded"  # type: ignore[arg-type]
    assert recorded.value("mcpq_queue_wait_seconds_count", server="s") == 1
    bad = {**entry, "id": "c2", "enqueued_at": "yesterday"}
    assert _run_chunk_call(manager, writer, bad, "q") == "failed"  # type: ignore[arg-type]
    assert "'enqueued_at'" in writer.stored["c2"]["error"]
    assert [c["call_id"] for c in manager.calls] == ["c1"]


def test_producers_stamp_enqueued_at() -> None:
    from mcpq.producer.submission import prepare_call

    before = time.time()
    call = prepare_call(Settings(), "echo", {"text": "x"}, server="s")
    assert before <= call.kwargs["enqueued_at"] <= time.time()
    assert call.chunkable and call.chunk_entry()["enqueued_at"] == call.kwargs["enqueued_at"]


# --------------------------------------------------------------------------- collectors


def breaker_servers(client: fakeredis.FakeRedis, keys: Keys) -> None:
    now_ms = int(time.time() * 1000)
    client.hset(
        keys.breaker("down"),
        mapping={"state": "open", "open_until": now_ms + 60_000, "opened_at": now_ms, "failures": 3},
    )
    client.hset(keys.breaker("probing"), mapping={"state": "open", "open_until": now_ms - 1, "failures": 1})


def test_breaker_collector_reads_the_fleet_state_at_scrape_time() -> None:
    client, keys = fakeredis.FakeRedis(), Keys("m:")
    breaker_servers(client, keys)
    registry = CollectorRegistry()
    registry.register(BreakerCollector(client, keys, ["up", "down", "probing"]))

    def state(server: str, each: str) -> float | None:
        return registry.get_sample_value("mcpq_breaker_state", {"server": server, "state": each})

    assert [state("down", s) for s in ("closed", "open", "half_open")] == [0, 1, 0]
    assert [state("up", s) for s in ("closed", "open", "half_open")] == [1, 0, 0]
    assert state("probing", "half_open") == 1, "open past its timeout: the next call probes"
    assert registry.get_sample_value("mcpq_breaker_failures", {"server": "down"}) == 3
    assert registry.get_sample_value("mcpq_metrics_scrape_errors_total") == 0
    client.delete(keys.breaker("down"))  # reset: seen at the next scrape
    assert state("down", "closed") == 1


def test_a_redis_error_at_scrape_skips_the_breakers_and_counts() -> None:
    server = fakeredis.FakeServer()
    client, keys = fakeredis.FakeRedis(server=server), Keys("m:")
    breaker_servers(client, keys)
    registry = CollectorRegistry()
    registry.register(BreakerCollector(client, keys, ["down"]))
    server.connected = False
    text = generate_latest(registry).decode()  # the scrape itself works
    assert "mcpq_breaker_state" not in text
    assert registry.get_sample_value("mcpq_metrics_scrape_errors_total") == 2  # two scrapes, two errors
    server.connected = True
    assert registry.get_sample_value("mcpq_breaker_state", {"server": "down", "state": "open"}) == 1
    assert registry.get_sample_value("mcpq_metrics_scrape_errors_total") == 2


def test_pool_collector_reads_sessions_and_stdio_children() -> None:
    counts = {"local": 2}
    registry = CollectorRegistry()
    registry.register(PoolCollector(["local", "remote"], frozenset({"local"}), lambda: dict(counts)))
    assert registry.get_sample_value("mcpq_pool_sessions", {"server": "local"}) == 2
    assert registry.get_sample_value("mcpq_pool_sessions", {"server": "remote"}) == 0
    assert registry.get_sample_value("mcpq_stdio_children", {"server": "local"}) == 2
    assert registry.get_sample_value("mcpq_stdio_children", {"server": "remote"}) is None, (
        "not a stdio server"
    )
    counts["local"] = 0  # idle sessions closed: the next scrape says so
    assert registry.get_sample_value("mcpq_stdio_children", {"server": "local"}) == 0


def test_pool_sessions_without_a_manager_is_empty() -> None:
    from mcpq.worker.metrics_export import pool_sessions

    assert pool_sessions() == {}


# --------------------------------------------------------------------------- settings


def test_metrics_settings() -> None:
    assert (Settings().metrics_port, Settings().metrics_max_tools) == (0, 100)
    assert Settings.from_env({"MCPQ_METRICS_PORT": "0"}).metrics_port == 0
    settings = Settings.from_env({"MCPQ_METRICS_PORT": "9808", "MCPQ_METRICS_MAX_TOOLS": "5"})
    assert (settings.metrics_port, settings.metrics_max_tools) == (9808, 5)
    for env in (
        {"MCPQ_METRICS_PORT": "70000"},
        {"MCPQ_METRICS_PORT": "-1"},
        {"MCPQ_METRICS_PORT": "http"},
        {"MCPQ_METRICS_MAX_TOOLS": "0"},
    ):
        with pytest.raises(ConfigError) as caught:
            Settings.from_env(env)
        assert next(iter(env)) in caught.value.message
        assert json.dumps(caught.value.details)
