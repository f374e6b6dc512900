"""The MCP conformance suite's test tools, for running its server scenarios through the gateway.

    python tests/servers/conformance_tools_server.py [stdio] [--progress-ms N]

The official suite (``@modelcontextprotocol/conformance``, pinned in
tests/npm/package.json) checks a server's ``tools/call`` answers against tools
of fixed names. This server implements the ones whose scenarios concern a
gateway that offers tools only, exactly as the scenarios' own descriptions
specify (``conformance list``; the text of each scenario in
``node_modules/@modelcontextprotocol/conformance/dist/index.js``):

- ``test_simple_text`` (``tools-call-simple-text``): the text
  ``"This is a simple text response for testing."``
- ``test_image_content`` (``tools-call-image``): a 1x1 red PNG, ``image/png``
- ``test_audio_content`` (``tools-call-audio``): a tiny WAV, ``audio/wav``
- ``test_embedded_resource`` (``tools-call-embedded-resource``): the text
  resource ``test://embedded-resource``, ``text/plain``
- ``test_multiple_content_types`` (``tools-call-mixed-content``): text, an
  image and a JSON resource
- ``test_error_handling`` (``tools-call-error``): ``isError: true``, text
  ``"This tool intentionally returns an error for testing"``
- ``test_tool_with_progress`` (``tools-call-with-progress``): progress 0, 50,
  100 of 100, ``--progress-ms`` apart (default 50, as the suite says)
- ``json_schema_2020_12_tool`` (``json-schema-2020-12``): its inputSchema is
  the suite's 2020-12 schema (``$schema``, ``$defs`` with an ``$anchor``,
  ``allOf``/``anyOf``, ``if``/``then``/``else``)
- ``test_logging_tool`` (``server-stateless``: no log without ``logLevel``):
  logs three info messages to its own client (the worker), returns a text
- ``test_trigger_tool_change`` (``server-stateless``: ``toolsListChanged`` on
  a listen stream): adds ``test_dynamic_tool`` (removes it, every other call)
  and sends ``notifications/tools/list_changed``
- ``aaa_no_arguments`` (``http-header-validation``): the text ``"ok"``
- ``test_mcp_param_header`` (``http-custom-header-server-validation``): echoes
  ``region``, a string argument declared ``x-mcp-header: Region``

Every tool has a description and an input schema (``tools-list``).

``aaa_no_arguments`` is there because ``http-header-validation`` calls the
*first* tool ``tools/list`` returns with ``arguments: {}``, and the gateway lists
tools by name: without it the first is ``json_schema_2020_12_tool``, whose
schema (rightly) refuses ``{}``.

``--progress-ms``: mcpq coalesces a call's progress to one update per 100 ms
(``PROGRESS_INTERVAL`` in mcpq/worker/contract/progress.py, the latest wins),
so at the suite's ~50 ms the middle update is often merged into the last;
the gateway's test runs this tool at a pace mcpq relays update by update.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import struct
from collections.abc import Sequence
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp_types import (
    AudioContent,
    CallToolResult,
    EmbeddedResource,
    ImageContent,
    TextContent,
    TextResourceContents,
)
from pydantic import Field

NAME = "mcpq-conformance-tools"

#: A 1x1 red pixel PNG.
RED_PIXEL_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
)

#: The inputSchema the ``json-schema-2020-12`` scenario expects, verbatim.
JSON_SCHEMA_2020_12: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {
        "address": {
            "$anchor": "addressDef",
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
        }
    },
    "properties": {
        "name": {"type": "string"},
        "address": {"$ref": "#/$defs/address"},
        "contactMethod": {"type": "string", "enum": ["phone", "email"]},
        "phone": {"type": "string"},
        "email": {"type": "string"},
    },
    "allOf": [{"anyOf": [{"required": ["phone"]}, {"required": ["email"]}]}],
    "if": {"properties": {"contactMethod": {"const": "phone"}}, "required": ["contactMethod"]},
    "then": {"required": ["phone"]},
    "else": {"required": ["email"]},
    "additionalProperties": False,
}


def _wav(samples: int = 800, rate: int = 8000) -> str:
    """A silent 8-bit mono WAV (0.1 s), base64."""
    data = b"\x80" * samples
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate, 1, 8)
    return base64.b64encode(header + fmt + b"data" + struct.pack("<I", len(data)) + data).decode()


def test_simple_text() -> list[TextContent]:
    """Return a simple text (conformance: tools-call-simple-text)."""
    return [TextContent(type="text", text="This is a simple text response for testing.")]


def test_image_content() -> list[ImageContent]:
    """Return a 1x1 red PNG (conformance: tools-call-image)."""
    return [ImageContent(type="image", data=RED_PIXEL_PNG, mime_type="image/png")]


def test_audio_content() -> list[AudioContent]:
    """Return a tiny WAV (conformance: tools-call-audio)."""
    return [AudioContent(type="audio", data=_wav(), mime_type="audio/wav")]


def test_embedded_resource() -> list[EmbeddedResource]:
    """Return an embedded text resource (conformance: tools-call-embedded-resource)."""
    resource = TextResourceContents(
        uri="test://embedded-resource", mime_type="text/plain", text="This is an embedded resource content."
    )
    return [EmbeddedResource(type="resource", resource=resource)]


def test_multiple_content_types() -> list[TextContent | ImageContent | EmbeddedResource]:
    """Return text, an image and a JSON resource (conformance: tools-call-mixed-content)."""
    resource = TextResourceContents(
        uri="test://mixed-content-resource", mime_type="application/json", text='{"test":"data","value":123}'
    )
    return [
        TextContent(type="text", text="Multiple content types test:"),
        ImageContent(type="image", data=RED_PIXEL_PNG, mime_type="image/png"),
        EmbeddedResource(type="resource", resource=resource),
    ]


def test_error_handling() -> CallToolResult:
    """Always fail with isError: true (conformance: tools-call-error)."""
    text = TextContent(type="text", text="This tool intentionally returns an error for testing")
    return CallToolResult(content=[text], is_error=True)


#: Milliseconds between test_tool_with_progress's notifications (``--progress-ms``).
PROGRESS_MS = 50


async def test_tool_with_progress(ctx: Context) -> str:
    """Report progress 0, 50 and 100 of 100, ~50 ms apart (conformance: tools-call-with-progress)."""
    for step, progress in enumerate((0, 50, 100)):
        if step:
            await asyncio.sleep(PROGRESS_MS / 1000)
        await ctx.report_progress(progress, 100)
    return "Progress test completed"


async def test_logging_tool(ctx: Context) -> str:
    """Log three info messages, then return (conformance: server-stateless)."""
    for message in ("Tool execution started", "Tool processing data", "Tool execution completed"):
        await ctx.info(message)
    return "Logging test completed"


def test_dynamic_tool() -> str:
    """A tool test_trigger_tool_change adds and removes."""
    return "dynamic"


def aaa_no_arguments() -> str:
    """Take no arguments and return "ok" (listed first, for conformance: http-header-validation)."""
    return "ok"


def json_schema_2020_12_tool(
    name: str | None = None,
    address: dict[str, str] | None = None,
    contactMethod: str | None = None,
    phone: str | None = None,
    email: str | None = None,
) -> str:
    """Tool with JSON Schema 2020-12 features (conformance: json-schema-2020-12)."""
    given = {"name": name, "address": address, "contactMethod": contactMethod, "phone": phone, "email": email}
    return f"received {sorted(k for k, v in given.items() if v is not None)}"


def test_mcp_param_header(
    region: Annotated[
        str,
        Field(
            description="mirrored in the Mcp-Param-Region header",
            json_schema_extra={"x-mcp-header": "Region"},
        ),
    ],
) -> str:
    """Echo region, an argument sent as the Mcp-Param-Region header too
    (conformance: http-custom-header-server-validation)."""
    return f"region={region}"


def build_server() -> MCPServer:
    server: MCPServer = MCPServer(NAME, log_level="WARNING")

    async def test_trigger_tool_change(ctx: Context) -> str:
        """Add test_dynamic_tool (or remove it, every other call) and tell the client the tools changed
        (conformance: server-stateless)."""
        if server._tool_manager.get_tool("test_dynamic_tool") is None:
            server.add_tool(test_dynamic_tool, structured_output=False)
            done = "added test_dynamic_tool"
        else:
            server.remove_tool("test_dynamic_tool")
            done = "removed test_dynamic_tool"
        await ctx.session.send_tool_list_changed()
        return done

    for tool in (
        aaa_no_arguments,
        test_simple_text,
        test_image_content,
        test_audio_content,
        test_embedded_resource,
        test_multiple_content_types,
        test_error_handling,
        test_tool_with_progress,
        test_logging_tool,
        test_trigger_tool_change,
        test_mcp_param_header,
    ):
        server.add_tool(tool, structured_output=False)
    server.add_tool(json_schema_2020_12_tool, structured_output=False)
    # The suite's schema, as the server advertises it (the signature cannot express it).
    server._tool_manager.get_tool("json_schema_2020_12_tool").parameters = JSON_SCHEMA_2020_12  # type: ignore[union-attr]
    return server


def main(argv: Sequence[str] | None = None) -> None:
    global PROGRESS_MS
    parser = argparse.ArgumentParser(description="the MCP conformance suite's test tools, over stdio")
    parser.add_argument("transport", nargs="?", choices=["stdio"], default="stdio")
    parser.add_argument(
        "--progress-ms", type=int, default=PROGRESS_MS, help="ms between progress notifications"
    )
    PROGRESS_MS = parser.parse_args(argv).progress_ms
    build_server().run("stdio")


if __name__ == "__main__":
    main()
