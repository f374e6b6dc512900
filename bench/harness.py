"""The processes a benchmark starts, and how every one of them stops: on exit, on error,
on Ctrl-C and on SIGTERM.

- ``stop_on_signals`` turns SIGINT and SIGTERM into ``KeyboardInterrupt`` (so the
  benchmark's ``ExitStack`` unwinds) and ``interrupted`` says whether that happened (the
  teardown is shorter then);
- ``WorkerProcess``: one Celery worker (``-A bench.app`` by default) in a session of its
  own, with its log in a file; ``wait_for_worker`` waits until it answers a ping;
- ``DemoServerProcess``: the bundled demo server over Streamable HTTP or SSE;
- ``start_redis``: a private redis-server (``EmbeddedRedis``) in a process group of its own;
- ``DirectClient``: an ``mcp.Client`` kept open on a private event loop (no queue);
- ``no_backend_retries``: the Celery result backend gives up at once at teardown.

Every child runs in a session or process group of its own: Ctrl-C in the terminal reaches
this process only, and the benchmark stops its children itself, in order (workers before
Redis), rather than all of them at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import psutil

from bench.environment import REPO_ROOT, free_port, stdio_params

if TYPE_CHECKING:
    from mcpq.producer.embedded_redis import EmbeddedRedis

T = TypeVar("T")

DEMO_SERVER_MODULE = "mcpq.worker.demo_server"

# -- interrupts -------------------------------------------------------------------------

_interrupted = False


def interrupted() -> bool:
    """Whether a SIGINT or SIGTERM arrived under ``stop_on_signals`` (in this process, ever)."""
    return _interrupted


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise ``KeyboardInterrupt`` (SIGTERM would
    otherwise end the process without running any cleanup); the previous handlers are
    restored on the way out."""
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def no_backend_retries(app: Any, always: bool = False) -> None:
    """Make the result backend of ``app`` (a Celery app) give up at once; an ``ExitStack``
    callback, registered after Redis is started so that it runs before Redis is stopped.

    A result still pending unsubscribes when it is garbage collected, which is after Redis
    is stopped: Celery would retry that for 20 s to over a minute, then complain, and
    nobody waits for it any more. ``always``: do it at every teardown (a result left
    pending by an error), not only after Ctrl-C or SIGTERM.
    """
    if always or _interrupted:
        with contextlib.suppress(Exception):
            backend = app.backend
            backend._transport_options["retry_policy"] = {"max_retries": 0}
            backend.remove_pending_result = lambda result: result


# -- looking at processes ------------------------------------------------------------


def cmdline(proc: psutil.Process) -> list[str]:
    """The command line of ``proc``, empty when it is gone or not ours to read."""
    try:
        return list(proc.cmdline())
    except psutil.Error:
        return []


def is_demo_server(proc: psutil.Process) -> bool:
    """Whether ``proc`` runs the bundled demo server (directly or through mcpq's launcher)."""
    return DEMO_SERVER_MODULE in " ".join(cmdline(proc))


def terminate(procs: Iterable[psutil.Process], grace: float = 5.0) -> None:
    """SIGTERM each of ``procs`` still running, then SIGKILL those alive after ``grace`` s."""
    alive = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.is_running():
                proc.terminate()
                alive.append(proc)
    _, left = psutil.wait_procs(alive, timeout=grace)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()


# -- child processes -------------------------------------------------------------------


