"""The worker's Celery app: the shared configuration plus the task modules it runs.

Task modules import ``app`` from here, and ``mcpq.worker.celery`` adds the
signal handlers, so no module imports one that imports it back.
"""

from __future__ import annotations

import sys

from mcpq.worker.contract.app import make_app
from mcpq.worker.contract.errors import ConfigError

try:
    app = make_app(include=["mcpq.worker.tasks"])
except ConfigError as exc:
    # `celery -A mcpq.worker ...` (worker, Flower) would print the import's traceback:
    # a setting a person must fix gets one line and exit 2, as `mcpq` gives it.
    sys.stderr.write(f"mcpq: {exc.message}\n")
    raise SystemExit(2) from None
