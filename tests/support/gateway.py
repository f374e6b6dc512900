"""A real ``mcpq gateway`` process for integration tests, and an SDK client for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from tests.support.procs import REPO_ROOT, free_port, wait_until
from tests.support.stack import Stack

TOKEN = "gateway-test-token"
READY_TIMEOUT = 60.0
MCPQ = str(Path(sys.executable).with_name("mcpq"))


class GatewayProcess:
    """``mcpq gateway`` on a free port with ``stack``'s environment; ready once
    ``/healthz`` lists at least ``min_tools`` tools (the workers published them)."""

    def __init__(
        self,
        stack: Stack,
        *args: str,
        token: str | None = TOKEN,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.stack = stack
        self.args = args
        self.token = token
        self.port = port or free_port()
        self.env = {**stack.env, **(env or {})}
        self.env.pop("MCPQ_GATEWAY_TOKEN", None)
        if token:
            self.env["MCPQ_GATEWAY_TOKEN"] = token
        self.log_path = stack.workdir / f"gateway-{stack.tag}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def health(self) -> dict[str, Any] | None:
        try:
            reply = httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2)
        except httpx.HTTPError:
            return None
        doc: dict[str, Any] = reply.json()
        return doc if reply.status_code == 200 else None

    def health_status(self) -> int | None:
        """``/healthz``'s HTTP status (None: nothing answers yet)."""
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code
        except httpx.HTTPError:
            return None

    def start(self, min_tools: int = 1, healthy: bool = True) -> GatewayProcess:
        """Start it; wait until ``/healthz`` lists ``min_tools`` tools (``healthy=False``:
        only until it answers at all, for a gateway whose Redis is meant to be down)."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [MCPQ, "gateway", "--port", str(self.port), *self.args],
                env=self.env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"gateway exited:\n{self.log_tail()}"
            if not healthy:
                return self.health_status() is not None
            doc = self.health()
            return doc is not None and doc["tools"] >= min_tools

        try:
            wait_until(ready, timeout=READY_TIMEOUT, message=lambda: f"gateway not ready:\n{self.log_tail()}")
        except BaseException:
            self.kill()  # a gateway that never became ready must not outlive the test
            raise
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@asynccontextmanager
async def http_client(gateway: GatewayProcess, mode: str = "legacy", **kwargs: Any) -> AsyncIterator[Client]:
    """The SDK's ``Client`` connected to ``gateway`` over Streamable HTTP in ``mode``."""
    async with (
        create_mcp_http_client(headers=gateway.headers or None) as http,
        Client(streamable_http_client(gateway.url, http_client=http), mode=mode, **kwargs) as client,  # type: ignore[arg-type]
    ):
        yield client
