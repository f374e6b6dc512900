"""mcpq: run MCP tool calls as Celery tasks.

    from mcpq import ToolQueue
    q = ToolQueue.from_env()
    result = q.call("get-sum", {"a": 2, "b": 40}, timeout=30)

This file is the package's public API: the producer's (``mcpq.producer``),
under one name. The repository's folders ``worker/`` and ``producer/``
install as ``mcpq.worker`` and ``mcpq.producer``. Importing ``mcpq`` never
imports the MCP SDK.
"""

from mcpq.producer import *  # noqa: F403  (the names listed in mcpq.producer.__all__)
from mcpq.producer import __all__ as __all__
