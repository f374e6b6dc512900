"""ToolQueue: what apps import to enqueue MCP tool calls.

Light on purpose: it sends tasks by name and reads shared state from Redis;
it never imports the MCP SDK.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Unpack

import redis
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from mcpq.producer import fanout
from mcpq.producer.calls import Call
from mcpq.producer.fanout import FanOutHandle
from mcpq.producer.fanout_options import FanOutOptions

# Shared with fan-out (producer/engine.py); still importable from here.
from mcpq.producer.publish_policy import PUBLISH_RETRY as PUBLISH_RETRY
from mcpq.producer.publish_policy import RESULT_GRACE as RESULT_GRACE
from mcpq.worker.contract.app import make_app
from mcpq.worker.contract.arguments import check_arguments
from mcpq.worker.contract.breaker_state import breaker_status, reset_breaker
from mcpq.worker.contract.errors import (
    ErrorCode,
    InvalidArgumentsError,
    MCPConnectionError,
    MCPTimeoutError,
    ServerNotFoundError,
)
from mcpq.worker.contract.keys import Keys
from mcpq.worker.contract.ledger import Ledger, ledger_message
from mcpq.worker.contract.numbers import seconds
from mcpq.worker.contract.redact import describe_call
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.settings import Settings
from mcpq.worker.contract.task_names import CALL_TOOL, DISCOVER, HEALTH
from mcpq.worker.contract.unreachable import exception_chain, is_unreachable, unreachable_error

log = logging.getLogger(__name__)


def _root(exc: BaseException) -> BaseException:
    return exception_chain(exc)[-1]


def release(async_result: AsyncResult) -> None:
    """Stop listening for a result nobody will read again, now, and make its later
    ``__del__`` a no-op. Celery unsubscribes in ``AsyncResult.__del__``, which for
    a result kept alive by an exception's traceback runs at interpreter shutdown
    and prints "Exception ignored ... sys.meta_path is None" after a clean exit;
    with the backend unreachable it prints a traceback at any time."""
    backend = async_result.backend
    if backend is None:
        return
    with contextlib.suppress(Exception):  # unsubscribing from an unreachable backend
        backend.remove_pending_result(async_result)
    async_result.backend = None


class CallHandle:
    """A submitted call. ``result()`` waits for and returns its ToolResult."""

    def __init__(self, async_result: AsyncResult, tool: str, wait_hint: float | None = None) -> None:
        self._async = async_result
        self.tool = tool
        self._wait_hint = wait_hint

    @property
    def id(self) -> str:
        return str(self._async.id)

    @property
    def state(self) -> str:
        return str(self._async.state)

    def ready(self) -> bool:
        return bool(self._async.ready())

    def result(self, timeout: float | None = None) -> ToolResult:
        """Wait for the ToolResult. Raises MCPTimeoutError if none came in time
        (the call is still queued or running; ``id`` finds it later)."""
        wait = timeout if timeout is not None else self._wait_hint
        try:
            raw = self._async.get(timeout=wait, propagate=False, disable_sync_subtasks=False)
        except CeleryTimeoutError:
            raise MCPTimeoutError(
                f"no result for {self.tool!r} within {wait:g}s (task {self.id} is {self.state.lower()}); "
                "is a worker running? start one with `mcpq worker`",
                details={"task_id": self.id, "state": self.state},
            ) from None
        if isinstance(raw, dict) and "success" in raw:
            return ToolResult.from_dict(raw)
        # The task itself failed (a bug, a killed worker): still one terminal result.
        return ToolResult(
            success=False,
            tool_name=self.tool,
            error=f"task {self.id} ended in state {self._async.state}: {raw!r}"[:2000],
            error_code=ErrorCode.INTERNAL_ERROR.value,
            request_id=self.id,
        )

    def __repr__(self) -> str:
        return f"<CallHandle {self.tool} id={self.id} state={self.state}>"


class ToolQueue:
    """Enqueue tool calls for mcpq workers and read the fleet's shared state."""

    def __init__(self, settings: Settings | None = None, app: Celery | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.app = app or make_app(self.settings)
        if app is None:
            # A caller should hear "unreachable" in about a second, not after
            # the worker-side default of twenty reconnect attempts.
            self.app.conf.result_backend_transport_options = {"retry_policy": PUBLISH_RETRY}
        self.keys = Keys(self.settings.key_prefix)
        self._secret_patterns = self.settings.secret_pattern_list()
        self._redis: redis.Redis | None = None
        self._ledger: Ledger | None = None

    @classmethod
    def from_env(cls) -> ToolQueue:
        return cls(Settings.from_env())

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(
                self.settings.redis_url, socket_timeout=5.0, socket_connect_timeout=5.0, decode_responses=True
            )
        return self._redis

    # -- calls -------------------------------------------------------------------
    def submit(
        self,
        tool: str,
        arguments: dict[str, Any] | None = None,
        *,
        server: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        idempotency_key: str | None = None,
        queue: str | None = None,
    ) -> CallHandle:
        """Enqueue one call and return at once. ``tool`` may be ``server/tool``;
        ``queue`` overrides MCPQ_QUEUE (e.g. to pin calls to a worker group).

        Raises InvalidArgumentsError, before anything is sent, for arguments that
        are not JSON the SDK can send and for a timeout that is not a positive
        finite number of seconds."""
        check_arguments(arguments, tool)
        if timeout is not None:
            timeout = self._seconds(timeout, "timeout")
        task_id = request_id or str(uuid.uuid4())
        kwargs: dict[str, Any] = {"tool": tool, "arguments": arguments or {}}
        if server is not None:
            kwargs["server"] = server
        if timeout is not None:
            kwargs["timeout"] = timeout
        if request_id is not None:
            kwargs["request_id"] = request_id
        if idempotency_key is not None:
            kwargs["idempotency_key"] = idempotency_key
        label = f"{server}/{tool}" if server else tool
        wait_hint = (timeout if timeout is not None else self.settings.default_timeout) + RESULT_GRACE
        if idempotency_key is not None:
            first = self._first_with_key(idempotency_key, task_id, tool, arguments, server)
            if first is not None:
                # Same key, same call, within the window: the first call's result is this one's.
                return CallHandle(AsyncResult(first, app=self.app), label, wait_hint)
        queue_name = queue or self.settings.queue
        shown = describe_call(label, arguments or {}, self._secret_patterns)
        self.record_in_ledger([(task_id, ledger_message(kwargs, queue_name, shown))])
        try:
            async_result = self.app.send_task(
                CALL_TOOL,
                kwargs=kwargs,
                task_id=task_id,
                queue=queue_name,
                retry=True,
                retry_policy=PUBLISH_RETRY,
                # Flower and logs show the tool and the arguments with secret
                # values masked; the broker message itself still holds them.
                argsrepr="()",
                kwargsrepr=shown,
            )
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            raise unreachable_error("broker_or_backend", self.settings.broker_url, exc) from None
        return CallHandle(async_result, label, wait_hint)

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._ledger = Ledger(self.redis, self.keys, self.settings.ledger_grace)
        return self._ledger

    def record_in_ledger(self, entries: list[tuple[str, dict[str, Any]]]) -> None:
        """Write calls to the ledger before publishing them (see worker/ledger.py).
        Without the state Redis the calls still go out, without that protection."""
        try:
            self.ledger.record(entries)
        except redis.RedisError as exc:
            log.warning("could not record %d call(s) in the ledger (state Redis: %s)", len(entries), exc)

    def _first_with_key(
        self, key: str, task_id: str, tool: str, arguments: dict[str, Any] | None, server: str | None
    ) -> str | None:
        """Record ``task_id`` as the call for ``key``; return the earlier call's id
        if the key is already taken (SET NX: exactly one submit wins a race)."""
        fingerprint = json.dumps([tool, server, arguments or {}], sort_keys=True, default=str)
        doc = json.dumps({"task_id": task_id, "call": fingerprint})
        window_ms = int(self.settings.idempotency_window * 1000)
        name = f"{self.keys.idempotency}{key}"
        try:
            if self.redis.set(name, doc, nx=True, px=window_ms):
                return None
            raw = self.redis.get(name)
        except redis.RedisError as exc:
            raise MCPConnectionError(f"cannot check idempotency key {key!r} in Redis: {exc}") from None
        if raw is None:  # expired between SET and GET: this submit starts a new window
            return self._first_with_key(key, task_id, tool, arguments, server)
        earlier = json.loads(raw)
        if earlier.get("call") != fingerprint:
            raise InvalidArgumentsError(
                f"idempotency key {key!r} was already used for a different call "
                "(another tool, server or arguments); use a new key",
                details={"idempotency_key": key, "task_id": earlier.get("task_id")},
            )
        return str(earlier["task_id"])

    def call(
        self,
        tool: str,
        arguments: dict[str, Any] | None = None,
        *,
        server: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        idempotency_key: str | None = None,
        queue: str | None = None,
        wait: float | None = None,
    ) -> ToolResult:
        """Submit and wait. Always returns a ToolResult: failures to enqueue
        (``connection_error`` for an unreachable broker or Redis,
        ``invalid_arguments`` for an idempotency key reused for another call) or
        to hear back within ``wait`` seconds (``timeout``) come back as failed
        results too. A timed-out result names the task in ``request_id`` and
        ``details.task_id``: the call may still run, and ``get`` finds it.
        Losing the result backend *while* waiting raises (that is neither).

        :param tool: the tool's name, or ``server/tool``.
        :param arguments: the tool's arguments.
        :param server: the server to call (else the tool's name routes it).
        :param timeout: the call's deadline on the worker, seconds (default: the server's).
        :param request_id: the task id to use (default: a new UUID).
        :param idempotency_key: the same key and call within the window get the first call's result.
        :param queue: the Celery queue, overriding MCPQ_QUEUE.
        :param wait: seconds to wait for the result (default: ``timeout`` plus RESULT_GRACE).
        """
        label = tool if server is None else f"{server}/{tool}"
        try:
            if wait is not None:
                wait = self._seconds(wait, "wait", allow_zero=True)
            handle = self.submit(
                tool,
                arguments,
                server=server,
                timeout=timeout,
                request_id=request_id,
                idempotency_key=idempotency_key,
                queue=queue,
            )
        except (MCPConnectionError, InvalidArgumentsError) as exc:
            return ToolResult.failure(label, exc, request_id=request_id)
        except Exception as exc:
            # submit already turns an unreachable broker into MCPConnectionError;
            # a lost connection that still escapes it (wrapped by a library) is
            # the same failure to enqueue, not a bug to raise.
            if not is_unreachable(exc):
                raise
            unreachable = unreachable_error("broker_or_backend", self.settings.broker_url, exc)
            return ToolResult.failure(label, unreachable, request_id=request_id)
        try:
            return handle.result(wait)
        except MCPTimeoutError as exc:
            # The task id lets the caller (and the HTTP API's Location header)
            # find the call later; an explicit request_id stays as the caller gave it.
            return ToolResult.failure(
                label, exc, request_id=request_id if request_id is not None else handle.id
            )
        finally:
            release(handle._async)  # the handle never leaves this method

    def get(self, task_id: str, tool: str = "?") -> CallHandle:
        """A handle for a call submitted earlier (by id)."""
        return CallHandle(AsyncResult(task_id, app=self.app), tool)

    # -- admin tasks ---------------------------------------------------------------
    def _admin(self, name: str, wait: float, **kwargs: Any) -> dict[str, Any]:
        wait = self._seconds(wait, "wait", allow_zero=True)
        async_result: AsyncResult | None = None
        try:
            async_result = self.app.send_task(
                name, kwargs=kwargs, queue=self.settings.queue, retry=True, retry_policy=PUBLISH_RETRY
            )
            out = async_result.get(timeout=wait, propagate=True)
        except CeleryTimeoutError:
            raise MCPTimeoutError(
                f"no worker answered {name} within {wait:g}s; is `mcpq worker` running?"
            ) from None
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            raise unreachable_error("broker_or_backend", self.settings.broker_url, exc) from None
        finally:
            if async_result is not None:
                release(async_result)
        return dict(out)

    @staticmethod
    def _seconds(value: Any, name: str, *, allow_zero: bool = False) -> float:
        try:
            return seconds(value, name, allow_zero=allow_zero)
        except ValueError as exc:
            raise InvalidArgumentsError(str(exc), details={"field": name}) from None

    def discover(self, server: str | None = None, wait: float = 60.0) -> dict[str, Any]:
        return self._admin(DISCOVER, wait, server=server)

    def health(self, server: str | None = None, wait: float = 60.0) -> dict[str, Any]:
        return self._admin(HEALTH, wait, server=server)

    def reconnect(self, server: str) -> dict[str, Any]:
        """Make every worker process drop and reopen its sessions to ``server``
        (and re-list its tools). Workers notice within about a second."""
        with self._state():
            self._known_server(server)
            epoch = self.redis.hincrby(self.keys.epochs, server, 1)
        return {"server": server, "epoch": int(epoch)}

    def _known_server(self, server: str) -> None:
        if not self.redis.hexists(self.keys.servers, server):
            raise ServerNotFoundError(
                f"no server named {server!r} is known to the fleet", details={"server": server}
            )

    # -- shared state (read from Redis, no worker needed) ---------------------------
    @contextlib.contextmanager
    def _state(self) -> Iterator[None]:
        """Say which Redis could not be reached, and where, instead of redis-py's
        bare "Timeout reading from socket"."""
        try:
            yield
        except redis.RedisError as exc:
            if not is_unreachable(exc):
                raise
            raise unreachable_error("state", self.settings.redis_url, exc) from None

    def servers(self) -> list[dict[str, Any]]:
        with self._state():
            return self._servers()

    def _servers(self) -> list[dict[str, Any]]:
        raw: dict[str, str] = self.redis.hgetall(self.keys.servers)  # type: ignore[assignment]
        out = []
        for name in sorted(raw):
            summary = json.loads(raw[name])
            info_raw = self.redis.get(self.keys.server_info(name))
            tools_raw = self.redis.get(self.keys.server_tools(name))
            info = json.loads(info_raw) if info_raw else {}
            tools = json.loads(tools_raw) if tools_raw else None
            summary["protocol_version"] = info.get("protocol_version")
            summary["server_info"] = info.get("server_info")
            summary["tools"] = len(tools["tools"]) if tools else None
            summary["discovered_at"] = tools.get("discovered_at") if tools else None
            out.append(summary)
        return out

    def tools(self, server: str | None = None) -> list[dict[str, Any]]:
        with self._state():
            return self._tools(server)

    def _tools(self, server: str | None) -> list[dict[str, Any]]:
        names: list[str] = [server] if server else sorted(self.redis.hkeys(self.keys.servers))  # type: ignore[arg-type]
        if not names:
            return []
        docs = self.redis.mget([self.keys.server_tools(n) for n in names])
        tool_map = self.redis.hgetall(self.keys.tool_map)
        out = []
        for name, doc in zip(names, docs, strict=True):
            for tool in json.loads(doc)["tools"] if doc else []:
                offered_by = json.loads(tool_map.get(tool["name"], "[]"))
                out.append({"server": name, "ambiguous": len(offered_by) > 1, **tool})
        return out

    def breakers(self) -> dict[str, dict[str, Any]]:
        """Every known server's breaker: state, failures, opened_at, next_probe_at."""
        with self._state():
            names: list[str] = sorted(self.redis.hkeys(self.keys.servers))  # type: ignore[arg-type]
            return breaker_status(self.redis, self.keys, names)

    def reset_breaker(self, server: str) -> bool:
        """Close ``server``'s breaker for the whole fleet."""
        with self._state():
            self._known_server(server)
            return reset_breaker(self.redis, self.keys, server)

    def wait_for_worker(self, timeout: float = 30.0) -> list[str]:
        """Block until at least one worker answers a ping; return their names."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            replies = self.app.control.ping(timeout=0.5) or []
            if replies:
                return [name for reply in replies for name in reply]
        raise MCPTimeoutError(f"no mcpq worker answered within {timeout:g}s")

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()

    # -- many calls at once (producer/fanout.py) -------------------------------------
    # Thin delegations. ``options`` are the fan-out keyword options, declared once
    # in producer/fanout_options.py: ``on_progress``, ``chunk_size``, ``window``,
    # ``queue``, ``stall_timeout`` (meanings and defaults: ``FanOutConfig``).
    def map(
        self,
        tool: str,
        arguments: Iterable[Mapping[str, Any]],
        *,
        server: str | None = None,
        timeout: float | None = None,
        **options: Unpack[FanOutOptions],
    ) -> list[ToolResult]:
        """``tool`` once per dict in ``arguments`` (an iterable), packed into
        chunk tasks; one ToolResult per call, in input order. A failed call never
        fails the batch. ``server`` and ``timeout`` apply to every call.
        ``options``: ``on_progress(Progress)`` runs after every result;
        ``chunk_size`` is calls per task (None: ``fanout.auto_chunk_size``; 1:
        one task per call); ``window`` caps calls outstanding at once (None: the
        default, ``fanout.DEFAULT_WINDOW``; 0: no cap); ``queue`` overrides
        MCPQ_QUEUE; ``stall_timeout`` ends calls after that long without
        progress. Defaults in full: ``fanout.FanOutConfig``."""
        return fanout.map_calls(self, tool, arguments, server=server, timeout=timeout, **options)

    def fan_out(
        self, calls: Iterable[Call | Mapping[str, Any]], **options: Unpack[FanOutOptions]
    ) -> list[ToolResult]:
        """Run ``calls`` (an iterable of ``fanout.Call`` or ``{"tool", "arguments",
        "server", "timeout"}`` dicts); one ToolResult per call, in input order.
        ``options`` as for :meth:`map`."""
        return fanout.fan_out(self, calls, **options)

    def as_completed(
        self, calls: Iterable[Call | Mapping[str, Any]], **options: Unpack[FanOutOptions]
    ) -> Iterator[tuple[int, ToolResult]]:
        """Iterator of ``(index, ToolResult)`` as ``calls`` (as for
        :meth:`fan_out`) finish, every index once. ``options`` as for :meth:`map`."""
        return fanout.as_completed(self, calls, **options)

    def submit_many(
        self, calls: Iterable[Call | Mapping[str, Any]], **options: Unpack[FanOutOptions]
    ) -> FanOutHandle:
        """Publish ``calls`` (as for :meth:`fan_out`) and return a
        ``fanout.FanOutHandle`` at once (``.ids``, ``.results()``,
        ``.iter_completed()``). ``options`` as for :meth:`map`, except that
        ``window`` defaults to 0 here: every call is published before this
        returns unless ``window`` is set."""
        return fanout.submit_many(self, calls, **options)
