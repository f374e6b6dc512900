"""Redis reads and writes written once, run by a sync or an asyncio client.

A *plan* is a generator that yields batches of Redis commands (method name and
arguments, as on a redis-py pipeline) and receives each batch's replies; its
return value is the answer. :func:`run_plan` drives it with a ``redis.Redis``,
:func:`run_plan_async` with a ``redis.asyncio.Redis``: every batch is one
pipelined round trip either way. That is how the producer's sync and asyncio
faces share one implementation of every read of the fleet's state.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any, TypeVar

import redis
import redis.asyncio

T = TypeVar("T")

#: One command: a redis-py pipeline method name and its positional arguments.
Command = tuple[str, tuple[Any, ...]]
#: A plan: yields batches of commands, is sent their replies, returns its answer.
Plan = Generator[Sequence[Command], list[Any], T]


def run_plan(client: redis.Redis, plan: Plan[T]) -> T:
    """Run ``plan`` on a sync client, one pipelined round trip per batch."""
    try:
        batch = next(plan)
        while True:
            pipe = client.pipeline(transaction=False)
            for name, args in batch:
                getattr(pipe, name)(*args)
            batch = plan.send(pipe.execute() if batch else [])
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def run_plan_async(client: redis.asyncio.Redis, plan: Plan[T]) -> T:
    """Run ``plan`` on an asyncio client, one pipelined round trip per batch."""
    try:
        batch = next(plan)
        while True:
            replies: list[Any] = []
            if batch:
                pipe = client.pipeline(transaction=False)
                for name, args in batch:
                    getattr(pipe, name)(*args)
                replies = await pipe.execute()
            batch = plan.send(replies)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
