"""The ``mcpq`` command line.

Exit codes scripts can trust: 0 success, 1 the call failed (the result says
why), 2 bad usage or config, 3 the broker, Redis or a worker could not be
reached, 130 interrupted (Ctrl-C; ``call`` and ``batch`` cancel what they
started first).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import click

from mcpq.producer.cli_types import DEADLINE, WAIT
from mcpq.worker.contract.errors import (
    ConfigError,
    MCPConnectionError,
    MCPError,
    MCPTimeoutError,
    ServerNotFoundError,
)
from mcpq.worker.contract.settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_INTERRUPTED = 130


def parse_arguments(values: Sequence[str]) -> dict[str, Any]:
    """``'{"a": 1}'`` or ``a=1 b=text`` -> a dict. Values that parse as JSON
    are taken as JSON (numbers, booleans, lists); anything else is a string."""
    if not values:
        return {}
    if len(values) == 1 and values[0].lstrip().startswith("{"):
        try:
            parsed = json.loads(values[0])
        except json.JSONDecodeError as exc:
            raise click.UsageError(f"arguments are not valid JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(parsed, dict):
            raise click.UsageError("arguments must be a JSON object")
        return parsed
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.UsageError(f"argument {item!r} is neither a JSON object nor key=value")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _queue() -> Any:
    from mcpq.producer.queue import ToolQueue

    return ToolQueue.from_env()


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"mcpq: {message}", err=True)
    sys.exit(code)


def _unreachable(exc: BaseException) -> NoReturn:
    _fail(f"{exc}", EXIT_UNREACHABLE)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    if not rows:
        return
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.RedisError, MCPConnectionError, MCPTimeoutError)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:  # MCPQ_* settings or the servers file: a person must fix them
            _fail(exc.message, EXIT_USAGE)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option("0.1.0", prog_name="mcpq")
def cli() -> None:
    """mcpq: run MCP tool calls as Celery tasks.

    Settings come from MCPQ_* environment variables (MCPQ_BROKER_URL,
    MCPQ_RESULT_BACKEND, MCPQ_REDIS_URL, MCPQ_CONFIG ...).
    """


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def servers(as_json: bool) -> None:
    """List the servers the fleet knows (published by workers)."""
    try:
        rows = _queue().servers()
    except _redis_errors() as exc:
        _unreachable(exc)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        _fail("no servers published yet: start a worker with `mcpq worker`", EXIT_FAILED)
    _table(rows, ["name", "transport", "enabled", "tools", "protocol_version", "description"])


@cli.command()
@click.argument("server", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--refresh", is_flag=True, help="Ask a worker to re-discover tools first.")
@click.option("--wait", type=WAIT, default=60.0, show_default=True, help="Seconds to wait for a worker.")
def tools(server: str | None, as_json: bool, refresh: bool, wait: float) -> None:
    """List tools (of every server, or of SERVER)."""
    try:
        queue = _queue()
        if refresh:
            queue.discover(server, wait=wait)
        rows = queue.tools(server)
    except _redis_errors() as exc:
        _unreachable(exc)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        _fail("no tools known yet: start a worker (`mcpq worker`) or run `mcpq tools --refresh`", EXIT_FAILED)
    for row in rows:
        row["call as"] = f"{row['server']}/{row['name']}" if row["ambiguous"] else row["name"]
        row["description"] = (
            (row.get("description") or "").splitlines()[0][:60] if row.get("description") else ""
        )
    _table(rows, ["server", "name", "call as", "description"])


@cli.command()
@click.argument("tool")
@click.argument("arguments", nargs=-1)
@click.option("--server", "-s", help="Server to call (needed when several offer the tool).")
@click.option(
    "--timeout", "-t", type=DEADLINE, help="Call deadline in seconds (default: the server's timeout)."
)
@click.option("--wait", type=WAIT, help="How long to wait for the result (default: deadline + 10 s).")
@click.option("--no-wait", is_flag=True, help="Enqueue and print the task id only.")
@click.option(
    "--progress",
    is_flag=True,
    help="Show the call's progress on stderr while waiting (a bar on a terminal, else one line per update).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON (the default for call; accepted for scripts)."
)
def call(
    tool: str,
    arguments: tuple[str, ...],
    server: str | None,
    timeout: float | None,
    wait: float | None,
    no_wait: bool,
    progress: bool,
    as_json: bool,
) -> None:
    """Call TOOL with ARGUMENTS ('{"a": 1}' or a=1 b=2); print the result as JSON.

    Exits 0 on success, 1 when the call failed (see error_code), 3 when no
    broker or worker could be reached. Ctrl-C cancels the call and exits 130.
    """
    from mcpq.producer.cli_call import CallInterrupted, run_call
    from mcpq.producer.cli_progress import progress_view

    args = parse_arguments(arguments)
    queue = _queue()
    try:
        if no_wait:
            handle = queue.submit(tool, args, server=server, timeout=timeout, progress=progress)
            _print_json({"task_id": handle.id, "tool": handle.tool})
            return
        view = progress_view(tool if server is None else f"{server}/{tool}", sys.stderr) if progress else None
        result = run_call(queue, tool, args, server=server, timeout=timeout, wait=wait, view=view)
    except MCPConnectionError as exc:
        _unreachable(exc)
    except CallInterrupted as exc:
        if exc.result is not None:
            _print_json(exc.result.to_dict())
        _fail(exc.message, EXIT_INTERRUPTED)
    _print_json(result.to_dict())
    if not result.success:
        unreachable = result.error_code in ("connection_error", "timeout") and not result.server_name
        sys.exit(EXIT_UNREACHABLE if unreachable else EXIT_FAILED)


@cli.command()
@click.argument("ids", nargs=-1, required=True, metavar="ID...")
@click.option(
    "--wait",
    type=WAIT,
    default=0.0,
    show_default=True,
    help="Then wait up to this long for each cancelled call's final result, and print it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def cancel(ids: tuple[str, ...], wait: float, as_json: bool) -> None:
    """Cancel calls by id (the task id `mcpq call --no-wait` prints).

    \b
    Prints one line per id:
      ID finished ok|ERROR_CODE   the call had ended; nothing changed
      ID cancel requested         a running call is interrupted, a queued one never runs
    With --wait, then "ID ended ERROR_CODE" once the call's own result
    (usually cancelled) is in.

    Exits 0 when every id was handled, 1 for an id no call has (call_not_found)
    or no result within --wait, 2 for a malformed id (the worst of them wins),
    3 when Redis cannot be reached.
    """
    from mcpq.producer.cli_cancel import CancelRow, cancel_all, wait_for_ends

    def shown(row: CancelRow) -> None:
        if row.state == "error":
            click.echo(f"mcpq: {row.error_code}: {row.error}", err=True)
        elif not as_json:
            click.echo(row.line())

    def ended(row: CancelRow) -> None:
        if not as_json:
            click.echo(row.ended_line(wait))

    try:
        queue = _queue()
        rows = cancel_all(queue, ids, shown)
        if wait > 0:
            wait_for_ends(queue, rows, wait, ended)
    except _redis_errors() as exc:
        _unreachable(exc)
    if as_json:
        _print_json([row.to_dict() for row in rows])
    sys.exit(max(row.exit_code for row in rows))


@cli.command()
@click.argument("server", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--wait", type=WAIT, default=60.0, show_default=True, help="Seconds to wait for a worker.")
def discover(server: str | None, as_json: bool, wait: float) -> None:
    """Ask a worker to (re)discover tools now."""
    try:
        answer = _queue().discover(server, wait=wait)
    except _redis_errors() as exc:
        _unreachable(exc)
    if as_json:
        _print_json(answer)
    elif not answer.get("ok"):
        _fail(str(answer.get("error")), EXIT_FAILED)
    else:
        for name, outcome in answer["result"].items():
            status = f"{len(outcome['tools'])} tools" if outcome["ok"] else f"FAILED: {outcome['error']}"
            click.echo(f"{name}: {status}")
    if not answer.get("ok") or not all(o["ok"] for o in answer.get("result", {}).values()):
        sys.exit(EXIT_FAILED)


@cli.command()
@click.argument("server", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--wait", type=WAIT, default=60.0, show_default=True, help="Seconds to wait for a worker.")
def health(server: str | None, as_json: bool, wait: float) -> None:
    """Ping every enabled server (a real MCP round trip, from a worker)."""
    try:
        answer = _queue().health(server, wait=wait)
    except _redis_errors() as exc:
        _unreachable(exc)
    if not answer.get("ok"):
        _fail(str(answer.get("error")), EXIT_FAILED)
    report: dict[str, Any] = answer["result"]
    if as_json:
        _print_json(report)
    else:
        rows = [
            {
                "server": name,
                "healthy": "yes" if r["healthy"] else "NO",
                "latency ms": r.get("latency_ms"),
                "protocol": r.get("protocol_version"),
                "error": r.get("error"),
            }
            for name, r in report.items()
        ]
        _table(rows, ["server", "healthy", "latency ms", "protocol", "error"])
    if not all(r["healthy"] for r in report.values()):
        sys.exit(EXIT_FAILED)


@cli.command()
@click.argument("server")
def reconnect(server: str) -> None:
    """Make every worker drop and reopen its sessions to SERVER, and re-list its tools."""
    try:
        answer = _queue().reconnect(server)
    except ServerNotFoundError as exc:
        _fail(exc.message, EXIT_FAILED)
    except _redis_errors() as exc:
        _unreachable(exc)
    click.echo(f"{server}: every worker will reconnect within a second (epoch {answer['epoch']})")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
def api(host: str, port: int) -> None:
    """Serve the HTTP API (admin endpoints need MCPQ_ADMIN_TOKEN)."""
    try:
        from mcpq.producer.api import serve
    except ImportError as exc:
        _fail(f"the HTTP API needs its extra: pip install 'mcpq[api]' ({exc})", EXIT_USAGE)
    serve(host, port)


@cli.command()
@click.option("--stdio", is_flag=True, help="Serve over stdin/stdout (a desktop client launches it).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Not loopback: set MCPQ_GATEWAY_TOKEN.")
@click.option("--port", default=8800, show_default=True, type=int)
@click.option("--servers", help="Expose only these servers' tools (comma-separated).")
@click.option(
    "--tools",
    help="Expose only tools matching these shell patterns, comma-separated ('get_*', 'github/*').",
)
@click.option(
    "--allowed-hosts",
    help="More Host names clients may use, comma-separated (a proxy, compose); the DNS-rebinding check.",
)
@click.option(
    "--max-request-bytes", type=click.IntRange(min=1024), help="Largest request body (default 4 MiB)."
)
@click.option(
    "--task-after",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Seconds a call may run before a client declaring the MCP Tasks extension gets a task (0: always).",
)
@click.option("--task-tools", help="Tools always answered with a task (comma-separated; Tasks clients only).")
def gateway(
    stdio: bool,
    host: str,
    port: int,
    servers: str | None,
    tools: str | None,
    allowed_hosts: str | None,
    max_request_bytes: int | None,
    task_after: float,
    task_tools: str | None,
) -> None:
    """Serve the fleet as one MCP server at http://HOST:PORT/mcp (or over stdio); every call is queued."""
    # Lazily: only the gateway imports the MCP SDK's server side.
    from mcpq.gateway.catalog import Exposure
    from mcpq.gateway.main import serve_http, serve_stdio
    from mcpq.gateway.tasks import TaskOptions
    from mcpq.worker.contract.settings import Settings

    settings = Settings.from_env()
    exposure = Exposure(
        servers=frozenset(_comma_list(servers)) if servers else None,
        tools=_comma_list(tools) if tools else None,
    )
    tasks = TaskOptions(task_after=task_after, task_tools=frozenset(_comma_list(task_tools)))
    if stdio:
        serve_stdio(settings, exposure=exposure, tasks=tasks)
        return
    try:
        import uvicorn  # noqa: F401
    except ImportError as exc:
        _fail(f"the gateway over HTTP needs its extra: pip install 'mcpq[gateway]' ({exc})", EXIT_USAGE)
    kwargs = {} if max_request_bytes is None else {"max_request_bytes": max_request_bytes}
    hosts = _comma_list(allowed_hosts)
    serve_http(settings, host, port, exposure=exposure, allowed_hosts=hosts, tasks=tasks, **kwargs)


