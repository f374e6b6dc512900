"""The worker's Prometheus metrics against real parts: a private redis-server,
real Celery workers with ``MCPQ_METRICS_PORT``, the test MCP server over stdio,
a server nobody listens on, and a real Prometheus server (the Debian package
``prometheus``) that scrapes the worker every second and is asked through its
HTTP API. ``promtool`` checks and unit-tests the alert rules."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.procs import REPO_ROOT, descendants, free_port, pid_alive, wait_for_port, wait_until
from tests.support.stack import Stack, WorkerProcess, stdio_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ALERTS = REPO_ROOT / "docs" / "prometheus" / "alerts.yml"
SECRET_ARGUMENT = "argument-value-never-a-label"


def tool_path(name: str) -> str:
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if found is None:
        pytest.fail(
            f"{name} is not installed: these tests need the Debian package 'prometheus' "
            "(apt-get install -y prometheus; `make setup` installs it where apt-get is available)"
        )
    return found


def servers(count_dir: Path) -> dict[str, dict[str, Any]]:
    return {
        "local": stdio_server(count_dir),
        "down": {
            "url": f"http://127.0.0.1:{free_port()}/mcp",
            "circuit_breaker_threshold": 1,
            "circuit_breaker_timeout": 600,  # stays open (not half-open) for the whole test
            "retry_attempts": 0,
            "connect_timeout": 3,
            "timeout": 5,
        },
    }


def scrape(port: int) -> str:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    response.raise_for_status()
    return response.text


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """``name``'s samples in an exposition text: sorted label pairs -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def total(text: str, name: str, **match: str) -> float:
    return sum(
        value
        for labels, value in samples(text, name).items()
        if all(dict(labels).get(k) == v for k, v in match.items())
    )


def make_calls(stack: Stack) -> None:
    """4 ok and 2 tool_error on local, then down: connection_error (the breaker
    opens at once), then circuit_open; and a fan-out of 32 (chunk tasks)."""
    q = stack.queue
    for text in ("a", "b", SECRET_ARGUMENT):
        assert q.call("local/echo", {"text": text}, timeout=30).success
    assert q.call("local/count", {"key": "k"}, timeout=30).success
    for _ in range(2):
        assert q.call("local/fail", {"message": "no"}, timeout=30).error_code == "tool_error"
    assert q.call("down/anything", {}, timeout=10).error_code == "connection_error"
    assert q.call("down/anything", {}, timeout=10).error_code == "circuit_open"
    results = q.map("echo", [{"text": f"m{i}"} for i in range(32)], server="local", timeout=30)
    assert all(r.success for r in results) and len(results) == 32


#: What make_calls leaves in mcpq_calls_total, by (server, outcome).
EXPECTED_CALLS = {
    ("local", "ok"): 36.0,
    ("local", "tool_error"): 2.0,
    ("down", "connection_error"): 1.0,
    ("down", "circuit_open"): 1.0,
}


# --------------------------------------------------------------------------- Prometheus


class Prometheus:
    """``/usr/bin/prometheus`` with a scrape config of our own, its TSDB in tmp_path."""

    def __init__(self, tmp_path: Path, targets: list[int]) -> None:
        self.port = free_port()
        self.dir = tmp_path / "prometheus"
        self.dir.mkdir()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": "mcpq",
                    "scrape_interval": "1s",
                    "scrape_timeout": "1s",
                    "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in targets]}],
                }
            ],
        }
        self.config = self.dir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = self.dir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        argv = [
            tool_path("prometheus"),
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for_port(self.port, 30, proc=self.proc, describe=self.log_tail)
        wait_until(self._ready, 30, interval=0.1, message=lambda: f"prometheus not ready:\n{self.log_tail()}")
        return self

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return self.log.read_bytes()[-4000:].decode(errors="replace") if self.log.exists() else ""

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def vector(self, expr: str, *by: str) -> dict[tuple[str, ...], float]:
        return {tuple(r["metric"].get(k, "") for k in by): float(r["value"][1]) for r in self.query(expr)}

    def rules(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/rules", timeout=10)
        response.raise_for_status()
        return [rule for group in response.json()["data"]["groups"] for rule in group["rules"]]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture()
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[list[int]], Prometheus]]:
    started: list[Prometheus] = []

    def start(targets: list[int]) -> Prometheus:
        server = Prometheus(tmp_path, targets).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# --------------------------------------------------------------------------- tests


