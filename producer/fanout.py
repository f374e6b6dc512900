"""Fan-out, the public API: many tool calls at once, results per call.

:func:`map_calls`, :func:`fan_out` and :func:`as_completed` run a batch and
hand back its results; :func:`submit_many` publishes one and returns a
:class:`FanOutHandle` to follow it (:meth:`FanOutHandle.attach` follows one
published earlier). ``ToolQueue.map/fan_out/as_completed/submit_many`` are these
with the queue filled in.

Every entry point takes the same keyword options, :class:`FanOutOptions`
(``on_progress``, ``chunk_size``, ``window``, ``queue``, ``stall_timeout``);
:class:`FanOutConfig` says what each means and its default. How a batch runs
(chunk tasks, rounds, the window, per-call results, stalls) is described in
:mod:`mcpq.producer.engine`; results are read by
:mod:`mcpq.producer.collector`; the values (:class:`Call`, :class:`Progress`)
live in :mod:`mcpq.producer.calls` and are importable from here too.

A call never fails the batch: every call ends with one :class:`ToolResult`.
Only a broker or result backend that cannot be reached ends a batch early,
with :class:`MCPConnectionError`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any, Unpack

from mcpq.producer.calls import (
    MAX_AUTO_CHUNK,
    Call,
    Progress,
    ProgressCallback,
    auto_chunk_size,
    coerce_call,
    item_label,
    task_result_to_tool_result,
)
from mcpq.producer.engine import BatchRun, Publisher
from mcpq.producer.fanout_options import (
    DEFAULT_WINDOW,
    SUBMIT_MANY_WINDOW,
    FanOutConfig,
    FanOutOptions,
)
from mcpq.worker.contract.errors import MCPTimeoutError
from mcpq.worker.contract.result import ToolResult

__all__ = [
    "DEFAULT_WINDOW",
    "MAX_AUTO_CHUNK",
    "SUBMIT_MANY_WINDOW",
    "Call",
    "FanOutConfig",
    "FanOutHandle",
    "FanOutOptions",
    "Progress",
    "ProgressCallback",
    "Publisher",
    "as_completed",
    "auto_chunk_size",
    "coerce_call",
    "fan_out",
    "map_calls",
    "submit_many",
    "task_result_to_tool_result",
]


def as_completed(
    tq: Publisher,
    calls: Iterable[Call | Mapping[str, Any]],
    **options: Unpack[FanOutOptions],
) -> Generator[tuple[int, ToolResult], None, None]:
    """Run ``calls`` and yield ``(index, ToolResult)`` as each finishes (every
    index exactly once).

    ``tq`` is the ToolQueue (any :class:`Publisher`) to publish through;
    ``calls`` are :class:`Call` objects or ``{"tool", "arguments", "server",
    "timeout"}`` mappings, read lazily, ``window`` calls ahead of the results
    (a mapping that is not a valid call gets an ``invalid_arguments`` result);
    ``options`` are the fan-out options of :class:`FanOutConfig`. Closing the
    iterator early stops publishing; calls already published still run."""
    # Built here, not in the generator, so a misspelt option fails at the call
    # as it did when every option was a named parameter.
    config = FanOutConfig.from_options(options)
    return _run_as_completed(tq, calls, config)


def _run_as_completed(
    tq: Publisher, calls: Iterable[Call | Mapping[str, Any]], config: FanOutConfig
) -> Generator[tuple[int, ToolResult], None, None]:
    run = BatchRun(tq, calls, config)
    try:
        yield from run.drain()
    finally:
        run.close()


def fan_out(
    tq: Publisher,
    calls: Iterable[Call | Mapping[str, Any]],
    **options: Unpack[FanOutOptions],
) -> list[ToolResult]:
    """Run ``calls``; return one ToolResult per call, in input order.

    ``tq``, ``calls`` and ``options`` are as for :func:`as_completed`."""
    results: dict[int, ToolResult] = {}
    for index, result in as_completed(tq, calls, **options):
        results[index] = result
    return [results[i] for i in range(len(results))]


def map_calls(
    tq: Publisher,
    tool: str,
    arguments: Iterable[Mapping[str, Any]],
    *,
    server: str | None = None,
    timeout: float | None = None,
    **options: Unpack[FanOutOptions],
) -> list[ToolResult]:
    """``tool`` once per arguments dict; results in the same order.

    ``tool`` may be ``server/tool``; ``arguments`` holds one mapping per call
    (an item that is not a mapping gets an ``invalid_arguments`` result);
    ``server`` and ``timeout`` apply to every call; ``tq`` and ``options`` are
    as for :func:`as_completed`."""
    calls = (
        Call(tool, dict(a), server, timeout)
        if isinstance(a, Mapping)
        else {"tool": tool, "arguments": a, "server": server, "timeout": timeout}
        for a in arguments
    )
    sized: Iterable[Call | Mapping[str, Any]] = list(calls) if isinstance(arguments, Sized) else calls
    return fan_out(tq, sized, **options)


class FanOutHandle:
    """A batch submitted without waiting.

    ``ids`` holds every call's task id in input order from the start. With
    ``window=0`` (the default here) every call is published before
    :func:`submit_many` returns; with a window, the rest are published while
    ``iter_completed()`` / ``results()`` run. Read it from one thread at a time.
    """

    def __init__(self, run: BatchRun, ids: list[str], labels: list[str]) -> None:
        """Made by :func:`submit_many` and :meth:`attach`: ``run`` is the batch,
        ``ids`` and ``labels`` its calls' task ids and labels in input order."""
        self._run = run
        self.ids = ids
        self.labels = labels
        self._results: list[ToolResult | None] = [None] * len(ids)

    @property
    def total(self) -> int:
        return len(self.ids)

    @property
    def group_ids(self) -> list[str]:
        """Celery group ids, when calls went out one task each (``chunk_size=1``)."""
        return list(self._run.group_ids)

    @property
    def chunk_ids(self) -> list[str]:
        """Task ids of the ``mcpq.call_chunk`` tasks the calls went out in."""
        return list(self._run.chunk_ids)

    @property
    def progress(self) -> Progress:
        return self._run.progress()

    def done(self) -> bool:
        return self._run.finished

    def poll(self) -> list[tuple[int, ToolResult]]:
        """What finished since the last look, without waiting."""
        return self._record(self._run.pump(0.0))

    def iter_completed(self, timeout: float | None = None) -> Iterator[tuple[int, ToolResult]]:
        """Yield ``(index, ToolResult)`` for calls not yielded before, as they
        finish. Raises MCPTimeoutError if ``timeout`` seconds pass first (the
        calls keep running; iterate again to go on)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._run.finished:
            wait = 1.0 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                p = self.progress
                raise MCPTimeoutError(
                    f"batch not finished within {timeout:g}s ({p.done} of {p.total} calls done)",
                    details={"done": p.done, "total": p.total},
                )
            yield from self._record(self._run.pump(min(wait, 1.0)))

    def results(self, timeout: float | None = None) -> list[ToolResult]:
        """Wait for every call; one ToolResult per call, in input order."""
        for _ in self.iter_completed(timeout):
            pass
        return [r for r in self._results if r is not None]

    def _record(self, items: list[tuple[int, ToolResult]]) -> list[tuple[int, ToolResult]]:
        for index, result in items:
            self._results[index] = result
        return items

    def cancel(self) -> int:
        """Cancel the batch's calls not finished yet: published ones are asked
        to cancel (each still ends with its own result: ``cancelled``, unless it
        finished first), unpublished ones are never sent and end ``cancelled``
        at once (``details.sent`` is False). Keep reading ``results()`` /
        ``iter_completed()`` for the outcomes. Returns how many calls the cancel
        reached. Raises MCPConnectionError when the state Redis is unreachable."""
        return self._run.cancel()

    def close(self) -> None:
        """Stop following the batch (the calls themselves keep running)."""
        self._run.close()

    def __enter__(self) -> FanOutHandle:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        p = self.progress
        return f"<FanOutHandle {p.done}/{p.total} done, {p.failed} failed>"

    @classmethod
    def attach(cls, tq: Publisher, ids: Sequence[str], labels: Sequence[str] | None = None) -> FanOutHandle:
        """Follow calls published earlier (say by another process) by their task ids.

        ``tq`` is the ToolQueue whose result backend holds their results;
        ``ids`` are the calls' task ids in input order; ``labels`` (one per
        id, default ``"?"``) name the calls in results made up here (a stall).
        Raises ValueError when ``labels`` and ``ids`` differ in length."""
        names = list(labels) if labels is not None else ["?"] * len(ids)
        if len(names) != len(ids):
            raise ValueError("labels must match ids one to one")
        # Nothing to publish, so no window to wait on.
        run = BatchRun(tq, (), FanOutConfig(window=0))
        run.follow([(str(task_id), label) for task_id, label in zip(ids, names, strict=True)])
        return cls(run, [str(i) for i in ids], names)


def submit_many(
    tq: Publisher,
    calls: Iterable[Call | Mapping[str, Any]],
    **options: Unpack[FanOutOptions],
) -> FanOutHandle:
    """Publish a batch and return a :class:`FanOutHandle` at once.

    ``tq`` and ``calls`` are as for :func:`as_completed`, but ``calls`` is read
    to its end first (every call gets its task id up front); ``options`` are
    those of :class:`FanOutConfig` except that ``window`` defaults to
    :data:`SUBMIT_MANY_WINDOW` (0: every call is published before this
    returns)."""
    config = FanOutConfig.from_options(options, window=SUBMIT_MANY_WINDOW)
    items = list(calls)
    ids = [str(uuid.uuid4()) for _ in items]
    labels = [item_label(item) for item in items]
    run = BatchRun(tq, items, config, task_ids=ids)
    run.refill()
    return FanOutHandle(run, ids, labels)
