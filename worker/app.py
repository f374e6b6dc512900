"""The worker's Celery app: the shared configuration plus the task modules it runs.

Task modules import ``app`` from here, and ``mcpq.worker.celery`` adds the
signal handlers, so no module imports one that imports it back.
"""

from __future__ import annotations

from mcpq.worker.contract.app import make_app

app = make_app(include=["mcpq.worker.tasks"])
