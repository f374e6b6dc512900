"""mcpq worker: runs MCP tool calls as Celery tasks over pooled sessions.

Importing this package is cheap on purpose: the producer imports the contract
modules (``mcpq.worker.contract.errors``, ``mcpq.worker.contract.result``, ``mcpq.worker.contract.keys``,
``mcpq.worker.contract.task_names``) without pulling in Celery's worker side or the MCP SDK.
``celery -A mcpq.worker`` finds the app in ``mcpq.worker.celery``.
"""
