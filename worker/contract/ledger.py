"""The ledger of enqueued calls: what makes "nothing lost" hold on a Redis broker.

kombu's Redis transport takes a message off the queue (BRPOP) and records it
as unacknowledged in a second round trip; a worker killed in between takes
the message with it. So the producer records every call (task id and
message) in the state Redis before publishing it; the call's final result
clears the entry inside the breaker's complete script (no extra round trip on
the happy path); and every worker sweeps now and then for entries that have
been due for longer than the broker could possibly need, and publishes them
again. A republished call that is in fact still queued somewhere is
harmless: its execution claim answers the second delivery.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import redis

from mcpq.worker.contract.keys import Keys
from mcpq.worker.contract.scripts import load_script

#: Entries handed to one sweeper per pass.
SWEEP_BATCH = 200


def ledger_message(
    kwargs: dict[str, Any],
    queue: str,
    kwargsrepr: str,
    task: str | None = None,
    trace: dict[str, str] | None = None,
) -> dict[str, Any]:
    """What a sweeper needs to publish a call again: the task's kwargs, its queue,
    its secret-free description, unless ``mcpq.call_tool`` the task name, and
    (tracing on) the submit span's context, so that a republished call's spans
    join the trace its first publish began."""
    message: dict[str, Any] = {"kwargs": kwargs, "queue": queue, "kwargsrepr": kwargsrepr}
    if task is not None:
        message["task"] = task
    if trace:
        message["trace"] = trace
    return message


class Ledger:
    def __init__(self, client: redis.Redis, keys: Keys, grace: float) -> None:
        self.redis = client
        self.keys = keys
        self.grace_ms = int(grace * 1000)
        self._add = load_script(client, "ledger_add.lua")
        self._sweep = load_script(client, "ledger_sweep.lua")

    @property
    def key_pair(self) -> list[str]:
        return [self.keys.ledger, self.keys.ledger_messages]

    def record(
        self,
        entries: Iterable[tuple[str, dict[str, Any]]],
        extra_grace: float = 0.0,
        members: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Record calls about to be published: (task id, :func:`ledger_message`).

        :param entries: the tasks, each with the message to publish it again.
        :param extra_grace: seconds added to their due time (a countdown).
        :param members: (call id, chunk task id) for calls sent inside chunk
            tasks, so that a call id alone is known (:meth:`knows`).
        """
        pairs: list[Any] = []
        for task_id, message in entries:
            pairs += [task_id, json.dumps(message, separators=(",", ":"))]
        if not pairs:
            return
        args: list[Any] = [self.grace_ms + int(extra_grace * 1000), len(pairs) // 2, *pairs]
        for call_id, chunk_id in members:
            args += [call_id, chunk_id]
        self._add(keys=[*self.key_pair, self.keys.ledger_members], args=args)

    def clear(self, task_id: str, members: Iterable[str] = ()) -> None:
        """Forget task ``task_id`` (it has its final result) and, for a chunk, its calls' ids."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(self.keys.ledger, task_id)
        pipe.hdel(self.keys.ledger_messages, task_id)
        call_ids = list(members)
        if call_ids:
            pipe.hdel(self.keys.ledger_members, *call_ids)
        pipe.execute()

    def knows(self, task_id: str) -> bool:
        """Whether ``task_id`` is a call (or chunk) still due: enqueued and not finished."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hexists(self.keys.ledger_messages, task_id)
        pipe.hexists(self.keys.ledger_members, task_id)
        return any(pipe.execute())

    def take_overdue(self) -> list[tuple[str, dict[str, Any]]]:
        raw = self._sweep(keys=self.key_pair, args=[self.grace_ms, SWEEP_BATCH])
        out = []
        for i in range(0, len(raw), 2):
            task_id = raw[i].decode() if isinstance(raw[i], bytes) else str(raw[i])
            out.append((task_id, json.loads(raw[i + 1])))
        return out
