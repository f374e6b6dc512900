"""Ctrl-C during ``mcpq batch``: what stops, what is cancelled, and what each
line is answered.

* SIGINT sets an :class:`Interrupt` (:func:`sigint_sets`) instead of raising
  KeyboardInterrupt wherever the program happens to be;
* the fan-out runs on a thread of its own (:class:`Fetcher`) and hands its
  results over a queue, so the writer (the main thread) is never stuck inside
  it and the fan-out is never torn half-way;
* :class:`BatchLines` stops handing calls to the fan-out once interrupted;
  the lines never handed out are answered ``cancelled`` without being sent
  (:func:`unsent_result`, they never ran);
* :class:`CancellingPublisher` knows which calls were sent and not answered,
  and cancels them (``ToolQueue.request_cancel``); a call still being
  published is cancelled as it is recorded in the ledger, before it is sent;
* :func:`write_results` then waits up to ``--cancel-wait`` seconds for the
  cancelled calls' own results (``cancelled``, with ``may_have_run``) and
  answers the calls still silent with :func:`unconfirmed_result` (they may
  have run).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from queue import Empty, SimpleQueue
from types import FrameType
from typing import Any

from celery import Celery

from mcpq.producer.calls import Call, unsent_cancelled_result
from mcpq.worker.contract.errors import ErrorCode
from mcpq.worker.contract.progress import ProgressUpdate
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.settings import Settings

#: How often the writer wakes up to notice a Ctrl-C while no result comes.
TICK = 0.2


def unsent_result(number: int, call: Call) -> ToolResult:
    """The answer of line ``number`` after Ctrl-C stopped the batch before its
    call was sent: ``cancelled``, and it never ran (a resume runs it)."""
    return unsent_cancelled_result(call, number, None, what="line", key="line", why=" (Ctrl-C)")


def unconfirmed_result(number: int, label: str, wait: float) -> ToolResult:
    """The answer of line ``number`` whose call was sent and asked to cancel
    (Ctrl-C) but gave no result within ``wait`` seconds: ``cancelled`` as far
    as the batch knows, and it may have run (a resume keeps it)."""
    return ToolResult(
        success=False,
        tool_name=label,
        error=f"line {number} was cancelled (Ctrl-C); its call gave no result within {wait:g}s "
        "and may have run",
        error_code=ErrorCode.CANCELLED.value,
        details={"line": number, "may_have_run": True, "retry_safe": False, "confirmed": False},
    )


class Interrupt:
    """Ctrl-C as ``mcpq batch`` hears it. SIGINT sets this instead of raising
    KeyboardInterrupt at whatever line the program is on (half-way through
    writing a result, say): the first one starts the cancel, a second stops
    waiting for the cancelled calls' results. :func:`sigint_sets` installs it."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.count = 0

    def request(self) -> None:
        self.count += 1
        self.event.set()

    @property
    def requested(self) -> bool:
        return self.event.is_set()


@contextlib.contextmanager
def sigint_sets(interrupt: Interrupt) -> Iterator[None]:
    """While inside, SIGINT sets ``interrupt`` (a third one raises
    KeyboardInterrupt after all). Only the main thread can take signals: from
    any other thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if interrupt.count >= 2:
            raise KeyboardInterrupt
        interrupt.request()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class BatchLines:
    """The lines still to run, read lazily from the calls file, one position
    shared under one lock by the fan-out (through :meth:`feed`, on its thread)
    and, after Ctrl-C, by the writer answering the lines never sent."""

    def __init__(self, source: Iterator[tuple[int, Call | ToolResult]], interrupt: Interrupt) -> None:
        self._source = source
        self._interrupt = interrupt
        self._lock = threading.Lock()
        self._count = 0
        #: malformed lines read so far, waiting to be written
        self.invalid: deque[tuple[int, ToolResult]] = deque()
        #: fan-out index -> (line number, label) of the calls handed out and not answered yet
        self._out: dict[int, tuple[int, str]] = {}

    def next_call(self) -> Call | None:
        """The next call to send; None at the end of the file, or after Ctrl-C
        (nothing more is sent then)."""
        with self._lock:
            while not self._interrupt.requested:
                item = next(self._source, None)
                if item is None:
                    return None
                number, parsed = item
                if isinstance(parsed, ToolResult):
                    self.invalid.append((number, parsed))
                    continue
                self._out[self._count] = (number, parsed.label)
                self._count += 1
                return parsed
            return None

    def feed(self, first: Call) -> Iterator[Call]:
        """The fan-out's input: ``first`` (read already), then the rest as asked for."""
        yield first
        while (call := self.next_call()) is not None:
            yield call

    def answered(self, index: int) -> int:
        """Call ``index`` has its result: its line number."""
        with self._lock:
            return self._out.pop(index)[0]

    def unanswered(self) -> list[tuple[int, str]]:
        """``(line number, label)`` of every call handed out and not answered."""
        with self._lock:
            return sorted(self._out.values())

    def rest(self) -> Iterator[tuple[int, Call | ToolResult]]:
        """The lines never handed out (after Ctrl-C)."""
        while True:
            with self._lock:
                item = next(self._source, None)
            if item is None:
                return
            yield item


