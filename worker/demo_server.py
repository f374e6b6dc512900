"""The demo MCP server bundled with mcpq (what ``mcpq demo`` talks to).

A small, dependency-free server built on the official SDK's ``MCPServer``:

- ``echo(text)`` -> the text, unchanged (plain text)
- ``add(a, b)`` -> ``a + b`` (structured output: ``{"result": <float>}``)
- ``sleep(ms)`` -> ``"slept N ms"`` after an async sleep (plain text; 0 <= ms <= 600000),
  reporting progress every 500 ms to a caller that asked for it
- ``word_count(text)`` -> ``{"words": .., "characters": .., "lines": ..}`` (structured)

Run it with one of::

    python -m mcpq.worker.demo_server stdio
    python -m mcpq.worker.demo_server http --host 127.0.0.1 --port 8765   # Streamable HTTP at /mcp
    python -m mcpq.worker.demo_server sse --host 127.0.0.1 --port 8766    # legacy SSE at /sse

Logging is set to warnings only, and every log line goes to stderr, so stdout
of the stdio transport carries nothing but JSON-RPC.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence
from typing import Annotated, TypedDict

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import ToolAnnotations
from pydantic import Field

SERVER_NAME = "mcpq-demo"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8765
DEFAULT_SSE_PORT = 8766
MAX_SLEEP_MS = 600_000
#: How often ``sleep`` reports progress to a caller that asked for it.
PROGRESS_EVERY_MS = 500

_PURE = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)


class WordCount(TypedDict):
    """Counts for a piece of text."""

    words: int
    characters: int
    lines: int


def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


async def sleep(
    ms: Annotated[int, Field(ge=0, le=MAX_SLEEP_MS, description="milliseconds")], ctx: Context
) -> str:
    """Sleep asynchronously for ``ms`` milliseconds (0..600000), then say so.

    A caller that asks for progress hears it at the start and about every
    :data:`PROGRESS_EVERY_MS` (milliseconds slept of ``ms``)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + ms / 1000
    while (left := end - loop.time()) > 0:
        done = ms - round(left * 1000)
        await ctx.report_progress(done, ms, f"slept {done} of {ms} ms")
        await asyncio.sleep(min(left, PROGRESS_EVERY_MS / 1000))
    return f"slept {ms} ms"


def word_count(text: str) -> WordCount:
    """Count the words, characters and lines in a text."""
    return WordCount(words=len(text.split()), characters=len(text), lines=len(text.splitlines()))


def build_server(name: str = SERVER_NAME) -> MCPServer:
    """Build the demo server with its four tools registered."""
    server: MCPServer = MCPServer(name, log_level="WARNING", warn_on_duplicate_tools=False)
    # The SDK would auto-wrap a str return as structured {"result": ...}; echo and
    # sleep are meant to be plain text, add and word_count structured.
    server.add_tool(echo, annotations=_PURE, structured_output=False)
    server.add_tool(add, annotations=_PURE, structured_output=True)
    server.add_tool(sleep, annotations=_PURE, structured_output=False)
    server.add_tool(word_count, annotations=_PURE, structured_output=True)
    return server


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mcpq.worker.demo_server", description="mcpq demo MCP server"
    )
    sub = parser.add_subparsers(dest="transport", required=True, metavar="{stdio,http,sse}")
    sub.add_parser("stdio", help="serve over stdin/stdout")
    http = sub.add_parser("http", help="serve Streamable HTTP at /mcp")
    http.add_argument("--host", default=DEFAULT_HOST)
    http.add_argument("--port", type=int, default=DEFAULT_HTTP_PORT)
    http.add_argument("--stateless", action="store_true", help="stateless Streamable HTTP (no sessions)")
    http.add_argument("--json-response", action="store_true", help="answer with JSON bodies instead of SSE")
    sse = sub.add_parser("sse", help="serve the legacy HTTP+SSE transport at /sse")
    sse.add_argument("--host", default=DEFAULT_HOST)
    sse.add_argument("--port", type=int, default=DEFAULT_SSE_PORT)
    return parser


def _quiet_logging() -> None:
    # MCPServer's constructor runs logging.basicConfig(level=WARNING) with a stderr
    # handler; pin the chatty libraries too so nothing below WARNING leaks out.
    for name in ("mcp", "uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "sse_starlette"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the server until stopped."""
    args = _parser().parse_args(argv)
    server = build_server()
    _quiet_logging()
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
