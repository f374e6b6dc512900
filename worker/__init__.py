"""mcpq worker: runs MCP tool calls as Celery tasks over pooled sessions.

Importing this package is cheap on purpose: the producer imports only its
contract subpackage (``mcpq.worker.contract``) and never the Celery worker
side or the MCP SDK. ``celery -A mcpq.worker`` finds the app in
``mcpq.worker.celery``.
"""