def test_prometheus_scrapes_calls_by_server_and_outcome_and_the_breakers(
    make_stack: Callable[..., Any], count_dir: Path, prometheus_for: Callable[[list[int]], Prometheus]
) -> None:
    port = free_port()
    stack: Stack = make_stack(servers(count_dir))
    worker = stack.start_worker(MCPQ_METRICS_PORT=str(port))
    wait_for_port(port, 30, describe=worker.log_tail)
    prometheus = prometheus_for([port])

    make_calls(stack)

    def calls_match() -> bool:
        seen = prometheus.vector("sum by (server, outcome) (mcpq_calls_total)", "server", "outcome")
        return seen == EXPECTED_CALLS

    wait_until(
        calls_match,
        30,
        interval=0.25,
        message=lambda: (
            "prometheus never saw the calls: "
            f"{prometheus.vector('sum by (server, outcome) (mcpq_calls_total)', 'server', 'outcome')}"
        ),
    )
    # By tool: each tool its own label; the durations were observed once per attempt.
    by_tool = prometheus.vector('sum by (tool) (mcpq_calls_total{server="local"})', "tool")
    assert by_tool == {("echo",): 35.0, ("count",): 1.0, ("fail",): 2.0}
    durations = prometheus.vector("sum by (server) (mcpq_call_duration_seconds_count)", "server")
    assert durations == {("local",): 38.0, ("down",): 2.0}
    # Every call was stamped when enqueued and waited once, before its first start.
    waits = prometheus.vector("sum by (server) (mcpq_queue_wait_seconds_count)", "server")
    assert waits == {("local",): 38.0, ("down",): 2.0}
    # The fleet-wide breakers, from Redis at scrape time: down is open, local closed.
    states = prometheus.vector("mcpq_breaker_state == 1", "server", "state")
    assert states == {("local", "closed"): 1.0, ("down", "open"): 1.0}
    assert prometheus.vector("mcpq_breaker_failures", "server")[("down",)] >= 1
    # The pool's sessions and stdio children, read from the worker's pool at scrape time.
    assert prometheus.vector("mcpq_pool_sessions", "server")[("local",)] >= 1
    assert prometheus.vector("mcpq_stdio_children", "server")[("local",)] >= 1
    assert prometheus.vector("mcpq_calls_in_flight", "server") == {("local",): 0.0, ("down",): 0.0}
    assert prometheus.vector("mcpq_metrics_scrape_errors_total", "job") == {("mcpq",): 0.0}
    # The alert rules load and evaluate against the real series.
    wait_until(
        lambda: all(not r.get("lastEvaluation", "0001").startswith("0001") for r in prometheus.rules()),
        30,
        interval=0.25,
        message=lambda: f"rules not evaluated: {prometheus.rules()}",
    )
    assert {r["name"] for r in prometheus.rules()} == {
        "MCPQBreakerOpen",
        "MCPQServerErrorRatioHigh",
        "MCPQQueueWaitHigh",
    }
    assert all(r["health"] == "ok" for r in prometheus.rules()), prometheus.rules()
    # No argument value and no URL ever becomes a label.
    text = scrape(port)
    assert SECRET_ARGUMENT not in text and "127.0.0.1" not in text


def test_scrape_survives_a_redis_outage_of_the_breakers(
    make_stack: Callable[..., Any], count_dir: Path
) -> None:
    """The breakers' Redis is down at scrape time: the scrape still answers with
    the call metrics, skips the breaker series and counts the error."""
    dead_state = f"redis://127.0.0.1:{free_port()}"
    port = free_port()
    stack: Stack = make_stack({"local": stdio_server(count_dir)}, state_url=dead_state)
    worker = stack.start_worker(MCPQ_METRICS_PORT=str(port))
    wait_for_port(port, 30, describe=worker.log_tail)
    assert stack.queue.call("local/echo", {"text": "x"}, timeout=30).success
    first = scrape(port)
    assert total(first, "mcpq_calls_total", server="local", outcome="ok") == 1
    assert samples(first, "mcpq_breaker_state") == {}
    assert total(first, "mcpq_metrics_scrape_errors_total") >= 1
    second = scrape(port)
    assert total(second, "mcpq_metrics_scrape_errors_total") > total(
        first, "mcpq_metrics_scrape_errors_total"
    )


def prefork_children(worker: WorkerProcess) -> list[int]:
    """The worker's pool processes (its direct children; stdio servers are theirs)."""
    out = []
    for pid in descendants(worker.pid):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rfind(")") + 2 :].split()[1]) == worker.pid:
            out.append(pid)
    return out


