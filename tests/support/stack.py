"""A real mcpq stack for integration tests: a private redis-server and real
Celery worker processes started the way users start them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis
import yaml

from mcpq.producer.queue import ToolQueue
from mcpq.worker.contract.settings import Settings
from tests.support.procs import REPO_ROOT, descendants, pid_alive, stdio_command_for_test_server, wait_until

WORKER_READY_TIMEOUT = 60.0

#: Budgets as small as they go, so the ledger's grace (2 x visibility + hard
#: limit + restore interval = 17.5 s) passes within a test.
TINY_BUDGETS = {
    "MCPQ_SOFT_TIME_LIMIT": "4",
    "MCPQ_TIME_LIMIT": "5",
    "MCPQ_VISIBILITY_TIMEOUT": "6",
    "MCPQ_RESTORE_INTERVAL": "0.5",
}


class Stack:
    """One isolated mcpq deployment: its own queue, key prefix and config."""

    def __init__(
        self,
        redis_url: str,
        workdir: Path,
        servers: Mapping[str, Mapping[str, Any]],
        state_url: str | None = None,
        broker_url: str | None = None,
        env: Mapping[str, str] | None = None,
        **top: Any,
    ) -> None:
        self.redis_url = redis_url
        self.workdir = workdir
        self.tag = uuid.uuid4().hex[:8]
        self.config_path = workdir / f"servers-{self.tag}.yaml"
        self.config_path.write_text(
            yaml.safe_dump({"mcp_servers": {k: dict(v) for k, v in servers.items()}, **top})
        )
        self.env = {
            **os.environ,
            "MCPQ_BROKER_URL": broker_url or f"{redis_url}/0",
            "MCPQ_RESULT_BACKEND": f"{redis_url}/1",
            "MCPQ_REDIS_URL": f"{state_url or redis_url}/2",
            "MCPQ_CONFIG": str(self.config_path),
            "MCPQ_QUEUE": f"mcpq-test-{self.tag}",
            "MCPQ_KEY_PREFIX": f"mcpq-test-{self.tag}:",
            "PYTHONPATH": str(REPO_ROOT),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.settings = Settings.from_env(self.env)
        self.queue = ToolQueue(self.settings)
        self.workers: list[WorkerProcess] = []

    def state(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.redis_url, decode_responses=True)

    def start_worker(
        self, *, concurrency: int = 8, pool: str = "threads", queue: str | None = None, **env: str
    ) -> WorkerProcess:
        """Start a worker; with ``queue`` it also consumes that queue, so calls
        sent there (``ToolQueue.call(..., queue=...)``) run on this worker."""
        worker = WorkerProcess(self, concurrency=concurrency, pool=pool, extra_env=env, queue=queue)
        self.workers.append(worker)
        worker.start()
        return worker

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.queue.close()


class WorkerProcess:
    """``python -m celery -A mcpq.worker worker`` as a child process with its own name."""

    def __init__(
        self, stack: Stack, *, concurrency: int, pool: str, extra_env: Mapping[str, str], queue: str | None
    ) -> None:
        self.stack = stack
        self.name = f"w{uuid.uuid4().hex[:6]}@{stack.tag}"
        self.concurrency = concurrency
        self.pool = pool
        self.env = {**stack.env, **extra_env}
        self.queues = stack.settings.queue + (f",{queue}" if queue else "")
        fd, log = tempfile.mkstemp(prefix="mcpq-worker-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, n: int = 6000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def start(self) -> None:
        argv = [
            sys.executable, "-m", "celery", "-A", "mcpq.worker", "worker", "-P", self.pool,
            "-c", str(self.concurrency), "-Q", self.queues, "-n", self.name,
            "--loglevel", "info", "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                env=self.env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        control = self.stack.queue.app.control

        def answered() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            return bool(control.ping(destination=[self.name], timeout=0.3))

        wait_until(
            answered,
            WORKER_READY_TIMEOUT,
            interval=0.05,
            message=lambda: f"worker not up:\n{self.log_tail()}",
        )

    def children(self) -> list[int]:
        return descendants(self.pid) if self.proc and self.proc.poll() is None else []

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM), as a process manager would do it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"worker did not stop within {timeout}s:\n{self.log_tail()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def all_gone(pids: list[int]) -> bool:
    return not any(pid_alive(p) for p in pids)


def stdio_server(count_dir: Path, *extra_args: str, **fields: Any) -> dict[str, Any]:
    """Config for tests/servers/test_server.py over stdio, counting into ``count_dir``."""
    command, args = stdio_command_for_test_server(*extra_args)
    return {
        "transport": "stdio",
        "command": command,
        "args": args,
        "env": {"MCPQ_TEST_COUNT_DIR": str(count_dir)},
        **fields,
    }
