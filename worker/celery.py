"""The Celery app: ``celery -A mcpq.worker worker`` finds it here.

Broker, result backend and shared-state Redis come from ``MCPQ_*`` settings.
JSON is the only serializer accepted anywhere. Importing this module connects
the worker's signal handlers (``mcpq.worker.signals``).
"""

from __future__ import annotations

from mcpq.worker import signals as _signals  # noqa: F401  (connects the handlers)
from mcpq.worker.app import app

__all__ = ["app"]
