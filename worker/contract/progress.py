"""A running call's progress, as the worker publishes it and callers read it.

A call asks for progress with ``progress=True`` in its task kwargs (or in its
chunk entry); only then does the worker send the MCP request with a
``progressToken`` and relay the server's ``notifications/progress``: calls
nobody listens to cost no Redis traffic. Updates are coalesced to at most one
per :data:`PROGRESS_INTERVAL` per call (the latest wins; the last one is
flushed before the result); each is written to ``Keys.progress(id)`` (so a
late reader sees the latest) and published on the channel of the same name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

#: At most one update per call per this many seconds reaches Redis.
PROGRESS_INTERVAL = 0.1
#: The latest update is kept this long after it was written.
PROGRESS_TTL = 600


@dataclass(frozen=True, slots=True)
class ProgressUpdate:
    """``progress`` so far, of ``total`` when the server knows it, with an optional ``message``."""

    progress: float
    total: float | None = None
    message: str | None = None

    def to_json(self) -> str:
        return json.dumps(
            {"progress": self.progress, "total": self.total, "message": self.message}, separators=(",", ":")
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> ProgressUpdate | None:
        """The update in ``raw``, or None when it is not one (a reader must not crash on a bad message)."""
        try:
            doc: Any = json.loads(raw)
            progress = float(doc["progress"])
            total = None if doc.get("total") is None else float(doc["total"])
        except (ValueError, TypeError, KeyError):
            return None
        message = doc.get("message")
        if not math.isfinite(progress) or (total is not None and not math.isfinite(total)):
            return None
        return cls(progress, total, message if isinstance(message, str) else None)
