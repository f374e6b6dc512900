"""Execution claims: nothing lost, nothing side-effecting run twice.

Celery delivers a late-acknowledged task again when its worker dies (or, on
the Redis transport, when the visibility timeout passes). Each attempt of a
call therefore takes a claim in Redis before it is sent (in the same Lua
script as the breaker's admit), keeps it alive with heartbeats while it runs,
and closes it with its ToolResult (in the same script as the breaker's
complete). A later delivery of the same attempt then:

* finds it **done** and returns the stored result without touching the server;
* finds it **running** with a fresh heartbeat (a duplicate delivery while the
  first is alive) and waits for it, re-enqueued, never sleeping;
* finds it **running** with a stale heartbeat (the worker died mid-call): an
  idempotent call is taken over and run again, any other ends as
  ``outcome_unknown`` naming the worker that died.

Heartbeats for every call running in this process go out in one script call
per interval, so they cost no round trip per call.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid

import redis

from mcpq.worker.breaker import Claim
from mcpq.worker.contract.keys import Keys
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.scripts import load_script

log = logging.getLogger(__name__)


class CallInProgress(Exception):
    """Another live worker is running this very call; wait for its result."""

    def __init__(self, owner: str, retry_after: float) -> None:
        super().__init__(f"call is running on {owner}")
        self.owner = owner
        self.retry_after = retry_after


def worker_identity() -> str:
    return f"{socket.gethostname()}/pid{os.getpid()}"


def worker_of(owner: str) -> str:
    """The worker part of a claim owner ("host/pid123#execution" -> "host/pid123")."""
    return owner.split("#", 1)[0]


class ClaimKeeper:
    """Creates claims for this process and keeps their heartbeats fresh."""

    def __init__(self, client: redis.Redis, keys: Keys, *, lease: float, ttl: float) -> None:
        self.redis = client
        self.keys = keys
        self.lease = lease
        self.ttl = ttl
        self.owner = worker_identity()
        self._heartbeat = load_script(client, "heartbeat.lua")
        self._finish = load_script(client, "finish_claim.lua")
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def claim(self, delivery: str, idempotent: bool, call_id: str | None = None) -> Claim:
        """A new claim on ``delivery`` (``<call id>:<attempt>``).

        :param idempotent: whether a stale claim of this call may be taken over.
        :param call_id: the id a caller cancels the call by; admit then reads
            its cancel flag in the same script.
        """
        # The owner names this very execution, not just the process: a message
        # redelivered to the same worker (after a broker connection loss) while
        # its first execution still runs must see a claim that is not its own.
        owner = f"{self.owner}#{uuid.uuid4().hex[:12]}"
        cancel_key = self.keys.cancelled(call_id) if call_id else ""
        return Claim(self.keys.claim(delivery), owner, idempotent, self.lease, self.ttl, cancel_key)

    def track(self, claim: Claim | None) -> None:
        if claim is None:
            return
        with self._lock:
            self._running.add(claim.key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="mcpq-claims", daemon=True)
                self._thread.start()

    def untrack(self, claim: Claim | None) -> None:
        if claim is not None:
            with self._lock:
                self._running.discard(claim.key)

    def finish(self, claim: Claim, result: ToolResult) -> ToolResult:
        """Close ``claim`` with ``result`` unless another delivery closed it first
        (then that delivery's result is the call's one result)."""
        try:
            stored = self._finish(
                keys=[claim.key], args=[json.dumps(result.to_dict()), int(self.ttl * 1000), self.owner]
            )
        except redis.RedisError as exc:
            log.warning("could not record the outcome of %s: %s", claim.key, exc)
            return result
        text = stored.decode() if isinstance(stored, bytes) else str(stored)
        return ToolResult.from_dict(json.loads(text))

    def _beat(self) -> None:
        interval = max(self.lease / 3, 0.05)
        while not self._stop.wait(interval):
            with self._lock:
                running = list(self._running)
            if not running:
                continue
            try:
                self._heartbeat(keys=running, args=[self.owner, int(self.ttl * 1000)])
            except redis.RedisError as exc:
                # A missed beat is survivable: the lease is three intervals long.
                log.warning("claim heartbeat failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
