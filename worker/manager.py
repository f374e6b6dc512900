"""MCPClientManager: the one facade that tasks and admin operations use.

It wires the parts of one worker process together (registry, pool,
discovery, router) and is created lazily, once per PID, in the process that
uses it: never before a fork.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from mcp import Client
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from redis.backoff import NoBackoff
from redis.retry import Retry

from mcpq.worker.breaker import ServerGuard
from mcpq.worker.cancellation import CancelListener
from mcpq.worker.claims import ClaimKeeper
from mcpq.worker.config import MCPQConfig
from mcpq.worker.config_loader import load_config
from mcpq.worker.contract.breaker_state import breaker_status, reset_breaker
from mcpq.worker.contract.errors import MCPError
from mcpq.worker.contract.keys import Keys
from mcpq.worker.contract.ledger import Ledger
from mcpq.worker.contract.result import ToolResult
from mcpq.worker.contract.settings import Settings
from mcpq.worker.discovery import Discovery
from mcpq.worker.ledger import LedgerSweeper
from mcpq.worker.pool import ConnectionPool, OutcomeError, ProtocolChoice, ServerHandshake
from mcpq.worker.progress import ProgressPublisher
from mcpq.worker.registry import MCPServerRegistry
from mcpq.worker.router import ToolRouter

log = logging.getLogger(__name__)


def state_redis(url: str) -> redis.Redis:
    # Short timeouts and one quick retry (redis-py's default backs off for
    # seconds): shared state matters, but a dead Redis must never stall a
    # call; the breaker falls back to per-process state instead.
    return redis.Redis.from_url(
        url,
        socket_timeout=1.0,
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )


def listener_redis(url: str) -> redis.Redis:
    # A subscribed connection waits for messages indefinitely; the health
    # check pings it so a silently dead connection is noticed and replaced.
    return redis.Redis.from_url(
        url, socket_timeout=5.0, socket_connect_timeout=0.5, socket_keepalive=True, health_check_interval=10
    )


class MCPClientManager:
    def __init__(self, settings: Settings, config: MCPQConfig) -> None:
        self.settings = settings
        self.config = config
        self.keys = Keys(settings.key_prefix)
        self.redis = state_redis(settings.redis_url)
        self.registry = MCPServerRegistry(config, self.redis, self.keys)
        # Writes to Redis triggered on the event loop run here, off the loop.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcpq-state")
        remembered = {
            name: ProtocolChoice(doc.get("mode", "auto"), doc.get("discover"))
            for name, doc in self.registry.load_protocols().items()
            if config.mcp_servers[name].protocol == "auto"
        }
        self.pool = ConnectionPool(
            config.mcp_servers,
            on_connected=self._on_connected,
            on_tools_changed=self._on_tools_changed,
            protocol_memory=remembered,
        )
        self.discovery = Discovery(self.registry, self.pool)
        self.registry.on_reconnect = self._reconnect_local
        self.guard = ServerGuard(self.redis, self.keys)
        self.claims = ClaimKeeper(self.redis, self.keys, lease=settings.claim_lease, ttl=settings.claim_ttl)
        self.cancels = CancelListener(lambda: listener_redis(settings.redis_url), self.keys)
        self.progress = ProgressPublisher(self.redis, self.keys, self._io)
        self.router = ToolRouter(
            config, self.registry, self.pool, self.discovery, self.guard, self.claims,
            cancels=self.cancels, progress=self.progress,
        )  # fmt: skip
        self.ledger = Ledger(self.redis, self.keys, settings.ledger_grace)
        self.sweeper: LedgerSweeper | None = None
        self.registry.publish_servers()

    # -- hooks from the loop ---------------------------------------------------
    def _on_connected(self, server: str, handshake: ServerHandshake, choice: ProtocolChoice) -> None:
        info = {
            "protocol_version": handshake.protocol_version,
            "server_info": handshake.server_info,
            "capabilities": handshake.capabilities,
            "instructions": handshake.instructions,
            "connected_at": time.time(),
        }
        self._io.submit(self.registry.publish_info, server, info)
        self._io.submit(
            self.registry.save_protocol, server, {"mode": choice.mode, "discover": choice.discover}
        )

    def _on_tools_changed(self, server: str) -> None:
        log.info("server %r announced a changed tool list; refreshing", server)
        self.discovery.refresh_soon(server)

    # -- operations --------------------------------------------------------------
    def call_tool(
        self,
        tool: str,
        arguments: dict[str, Any] | None = None,
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
        """One call (:meth:`ToolRouter.call`); ``call_id`` is the id it is cancelled by,
        ``progress`` relays its progress notifications."""
        return self.router.call(
            tool,
            arguments,
            server=server,
            timeout=timeout,
            request_id=request_id,
            claim_key=claim_key,
            attempt=attempt,
            ledger_id=ledger_id,
            call_id=call_id,
            progress=progress,
        )

    def discover(self, server: str | None = None) -> dict[str, Any]:
        names = [server] if server else self.registry.enabled_names()
        for name in names:
            self.registry.get_enabled(name)
        deadline = (
            time.monotonic() + max((self.registry.get(n).connect_timeout for n in names), default=10) + 30
        )
        failures = self.discovery.ensure(names, deadline, force=True)
        out: dict[str, Any] = {}
        for name in names:
            if name in failures:
                out[name] = {
                    "ok": False,
                    "error": failures[name].message,
                    "error_code": failures[name].code.value,
                }
            else:
                toolset = self.registry.toolset(name)
                out[name] = {"ok": True, "tools": sorted(toolset.tools) if toolset else []}
        return out

    def list_servers(self) -> list[dict[str, Any]]:
        sessions = self.pool.open_sessions()
        out = []
        for name, config in self.config.mcp_servers.items():
            toolset = self.registry.toolset(name)
            out.append(
                {
                    **config.summary(),
                    "tools": len(toolset.tools) if toolset else None,
                    "open_sessions": sessions.get(name, 0),
                }
            )
        return out

    def list_tools(self, server: str | None = None) -> list[dict[str, Any]]:
        names = [server] if server else self.registry.enabled_names()
        out = []
        for name in names:
            toolset = self.registry.toolset(name)
            for tool in toolset.tools.values() if toolset else []:
                out.append({"server": name, **tool})
        return out

    def health(self, server: str | None = None) -> dict[str, Any]:
        names = [server] if server else self.registry.enabled_names()
        return {name: self._ping(name) for name in names}

    def _ping(self, server: str) -> dict[str, Any]:
        config = self.registry.get_enabled(server)
        started = time.monotonic()
        deadline = started + config.connect_timeout + config.timeout

        async def op(client: Client) -> dict[str, Any]:
            version = client.protocol_version
            # The cheapest real round trip each era has: 2026-07-28 removed ping.
            if version in MODERN_PROTOCOL_VERSIONS:
                await client.session.send_discover(version)
            else:
                await client.send_ping()
            return {"protocol_version": version}

        try:
            answer = self.pool.run(
                self.pool.with_session(server, deadline, op, idempotent=True), timeout=deadline - started + 5
            )
        except OutcomeError as exc:
            return {
                "healthy": False,
                "error": exc.outcome.error.message,
                "error_code": exc.outcome.error.code.value,
            }
        except MCPError as exc:
            return {"healthy": False, "error": exc.message, "error_code": exc.code.value}
        return {"healthy": True, "latency_ms": round((time.monotonic() - started) * 1000, 3), **answer}

    def breakers(self) -> dict[str, dict[str, Any]]:
        return breaker_status(self.redis, self.keys, list(self.config.mcp_servers))

    def reset_breaker(self, server: str) -> bool:
        self.registry.get(server)
        return reset_breaker(self.redis, self.keys, server)

    def reconnect(self, server: str) -> dict[str, Any]:
        """Ask every worker process in the fleet to reopen its sessions to ``server``."""
        epoch = self.registry.bump_epoch(server)
        self._reconnect_local(server)
        return {"server": server, "epoch": epoch, "pid": os.getpid()}

    def _reconnect_local(self, server: str) -> None:
        log.info("reconnecting to %r (fleet-wide reconnect)", server)
        self.pool.run(self.pool.reconnect(server), timeout=30)
        self.pool.loop_call(self.discovery.refresh_soon, server)

    def start_sweeper(self, publish: Any) -> None:
        """Start republishing calls the broker lost (once per process)."""
        if self.sweeper is None:
            self.sweeper = LedgerSweeper(self.ledger, publish, self.settings.restore_interval)
            self.sweeper.start()

    def close(self) -> None:
        if self.sweeper is not None:
            self.sweeper.stop()
        self.claims.stop()
        self.cancels.stop()
        self.pool.close()
        self._io.shutdown(wait=True, cancel_futures=False)
        self.redis.close()


_lock = threading.Lock()
_manager: MCPClientManager | None = None


def get_manager() -> MCPClientManager:
    """This process's manager, built from MCPQ_* settings and the YAML config."""
    global _manager
    manager = _manager
    if manager is not None and manager.pool.pid == os.getpid():
        return manager
    with _lock:
        if _manager is None or _manager.pool.pid != os.getpid():
            settings = Settings.from_env()
            _manager = MCPClientManager(settings, load_config(settings.config_path))
        return _manager


def shutdown_manager() -> None:
    """Close this process's sessions (terminating stdio servers)."""
    global _manager
    with _lock:
        manager, _manager = _manager, None
    if manager is not None and manager.pool.pid == os.getpid():
        manager.close()
