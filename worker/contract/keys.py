"""Redis key layout for shared state. Every key starts with the configured prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "mcpq:"

    @property
    def tool_map(self) -> str:
        """Hash: tool name -> JSON list of server names offering it."""
        return f"{self.prefix}tools:map"

    @property
    def servers(self) -> str:
        """Hash: server name -> JSON summary (transport, enabled, description, status)."""
        return f"{self.prefix}servers"

    @property
    def tools_version(self) -> str:
        """Counter bumped on every publish: per-process caches compare against it."""
        return f"{self.prefix}tools:version"

    @property
    def protocols(self) -> str:
        """Hash: server -> JSON of the protocol mode it negotiated (saves auto's probe)."""
        return f"{self.prefix}protocols"

    def server_tools(self, server: str) -> str:
        """String: JSON list of the server's tools (name, description, inputSchema, annotations)."""
        return f"{self.prefix}server:{server}:tools"

    def server_info(self, server: str) -> str:
        """String: JSON of serverInfo, capabilities, protocol version, discovered_at."""
        return f"{self.prefix}server:{server}:info"

    def breaker(self, server: str) -> str:
        return f"{self.prefix}breaker:{server}"

    def inflight(self, server: str) -> str:
        """Sorted set: tokens of calls in flight fleet-wide, scored by lease expiry (ms)."""
        return f"{self.prefix}inflight:{server}"

    def rate(self, server: str) -> str:
        """String: the GCRA theoretical arrival time (ms) of the server's rate limit."""
        return f"{self.prefix}rate:{server}"

    @property
    def ledger(self) -> str:
        """Sorted set: task ids of enqueued, unfinished calls, scored by when they are overdue (ms)."""
        return f"{self.prefix}ledger"

    @property
    def ledger_messages(self) -> str:
        """Hash: task id -> the call's message, to publish it again if the broker lost it."""
        return f"{self.prefix}ledger:messages"

    @property
    def ledger_members(self) -> str:
        """Hash: id of a call sent inside a chunk task -> the chunk's task id (while it is due)."""
        return f"{self.prefix}ledger:members"

    def cancelled(self, task_id: str) -> str:
        """String, set when a caller cancels call ``task_id``: no worker sends it from then on."""
        return f"{self.prefix}cancel:{task_id}"

    @property
    def cancel_channel(self) -> str:
        """Pub/sub channel: the id of every call just cancelled, so a running one is interrupted."""
        return f"{self.prefix}cancel"

    def progress(self, task_id: str) -> str:
        """String and pub/sub channel of call ``task_id``'s latest progress (contract/progress.py)."""
        return f"{self.prefix}progress:{task_id}"

    def claim(self, delivery: str) -> str:
        """Hash: the execution claim of one attempt of one call (state, owner, heartbeat, result)."""
        return f"{self.prefix}claim:{delivery}"

    @property
    def idempotency(self) -> str:
        """Prefix of the keys that map caller idempotency keys to the first call's task id."""
        return f"{self.prefix}idem:"

    @property
    def metrics_endpoints(self) -> str:
        """Hash: a worker's ``http://host:port/metrics`` -> when it last announced it (Redis time,
        epoch seconds), refreshed every ~10 s; readers (``mcpq top``) skip entries older than 60 s."""
        return f"{self.prefix}metrics:endpoints"

    @property
    def epochs(self) -> str:
        """Hash: server -> reconnect epoch; bumping it makes every worker reopen its sessions."""
        return f"{self.prefix}epochs"
