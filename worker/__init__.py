"""mcpq worker: runs MCP tool calls as Celery tasks over pooled sessions.

Importing this package is cheap on purpose: the producer imports the contract
modules (``worker.errors``, ``worker.result``, ``worker.keys``,
``worker.task_names``) without pulling in Celery's worker side or the MCP SDK.
``celery -A worker`` finds the app in ``worker.celery``.
"""
