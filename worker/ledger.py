"""The sweeper that republishes calls the broker lost (the ledger itself is in
``mcpq.worker.contract.ledger``: the producer records, the worker sweeps)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import redis

from mcpq.worker.contract.ledger import Ledger

log = logging.getLogger(__name__)


class LedgerSweeper:
    """A daemon thread that republishes overdue calls every ``interval`` seconds."""

    def __init__(
        self, ledger: Ledger, publish: Callable[[str, dict[str, Any]], None], interval: float
    ) -> None:
        self.ledger = ledger
        self.publish = publish
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mcpq-ledger", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def sweep_once(self) -> int:
        overdue = self.ledger.take_overdue()
        for task_id, message in overdue:
            log.warning("call %s was enqueued but never finished; publishing it again", task_id)
            self.publish(task_id, message)
        return len(overdue)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweep_once()
            except redis.RedisError as exc:
                log.warning("ledger sweep skipped: %s", exc)
            except Exception:  # the sweeper must outlive any one bad entry
                log.exception("ledger sweep failed")
