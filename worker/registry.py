"""Server configs and the fleet's shared view of what each server offers.

Discovery results (tools, capabilities, server info, negotiated protocol) are
published to Redis so that every worker routes by the same tool map and the
producer can list tools without touching an MCP server. Each process keeps a
copy and re-reads Redis only when the shared version counter moves (checked
at most once a second), so routing costs no Redis round trip per call.

Redis being unreachable never stops a call: the process then routes by what
it discovered itself.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from mcpq.worker.config import MCPQConfig, MCPServerConfig
from mcpq.worker.contract.errors import ServerDisabledError, ServerNotFoundError
from mcpq.worker.contract.keys import Keys
from mcpq.worker.contract.scripts import load_script

log = logging.getLogger(__name__)

#: How often a process asks Redis whether another process re-discovered tools.
VERSION_CHECK_INTERVAL = 1.0


@dataclass(slots=True)
class ToolSet:
    """One server's tools as last discovered."""

    tools: dict[str, dict[str, Any]]
    discovered_at: float
    info: dict[str, Any] = field(default_factory=dict)
    #: The server config's target fingerprint this was discovered from (``MCPServerConfig.target``).
    target: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {"tools": list(self.tools.values()), "discovered_at": self.discovered_at, "target": self.target}
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> ToolSet:
        doc = json.loads(raw)
        tools = {t["name"]: t for t in doc.get("tools", []) if isinstance(t, dict) and "name" in t}
        return cls(
            tools=tools, discovered_at=float(doc.get("discovered_at", 0.0)), target=str(doc.get("target", ""))
        )


