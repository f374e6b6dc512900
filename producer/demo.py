"""``mcpq demo``: the whole path, end to end, on one machine with nothing installed.

It starts an embedded redis-server (unless MCPQ_BROKER_URL is set), the
bundled demo MCP server over Streamable HTTP and legacy SSE (stdio is started
by the worker itself), one real worker process, then enqueues calls and
prints their results.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from mcpq.producer.embedded_redis import EmbeddedRedis, free_port
from mcpq.producer.queue import ToolQueue
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.settings import Settings

DEMO_CONFIG = """\
# Written by `mcpq demo`: the bundled demo server over all three transports.
mcp_servers:
  demo-stdio:
    transport: stdio
    command: {python}
    args: ["-m", "mcpq.worker.demo_server", "stdio"]
    description: demo server as a child process of the worker
  demo-http:
    transport: http
    url: http://127.0.0.1:{http_port}/mcp
    description: demo server over Streamable HTTP
  demo-sse:
    transport: sse
    url: http://127.0.0.1:{sse_port}/sse
    description: demo server over legacy HTTP+SSE
"""


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"demo server on port {port} exited with code {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"demo server did not listen on port {port} within {timeout:g}s")


@contextlib.contextmanager
def _process(argv: list[str], env: dict[str, str], quiet: bool = True) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.DEVNULL if quiet else None,
        stderr=subprocess.DEVNULL if quiet else None,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def _show(label: str, result: ToolResult) -> None:
    if result.success:
        value: Any = result.structured if result.structured is not None else result.text
        status = click.style("ok", fg="green")
        click.echo(
            f"  {status:>4}  {label:<44} -> {json.dumps(value)}  [{result.server_name}, "
            f"{result.execution_time_ms:.1f} ms]"
        )
    else:
        status = click.style(result.error_code or "error", fg="yellow")
        click.echo(f"  {label:<44} -> {status}: {result.error}")


def run_demo(keep: bool = False) -> int:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    with contextlib.ExitStack() as stack:
        if not env.get("MCPQ_BROKER_URL"):
            redis_server = stack.enter_context(EmbeddedRedis())
            click.echo(f"* broker and state: embedded redis-server at {redis_server.url} "
                       "(set MCPQ_BROKER_URL to use your own)")  # fmt: skip
            env.update(
                MCPQ_BROKER_URL=f"{redis_server.url}/0",
                MCPQ_RESULT_BACKEND=f"{redis_server.url}/1",
                MCPQ_REDIS_URL=f"{redis_server.url}/2",
            )
        else:
            click.echo(f"* broker: {Settings.from_env(env).redacted()['broker_url']}")
        http_port, sse_port = free_port(), free_port()
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mcpq-demo-")))
        config_path = workdir / "servers.yaml"
        config_path.write_text(
            DEMO_CONFIG.format(python=sys.executable, http_port=http_port, sse_port=sse_port)
        )
        env["MCPQ_CONFIG"] = str(config_path)
        env.setdefault("MCPQ_QUEUE", f"mcpq-demo-{os.getpid()}")

        click.echo("* starting the demo MCP server over Streamable HTTP and SSE")
        module = [sys.executable, "-m", "mcpq.worker.demo_server"]
        http = stack.enter_context(_process([*module, "http", "--port", str(http_port)], env))
        sse = stack.enter_context(_process([*module, "sse", "--port", str(sse_port)], env))
        _wait_for_port(http_port, http)
        _wait_for_port(sse_port, sse)

        settings = Settings.from_env(env)
        click.echo("* starting one mcpq worker (threads pool); it starts the stdio server itself")
        stack.enter_context(
            _process(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "worker",
                    "worker",
                    "-P",
                    "threads",
                    "-c",
                    "16",
                    "-Q",
                    settings.queue,
                    "--loglevel",
                    "warning",
                    "--without-gossip",
                    "--without-mingle",
                ],
                env,
                quiet=not keep,
            )
        )
        queue = ToolQueue(settings)
        queue.wait_for_worker(timeout=60)
        click.echo("* worker is up; enqueueing calls\n")

        calls: list[tuple[str, dict[str, Any], str | None]] = [
            ("demo-stdio/echo", {"text": "hello over stdio"}, None),
            ("demo-http/echo", {"text": "hello over Streamable HTTP"}, None),
            ("demo-sse/echo", {"text": "hello over SSE"}, None),
            ("add", {"a": 2, "b": 40}, "demo-http"),
            ("demo-sse/word_count", {"text": "the quick brown fox"}, None),
        ]
        failures = 0
        for tool, args, server in calls:
            result = queue.call(tool, args, server=server, timeout=30, wait=60)
            failures += not result.success
            _show(f"{server + '/' if server else ''}{tool} {json.dumps(args)}", result)

        click.echo("\n* errors come back as results with a stable error_code:")
        _show("echo (offered by three servers)", queue.call("echo", {"text": "?"}, timeout=30))
        _show("demo-stdio/add with a='two'", queue.call("demo-stdio/add", {"a": "two", "b": 1}, timeout=30))
        _show("no_such_tool", queue.call("no_such_tool", {}, timeout=30))

        n = 200
        click.echo(f"\n* {n} calls submitted at once, spread over the three transports:")
        started = time.perf_counter()
        servers = ["demo-stdio", "demo-http", "demo-sse"]
        handles = [queue.submit("add", {"a": i, "b": 1}, server=servers[i % 3], timeout=30) for i in range(n)]
        results = [h.result(60) for h in handles]
        elapsed = time.perf_counter() - started
        ok = sum(r.success and r.structured == {"result": i + 1} for i, r in enumerate(results))
        failures += n - ok
        click.echo(f"  {ok}/{n} correct in {elapsed:.2f} s ({n / elapsed:.0f} calls/s, one worker process)")

        if keep:
            click.echo(
                f"\nRunning. MCPQ_BROKER_URL={env['MCPQ_BROKER_URL']} MCPQ_QUEUE={settings.queue}."
                " Ctrl-C stops."
            )
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
        click.echo("\n* shutting down (the worker stops its stdio server)")
    if failures:
        click.echo(click.style(f"demo finished with {failures} unexpected failures", fg="red"), err=True)
        return 1
    click.echo(click.style("demo finished: every call answered as expected", fg="green"))
    return 0
