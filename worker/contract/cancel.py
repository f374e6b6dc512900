"""Cancelling a call: the flag a caller sets, and the message that interrupts a running call.

A cancel is a flag in the state Redis (``Keys.cancelled``) plus one message on
``Keys.cancel_channel``. Every worker reads the flag before it sends a call
(in the breaker's admit script, so it costs no round trip): a call that is
queued, waiting for a retry, a limit or an open breaker, redelivered or
republished by the ledger sweep then ends ``cancelled`` without reaching the
server. Every worker process also listens on the channel and interrupts the
MCP request of a call it is running. Only workers write a call's result, so
a call has one terminal result whatever the race.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import redis

from mcpq.worker.contract.keys import Keys

#: What a call id may look like: Celery task ids are UUIDs; request ids chosen
#: by callers are kept to a safe, bounded alphabet.
_CALL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")


def check_call_id(task_id: object) -> str:
    """``task_id`` if it can name a call, else a ValueError a person can act on."""
    if not isinstance(task_id, str) or not _CALL_ID.fullmatch(task_id):
        shown = repr(task_id)[:80]
        raise ValueError(
            f"{shown} is not a call id: ids are 1 to 200 letters, digits, '.', '_', ':' or '-' "
            "(mcpq prints a call's id when it submits it)"
        )
    return task_id


def request_cancel(client: redis.Redis, keys: Keys, task_ids: Iterable[str], ttl: float) -> None:
    """Flag ``task_ids`` as cancelled (for ``ttl`` seconds) and tell running workers, in one round trip."""
    pipe = client.pipeline(transaction=False)
    ids = list(task_ids)
    for task_id in ids:
        pipe.set(keys.cancelled(task_id), "1", ex=max(int(ttl), 1))
    for task_id in ids:
        pipe.publish(keys.cancel_channel, task_id)
    if ids:
        pipe.execute()
