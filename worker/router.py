"""ToolRouter: resolve a tool to a server, validate, call, classify.

The order matters and is part of the contract: nothing is sent to a server
until the tool is resolved unambiguously and its arguments pass the tool's
inputSchema.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import difflib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from mcp import Client

from mcpq.worker import metrics
from mcpq.worker import tracing as call_tracing
from mcpq.worker.breaker import Admission, BreakerPolicy, Claim, ServerGuard
from mcpq.worker.cancellation import CallWatch, CancelListener
from mcpq.worker.claims import CallInProgress, ClaimKeeper, worker_of
from mcpq.worker.classify import Outcome, classify
from mcpq.worker.config import MCPQConfig, MCPServerConfig
from mcpq.worker.contract.errors import (
    AmbiguousToolError,
    CallCancelledError,
    CircuitOpenError,
    InternalError,
    LimitExceededError,
    MCPConnectionError,
    MCPError,
    MCPTimeoutError,
    OutcomeUnknownError,
    ResultTooLargeError,
    ToolExecutionError,
    ToolNotFoundError,
)
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.discovery import Discovery
from mcpq.worker.pool import ConnectionPool, OutcomeError
from mcpq.worker.progress import ProgressPublisher, ProgressRelay
from mcpq.worker.redact import scrub
from mcpq.worker.registry import MCPServerRegistry
from mcpq.worker.validation import validate_arguments

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Target:
    server: MCPServerConfig
    tool: str
    definition: dict[str, Any]


#: Set (and removed again by the task) when the complete script cleared the ledger entry.
LEDGER_CLEARED = "_ledger_cleared"

#: After a server could not be listed, bare-name calls skip it this long.
UNREACHABLE_RETRY = 5.0

# Counts as neither success nor failure (isError results, cancellations we caused).
_IGNORED = Outcome(
    error=InternalError("ignored"),
    breaker_failure=False,
    retryable=False,
    maybe_executed=False,
    session_broken=False,
)


class _Interrupted(Exception):
    """A caller cancelled the call while this worker handled it; ``sent``: its
    request may have reached the server."""

    def __init__(self, sent: bool) -> None:
        super().__init__("cancelled")
        self.sent = sent


def split_qualified(tool: str, server: str | None) -> tuple[str, str | None]:
    """``server/tool`` -> (tool, server). MCP tool names cannot contain '/'."""
    if server is None and "/" in tool:
        prefix, _, name = tool.partition("/")
        if prefix and name:
            return name, prefix
    return tool, server


class ToolRouter:
    def __init__(
        self,
        config: MCPQConfig,
        registry: MCPServerRegistry,
        pool: ConnectionPool,
        discovery: Discovery,
        guard: ServerGuard,
        claims: ClaimKeeper,
        cancels: CancelListener | None = None,
        progress: ProgressPublisher | None = None,
    ) -> None:
        """
        :param cancels: this process's cancel listener (None: calls cannot be
            interrupted once sent; the flag in admit still stops unsent ones).
        :param progress: relays progress of calls that ask for it (None: none is relayed).
        """
        self.config = config
        self.registry = registry
        self.pool = pool
        self.discovery = discovery
        self.guard = guard
        self.claims = claims
        self.cancels = cancels
        self.progress = progress
        self.policies = {name: BreakerPolicy.from_config(c) for name, c in config.mcp_servers.items()}
        self._failed_discovery: dict[str, tuple[float, MCPError]] = {}

    # -- resolve -----------------------------------------------------------------
    def resolve(self, tool: str, server: str | None, deadline: float) -> Target:
        tool, server = split_qualified(tool, server)
        if server is not None:
            return self._resolve_on(server, tool, deadline)
        # A bare name is unambiguous only if every enabled server's tools are
        # known: a server not listed yet may offer the same name.
        failures = self._discover_unknown(deadline)
        candidates = self.registry.servers_offering(tool)
        if not candidates:
            # Unknown here may also mean changed since the last listing.
            candidates = self.registry.servers_offering(tool, refresh=True)
        if not candidates:
            known = self.registry.known_tool_names()
            close = difflib.get_close_matches(tool, known, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            unreachable = (
                f" (not reachable to list their tools: {', '.join(sorted(failures))})" if failures else ""
            )
            raise ToolNotFoundError(
                f"no enabled server offers a tool named {tool!r}{hint}{unreachable}",
                details={"tool": tool, "suggestions": close, "unreachable": sorted(failures)},
            )
        if len(candidates) > 1:
            listed = ", ".join(f"'{s}/{tool}'" for s in candidates)
            raise AmbiguousToolError(
                f"tool {tool!r} is offered by {len(candidates)} servers ({', '.join(candidates)}); "
                f"name one with server= or the qualified form: {listed}",
                details={"tool": tool, "servers": candidates},
            )
        return self._resolve_on(candidates[0], tool, deadline)

    def _resolve_on(self, server: str, tool: str, deadline: float) -> Target:
        config = self.registry.get_enabled(server)
        toolset = self.registry.toolset(server)
        if toolset is None or tool not in toolset.tools or self.registry.is_stale(server):
            failures = self._guarded_discovery(config, deadline, force=toolset is not None)
            toolset = self.registry.toolset(server)
            if toolset is None and server in failures:
                # Nothing known about the server and it cannot be reached: that
                # is the real error, not an unknown tool.
                raise failures[server]
        if toolset is None or tool not in toolset.tools:
            known = sorted(toolset.tools) if toolset else []
            close = difflib.get_close_matches(tool, known, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ToolNotFoundError(
                f"server {server!r} offers no tool named {tool!r}{hint}",
                details={"tool": tool, "server": server, "suggestions": close},
            )
        return Target(config, tool, toolset.tools[tool])

    def _discover_unknown(self, deadline: float) -> dict[str, MCPError]:
        """List the tools of enabled servers never listed yet. A server that
        could not be reached is tried again only after a pause, so a dead
        server does not cost every call a connect attempt."""
        failures: dict[str, MCPError] = {}
        now = time.monotonic()
        for name in self.registry.undiscovered():
            last = self._failed_discovery.get(name)
            if last is not None and now - last[0] < UNREACHABLE_RETRY:
                failures[name] = last[1]
                continue
            try:
                found = self._guarded_discovery(self.registry.get(name), deadline)
            except LimitExceededError:
                raise  # busy, not unreachable: the call waits for the limit like any call
            except MCPError as exc:  # its breaker is open
                found = {name: exc}
            if name in found:
                self._failed_discovery[name] = (time.monotonic(), found[name])
            else:
                self._failed_discovery.pop(name, None)
            failures |= found
        return failures

    def _guarded_discovery(
        self, config: MCPServerConfig, deadline: float, force: bool = False
    ) -> dict[str, MCPError]:
        """Discovery on the call path talks to the server, so the breaker
        guards it like a call: an open circuit is not hammered by tools/list."""
        if not (force or self.registry.is_stale(config.name)):
            return {}
        admission = self._admit(config, deadline)
        started = time.monotonic()
        failures = self.discovery.ensure([config.name], deadline, force=force)
        failure = failures.get(config.name)
        outcome = classify(failure, config.name, "connect") if failure is not None else None
        self._complete(config, admission, outcome, started)
        return failures

    def _admit(self, config: MCPServerConfig, deadline: float, claim: Claim | None = None) -> Admission:
        lease_ttl = max(deadline - time.monotonic(), 0.0) + config.connect_timeout + 5.0
        admission = self.guard.admit(
            config.name, self.policies[config.name], uuid.uuid4().hex, lease_ttl, claim
        )
        call_tracing.current().admission(admission.decision)
        if admission.admitted or admission.decision in ("done", "busy", "orphaned", "cancelled"):
            return admission
        wait = round(admission.retry_after, 3)
        if admission.decision == "reject":
            state = "open" if admission.state == "open" else "half-open with its probe in flight"
            raise CircuitOpenError(
                f"circuit breaker for server {config.name!r} is {state}; the call was not sent"
                + (f" (next probe in {wait:g}s)" if wait > 0 else ""),
                details={"server": config.name, "retry_after": wait, "defer": config.on_open == "defer"},
            )
        raise LimitExceededError(
            f"server {config.name!r} is at its {admission.reason} limit "
            f"({self._limit_text(config, admission.reason)}); the call was not sent",
            details={"server": config.name, "retry_after": wait, "limit": admission.reason},
        )

    @staticmethod
    def _limit_text(config: MCPServerConfig, reason: str) -> str:
        if reason == "concurrency":
            return f"max_concurrency {config.max_concurrency}"
        return f"rate_limit {config.rate_limit}"

    def _complete(
        self,
        config: MCPServerConfig,
        admission: Admission,
        outcome: Outcome | None,
        started: float,
        claim: Claim | None = None,
        result: ToolResult | None = None,
        finished_task: str = "",
    ) -> None:
        verdict = "success" if outcome is None else ("failure" if outcome.breaker_failure else "ignore")
        self.guard.complete(
            config.name,
            self.policies[config.name],
            admission,
            verdict,  # type: ignore[arg-type]
            time.monotonic() - started,
            outcome.error.code.value if outcome else "",
            claim=claim,
            result_json=json.dumps(result.to_dict()) if result is not None else "",
            finished_task=finished_task,
        )

    # -- call ----------------------------------------------------------------------
    def call(
        self,
        tool: str,
        arguments: dict[str, Any] | None,
        *,
        server: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        claim_key: str | None = None,
        attempt: int = 1,
        ledger_id: str | None = None,
        call_id: str | None = None,
        progress: bool = False,
    ) -> ToolResult:
        """Run one call and return its ToolResult; never raises, except
        :class:`CallInProgress` when another live worker holds the call's claim.

        :param call_id: the id callers cancel the call by (its task id, or its
            id in a chunk); watched from before admit until the result.
        :param progress: relay the server's progress notifications to Redis.
        """
        watching: contextlib.AbstractContextManager[CallWatch | None] = (
            self.cancels.watch(call_id) if self.cancels is not None else contextlib.nullcontext(None)
        )
        relay = self.progress.relay(call_id) if progress and call_id and self.progress else None
        with watching as watch, call_tracing.call_span(tool, server, attempt) as span:
            result = self._call(
                tool, arguments, server, timeout, request_id, claim_key, attempt, ledger_id,
                call_id, watch, relay,
            )  # fmt: skip
            span.finish(result)
            return result

    def _call(
        self,
        tool: str,
        arguments: dict[str, Any] | None,
        server: str | None,
        timeout: float | None,
        request_id: str | None,
        claim_key: str | None,
        attempt: int,
        ledger_id: str | None,
        call_id: str | None,
        watch: CallWatch | None,
        relay: ProgressRelay | None,
    ) -> ToolResult:
        started = time.monotonic()
        target: Target | None = None
        meta = {"request_id": request_id, "attempts": attempt}
        try:
            budget = timeout if timeout is not None else self.default_timeout(tool, server)
            deadline = started + budget
            target = self.resolve(tool, server, deadline)
            call_tracing.current().target(target.server.name, target.server.transport)
            args = {} if arguments is None else arguments
            validate_arguments(
                target.tool, target.definition.get("inputSchema"), args, self.config.secret_patterns
            )
            claim = self.claims.claim(claim_key, self._idempotent(target), call_id) if claim_key else None
            admission = self._admit(target.server, deadline, claim)
            if admission.decision == "cancelled":
                return self._cancelled_unsent(tool, target, admission, claim, started, meta)
            if admission.decision in ("done", "busy", "orphaned"):
                return self._redelivered(tool, target, admission, claim, started, meta)
            self.claims.track(claim)
            try:
                return self._send(
                    tool, target, args, admission, claim, deadline, budget, started, meta, ledger_id,
                    watch, relay,
                )  # fmt: skip
            finally:
                self.claims.untrack(claim)
        except CallInProgress:
            raise
        except MCPError as exc:
            if exc.details.get("phase") in ("connect", "discovery"):
                # Nothing reached the server, so trying again later is always safe.
                exc.details.setdefault("retry_safe", isinstance(exc, MCPConnectionError | MCPTimeoutError))
            return self._failure(tool, target, exc, started, meta)
        except Exception as exc:  # the task must always end with a ToolResult
            log.exception("internal error routing %r", tool)
            err = InternalError(f"mcpq failed while calling {tool!r}: {type(exc).__name__}: {exc}")
            return self._failure(tool, target, err, started, meta)

    def _send(
        self,
        tool: str,
        target: Target,
        args: dict[str, Any],
        admission: Admission,
        claim: Claim | None,
        deadline: float,
        budget: float,
        started: float,
        meta: dict[str, Any],
        ledger_id: str | None = None,
        watch: CallWatch | None = None,
        relay: ProgressRelay | None = None,
    ) -> ToolResult:
        sent_at = time.monotonic()
        outcome: Outcome | None
        try:
            data = self._execute(target, args, deadline, budget, watch, relay)
        except _Interrupted as exc:
            # Cancellation we caused: neither success nor failure for the
            # breaker, never retried, and the session stays (it is not broken).
            err = self._cancelled_error(target, sent=exc.sent, attempts=meta["attempts"])
            outcome = Outcome(error=err, breaker_failure=False, retryable=False, maybe_executed=exc.sent,
                              session_broken=False)  # fmt: skip
            result = self._failure(tool, target, err, started, meta)
            log.info("call %s: %s", meta["request_id"], err.message)
        except OutcomeError as exc:
            outcome = exc.outcome
            outcome.error.details["retry_safe"] = outcome.retryable and (
                not outcome.maybe_executed or self._idempotent(target)
            )
            outcome.error.details["may_have_run"] = outcome.maybe_executed
            result = self._failure(tool, target, outcome.error, started, meta)
        except MCPError as exc:  # the pool could not connect: nothing was sent
            outcome = classify(exc, target.server.name, "connect")
            exc.details.setdefault("retry_safe", outcome.retryable)
            result = self._failure(tool, target, exc, started, meta)
        except BaseException:
            self._complete(target.server, admission, _IGNORED, sent_at)
            raise
        else:
            outcome = _IGNORED if data.get("isError") else None
            result = self._result(tool, target, data, started, meta)
        # The call's final attempt clears its ledger entry in the same script.
        final = (
            result.success
            or not result.details.get("retry_safe")
            or meta["attempts"] > target.server.retry_attempts
        )
        finished = ledger_id if ledger_id and final else ""
        self._complete(target.server, admission, outcome, sent_at, claim, result, finished)
        if finished:
            result.details[LEDGER_CLEARED] = True
        return result

    @staticmethod
    def _cancelled_error(target: Target, *, sent: bool, attempts: int, died: str = "") -> CallCancelledError:
        """The error of a call a caller cancelled. ``may_have_run``: this
        attempt was sent, an earlier delivery died mid-call, or an earlier
        attempt (which failed in a retryable way) may have reached the server."""
        where = f"{target.tool!r} on {target.server.name!r}"
        if sent:
            text = f"the call to {where} was cancelled while it ran; it may have had effects"
        elif died:
            text = (
                f"the call to {where} was cancelled; it was not sent again, but its earlier delivery "
                f"on worker {worker_of(died)!r} stopped mid-call, so it may have run"
            )
        elif attempts > 1:
            text = (
                f"the call to {where} was cancelled before attempt {attempts} was sent; "
                "an earlier attempt may have reached the server"
            )
        else:
            text = f"the call to {where} was cancelled before it was sent"
        return CallCancelledError(
            text,
            details={
                "server": target.server.name,
                "may_have_run": sent or bool(died) or attempts > 1,
                "retry_safe": False,
            },
        )

    def _cancelled_unsent(
        self,
        tool: str,
        target: Target,
        admission: Admission,
        claim: Claim | None,
        started: float,
        meta: dict[str, Any],
    ) -> ToolResult:
        """Admit found the call's cancel flag: end it without sending, claim closed
        with the result (so a redelivery answers the same)."""
        err = self._cancelled_error(target, sent=False, attempts=meta["attempts"], died=admission.reason)
        result = self._failure(tool, target, err, started, meta)
        log.info("call %s: %s", meta["request_id"], err.message)
        return self.claims.finish(claim, result) if claim is not None else result

    def _redelivered(
        self,
        tool: str,
        target: Target,
        admission: Admission,
        claim: Claim | None,
        started: float,
        meta: dict[str, Any],
    ) -> ToolResult:
        """A delivery of a call that an earlier delivery already claimed."""
        if admission.decision == "done":
            stored = ToolResult.from_dict(json.loads(admission.stored))
            stored.details["redelivered"] = True
            log.info("call %s was already answered; returning its stored result", meta["request_id"])
            return stored
        if admission.decision == "busy":
            raise CallInProgress(admission.reason, admission.retry_after)
        assert claim is not None
        err = OutcomeUnknownError(
            f"the call to {target.tool!r} on {target.server.name!r} was running on worker "
            f"{worker_of(admission.reason)!r}, which stopped before reporting its outcome; it may or may not "
            "have run, and it was not repeated because the tool is not marked idempotent",
            details={"worker": worker_of(admission.reason), "server": target.server.name},
        )
        result = self._failure(tool, target, err, started, meta)
        log.warning("call %s: %s", meta["request_id"], err.message)
        return self.claims.finish(claim, result)

    def default_timeout(self, tool: str, server: str | None) -> float:
        name, server = split_qualified(tool, server)
        config = self.config.mcp_servers.get(server) if server else None
        if config is None:
            return max((c.timeout for c in self.config.mcp_servers.values()), default=30.0)
        override = config.tools.get(name)
        return override.timeout if override and override.timeout else config.timeout

    def _execute(
        self,
        target: Target,
        args: dict[str, Any],
        deadline: float,
        budget: float,
        watch: CallWatch | None = None,
        relay: ProgressRelay | None = None,
    ) -> dict[str, Any]:
        """The MCP request; raises :class:`_Interrupted` when ``watch`` fires first."""

        # The call's span, made current again on the loop thread around the request.
        handoff = call_tracing.handoff()

        async def op(client: Client) -> dict[str, Any]:
            remaining = max(deadline - time.monotonic(), 0.001)
            with call_tracing.resumed(handoff, client):
                result = await client.call_tool(
                    target.tool, args, read_timeout_seconds=remaining, progress_callback=relay
                )
            return result.model_dump(mode="json", by_alias=True, exclude_none=True)

        if watch is not None and watch.fired:  # cancelled between admit and here
            raise _Interrupted(sent=False)
        idempotent = self._idempotent(target)
        coro = self.pool.with_session(target.server.name, deadline, op, idempotent=idempotent)
        try:
            # The loop enforces the deadline; this outer bound only guards against a wedged loop.
            with metrics.current().in_flight(target.server.name):
                return self.pool.run(
                    coro,
                    timeout=budget + target.server.connect_timeout + 5,
                    on_submit=watch.attach if watch is not None else None,
                )
        except concurrent.futures.CancelledError:
            if watch is not None and watch.fired:
                # Once handed to the loop the request may have been written
                # (the loop sees the cancel only at its next await): say so.
                raise _Interrupted(sent=True) from None
            raise
        finally:
            if relay is not None:
                relay.close()  # the last progress goes out before the result

    def _idempotent(self, target: Target) -> bool:
        configured = target.server.is_tool_idempotent(target.tool)
        if configured is not None:
            return configured
        hints = target.definition.get("annotations") or {}
        return bool(hints.get("idempotentHint") or hints.get("readOnlyHint"))

    # -- results -------------------------------------------------------------------
    def _result(
        self, tool: str, target: Target, data: dict[str, Any], started: float, meta: dict[str, Any]
    ) -> ToolResult:
        elapsed = (time.monotonic() - started) * 1000
        size = len(json.dumps(data, separators=(",", ":")))
        if size > self.config.max_result_bytes:
            err: MCPError = ResultTooLargeError(
                f"tool {target.tool!r} on {target.server.name!r} returned {size} bytes, over "
                f"max_result_bytes ({self.config.max_result_bytes}); the result was dropped",
                details={"size": size, "limit": self.config.max_result_bytes},
            )
            return self._failure(tool, target, err, started, meta)
        if data.get("isError"):
            text = " ".join(
                str(c.get("text", "")) for c in data.get("content", []) if c.get("type") == "text"
            )
            err = ToolExecutionError(f"tool {target.tool!r} reported an error: {text[:500]}".rstrip(": "))
            return ToolResult.failure(
                target.tool,
                err,
                server_name=target.server.name,
                data=data,
                execution_time_ms=round(elapsed, 3),
                **meta,
            )
        return ToolResult.ok(
            target.tool, target.server.name, data, execution_time_ms=round(elapsed, 3), **meta
        )

    def _failure(
        self, tool: str, target: Target | None, error: MCPError, started: float, meta: dict[str, Any]
    ) -> ToolResult:
        if target is not None:
            error.message = scrub(error.message, target.server)
        elapsed = (time.monotonic() - started) * 1000
        return ToolResult.failure(
            target.tool if target else split_qualified(tool, None)[0],
            error,
            server_name=target.server.name if target else error.details.get("server"),
            execution_time_ms=round(elapsed, 3),
            **meta,
        )
