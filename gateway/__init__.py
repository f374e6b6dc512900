"""``mcpq gateway``: the fleet as one MCP server, every call queued (docs/gateway.md).

Built on the MCP SDK's server side; it calls through
:class:`~mcpq.producer.aio.AsyncToolQueue` and imports nothing of the worker
but its contract. Importing the producer never imports this package.
"""
