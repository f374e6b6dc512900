"""A worker that serves ``/metrics`` says where, in Redis, so ``mcpq top`` finds it.

The entry is ``http://<host>:<port>/metrics`` -> the Redis time it was last
announced (``Keys.metrics_endpoints``), refreshed every :data:`REFRESH`
seconds by a daemon thread of the process that serves the endpoint, and
removed at a clean shutdown. A worker that was killed leaves its entry
behind: readers skip entries older than 60 s, and every announcer drops
entries older than :data:`PRUNE_AFTER`. Redis being down costs a log line,
never the worker. ``<host>`` is ``MCPQ_METRICS_HOST`` when set, else the
host's FQDN (resolved on the thread: a slow DNS never delays the start).
"""

from __future__ import annotations

import logging
import os
import socket
import threading

import redis

from mcpq.worker.contract.keys import Keys

log = logging.getLogger(__name__)

#: Seconds between announcements.
REFRESH = 10.0
#: Entries this old (seconds) are removed by any announcer: workers that died uncleanly.
PRUNE_AFTER = 3600.0


def endpoint_url(host: str, port: int) -> str:
    """The URL a worker announces: ``host`` or, when empty, this host's FQDN."""
    host = host or socket.getfqdn()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    return f"http://{host}:{port}/metrics"


def _now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


class Announcer:
    """Keeps one worker's metrics URL fresh in Redis until :meth:`stop`."""

    def __init__(
        self, client: redis.Redis, keys: Keys, host: str, port: int, interval: float = REFRESH
    ) -> None:
        self.client = client
        self.key = keys.metrics_endpoints
        self.host = host
        self.port = port
        self.interval = interval
        self.url: str | None = None
        self.pid = os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def announce(self) -> None:
        """Record this endpoint as seen now, and drop long-dead ones."""
        if self.url is None:
            self.url = endpoint_url(self.host, self.port)
        now = _now(self.client)
        seen = self.client.hgetall(self.key)
        dead = [f for f, v in seen.items() if _age(now, v) > PRUNE_AFTER and f != self.url.encode()]
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.key, self.url, f"{now:.3f}")
        if dead:
            pipe.hdel(self.key, *dead)
        pipe.execute()

    def _run(self) -> None:
        while True:
            try:
                self.announce()
            except Exception as exc:  # Redis down, DNS broken: the metrics still serve
                if not self._failing:
                    log.warning("metrics: cannot announce the endpoint in Redis (%s); retrying", exc)
                self._failing = True
            else:
                if self._failing:
                    log.info("metrics: announcing %s in Redis again", self.url)
                self._failing = False
            if self._stop.wait(self.interval):
                return

    def start(self) -> Announcer:
        self._thread = threading.Thread(target=self._run, name="mcpq-metrics-announce", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """At a clean shutdown, in the process that started it: the entry goes."""
        if os.getpid() != self.pid:
            return  # a prefork child's copy: the parent announces
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        if self.url is not None:
            try:
                self.client.hdel(self.key, self.url)
            except Exception as exc:
                log.info("metrics: could not remove %s from Redis (%s)", self.url, exc)


def _age(now: float, value: bytes | str) -> float:
    try:
        return now - float(value)
    except ValueError:
        return float("inf")
