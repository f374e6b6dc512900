"""MCP server used by mcpq's integration tests.

    python tests/servers/test_server.py stdio [--name NAME] [--only-echo]
    python tests/servers/test_server.py http [--host H] [--port N] [--stateless] [--json-response] [...]
    python tests/servers/test_server.py sse [--host H] [--port N] [...]

``http`` serves Streamable HTTP at ``/mcp``; ``sse`` serves the legacy transport
at ``/sse``. ``--only-echo`` registers nothing but ``echo`` (two servers offering
the same tool name). See tests/servers/README.md for the tool list.

Cross-process bookkeeping (``count``, ``concurrency``) lives in files under
``$MCPQ_TEST_COUNT_DIR`` so a test can observe executions that happened in any
server process, including ones that have since been restarted or killed.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError
from mcp.types import ToolAnnotations
from mcp_types import INTERNAL_ERROR
from pydantic import Field

COUNT_DIR_ENV = "MCPQ_TEST_COUNT_DIR"
DEFAULT_NAME = "mcpq-test"

_KEY = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,128}$", description="file-name-safe key")]


def _count_dir() -> Path:
    raw = os.environ.get(COUNT_DIR_ENV)
    if not raw:
        raise ToolError(f"{COUNT_DIR_ENV} is not set in the server's environment")
    path = Path(raw)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def _locked(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read_ints(fd: int) -> tuple[int, int]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 256).decode().split()
    current = int(raw[0]) if raw else 0
    peak = int(raw[1]) if len(raw) > 1 else 0
    return current, peak


def _write_ints(fd: int, current: int, peak: int) -> None:
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, f"{current} {peak}\n".encode())


# --- tools -----------------------------------------------------------------


def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


async def sleep_ms(ms: Annotated[int, Field(ge=0, le=3_600_000)]) -> str:
    """Sleep asynchronously for ms milliseconds."""
    await asyncio.sleep(ms / 1000)
    return f"slept {ms} ms"


def fail(message: str) -> str:
    """Always fail: the call returns isError=True with the message as its text."""
    raise ToolError(message)


def count(key: _KEY) -> int:
    """Append one line to $MCPQ_TEST_COUNT_DIR/<key> and return how many lines it now has."""
    path = _count_dir() / key
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    # Lines are appended atomically (one small write each), so this never sees a torn line.
    with path.open("rb") as fh:
        return sum(1 for _ in fh)


async def concurrency(key: _KEY, ms: Annotated[int, Field(ge=0, le=3_600_000)]) -> int:
    """Hold a slot for ms milliseconds; returns how many calls for key were in flight (including this one).

    $MCPQ_TEST_COUNT_DIR/<key>.conc holds "<current> <peak>" under an flock, across processes.
    """
    path = _count_dir() / f"{key}.conc"
    with _locked(path) as fd:
        current, peak = _read_ints(fd)
        current += 1
        peak = max(peak, current)
        _write_ints(fd, current, peak)
    try:
        await asyncio.sleep(ms / 1000)
    finally:
        with _locked(path) as fd:
            now, peak = _read_ints(fd)
            _write_ints(fd, max(now - 1, 0), peak)
    return current


def flaky(key: _KEY, failures: Annotated[int, Field(ge=0, le=100)]) -> int:
    """Fail with a JSON-RPC internal error (-32603) the first ``failures`` times for key, then succeed.

    Returns the attempt number that succeeded. Attempts are counted in $MCPQ_TEST_COUNT_DIR/<key>.
    """
    attempt = count(key)
    if attempt <= failures:
        raise MCPError(INTERNAL_ERROR, f"flaky failure {attempt} of {failures}")
    return attempt


async def slow_count(key: _KEY, ms: Annotated[int, Field(ge=0, le=3_600_000)]) -> int:
    """Count one execution for key (like ``count``), then hold the call for ms milliseconds."""
    n = count(key)
    await asyncio.sleep(ms / 1000)
    return n


async def progress(
    key: _KEY,
    steps: Annotated[int, Field(ge=1, le=10_000)],
    ms: Annotated[int, Field(ge=0, le=60_000)],
    ctx: Context,
) -> int:
    """Count one execution for key, report steps progress notifications ms apart
    (progress 1..steps, total=steps, message "step i of steps"), then return steps."""
    count(key)
    for i in range(1, steps + 1):
        await ctx.report_progress(i, steps, f"step {i} of {steps}")
        if i < steps:
            await asyncio.sleep(ms / 1000)
    return steps


def _event(key: str, what: str) -> None:
    fd = os.open(_count_dir() / f"{key}.events", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{what} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


async def wait_for_cancel(key: _KEY, ms: Annotated[int, Field(ge=0, le=3_600_000)]) -> str:
    """Record "started", hold the call for ms milliseconds, record "finished" and return "finished".

    If the request is cancelled meanwhile (the SDK interrupts the handler on
    notifications/cancelled, or when a 2026-07-28 HTTP request's stream
    closes), record "cancelled" instead and let the cancellation propagate.
    Events are lines "<event> <pid>" in $MCPQ_TEST_COUNT_DIR/<key>.events.
    """
    _event(key, "started")
    try:
        await asyncio.sleep(ms / 1000)
    except BaseException:  # asyncio.CancelledError, anyio's cancellation on asyncio
        _event(key, "cancelled")
        raise
    _event(key, "finished")
    return "finished"


def pid() -> int:
    """Return the server process id."""
    return os.getpid()


def big(n: Annotated[int, Field(ge=0, le=256 * 1024 * 1024)]) -> str:
    """Return a text of exactly n bytes (ASCII)."""
    pattern = "0123456789abcdef"
    return (pattern * (n // len(pattern) + 1))[:n]


def env_value(name: str) -> str:
    """Return os.environ.get(name, "") from the server process."""
    return os.environ.get(name, "")


def mul(a: int, b: int) -> int:
    """Multiply two integers (registered as "math.mul")."""
    return a * b


def read_only_echo(text: str) -> str:
    """Echo, annotated readOnlyHint/idempotentHint."""
    return text


def strict(n: int, mode: Literal["a", "b"]) -> str:
    """Accept only mode "a" or "b" (the input schema has an enum)."""
    return f"{mode}{n}"


def trace_meta(text: str, ctx: Context) -> dict[str, str]:
    """Return the W3C trace context this request carried in ``params._meta``
    (``traceparent``, and ``tracestate`` if any); ``text`` is ignored."""
    meta = ctx.request_context.meta or {}
    return {key: str(meta[key]) for key in ("traceparent", "tracestate") if key in meta}


def build_server(name: str = DEFAULT_NAME, only_echo: bool = False) -> MCPServer:
    server: MCPServer = MCPServer(name, log_level="WARNING")
    server.add_tool(echo)
    if only_echo:
        return server
    server.add_tool(add)
    server.add_tool(sleep_ms)
    server.add_tool(fail)
    server.add_tool(count)
    server.add_tool(concurrency)
    server.add_tool(pid)
    server.add_tool(progress)
    server.add_tool(wait_for_cancel)
    server.add_tool(flaky)
    server.add_tool(slow_count)
    server.add_tool(big)
    server.add_tool(env_value)
    server.add_tool(mul, name="math.mul")
    server.add_tool(
        read_only_echo,
        annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True),
    )
    server.add_tool(strict)
    server.add_tool(trace_meta)
    return server


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="mcpq integration-test MCP server")
    parser.add_argument("transport", choices=["stdio", "http", "sse"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--stateless", action="store_true", help="stateless Streamable HTTP")
    parser.add_argument("--json-response", action="store_true", help="Streamable HTTP JSON responses")
    parser.add_argument("--name", default=DEFAULT_NAME, help="server name reported in serverInfo")
    parser.add_argument("--only-echo", action="store_true", help="register only the echo tool")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    server = build_server(args.name, only_echo=args.only_echo)
    for logger_name in ("mcp", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(logger_name).setLevel(logging.WARNING)
    try:
        if args.transport == "stdio":
            server.run("stdio")
        elif args.transport == "http":
            server.run(
                "streamable-http",
                host=args.host,
                port=args.port,
                stateless_http=args.stateless,
                json_response=args.json_response,
            )
        else:
            server.run("sse", host=args.host, port=args.port)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
