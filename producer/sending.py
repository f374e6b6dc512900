"""Putting calls on the broker, one implementation for every producer path:
single ``mcpq.call_tool`` messages and ``mcpq.call_chunk`` tasks with their
ledger entries.

Used by the fan-out engine (:mod:`mcpq.producer.engine`) and by the asyncio
face's publisher thread (:mod:`mcpq.producer.aio_publisher`). Everything here
blocks on the network; none of it subscribes to results (the callers listen
their own way).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery

from mcpq.producer.submission import PreparedCall
from mcpq.worker.contract import tracing
from mcpq.worker.contract.ledger import ledger_message
from mcpq.worker.contract.redact import describe_chunk
from mcpq.worker.contract.task_names import CALL_CHUNK, CALL_TOOL

#: ``record(entries, members)``: write ledger entries (and chunk members) before publishing.
RecordInLedger = Callable[[list[tuple[str, dict[str, Any]]], list[tuple[str, str]]], None]


@dataclass(frozen=True, slots=True)
class Chunk:
    """One ``mcpq.call_chunk`` task: its own id, its call entries, their description."""

    id: str
    calls: list[dict[str, Any]]
    shown: str

    @property
    def members(self) -> list[tuple[str, str]]:
        """``(call id, chunk id)`` of every call inside, for ``Ledger.record(members=...)``."""
        return [(str(c["id"]), self.id) for c in self.calls]


def plan_chunks(entries: Sequence[tuple[dict[str, Any], str]], chunk_size: int) -> list[Chunk]:
    """Pack ``(chunk entry, label)`` pairs into chunks of at most ``chunk_size`` calls.

    :param entries: each call's chunk entry (with its ``id``) and its label.
    :param chunk_size: calls per chunk task, at least 1.
    """
    out: list[Chunk] = []
    for start in range(0, len(entries), chunk_size):
        piece = entries[start : start + chunk_size]
        out.append(
            Chunk(str(uuid.uuid4()), [e for e, _ in piece], describe_chunk([label for _, label in piece]))
        )
    return out


def record_chunks(record: RecordInLedger, chunks: Iterable[Chunk], queue: str) -> None:
    """Write ``chunks`` to the ledger (the chunk's message and its members) before they are sent."""
    chunks = list(chunks)
    record(
        [(c.id, ledger_message({"calls": c.calls}, queue, c.shown, task=CALL_CHUNK)) for c in chunks],
        [m for c in chunks for m in c.members],
    )


def send_chunks(
    app: Celery, chunks: Iterable[Chunk], queue: str, retry_policy: dict[str, Any], producer: Any = None
) -> list[str]:
    """Publish ``chunks`` to ``queue`` over one producer; return their task ids.

    A chunk has no result of its own (``ignore_result``: each call's result is
    stored under the call's id), so nothing subscribes here."""
    sent: list[str] = []
    with app.producer_or_acquire(producer) as p:
        for chunk in chunks:
            app.send_task(
                CALL_CHUNK,
                kwargs={"calls": chunk.calls},
                task_id=chunk.id,
                queue=queue,
                producer=p,
                retry=True,
                retry_policy=retry_policy,
                ignore_result=True,
                argsrepr="()",
                kwargsrepr=chunk.shown,
            )
            sent.append(chunk.id)
    return sent


def send_call_tool(
    app: Celery, call: PreparedCall, retry_policy: dict[str, Any], producer: Any = None
) -> None:
    """Publish ``call`` as one ``mcpq.call_tool`` message, its result stored as usual.

    Unlike ``app.send_task`` this never calls ``backend.on_task_call``, which
    would subscribe Celery's own (blocking) result consumer to the call: the
    asyncio face listens on its own connection instead."""
    amqp = app.amqp
    options = amqp.router.route({"queue": call.queue}, CALL_TOOL, (), call.kwargs, None)
    message = amqp.create_task_message(
        call.task_id,
        CALL_TOOL,
        (),
        call.kwargs,
        reply_to=app.thread_oid,
        create_sent_event=app.conf.task_send_sent_event,
        # Flower and logs show the tool and the arguments with secret values
        # masked; the broker message itself still holds them.
        argsrepr="()",
        kwargsrepr=call.shown,
    )
    # On the publisher thread: the submit span is current again, so Celery's
    # publish span is its child and the message headers carry its trace.
    with (
        tracing.attached(call.trace),
        app.producer_or_acquire(producer) as p,
        p.connection._reraise_as_library_errors(),
    ):
        amqp.send_task_message(p, CALL_TOOL, message, retry=True, retry_policy=retry_policy, **options)
