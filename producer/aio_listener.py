"""One ``redis.asyncio`` pub/sub connection that many calls listen on.

A :class:`ChannelListener` owns one connection and one reader task. Any task
may subscribe or unsubscribe: redis-py's asyncio ``PubSub`` only *writes* for
those while the reader task alone *reads* (checked by
``tests/unit/test_async_listener.py``). Subscriptions asked for in the same
loop iteration go out as one SUBSCRIBE (10,000 gathered calls: one command).

When the connection drops, the reader reconnects and subscribes to every
channel again, then tells its owner (``on_reconnect``: sweep for results
published meanwhile); when it cannot reconnect it hands the error to
``on_lost`` and stops until the next subscribe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

import redis
import redis.asyncio as aredis

log = logging.getLogger(__name__)

#: How long the reader waits for a message before it calls ``on_idle``.
READ_TIMEOUT = 0.25
#: Reconnect attempts after the connection dropped, and the pause before each.
RECONNECT_PAUSES = (0.1, 0.3, 0.6)
#: Channels per SUBSCRIBE / UNSUBSCRIBE command.
COMMAND_SLICE = 2000

#: ``on_message(channel, data)``: a message arrived (called on the loop, must not block).
OnMessage = Callable[[str, bytes], None]


class ChannelListener:
    """One pub/sub connection for many channels; see the module docstring."""

    def __init__(
        self,
        client: aredis.Redis,
        on_message: OnMessage,
        *,
        on_idle: Callable[[], None],
        on_reconnect: Callable[[], None],
        on_lost: Callable[[BaseException], None],
    ) -> None:
        """
        :param client: the server to listen on (its pool hands out the one connection).
        :param on_message: gets every message (channel decoded, data as bytes).
        :param on_idle: called whenever :data:`READ_TIMEOUT` passed without a message.
        :param on_reconnect: called after a dropped connection was reopened.
        :param on_lost: called with the error when the connection could not be reopened.
        """
        self._client = client
        self._on_message = on_message
        self._on_idle = on_idle
        self._on_reconnect = on_reconnect
        self._on_lost = on_lost
        self._pubsub: aredis.client.PubSub | None = None
        self._channels: set[str] = set()
        self._to_subscribe: set[str] = set()
        self._to_unsubscribe: set[str] = set()
        self._flush: asyncio.Future[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        # One sender at a time: a second SUBSCRIBE sent while the first still
        # connects would open (and leak) a connection of its own.
        self._sending = asyncio.Lock()
        self._closed = False

    @property
    def channels(self) -> frozenset[str]:
        return frozenset(self._channels)

    async def subscribe(self, channels: Iterable[str]) -> None:
        """Listen on ``channels`` from now on (returns once SUBSCRIBE is sent).
        Raises redis' ConnectionError/TimeoutError when the server cannot be reached."""
        new = [c for c in channels if c not in self._channels]
        if not new:
            return
        self._to_subscribe.update(new)
        self._to_unsubscribe.difference_update(new)
        self._channels.update(new)
        await self._flushed()

    def unsubscribe(self, channels: Iterable[str]) -> None:
        """Stop listening on ``channels`` (sent with the next flush; never waits)."""
        gone = [c for c in channels if c in self._channels]
        if not gone:
            return
        self._channels.difference_update(gone)
        self._to_subscribe.difference_update(gone)
        self._to_unsubscribe.update(gone)
        self._schedule_flush()

    def _schedule_flush(self) -> asyncio.Future[None]:
        if self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.create_future()
            # The task's first step runs after everything already scheduled in
            # this loop iteration: every subscribe made meanwhile joins the command.
            self._sender = loop.create_task(self._send())  # kept: a task only weakly referenced may vanish
        return self._flush

    async def _flushed(self) -> None:
        await asyncio.shield(self._schedule_flush())

    async def _send(self) -> None:
        async with self._sending:
            # Taken inside the lock: what arrived while an earlier send ran joins this one.
            flush, self._flush = self._flush, None
            assert flush is not None
            adds, self._to_subscribe = sorted(self._to_subscribe), set()
            drops, self._to_unsubscribe = sorted(self._to_unsubscribe), set()
            try:
                pubsub = self._connection()
                for i in range(0, len(adds), COMMAND_SLICE):
                    await pubsub.subscribe(*adds[i : i + COMMAND_SLICE])
                for i in range(0, len(drops), COMMAND_SLICE):
                    await pubsub.unsubscribe(*drops[i : i + COMMAND_SLICE])
            except Exception as exc:
                # Those channels are not listened on: forget them (the callers hear why).
                self._channels.difference_update(adds)
                if not flush.done():
                    flush.set_exception(exc)
                flush.exception()  # retrieved: a flush nobody awaited (only unsubscribes) is no warning
                return
            if not flush.done():
                flush.set_result(None)
            self._start_reader()

    def _connection(self) -> aredis.client.PubSub:
        if self._pubsub is None:
            self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        return self._pubsub

    def _start_reader(self) -> None:
        if self._reader is None and not self._closed and self._channels:
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            while not self._closed and self._channels:
                pubsub = self._connection()
                try:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=READ_TIMEOUT)
                except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                    if not await self._reconnect(exc):
                        return
                    continue
                if message is None:
                    self._on_idle()
                    continue
                if message.get("type") == "message":
                    channel = message["channel"]
                    name = channel.decode() if isinstance(channel, bytes) else str(channel)
                    self._on_message(name, message["data"])
        finally:
            self._reader = None

    async def _reconnect(self, error: BaseException) -> bool:
        """Open a new connection and subscribe to every channel again; False
        (after ``on_lost``) when the server stays unreachable."""
        log.warning("result listener lost its connection (%s); reconnecting", error)
        for pause in RECONNECT_PAUSES:
            async with self._sending:
                await self._drop_connection()
            await asyncio.sleep(pause)  # a pause between attempts, not a wait for anything
            async with self._sending:
                try:
                    pubsub = self._connection()
                    channels = sorted(self._channels)
                    for i in range(0, len(channels), COMMAND_SLICE):
                        await pubsub.subscribe(*channels[i : i + COMMAND_SLICE])
                except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                    error = exc
                    continue
            self._on_reconnect()
            return True
        async with self._sending:
            await self._drop_connection()
            self._channels.clear()
        self._on_lost(error)
        return False

    async def _drop_connection(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):  # closing a broken connection
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        """Stop reading and close the connection."""
        self._closed = True
        reader = self._reader
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        await self._drop_connection()
        self._channels.clear()


def same_server(a: aredis.Redis, b: aredis.Redis) -> bool:
    """Whether two clients reach the same Redis server (pub/sub channels are
    per server, not per database, so one connection can serve both)."""
    keys = ("host", "port", "path", "username", "password")
    ka, kb = a.connection_pool.connection_kwargs, b.connection_pool.connection_kwargs
    return all(ka.get(k) == kb.get(k) for k in keys) and type(a.connection_pool) is type(b.connection_pool)