class ChildProcess:
    """``argv`` in a session of its own, cwd the repository, output to a log file that is
    removed when it stops. Subclasses set ``argv`` and what "started" means."""

    #: Seconds ``stop`` waits after SIGTERM before SIGKILL; ``interrupted_grace`` after a
    #: Ctrl-C or SIGTERM of this process (a Ctrl-C is meant to end things quickly).
    grace = 10.0
    interrupted_grace = 5.0

    def __init__(self, argv: list[str], env: dict[str, str], label: str) -> None:
        """``argv``: the command; ``env``: its whole environment (see ``child_env``);
        ``label``: what it is, in messages and in its log file's name."""
        self.argv = argv
        self.label = label
        self.env = env
        fd, name = tempfile.mkstemp(prefix=f"mcpq-bench-{label.replace(' ', '-')}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        """Start the process (and return at once)."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches us only; we stop it ourselves
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        """The last ``n`` bytes of its output, for error messages."""
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM (a graceful shutdown), then SIGKILL to its whole session (whatever it
        started that is still there) after ``grace`` seconds (default: the class's, see
        above); then remove the log. Safe to call twice."""
        if grace is None:
            grace = self.interrupted_grace if _interrupted else self.grace
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    print(
                        f"{self.label} {proc.pid} ignored SIGTERM for {grace:g}s; killing it", file=sys.stderr
                    )
            # Anything left in its session (a server it started, say) goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        with contextlib.suppress(OSError):
            self.log_path.unlink()


class WorkerProcess(ChildProcess):
    """One Celery worker on ``bench.app`` (threads pool by default), its own session and log file."""

    grace = 20.0  # a warm shutdown closes its stdio servers first

    def __init__(
        self,
        env: dict[str, str],
        queue: str,
        concurrency: int,
        pool: str = "threads",
        app: str = "bench.app",
        node: str = "",
        extra_args: Iterable[str] = (),
    ) -> None:
        """``env``: its environment (``child_env``); ``queue``: the one queue it consumes;
        ``concurrency``, ``pool``: its ``-c`` and ``-P``; ``app``: its ``-A`` (mcpq's own app
        plus the bench tasks by default); ``node``: its node name before the ``@host``
        (default the queue's name; give each worker of a queue its own); ``extra_args``:
        more worker options (``--include bench.soak``, say)."""
        self.name = f"{node or queue}@{platform.node() or 'localhost'}"
        self.pool = pool
        self.concurrency = concurrency
        # Celery reads "-P prefork" as "the app's pool" (threads, for mcpq's app).
        celery_pool = "processes" if pool == "prefork" else pool
        argv = [
            sys.executable, "-m", "celery", "-A", app, "worker",
            "-P", celery_pool, "-c", str(concurrency), "-Q", queue, "-n", self.name,
            "--without-gossip", "--without-mingle", "--loglevel", "warning", *extra_args,
        ]  # fmt: skip
        super().__init__(argv, env, "worker")


def wait_for_worker(app: Any, worker: WorkerProcess, timeout: float = 90.0) -> None:
    """Return once ``worker`` answers a ping through ``app`` (a Celery app on its broker);
    raise with the end of its log when it exits or stays silent for ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not worker.alive():
            raise RuntimeError(f"the worker exited at start:\n{worker.log_tail()}")
        # By name: on a shared Redis other mcpq workers would answer a broadcast ping.
        if app.control.ping(destination=[worker.name], timeout=0.5):
            return
    raise RuntimeError(f"the worker did not answer a ping within {timeout:g}s:\n{worker.log_tail()}")


class DemoServerProcess(ChildProcess):
    """``python -m mcpq.worker.demo_server http|sse --host 127.0.0.1 --port P``."""

    grace = 5.0

    def __init__(self, env: dict[str, str], transport: str = "http", port: int | None = None) -> None:
        """``env``: its environment (``child_env``); ``transport``: ``http`` (Streamable
        HTTP at /mcp) or ``sse`` (legacy SSE at /sse); ``port``: default a free one."""
        self.transport = transport
        self.port = port if port is not None else free_port()
        argv = [sys.executable, "-m", DEMO_SERVER_MODULE, transport, "--host", "127.0.0.1"]
        argv += ["--port", str(self.port)]
        super().__init__(argv, env, f"{transport} demo server")

    @property
    def url(self) -> str:
        """Where ``mcp.Client`` and servers.yaml reach it."""
        return f"http://127.0.0.1:{self.port}/{'sse' if self.transport == 'sse' else 'mcp'}"

    def start(self, timeout: float = 30.0) -> Self:
        """Start it and return once it accepts connections; raise if it exits or does not
        listen within ``timeout`` s."""
        super().start()
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {self.label} exited at start:\n{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5):
                return self
            time.sleep(0.05)
        raise RuntimeError(
            f"the {self.label} did not listen on {self.port} within {timeout:g}s:\n{self.log_tail()}"
        )


def start_redis(stack: contextlib.ExitStack, port: int) -> EmbeddedRedis:
    """A private redis-server on ``port``, stopped when ``stack`` unwinds. Call it after
    ``load_mcpq`` (it imports mcpq) and before starting anything that uses it, so the
    stack stops those first."""
    from mcpq.producer.embedded_redis import EmbeddedRedis

    redis_proc = stack.enter_context(EmbeddedRedis(port=port))
    if redis_proc.process is not None:
        # Its own process group: Ctrl-C in the terminal reaches this process only, and
        # the stack stops workers, then Redis, in order.
        with contextlib.suppress(OSError):
            os.setpgid(redis_proc.process.pid, redis_proc.process.pid)
    return redis_proc


# -- a direct client -----------------------------------------------------------------------


class DirectClient:
    """An ``mcp.Client`` kept open on a private event loop, with no queue in between.

    One owner task enters the Client and stays parked until ``close`` (anyio wants the
    entering task to exit it); a benchmark's calls run as other tasks on the same loop
    (``run``), so they can be timed inside the loop. Subclasses add those calls.
    """

    def __init__(self, target: Any = None) -> None:
        """``target``: what ``mcp.Client`` connects to (default the demo server over stdio,
        started as this process's child)."""
        self.target = target
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-direct", daemon=True)
        self.client: Any = None
        self.protocol_version: str | None = None
        self._closing: asyncio.Event | None = None
        self._owner: concurrent.futures.Future[None] | None = None
        #: The stdio servers this client started (none over HTTP).
        self.server_pids: list[int] = []

    def start(self, timeout: float = 60.0) -> Self:
        """Connect (raise if that takes over ``timeout`` s) and note the server it started."""
        before = {p.pid for p in psutil.Process().children()}
        self.thread.start()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._owner = asyncio.run_coroutine_threadsafe(self._own(ready), self.loop)
        try:
            ready.result(timeout)
        except concurrent.futures.TimeoutError:
            raise RuntimeError(f"direct client did not connect within {timeout:g}s") from None
        # The SDK starts the server as our direct child; only this client's, not the
        # workers' (theirs are their children) nor another client's or the HTTP server.
        self.server_pids = [
            p.pid for p in psutil.Process().children() if p.pid not in before and is_demo_server(p)
        ]
        return self

    async def _own(self, ready: concurrent.futures.Future[None]) -> None:
        from mcp import Client

        self._closing = asyncio.Event()
        try:
            async with Client(self.target if self.target is not None else stdio_params()) as client:
                self.client = client
                self.protocol_version = client.protocol_version
                ready.set_result(None)
                await self._closing.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            raise
        finally:
            self.client = None

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the client's loop and return its result (``timeout`` s at most)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Close the client (which ends its stdio server), stop the loop; safe to call twice."""
        if self.thread.is_alive():
            closing = self._closing
            if closing is not None:
                self.loop.call_soon_threadsafe(closing.set)
            if self._owner is not None:
                with contextlib.suppress(Exception):
                    self._owner.result(15)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        for pid in self.server_pids:  # only if the SDK's own close did not end it
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                proc.terminate()
                proc.wait(5)
