"""Process helpers for mcpq's integration tests.

Everything that waits does so with a deadline and a short poll interval, never a
fixed sleep standing in for synchronisation. Servers run in their own process
group (``start_new_session=True``) so ``stop()`` can take down the whole tree,
and their stdout/stderr go to a log file whose tail is quoted when they fail to
come up.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVERS_DIR = REPO_ROOT / "tests" / "servers"
TEST_SERVER = SERVERS_DIR / "test_server.py"
HANG_SERVER = SERVERS_DIR / "hang_server.py"
NPM_DIR = REPO_ROOT / "tests" / "npm"
EVERYTHING_JS = NPM_DIR / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
EVERYTHING_MISSING = (
    f"@modelcontextprotocol/server-everything is not installed ({EVERYTHING_JS} is missing): "
    "run `npm ci --prefix tests/npm`"
)

HOST = "127.0.0.1"
DEFAULT_READY_TIMEOUT = 30.0
DEFAULT_STOP_GRACE = 5.0
POLL_INTERVAL = 0.02

T = TypeVar("T")


# --- waiting -----------------------------------------------------------------


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = POLL_INTERVAL,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Raises AssertionError with ``message`` (a string, or a callable producing one
    lazily) if the deadline passes first. The predicate is always evaluated once
    more at the deadline, so a zero timeout means "check exactly once".
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            text = message() if callable(message) else message
            raise AssertionError(f"{text} (waited {timeout:.2f}s)")
        time.sleep(min(interval, remaining))


def port_is_open(port: int, host: str = HOST, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(
    port: int,
    timeout: float = DEFAULT_READY_TIMEOUT,
    host: str = HOST,
    proc: subprocess.Popen[bytes] | None = None,
    describe: Callable[[], str] | None = None,
) -> None:
    """Poll a TCP connect to ``host:port`` until it succeeds or ``timeout`` passes.

    With ``proc``, fail fast (AssertionError) if that process exits while waiting.
    """

    def ready() -> bool:
        if proc is not None and proc.poll() is not None:
            extra = f"\n{describe()}" if describe else ""
            raise AssertionError(
                f"process {proc.pid} exited with {proc.returncode} before {host}:{port} opened{extra}"
            )
        return port_is_open(port, host)

    def fail_message() -> str:
        extra = f"\n{describe()}" if describe else ""
        return f"nothing accepted connections on {host}:{port}{extra}"

    wait_until(ready, timeout, interval=0.05, message=fail_message)


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


# --- /proc inspection ----------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the ``comm`` field (state, ppid, pgrp, ...)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm is parenthesised and may itself contain spaces or parentheses.
    return raw[raw.rfind(")") + 2 :].split()


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def process_state(pid: int) -> str | None:
    """Single-letter state from /proc (``R``, ``S``, ``Z``, ...), or None if gone."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    state = process_state(pid)
    return state is not None and state not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children, grandchildren, ...), by scanning /proc ppids."""
    children: dict[int, list[int]] = {}
    for other in _all_pids():
        fields = _stat_fields(other)
        if fields is None or fields[0] in ("Z", "X"):
            continue
        children.setdefault(int(fields[1]), []).append(other)
    found: list[int] = []
    stack = list(children.get(pid, ()))
    while stack:
        child = stack.pop()
        if child in found:
            continue
        found.append(child)
        stack.extend(children.get(child, ()))
    return sorted(found)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    members = []
    for other in _all_pids():
        fields = _stat_fields(other)
        if fields is not None and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(other)
    return sorted(members)


def pids_with_cmdline_containing(text: str) -> list[int]:
    """Live processes (other than this one) whose NUL-joined command line contains ``text``.

    Arguments are joined with spaces before matching, so ``text`` may span several.
    Use a unique marker (a temp path, a random ``--name``) to spot orphans.
    """
    me = os.getpid()
    found = []
    for other in _all_pids():
        if other == me:
            continue
        try:
            raw = Path(f"/proc/{other}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if not raw:  # kernel threads and zombies have no command line
            continue
        if text in raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace") and pid_alive(other):
            found.append(other)
    return sorted(found)


# --- server processes ----------------------------------------------------------

# Strong references: a server nobody stopped is still killed when the interpreter exits.
_LIVE: set[ServerProcess] = set()


class ServerProcess:
    """A server subprocess listening on ``host:port``, in its own process group.

    ``start()`` launches it and waits (with a deadline) until the port accepts
    connections. ``stop()`` sends SIGTERM to the group, waits ``grace`` seconds
    for it to empty, then SIGKILLs whatever is left. ``restart()`` does both and
    comes back on the same port. Usable as a context manager.
    """

    def __init__(
        self,
        command: Sequence[str],
        port: int,
        *,
        path: str = "/mcp",
        env: Mapping[str, str] | None = None,
        host: str = HOST,
        cwd: str | os.PathLike[str] | None = None,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        name: str | None = None,
    ) -> None:
        self.command = [str(part) for part in command]
        self.port = port
        self.host = host
        self.path = path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.ready_timeout = ready_timeout
        self.name = name or Path(self.command[min(1, len(self.command) - 1)]).name
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopped = False
        self.starts = 0
        fd, log = tempfile.mkstemp(prefix=f"mcpq-{self.name}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log)

    # -- properties

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, max_bytes: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return "(no log)"
        tail = data[-max_bytes:].decode(errors="replace")
        return f"--- {self.name} log ({self.log_path}) ---\n{tail}"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<ServerProcess {self.name} {self.url} pid={self.proc.pid if self.proc else None} {state}>"

    # -- lifecycle

    def start(self) -> ServerProcess:
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        env = {**os.environ, **self.env} if self.env is not None else None
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start #{self.starts + 1}: {' '.join(self.command)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
            )
        self._stopped = False
        self.starts += 1
        _LIVE.add(self)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        wait_for_port(
            self.port,
            self.ready_timeout if timeout is None else timeout,
            host=self.host,
            proc=self.proc,
            describe=self.log_tail,
        )

    def stop(self, grace: float = DEFAULT_STOP_GRACE) -> int | None:
        """Stop the whole process group; returns the leader's exit code (None if never started)."""
        proc = self.proc
        if proc is None:
            return None
        if self._stopped:
            # Signalling again could hit an unrelated group that reused the id.
            return proc.returncode
        pgid = proc.pid  # start_new_session: the leader's pid is the group id
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(deadline - time.monotonic(), 0))
        # The leader may be gone while children it spawned are still shutting down.
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        if proc.poll() is None or group_members(pgid):
            _signal_group(pgid, signal.SIGKILL)
        code = proc.wait(timeout=10)
        wait_until(
            lambda: not group_members(pgid),
            timeout=10,
            message=lambda: f"process group {pgid} of {self.name} survived SIGKILL: {group_members(pgid)}",
        )
        self._stopped = True
        _LIVE.discard(self)
        return code

    def kill(self) -> None:
        """SIGKILL the group right away (a crash, as far as clients can tell)."""
        self.stop(grace=0)

    def restart(self, grace: float = DEFAULT_STOP_GRACE) -> ServerProcess:
        self.stop(grace=grace)
        # The port was ours a moment ago; wait until the old listener has really gone.
        wait_until(
            lambda: not port_is_open(self.port, self.host),
            timeout=10,
            message=f"port {self.port} still accepting connections after stopping {self.name}",
        )
        return self.start()

    def close(self) -> None:
        """Stop and delete the log file."""
        self.stop()
        with contextlib.suppress(FileNotFoundError):
            self.log_path.unlink()

    def __enter__(self) -> ServerProcess:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.stop()  # keep the log for the post-mortem


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop(grace=1.0)


