"""A bare MCP server for bench.gateway's baseline: the SDK's lowlevel ``Server``
over Streamable HTTP with one ``echo`` tool answered at once, no queue behind it.
Its round trip is what the MCP stack alone costs (client and server).

    python -m bench.mcp_echo_server PORT
"""

from __future__ import annotations

import sys
from typing import Any

import mcp_types as types
import uvicorn
from mcp.server.lowlevel.server import Server

ECHO = types.Tool(name="echo", inputSchema={"type": "object", "properties": {"text": {"type": "string"}}})


async def _list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
    return types.ListToolsResult(tools=[ECHO])


async def _call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
    text = str((params.arguments or {}).get("text", ""))
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)])


def main(argv: list[str] | None = None) -> None:
    port = int((argv or sys.argv[1:])[0])
    server: Server[Any] = Server("bench-echo", on_list_tools=_list_tools, on_call_tool=_call_tool)
    app = server.streamable_http_app(host="127.0.0.1")
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
