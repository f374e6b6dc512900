"""Interrupting the calls this process is running when a caller cancels them.

A caller cancels by setting the call's flag and publishing its id on
``Keys.cancel_channel`` (``contract/cancel.py``). The flag stops every call
that has not been sent yet (the admit script reads it); this module handles
the rest: one listener per process subscribes to the channel and cancels the
future of a call it is running, which cancels the MCP request through the SDK
(``notifications/cancelled`` on a handshake-era session, the request's stream
closed on 2026-07-28 Streamable HTTP).

A call is watched from *before* its admit: a cancel published while admit
runs is then seen by the listener, and one published before the listener had
subscribed is caught by the flag check the listener makes for every watched
call right after each (re)subscription. So no cancel falls between the flag
check in admit and the subscription.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import redis

from mcpq.worker.contract.keys import Keys

log = logging.getLogger(__name__)

#: How long one wait for a message lasts; also how quickly ``stop`` is noticed.
_POLL = 1.0
#: Pause after the state Redis could not be reached, doubling up to the cap.
_RETRY_BASE, _RETRY_MAX = 0.2, 5.0


class CallWatch:
    """One call this process handles, from before its admit until its result.

    ``fire`` (a cancel arrived) and ``attach`` (the call's MCP request was
    handed to the loop) may happen in either order, on different threads:
    whichever comes second cancels the request's future.
    """

    __slots__ = ("_fired", "_future", "_lock", "call_id")

    def __init__(self, call_id: str) -> None:
        self.call_id = call_id
        self._lock = threading.Lock()
        self._fired = False
        self._future: concurrent.futures.Future[Any] | None = None

    @property
    def fired(self) -> bool:
        """Whether a caller cancelled this call while this process handled it."""
        return self._fired

    def fire(self) -> None:
        """A cancel for this call arrived: interrupt its request if one is running."""
        with self._lock:
            self._fired = True
            future = self._future
        if future is not None:
            future.cancel()

    def attach(self, future: concurrent.futures.Future[Any]) -> None:
        """The call's request now runs as ``future``; cancel it at once if already fired."""
        with self._lock:
            self._future = future
            fired = self._fired
        if fired:
            future.cancel()


class CancelListener:
    """This process's subscription to the cancel channel and its running calls.

    The subscriber thread starts with the first watched call, in the process
    that makes it (a listener inherited through a fork is not used: the
    manager that owns it is rebuilt per PID).
    """

    def __init__(self, connect: Callable[[], redis.Redis], keys: Keys) -> None:
        """
        :param connect: makes the Redis client for the subscription (a
            dedicated connection: a subscribed connection serves nothing else).
        :param keys: the key layout (channel and flag names).
        """
        self.pid = os.getpid()
        self.keys = keys
        self._connect = connect
        self._watches: dict[str, set[CallWatch]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._degraded = False
        #: Set while the subscription is live (tests and health read it).
        self.subscribed = threading.Event()

    @contextlib.contextmanager
    def watch(self, call_id: str | None) -> Iterator[CallWatch | None]:
        """Watch call ``call_id`` for the duration of the block (None: nothing to watch)."""
        if not call_id:
            yield None
            return
        watch = CallWatch(call_id)
        with self._lock:
            self._watches.setdefault(call_id, set()).add(watch)
            self._start_locked()
        try:
            yield watch
        finally:
            with self._lock:
                same = self._watches.get(call_id)
                if same is not None:
                    same.discard(watch)
                    if not same:
                        del self._watches[call_id]

    def running(self) -> list[str]:
        """Ids of the calls watched right now."""
        with self._lock:
            return list(self._watches)

    def cancel_local(self, call_id: str) -> int:
        """Interrupt call ``call_id`` if this process runs it; returns how many watches fired."""
        with self._lock:
            watches = list(self._watches.get(call_id, ()))
        for watch in watches:
            watch.fire()
        if watches:
            log.info("call %s cancelled by a caller; interrupting it", call_id)
        return len(watches)

    def _start_locked(self) -> None:
        if self._thread is not None or self.pid != os.getpid():
            return
        self._thread = threading.Thread(target=self._run, name="mcpq-cancel", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    # -- the subscriber thread ---------------------------------------------------
    def _run(self) -> None:
        delay = _RETRY_BASE
        while not self._stop.is_set():
            try:
                self._listen()
            except redis.RedisError as exc:
                if self.subscribed.is_set():  # it was working: try again soon
                    self.subscribed.clear()
                    delay = _RETRY_BASE
                if not self._degraded:
                    self._degraded = True
                    log.warning(
                        "cannot listen for cancels (state Redis: %s); running calls are not "
                        "interrupted until it is back (queued ones still never run)",
                        exc,
                    )
                self._stop.wait(delay)
                delay = min(delay * 2, _RETRY_MAX)
            except Exception:  # the listener must outlive any surprise
                self.subscribed.clear()
                log.exception("cancel listener failed; restarting it")
                self._stop.wait(_RETRY_MAX)
            else:
                return

    def _subscribed(self) -> None:
        self.subscribed.set()
        if self._degraded:
            self._degraded = False
            log.warning("listening for cancels again")

    def _listen(self) -> None:
        client = self._connect()
        pubsub = client.pubsub(ignore_subscribe_messages=False)  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(self.keys.cancel_channel)
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=_POLL)
                if message is None:
                    continue
                if message["type"] == "subscribe":
                    # Cancels published before this (re)subscription were
                    # missed: their flags are still set, so look once.
                    self._recheck(client)
                    self._subscribed()
                elif message["type"] == "message":
                    raw = message["data"]
                    self.cancel_local(raw.decode() if isinstance(raw, bytes) else str(raw))
        finally:
            with contextlib.suppress(Exception):
                pubsub.close()
            with contextlib.suppress(Exception):
                client.close()

    def _recheck(self, client: redis.Redis) -> None:
        ids = self.running()
        if not ids:
            return
        pipe = client.pipeline(transaction=False)
        for call_id in ids:
            pipe.exists(self.keys.cancelled(call_id))
        for call_id, flagged in zip(ids, pipe.execute(), strict=True):
            if flagged:
                self.cancel_local(call_id)
