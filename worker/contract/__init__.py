"""What the producer and the worker both import: the contract between them.

Error codes and exceptions, ToolResult, settings, the Redis key layout, task
names, the Celery app's configuration, the ledger entry format, call
descriptions and redaction, breaker status readers and the one predicate for
an unreachable broker or Redis. Nothing here imports any other part of
``mcpq.worker`` (a test enforces it), so ``import mcpq.producer`` stays free of
the MCP SDK, the YAML config loader and the worker's Celery signal wiring.
"""