# --- factories -------------------------------------------------------------------


def _merged_env(env: Mapping[str, str] | None) -> dict[str, str]:
    return {"PYTHONUNBUFFERED": "1", **(env or {})}


def start_test_server(
    transport: Literal["http", "sse"],
    port: int | None = None,
    extra_args: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    ready_timeout: float = DEFAULT_READY_TIMEOUT,
) -> ServerProcess:
    """Start tests/servers/test_server.py over HTTP; ``env`` is merged over os.environ.

    The URL is ``http://127.0.0.1:PORT/mcp`` for ``http`` and ``.../sse`` for ``sse``.
    """
    if transport not in ("http", "sse"):
        raise ValueError(f"transport must be 'http' or 'sse', not {transport!r}")
    port = free_port() if port is None else port
    command = [sys.executable, str(TEST_SERVER), transport, "--host", HOST, "--port", str(port), *extra_args]
    server = ServerProcess(
        command,
        port,
        path="/mcp" if transport == "http" else "/sse",
        env=_merged_env(env),
        ready_timeout=ready_timeout,
        name=f"test_server-{transport}",
    )
    return server.start()


def everything_installed() -> bool:
    return EVERYTHING_JS.is_file() and shutil.which("node") is not None


def require_everything() -> None:
    """Raise AssertionError (never skip) when server-everything or node is missing."""
    if shutil.which("node") is None:
        raise AssertionError("node is not on PATH; install Node.js 20+ and run `npm ci --prefix tests/npm`")
    if not EVERYTHING_JS.is_file():
        raise AssertionError(EVERYTHING_MISSING)