def _comma_list(text: str | None) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``."""
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def breakers(ctx: click.Context, as_json: bool) -> None:
    """Show every server's circuit breaker (shared by the whole fleet)."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        status = _queue().breakers()
    except _redis_errors() as exc:
        _unreachable(exc)
    if as_json:
        _print_json(status)
        return
    if not status:
        _fail("no servers published yet: start a worker with `mcpq worker`", EXIT_FAILED)
    now = time.time()
    rows = []
    for name, s in status.items():
        due = s["next_probe_at"]
        rows.append(
            {
                "server": name,
                "state": s["state"],
                "failures": s["failures"],
                "opened": f"{now - s['opened_at']:.1f}s ago" if s["opened_at"] else "",
                "next probe": (f"in {due - now:.1f}s" if due > now else "now") if due else "",
                "last error": s["last_error"],
                "in flight": s["in_flight"],
            }
        )
    _table(rows, ["server", "state", "failures", "opened", "next probe", "last error", "in flight"])


@breakers.command("reset")
@click.argument("server")
def breakers_reset(server: str) -> None:
    """Close SERVER's breaker for every worker."""
    try:
        cleared = _queue().reset_breaker(server)
    except ServerNotFoundError as exc:
        _fail(exc.message, EXIT_FAILED)
    except _redis_errors() as exc:
        _unreachable(exc)
    click.echo(f"{server}: breaker {'reset to closed' if cleared else 'was already closed'}")


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option(
    "--concurrency", "-c", type=int, help="Threads per worker process (default MCPQ_WORKER_CONCURRENCY)."
)
@click.option(
    "--pool", "-P", default="threads", show_default=True, help="Celery pool: threads, prefork, solo."
)
@click.option("--loglevel", "-l", default="info", show_default=True)
@click.option(
    "--mingle",
    is_flag=True,
    help="Sync with the other workers at start (Celery's mingle: about 1 s; mcpq uses no revokes).",
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(
    concurrency: int | None, pool: str, loglevel: str, mingle: bool, celery_args: tuple[str, ...]
) -> None:
    """Start a worker (celery -A mcpq.worker worker) after checking the config.

    Any other Celery worker option passes through as it is (``-n w1@%h``,
    ``-Q q``, ``--autoscale``; everything after ``--`` too)."""
    from mcpq.worker.start import celery_worker_argv, preflight, worker_environment

    settings = Settings.from_env()
    try:
        config = preflight(settings)
    except ConfigError as exc:
        _fail(exc.message, EXIT_USAGE)
    click.echo(
        f"mcpq worker: {len(config.mcp_servers)} servers from {settings.config_path}; "
        f"broker {settings.redacted()['broker_url']}",
        err=True,
    )
    argv = celery_worker_argv(
        settings,
        pool=pool,
        concurrency=concurrency,
        loglevel=loglevel,
        mingle=mingle,
        passthrough=celery_args,
    )
    os.execvpe(argv[0], argv, worker_environment(os.environ))


@cli.command()
@click.option("--keep", is_flag=True, help="Leave the demo running until Ctrl-C.")
def demo(keep: bool) -> None:
    """Run the end-to-end demo: embedded Redis, a worker, demo servers over stdio, HTTP and SSE."""
    from mcpq.producer.demo import run_demo

    sys.exit(run_demo(keep=keep))


def _add_batch_command() -> None:
    from mcpq.producer.batch import batch

    cli.add_command(batch)


_add_batch_command()


def _add_top_command() -> None:
    from mcpq.producer.top import top

    cli.add_command(top)


_add_top_command()


def main(argv: Sequence[str] | None = None) -> None:
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="mcpq", standalone_mode=True)
    except MCPError as exc:  # anything not handled above still gets a one-line message
        _fail(exc.message, EXIT_FAILED)


if __name__ == "__main__":
    main()
