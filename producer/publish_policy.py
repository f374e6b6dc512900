"""How hard the producer tries to publish, and how long past a deadline it waits.

Shared by single calls (:mod:`mcpq.producer.queue`) and fan-out
(:mod:`mcpq.producer.engine`); a module of its own so neither has to import
the other for them.
"""

from __future__ import annotations

#: Extra wait beyond the call's own deadline: queueing, connect, result write.
RESULT_GRACE = 10.0
#: Publishing retries: enough to ride out a blip, not to hang a caller. Also the
#: result backend's reconnect policy of a ToolQueue that built its own app.
PUBLISH_RETRY = {
    "max_retries": 3,
    "interval_start": 0.1,
    "interval_step": 0.2,
    "interval_max": 0.5,
}