def test_prefork_parent_serves_the_sum_of_its_children(
    make_stack: Callable[..., Any], count_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    multiproc = tmp_path / "multiproc"
    multiproc.mkdir()
    stack: Stack = make_stack(servers(count_dir))
    # "processes" is Celery's other name for prefork: `-P prefork` is what Celery's CLI
    # takes for "no pool given", and then uses the app's worker_pool (threads) instead.
    worker = stack.start_worker(
        pool="processes", concurrency=2, MCPQ_METRICS_PORT=str(port), PROMETHEUS_MULTIPROC_DIR=str(multiproc)
    )
    wait_for_port(port, 30, describe=worker.log_tail)
    make_calls(stack)

    # The children wrote their counts before answering: the parent's sum has them all.
    text = scrape(port)
    by_outcome: dict[tuple[str, str], float] = {}
    for labels, value in samples(text, "mcpq_calls_total").items():
        key = (dict(labels)["server"], dict(labels)["outcome"])
        by_outcome[key] = by_outcome.get(key, 0.0) + value
    assert by_outcome == EXPECTED_CALLS, worker.log_tail()
    assert total(text, "mcpq_queue_wait_seconds_count") == 40
    assert total(text, "mcpq_breaker_state", server="down", state="open") == 1
    # Each child publishes its sessions (every second): the parent sums them.
    wait_until(lambda: total(scrape(port), "mcpq_pool_sessions", server="local") >= 1, 15)
    assert total(scrape(port), "mcpq_calls_in_flight") == 0

    # A child killed without a clean exit: its live gauges are dropped at the
    # next scrape, its counters stay (they are totals).
    (files_dir,) = list(multiproc.iterdir())
    children = prefork_children(worker)
    assert children
    victim = max(children, key=lambda pid: len(descendants(pid)))
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not pid_alive(victim), 15)
    assert list(files_dir.glob(f"gauge_live*_{victim}.db"))
    wait_until(
        lambda: bool(scrape(port)) and not list(files_dir.glob(f"gauge_live*_{victim}.db")),
        15,
        message="the killed child's live gauges were kept",
    )
    after = scrape(port)
    assert total(after, "mcpq_calls_total", server="local", outcome="ok") == 36
    worker.stop()
    assert not files_dir.exists(), "the worker removes its metric files when it stops"


def test_metrics_port_in_use_refuses_to_start(make_stack: Callable[..., Any], count_dir: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stack: Stack = make_stack({"local": stdio_server(count_dir)})
        with pytest.raises(AssertionError, match="worker exited with 2") as failed:
            stack.start_worker(MCPQ_METRICS_PORT=str(port))
        assert f"MCPQ_METRICS_PORT={port}" in str(failed.value)


# --------------------------------------------------------------------------- alert rules


def test_promtool_checks_the_alert_rules() -> None:
    proc = subprocess.run(
        [tool_path("promtool"), "check", "rules", str(ALERTS)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 3 rules found" in proc.stdout


def alert(name: str, server: str, summary: str, severity: str = "warning") -> dict[str, Any]:
    """An expected alert: its labels, its summary, its description rendered for ``server``."""
    rules = {r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    description = rules[name]["annotations"]["description"].replace("{{ $labels.server }}", server)
    return {
        "exp_labels": {"severity": severity, "server": server},
        "exp_annotations": {"summary": summary, "description": description},
    }


def test_promtool_unit_tests_the_alerts(tmp_path: Path) -> None:
    """The rules do what docs/observability.md says, on made-up series."""
    state = 'mcpq_breaker_state{{server="{s}",state="open",instance="{i}"}}'
    calls = 'mcpq_calls_total{{server="{s}",tool="t",outcome="{o}",instance="w1"}}'
    bucket = 'mcpq_queue_wait_seconds_bucket{{server="local",instance="w1",le="{le}"}}'
    series = [
        # down: open for 3 minutes, seen by two workers; local: closed.
        (state.format(s="down", i="w1"), "1x12"),
        (state.format(s="down", i="w2"), "1x12"),
        (state.format(s="local", i="w1"), "0x12"),
        # flaky: 20 % timeouts; tools: 50 % tool_error (the tool's answer, not an error).
        (calls.format(s="flaky", o="ok"), "0+8x40"),
        (calls.format(s="flaky", o="timeout"), "0+2x40"),
        (calls.format(s="tools", o="ok"), "0+5x40"),
        (calls.format(s="tools", o="tool_error"), "0+5x40"),
        # rare: one call in five minutes, and it failed: too few to page anyone.
        (calls.format(s="rare", o="timeout"), "0 1x40"),
        # local: every call waits about a minute in the queue.
        (bucket.format(le="30"), "0x40"),
        (bucket.format(le="60"), "0+10x40"),
        (bucket.format(le="+Inf"), "0+10x40"),
    ]
    breaker = alert("MCPQBreakerOpen", "down", "mcpq: circuit breaker for server down is open", "critical")
    ratio = alert("MCPQServerErrorRatioHigh", "flaky", "mcpq: 20% of calls to flaky fail")
    wait = alert("MCPQQueueWaitHigh", "local", "mcpq: calls to local wait 58.5s in the queue (p95)")
    checks = [
        ("30s", "MCPQBreakerOpen", []),  # pending: open for less than a minute
        ("2m", "MCPQBreakerOpen", [breaker]),  # once per server, however many workers report it
        ("8m", "MCPQServerErrorRatioHigh", [ratio]),  # not tools (tool_error), not rare (too few)
        ("3m", "MCPQQueueWaitHigh", []),
        ("9m", "MCPQQueueWaitHigh", [wait]),
    ]
    tests = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [{"series": name, "values": values} for name, values in series],
                "alert_rule_test": [
                    {"eval_time": at, "alertname": name, "exp_alerts": expected}
                    for at, name, expected in checks
                ],
            }
        ],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests))
    proc = subprocess.run(
        [tool_path("promtool"), "test", "rules", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
