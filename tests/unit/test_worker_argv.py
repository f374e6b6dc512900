"""`mcpq worker`'s Celery command line: the pool asked for is the pool Celery runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from celery.bin.worker import WorkersPool

from mcpq.worker.contract.app import make_app
from mcpq.worker.contract.settings import Settings
from mcpq.worker.start import celery_worker_argv

pytestmark = pytest.mark.timeout(30)


def pool_celery_runs(name: str) -> type:
    """What Celery's own ``-P`` option resolves ``name`` to for mcpq's app."""
    ctx = SimpleNamespace(obj=SimpleNamespace(app=make_app(Settings())), token_normalize_func=None)
    resolved: type = WorkersPool().convert(name, None, ctx)  # type: ignore[arg-type]
    return resolved


@pytest.mark.parametrize(
    ("asked", "runs"),
    [
        ("prefork", "celery.concurrency.prefork"),
        ("threads", "celery.concurrency.thread"),
        ("solo", "celery.concurrency.solo"),
    ],
)
def test_the_pool_asked_for_is_the_pool_celery_runs(asked: str, runs: str) -> None:
    argv = celery_worker_argv(
        Settings(), pool=asked, concurrency=2, loglevel="info", mingle=False, passthrough=[]
    )
    pool_arg = argv[argv.index("-P") + 1]
    assert pool_celery_runs(pool_arg).__module__ == runs


def test_celery_itself_reads_prefork_as_the_apps_pool() -> None:
    # Why the argv above renames it: mcpq's app is configured for threads.
    assert pool_celery_runs("prefork").__module__ == "celery.concurrency.thread"
