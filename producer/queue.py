"""ToolQueue: what apps import to enqueue MCP tool calls.

Light on purpose: it sends tasks by name and reads shared state from Redis;
it never imports the MCP SDK.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, Unpack

import redis
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from mcpq.producer import fanout, fleet_state
from mcpq.producer.calls import Call
from mcpq.producer.cancelling import (
    NOT_FOUND_WAIT,
    CancelOutcome,
    cancel_step,
    checked_call_id,
    final_result,
    not_found,
    read_meta,
)
from mcpq.producer.fanout import FanOutHandle
from mcpq.producer.fanout_options import FanOutOptions

# Shared with fan-out (producer/engine.py); still importable from here.
from mcpq.producer.publish_policy import PUBLISH_RETRY as PUBLISH_RETRY
from mcpq.producer.publish_policy import RESULT_GRACE as RESULT_GRACE
from mcpq.producer.submission import (
    call_label,
    checked_seconds,
    claim_idempotency_key,
    not_enqueued_result,
    prepare_call,
    timed_out_result,
)
from mcpq.worker.contract.app import make_app
from mcpq.worker.contract.cancel import request_cancel
from mcpq.worker.contract.errors import (
    ErrorCode,
    MCPError,
    MCPTimeoutError,
)
from mcpq.worker.contract.keys import Keys
from mcpq.worker.contract.ledger import Ledger
from mcpq.worker.contract.plans import Plan, run_plan
from mcpq.worker.contract.progress import ProgressUpdate
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.settings import Settings
from mcpq.worker.contract.task_names import CALL_TOOL, DISCOVER, HEALTH
from mcpq.worker.contract.tracing import submit_span
from mcpq.worker.contract.unreachable import exception_chain, is_unreachable, unreachable_error

log = logging.getLogger(__name__)
T = TypeVar("T")


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
    """A submitted call. ``result()`` waits for and returns its ToolResult;
    ``cancel()`` cancels it; ``progress`` is its latest progress."""

    def __init__(
        self,
        async_result: AsyncResult,
        tool: str,
        wait_hint: float | None = None,
        queue: ToolQueue | None = None,
    ) -> None:
        """Made by :meth:`ToolQueue.submit` and :meth:`ToolQueue.get`:
        ``async_result`` follows the task, ``tool`` names the call, ``wait_hint``
        is ``result()``'s default wait, ``queue`` the queue for cancel and progress."""
        self._async = async_result
        self.tool = tool
        self._wait_hint = wait_hint
        self._queue = queue

    @property
    def progress(self) -> ProgressUpdate | None:
        """The latest progress the call reported (one read of the state Redis),
        or None: none yet, or the call was not submitted with ``progress=True``."""
        if self._queue is None:
            return None
        return self._queue.progress_of(self.id)

    def cancel(self) -> CancelOutcome:
        """Cancel the call: see :meth:`ToolQueue.cancel`."""
        if self._queue is None:
            raise MCPError("this handle has no queue to cancel through; use ToolQueue.cancel(id)")
        return self._queue.cancel(self.id)

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
        progress: bool = False,
    ) -> CallHandle:
        """Enqueue one call and return at once. ``tool`` may be ``server/tool``;
        ``queue`` overrides MCPQ_QUEUE (e.g. to pin calls to a worker group);
        ``progress=True`` asks the worker to relay the server's progress
        (``CallHandle.progress``; without it there is no progress traffic).

        Raises InvalidArgumentsError, before anything is sent, for arguments that
        are not JSON the SDK can send and for a timeout that is not a positive
        finite number of seconds."""
        with submit_span(tool, server, queue or self.settings.queue):  # a no-op unless tracing is on
            prepared = prepare_call(
                self.settings,
                tool,
                arguments,
                server=server,
                timeout=timeout,
                request_id=request_id,
                idempotency_key=idempotency_key,
                queue=queue,
                progress=progress,
                traced=True,
            )
            first = claim_idempotency_key(self.redis, self.keys, self.settings, prepared)
            if first is not None:
                # Same key, same call, within the window: the first call's result is this one's.
                return CallHandle(AsyncResult(first, app=self.app), prepared.label, prepared.wait_hint, self)
            self.record_in_ledger([prepared.ledger_entry])
            try:
                # send_task, not sending.send_call_tool: it subscribes Celery's
                # result consumer to the call, which is how result() hears of it.
                async_result = self.app.send_task(
                    CALL_TOOL,
                    kwargs=prepared.kwargs,
                    task_id=prepared.task_id,
                    queue=prepared.queue,
                    retry=True,
                    retry_policy=PUBLISH_RETRY,
                    # Flower and logs show the tool and the arguments with secret
                    # values masked; the broker message itself still holds them.
                    argsrepr="()",
                    kwargsrepr=prepared.shown,
                )
            except Exception as exc:
                if not is_unreachable(exc):
                    raise
                raise unreachable_error("broker_or_backend", self.settings.broker_url, exc) from None
            return CallHandle(async_result, prepared.label, prepared.wait_hint, self)

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._ledger = Ledger(self.redis, self.keys, self.settings.ledger_grace)
        return self._ledger

    def record_in_ledger(
        self, entries: list[tuple[str, dict[str, Any]]], members: Sequence[tuple[str, str]] = ()
    ) -> None:
        """Write calls to the ledger before publishing them (see worker/ledger.py),
        with ``(call id, chunk id)`` members of chunk tasks so that a call id
        alone is known. Without the state Redis the calls still go out,
        without that protection."""
        try:
            self.ledger.record(entries, members=members)
        except redis.RedisError as exc:
            log.warning("could not record %d call(s) in the ledger (state Redis: %s)", len(entries), exc)

    # -- cancel and progress ---------------------------------------------------------
    def cancel(self, task_id: str) -> CancelOutcome:
        """Cancel call ``task_id`` (see :mod:`mcpq.producer.cancelling`).

        Returns ``CancelOutcome(id, "finished", result)`` for a call that had
        ended (nothing changes) or ``CancelOutcome(id, "requested")`` once the
        cancel is asked for: a running call is interrupted, a queued one ends
        ``cancelled`` when a worker reaches its message; its result comes as
        usual (``get(id).result()``).

        :raises InvalidArgumentsError: ``task_id`` cannot name a call.
        :raises CallNotFoundError: no call of that id is known.
        :raises MCPConnectionError: the state Redis or the result backend cannot be reached.
        """
        task_id = checked_call_id(task_id)
        backend = self.app.backend
        try:
            listener = backend.client.pubsub(ignore_subscribe_messages=True)
            try:
                # Before the reads: a result stored meanwhile is then heard of.
                listener.subscribe(backend.get_key_for_task(task_id))
                outcome = cancel_step(
                    task_id,
                    lambda: read_meta(backend, task_id),
                    lambda: self.ledger.knows(task_id),
                    lambda: self.request_cancel([task_id]),
                )
                if outcome is not None:
                    return outcome
                deadline = time.monotonic() + NOT_FOUND_WAIT
                while (left := deadline - time.monotonic()) > 0:
                    message = listener.get_message(timeout=left)
                    if message is None or message.get("type") != "message":
                        continue
                    result = final_result(task_id, dict(backend.decode_result(message["data"])))
                    if result is not None:
                        return CancelOutcome(task_id, "finished", result)
                raise not_found(task_id)
            finally:
                listener.close()
        except redis.RedisError as exc:
            if not is_unreachable(exc):
                raise
            raise unreachable_error("state", self.settings.redis_url, exc) from None

    def request_cancel(self, task_ids: Sequence[str]) -> None:
        """Flag calls as cancelled and tell the workers, without the checks of
        :meth:`cancel` (fan-out uses it for calls it published itself)."""
        with self._state():
            request_cancel(self.redis, self.keys, task_ids, ttl=self.settings.result_expires)

    def progress_of(self, task_id: str) -> ProgressUpdate | None:
        """The latest progress call ``task_id`` reported, or None."""
        return self.read_progress([task_id])[0]

    def read_progress(self, task_ids: Sequence[str]) -> list[ProgressUpdate | None]:
        """The latest progress of each call (None: none reported), in one round trip."""
        if not task_ids:
            return []
        with self._state():
            raw: list[str | None] = self.redis.mget([self.keys.progress(t) for t in task_ids])  # type: ignore[assignment]
        return [None if r is None else ProgressUpdate.from_json(r) for r in raw]

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
        label = call_label(tool, server)
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
        except Exception as exc:
            return not_enqueued_result(label, exc, request_id, self.settings.broker_url)
        try:
            return handle.result(wait)
        except MCPTimeoutError as exc:
            return timed_out_result(label, exc, request_id, handle.id)
        finally:
            release(handle._async)  # the handle never leaves this method

    def get(self, task_id: str, tool: str = "?") -> CallHandle:
        """A handle for a call submitted earlier (by id)."""
        return CallHandle(AsyncResult(task_id, app=self.app), tool, queue=self)

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
        return checked_seconds(value, name, allow_zero=allow_zero)

    def discover(self, server: str | None = None, wait: float = 60.0) -> dict[str, Any]:
        return self._admin(DISCOVER, wait, server=server)

    def health(self, server: str | None = None, wait: float = 60.0) -> dict[str, Any]:
        return self._admin(HEALTH, wait, server=server)

    def reconnect(self, server: str) -> dict[str, Any]:
        """Make every worker process drop and reopen its sessions to ``server``
        (and re-list its tools). Workers notice within about a second."""
        return self._run(fleet_state.reconnect_plan(self.keys, server))

    # -- shared state (read from Redis, no worker needed; producer/fleet_state.py) ----
    def _run(self, plan: Plan[T]) -> T:
        """Run a fleet-state plan, saying which Redis could not be reached, and
        where, instead of redis-py's bare "Timeout reading from socket"."""
        try:
            return run_plan(self.redis, plan)
        except (redis.RedisError, OSError) as exc:
            if not is_unreachable(exc):
                raise
            raise unreachable_error("state", self.settings.redis_url, exc) from None

    @contextlib.contextmanager
    def _state(self) -> Iterator[None]:
        """As :meth:`_run`, for the few state commands that are not plans."""
        try:
            yield
        except redis.RedisError as exc:
            if not is_unreachable(exc):
                raise
            raise unreachable_error("state", self.settings.redis_url, exc) from None

    def servers(self) -> list[dict[str, Any]]:
        """Every server the workers published: summary, protocol, server info, tool count."""
        return self._run(fleet_state.servers_plan(self.keys))

    def tools(self, server: str | None = None) -> list[dict[str, Any]]:
        """Every tool of every server (or of ``server``), each with ``server`` and ``ambiguous``."""
        return self._run(fleet_state.tools_plan(self.keys, server))

    def breakers(self) -> dict[str, dict[str, Any]]:
        """Every known server's breaker: state, failures, opened_at, next_probe_at."""
        return self._run(fleet_state.breakers_plan(self.keys))

    def reset_breaker(self, server: str) -> bool:
        """Close ``server``'s breaker for the whole fleet."""
        return self._run(fleet_state.reset_plan(self.keys, server))

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