class CancellingPublisher:
    """The ToolQueue as the fan-out sees it, plus which calls it has sent and
    are not answered yet, so that Ctrl-C can cancel exactly those. Every call
    is recorded in the ledger before it is published (the engine's
    :class:`~mcpq.producer.engine.Publisher` contract): that is where its id is
    learnt, and a call recorded after :meth:`stop` is cancelled before it is sent."""

    def __init__(self, tq: Any) -> None:
        self._tq = tq
        self._lock = threading.Lock()
        self._live: set[str] = set()
        self._stopped = False

    @property
    def app(self) -> Celery:
        app: Celery = self._tq.app
        return app

    @property
    def settings(self) -> Settings:
        settings: Settings = self._tq.settings
        return settings

    def record_in_ledger(
        self, entries: list[tuple[str, dict[str, Any]]], members: Sequence[tuple[str, str]] = ()
    ) -> None:
        # Chunk tasks: the entries are the chunks, the members their calls.
        ids = [call_id for call_id, _ in members] if members else [task_id for task_id, _ in entries]
        with self._lock:
            self._live.update(ids)
            late = self._stopped
        self._tq.record_in_ledger(entries, members)
        if late:
            self._tq.request_cancel(ids)

    def request_cancel(self, task_ids: Sequence[str]) -> None:
        self._tq.request_cancel(task_ids)

    def read_progress(self, task_ids: Sequence[str]) -> list[ProgressUpdate | None]:
        progress: list[ProgressUpdate | None] = self._tq.read_progress(task_ids)
        return progress

    def answered(self, task_id: str | None) -> None:
        if task_id is not None:
            with self._lock:
                self._live.discard(task_id)

    def stop(self) -> None:
        """Ctrl-C: cancel every call sent and not answered; any call recorded
        from now on is cancelled as it is recorded.
        Raises MCPConnectionError when the state Redis cannot be reached."""
        with self._lock:
            self._stopped = True
            ids = sorted(self._live)
        if ids:
            self._tq.request_cancel(ids)


_DONE = object()


class Fetcher(threading.Thread):
    """Runs the fan-out on its own thread and hands its ``(index, ToolResult)``
    pairs over a queue, so that the writer (the main thread, the one that
    hears Ctrl-C) is never stuck inside it, and the fan-out is never
    interrupted half-way."""

    def __init__(self, stream: Iterator[tuple[int, ToolResult]]) -> None:
        super().__init__(name="mcpq-batch-fanout", daemon=True)
        self.stream = stream
        self.results: SimpleQueue[Any] = SimpleQueue()

    def run(self) -> None:
        try:
            for item in self.stream:
                self.results.put(item)
        except BaseException as exc:  # handed to the writer, which raises it
            self.results.put(exc)
        else:
            self.results.put(_DONE)


def write_results(
    fetcher: Fetcher,
    lines: BatchLines,
    publisher: CancellingPublisher,
    write: Callable[[int, ToolResult], None],
    interrupt: Interrupt,
    cancel_wait: float,
    flush_invalid: Callable[[], None],
) -> None:
    """Write results as the fan-out hands them over, until it is done. On
    Ctrl-C: cancel what is outstanding, keep writing for up to ``cancel_wait``
    seconds (or until a second Ctrl-C), then answer the calls still without a
    result as cancelled-but-may-have-run."""
    deadline: float | None = None

    def take(item: Any) -> bool:
        """Write one handed-over item; True once the fan-out is done."""
        if item is _DONE:
            return True
        if isinstance(item, BaseException):
            raise item
        index, result = item
        publisher.answered(result.request_id)
        write(lines.answered(index), result)
        return False

    while True:
        if interrupt.requested and deadline is None:
            # What finished already is written first, so only calls still out are cancelled.
            while True:
                try:
                    if take(fetcher.results.get_nowait()):
                        return
                except Empty:
                    break
            deadline = time.monotonic() + cancel_wait
            publisher.stop()
        wait = TICK
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
            if wait <= 0 or interrupt.count >= 2:
                break
        flush_invalid()
        try:
            if take(fetcher.results.get(timeout=wait)):
                return
        except Empty:
            continue
    # Gave up waiting: the fan-out thread is left behind (the process is about to exit).
    for number, label in lines.unanswered():
        write(number, unconfirmed_result(number, label, cancel_wait))