class MCPServerRegistry:
    """Thread-safe registry of server configs plus the discovered-tools cache."""

    def __init__(self, config: MCPQConfig, client: redis.Redis, keys: Keys) -> None:
        self.config = config
        self.redis = client
        self.keys = keys
        self._lock = threading.RLock()
        self._toolsets: dict[str, ToolSet] = {}
        self._seen_version: int | None = None
        self._next_version_check = 0.0
        self._rebuild = load_script(client, "rebuild_tool_map.lua")
        self._redis_down_logged = False
        self._epochs: dict[str, int] | None = None
        #: Called (in the calling thread) with a server name when the fleet was asked to reconnect it.
        self.on_reconnect: Callable[[str], None] | None = None

    # -- configs -------------------------------------------------------------
    @property
    def servers(self) -> dict[str, MCPServerConfig]:
        return self.config.mcp_servers

    def get(self, name: str) -> MCPServerConfig:
        config = self.servers.get(name)
        if config is None:
            known = ", ".join(sorted(self.servers)) or "none"
            raise ServerNotFoundError(
                f"no server named {name!r} is configured (configured: {known})", details={"server": name}
            )
        return config

    def get_enabled(self, name: str) -> MCPServerConfig:
        config = self.get(name)
        if not config.enabled:
            raise ServerDisabledError(
                f"server {name!r} is disabled in config (enabled: false)", details={"server": name}
            )
        return config

    def enabled_names(self) -> list[str]:
        return [name for name, c in self.servers.items() if c.enabled]

    # -- shared state ------------------------------------------------------------
    def _redis_call(self, what: str, fn: Any, *args: Any) -> Any:
        """Run a Redis command; on failure log once and return None."""
        try:
            result = fn(*args)
        except redis.RedisError as exc:
            if not self._redis_down_logged:
                log.warning("state Redis unavailable (%s while %s); using this process's own view", exc, what)
                self._redis_down_logged = True
            return None
        if self._redis_down_logged:
            log.warning("state Redis reachable again")
            self._redis_down_logged = False
        return result

    def publish_servers(self) -> None:
        """Write every configured server's summary (no secrets) for the producer."""
        mapping: dict[str | bytes, str | bytes] = {
            n: json.dumps(c.summary()) for n, c in self.servers.items()
        }

        def write() -> None:
            pipe = self.redis.pipeline()
            pipe.delete(self.keys.servers)
            if mapping:
                pipe.hset(self.keys.servers, mapping=mapping)  # type: ignore[arg-type]
            pipe.execute()

        self._redis_call("publishing servers", write)

    def publish_discovery(self, server: str, toolset: ToolSet) -> None:
        toolset.target = self.get(server).target()
        with self._lock:
            self._toolsets[server] = toolset

        def write() -> Any:
            pipe = self.redis.pipeline()
            pipe.set(self.keys.server_tools(server), toolset.to_json())
            if toolset.info:
                pipe.set(
                    self.keys.server_info(server), json.dumps({**toolset.info, "target": toolset.target})
                )
            pipe.execute()
            names = list(self.servers)
            keys = [self.keys.tool_map, self.keys.tools_version] + [self.keys.server_tools(n) for n in names]
            return self._rebuild(keys=keys, args=names)

        version = self._redis_call("publishing discovered tools", write)
        if version is not None:
            with self._lock:
                # Only our own bump may be skipped; if another process published
                # in between, the next check must still load its tools.
                if self._seen_version is not None and int(version) == self._seen_version + 1:
                    self._seen_version = int(version)

    def publish_info(self, server: str, info: dict[str, Any]) -> None:
        with self._lock:
            current = self._toolsets.get(server)
            if current is not None:
                current.info = info
        shown = {**info, "target": self.get(server).target()}
        self._redis_call(
            "publishing server info", self.redis.set, self.keys.server_info(server), json.dumps(shown)
        )

    def _maybe_reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_version_check:
            return
        self._next_version_check = now + VERSION_CHECK_INTERVAL

        def check() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(self.keys.tools_version)
            pipe.hgetall(self.keys.epochs)
            return list(pipe.execute())

        replies = self._redis_call("checking the tools version", check)
        if replies is None:
            return
        self._apply_epochs(replies[1])
        if replies[0] is None:
            return
        version = int(replies[0])
        if not force and version == self._seen_version:
            return
        names = list(self.servers)
        if not names:
            return
        docs = self._redis_call("loading tools", self.redis.mget, [self.keys.server_tools(n) for n in names])
        if docs is None:
            return
        with self._lock:
            for name, doc in zip(names, docs, strict=True):
                if doc is None:
                    continue
                shared = ToolSet.from_json(doc)
                if shared.target != self.servers[name].target():
                    # Published by a worker whose config points this name at
                    # another URL or command: not this server's tools.
                    continue
                mine = self._toolsets.get(name)
                if mine is None or shared.discovered_at > mine.discovered_at:
                    if mine is not None:
                        shared.info = mine.info
                    self._toolsets[name] = shared
            self._seen_version = version

    def _apply_epochs(self, raw: dict[Any, Any]) -> None:
        """Fleet-wide reconnect: a server whose epoch moved gets its sessions
        dropped in this process (the check rides on the version check)."""
        epochs = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
        with self._lock:
            first = self._epochs is None
            moved = [] if first else [s for s, n in epochs.items() if n != (self._epochs or {}).get(s, 0)]
            self._epochs = epochs
        for server in moved:
            if server in self.servers and self.on_reconnect is not None:
                self.on_reconnect(server)

    def bump_epoch(self, server: str) -> int | None:
        self.get(server)
        value = self._redis_call(
            "asking the fleet to reconnect", self.redis.hincrby, self.keys.epochs, server, 1
        )
        return None if value is None else int(value)

    def toolset(self, server: str, *, refresh: bool = False) -> ToolSet | None:
        self._maybe_reload(force=refresh)
        with self._lock:
            return self._toolsets.get(server)

    def is_stale(self, server: str) -> bool:
        toolset = self.toolset(server)
        if toolset is None:
            return True
        return time.time() - toolset.discovered_at > self.get(server).discovery_ttl

    def mark_stale(self, server: str) -> None:
        with self._lock:
            toolset = self._toolsets.get(server)
            if toolset is not None:
                toolset.discovered_at = 0.0

    def servers_offering(self, tool: str, *, refresh: bool = False) -> list[str]:
        """Enabled servers whose last discovery lists ``tool``, in config order."""
        self._maybe_reload(force=refresh)
        with self._lock:
            return [
                name
                for name in self.enabled_names()
                if (ts := self._toolsets.get(name)) is not None and tool in ts.tools
            ]

    def known_tool_names(self) -> list[str]:
        with self._lock:
            names = {t for name in self.enabled_names() if (ts := self._toolsets.get(name)) for t in ts.tools}
        return sorted(names)

    def undiscovered(self) -> list[str]:
        self._maybe_reload()
        with self._lock:
            return [n for n in self.enabled_names() if n not in self._toolsets]

    def load_protocols(self) -> dict[str, dict[str, Any]]:
        """The fleet's remembered protocol choices for the configured servers, each
        only if it was learnt from the same target this process's config names."""
        raw = self._redis_call("loading protocol memory", self.redis.hgetall, self.keys.protocols)
        out: dict[str, dict[str, Any]] = {}
        for k, v in (raw or {}).items():
            name = k.decode() if isinstance(k, bytes) else k
            try:
                doc = json.loads(v)
            except ValueError:
                continue
            config = self.servers.get(name)
            if isinstance(doc, dict) and config is not None and doc.get("target") == config.target():
                out[name] = doc
        return out

    def save_protocol(self, server: str, choice: dict[str, Any]) -> None:
        doc = {**choice, "target": self.get(server).target()}
        self._redis_call(
            "saving protocol memory", self.redis.hset, self.keys.protocols, server, json.dumps(doc)
        )
