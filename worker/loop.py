"""One asyncio event loop per process, in a daemon thread.

Celery runs tasks in plain threads (or prefork children); the MCP SDK is
async. Every session of the process lives on this one loop, so calls from
many task threads are multiplexed over the same sessions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class LoopThread:
    """An event loop running forever in a daemon thread, owned by one PID."""

    def __init__(self, name: str = "mcpq-loop") -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._started.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    @property
    def alive(self) -> bool:
        return self.pid == os.getpid() and self._thread.is_alive() and not self.loop.is_closed()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(
        self,
        coro: Coroutine[Any, Any, T],
        timeout: float | None = None,
        on_submit: Callable[[concurrent.futures.Future[T]], None] | None = None,
    ) -> T:
        """Run ``coro`` on the loop and wait for it from a foreign thread.

        On timeout the coroutine is cancelled, so nothing keeps running for a
        caller that has gone away.

        :param on_submit: called with the future before waiting, so that
            another thread can cancel the coroutine (a caller's cancel); the
            wait then raises ``concurrent.futures.CancelledError``.
        """
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("LoopThread.run called from the loop thread itself (would deadlock)")
        fut = self.submit(coro)
        if on_submit is not None:
            on_submit(fut)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"operation did not finish within {timeout}s") from None

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive:
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
