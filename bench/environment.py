"""The environment the benchmarks give mcpq: the repository, the MCPQ_* variables of one
run, the environment of the processes they start, servers.yaml, and the run's description.

Nothing from mcpq is imported at module level, here or in any benchmark: importing any
module of ``mcpq.producer`` or ``mcpq.worker`` imports ``mcpq.worker.celery``, which
builds its app from the MCPQ_* environment at import time, and that app must see this
run's Redis. ``load_mcpq`` sets the environment first and imports afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery
    from mcp.client.stdio import StdioServerParameters

    from mcpq.worker.contract.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
#: ``python <these>`` is the bundled demo server over stdio.
DEMO_SERVER_ARGS = ["-m", "mcpq.worker.demo_server", "stdio"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_env(redis_base: str, config_path: Path, tag: str, state_url: str | None = None) -> dict[str, str]:
    """The MCPQ_* variables of one run, for this process and the workers alike.

    ``redis_base``: a Redis URL without a db; broker, results and state get dbs 0, 1 and 2.
    ``config_path``: the servers.yaml the worker loads. ``tag``: makes the queue and the key
    prefix this run's own (a shared Redis may hold others). ``state_url``: the state Redis,
    when it is not db 2 of ``redis_base`` (bench.roundtrips watches a server of its own).
    """
    return {
        "MCPQ_BROKER_URL": f"{redis_base}/0",
        "MCPQ_RESULT_BACKEND": f"{redis_base}/1",
        "MCPQ_REDIS_URL": state_url or f"{redis_base}/2",
        "MCPQ_CONFIG": str(config_path),
        "MCPQ_QUEUE": f"mcpq-bench-{tag}",
        "MCPQ_KEY_PREFIX": f"mcpq-bench-{tag}:",
    }


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a process a benchmark starts: this one's (MCPQ_* included once
    ``load_mcpq`` set them), the repository on PYTHONPATH (``-A bench.app`` is not an
    installed package) and unbuffered output (log lines arrive when written), then ``extra``.
    """
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
        **(extra or {}),
    }


def load_mcpq(env: Mapping[str, str], prog: str) -> tuple[Celery, Settings]:
    """Set ``env`` (``bench_env``'s variables) in this process, then import mcpq's app.

    Returns the app and the settings read from the environment. ``prog`` names the
    benchmark in the error raised when the app was built before (something imported mcpq
    too early), in which case it would talk to another Redis than this run's.
    """
    os.environ.update(env)
    from mcpq.worker.celery import app
    from mcpq.worker.contract.settings import Settings

    settings = Settings.from_env()
    if app.conf.broker_url != settings.broker_url:
        raise RuntimeError(
            "mcpq.worker.celery.app was built before this run set MCPQ_BROKER_URL "
            f"({app.conf.broker_url!r} != {settings.broker_url!r}): run {prog} as a program"
        )
    return app, settings


def stdio_server(**options: Any) -> dict[str, Any]:
    """The servers.yaml entry of the demo server over stdio, plus ``options`` (retries, say)."""
    return {"transport": "stdio", "command": sys.executable, "args": list(DEMO_SERVER_ARGS), **options}


def write_config(path: Path, servers: Mapping[str, Mapping[str, Any]]) -> None:
    """Write servers.yaml at ``path``: ``servers`` maps each server's name to its entry."""
    import yaml

    path.write_text(yaml.safe_dump({"mcp_servers": {name: dict(entry) for name, entry in servers.items()}}))


def stdio_params() -> StdioServerParameters:
    """What ``mcp.Client`` takes to start the demo server over stdio, as the worker does."""
    from mcp.client.stdio import StdioServerParameters

    return StdioServerParameters(command=sys.executable, args=list(DEMO_SERVER_ARGS), cwd=str(REPO_ROOT))


def check_redis(url: str, prog: str) -> None:
    """Exit with a message naming ``prog`` unless the Redis at ``url`` answers a PING."""
    import redis

    try:
        with redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0) as client:
            client.ping()
    except redis.RedisError as exc:
        raise SystemExit(f"{prog}: cannot reach Redis at {url}: {exc}") from None


def drop_keys(url: str, pattern: str) -> None:
    """On a shared Redis, remove this run's keys: those matching ``pattern`` (its own key
    prefix or queue name), never anything else. Errors are ignored: this runs at teardown."""
    import redis

    with contextlib.suppress(redis.RedisError), redis.Redis.from_url(url, socket_timeout=2.0) as client:
        keys = list(client.scan_iter(match=pattern, count=500))
        if keys:
            client.delete(*keys)


def _source_fingerprint() -> str:
    digest = hashlib.sha256()
    for path in sorted([*REPO_ROOT.glob("worker/**/*.py"), *REPO_ROOT.glob("worker/**/*.lua"),
                        *REPO_ROOT.glob("producer/**/*.py")]):  # fmt: skip
        digest.update(path.relative_to(REPO_ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def git_state() -> str:
    """The commit and a fingerprint of worker/ and producer/, which others may be editing."""
    fingerprint = f"source sha256 {_source_fingerprint()}"
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "worker", "producer"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"not a git checkout, {fingerprint}"
    return f"{head}{' + uncommitted changes' if dirty else ''}, {fingerprint}"


def machine_info() -> dict[str, Any]:
    """The report's ``machine`` section at the start of a run (``loadavg_end`` is added at its end)."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
    }
