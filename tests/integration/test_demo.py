"""The README's main command: `mcpq demo` runs end to end with nothing installed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.procs import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_mcpq_demo_runs_end_to_end_on_an_embedded_redis() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPQ_")}
    run = subprocess.run(
        [sys.executable, "-m", "mcpq.producer.cli", "demo"],
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "embedded redis-server" in out
    for transport in ("demo-stdio/echo", "demo-http/echo", "demo-sse/echo"):
        assert f"{transport}" in out
    assert "ambiguous_tool" in out and "invalid_arguments" in out and "tool_not_found" in out
    assert "200/200 correct" in out
    assert "demo finished: every call answered as expected" in out