def everything_stdio_command() -> tuple[str, list[str]]:
    """(command, args) for server-everything over stdio."""
    require_everything()
    node = shutil.which("node")
    assert node is not None
    return node, [str(EVERYTHING_JS), "stdio"]


def start_everything_server(
    port: int | None = None, ready_timeout: float = DEFAULT_READY_TIMEOUT
) -> ServerProcess:
    """Start server-everything with Streamable HTTP at ``http://127.0.0.1:PORT/mcp``."""
    node, _ = everything_stdio_command()
    port = free_port() if port is None else port
    server = ServerProcess(
        [node, str(EVERYTHING_JS), "streamableHttp"],
        port,
        path="/mcp",
        env={"PORT": str(port)},
        ready_timeout=ready_timeout,
        name="server-everything",
    )
    return server.start()


def start_hang_server(port: int | None = None) -> ServerProcess:
    """Start a TCP listener that accepts connections and never answers (url ends in /mcp)."""
    port = free_port() if port is None else port
    command = [sys.executable, str(HANG_SERVER), "tcp", "--host", HOST, "--port", str(port)]
    return ServerProcess(command, port, path="/mcp", env=_merged_env(None), name="hang_server").start()


def stdio_command_for_test_server(*extra_args: str) -> tuple[str, list[str]]:
    """(command, args) to launch tests/servers/test_server.py over stdio.

    Note that ``StdioServerParameters.env`` is merged over the SDK's *minimal*
    default environment, not os.environ: pass ``MCPQ_TEST_COUNT_DIR`` etc. explicitly.
    """
    return sys.executable, [str(TEST_SERVER), "stdio", *extra_args]


def stdio_command_for_hang_server() -> tuple[str, list[str]]:
    """(command, args) for a stdio "server" that reads forever and never answers."""
    return sys.executable, [str(HANG_SERVER), "stdio"]


# --- test_server bookkeeping files -------------------------------------------------


def read_count(count_dir: str | os.PathLike[str], key: str) -> int:
    """How many times ``count(key)`` ran, across all test_server processes sharing ``count_dir``."""
    try:
        with open(Path(count_dir) / key, "rb") as fh:
            return sum(1 for _ in fh)
    except FileNotFoundError:
        return 0


def read_events(count_dir: str | os.PathLike[str], key: str) -> list[str]:
    """What ``wait_for_cancel(key, ms)`` calls recorded, in order: "started",
    "cancelled", "finished" (one word per event, the server's pid left out)."""
    try:
        lines = (Path(count_dir) / f"{key}.events").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [line.split()[0] for line in lines if line.strip()]


def read_concurrency(count_dir: str | os.PathLike[str], key: str) -> tuple[int, int]:
    """(in flight now, peak in flight) for ``concurrency(key, ms)`` calls sharing ``count_dir``."""
    try:
        raw = (Path(count_dir) / f"{key}.conc").read_text().split()
    except FileNotFoundError:
        return 0, 0
    current = int(raw[0]) if raw else 0
    peak = int(raw[1]) if len(raw) > 1 else 0
    return current, peak


def local_tcp_ports(pid: int) -> set[int]:
    """Local ports of the TCP sockets process ``pid`` holds (from /proc)."""
    inodes: set[str] = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return set()
    ports: set[int] = set()
    for table in (f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
