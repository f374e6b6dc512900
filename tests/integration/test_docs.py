"""Every example in docs/usage.md runs against a real stack.

The page's fenced blocks are executed in order:

* ``python`` blocks run in one shared namespace with the stack's ``MCPQ_*``
  environment, so ``ToolQueue.from_env()`` reaches the test's worker; their
  ``assert`` lines are the examples' expected outcomes;
* ``console`` blocks: each ``$ `` line runs in bash; the lines after it are
  fragments that must appear in its output; a trailing ``# exit N`` states
  the expected exit code (default 0);
* ``yaml`` blocks must load with ``mcpq.worker.config_loader.parse_config``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from mcpq.worker.config_loader import parse_config
from tests.support.procs import (
    REPO_ROOT,
    everything_stdio_command,
    free_port,
    start_test_server,
    wait_for_port,
)
from tests.support.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

USAGE = REPO_ROOT / "docs" / "usage.md"
BLOCK = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.M | re.S)
ADMIN_TOKEN = "docs-admin-token"


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(USAGE.read_text())]


@pytest.fixture()
def docs_stack(make_stack: Callable[..., Any], count_dir: Path) -> Iterator[Stack]:
    node, args = everything_stdio_command()
    with start_test_server("http", env={"MCPQ_TEST_COUNT_DIR": str(count_dir)}) as http:
        stack: Stack = make_stack(
            {
                "everything": {"command": node, "args": args, "protocol": "legacy"},
                "demo": {"command": sys.executable, "args": ["-m", "mcpq.worker.demo_server", "stdio"]},
                "remote": {"url": http.url, "description": "the test server over Streamable HTTP"},
            }
        )
        stack.env["MCPQ_ADMIN_TOKEN"] = ADMIN_TOKEN
        stack.start_worker(concurrency=16)
        yield stack


@pytest.fixture()
def api_url(docs_stack: Stack) -> Iterator[str]:
    from mcpq.producer.api import create_app
    from mcpq.worker.contract.settings import Settings

    port = free_port()
    settings = Settings.from_env(docs_stack.env)
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings=settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(port, 30)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def run_console(block: str, env: dict[str, str], cwd: Path) -> None:
    commands: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        elif line.strip() and commands:
            commands[-1][1].append(line.strip())
    for command, expected in commands:
        code = 0
        match = re.search(r"\s+# exit (\d+)$", command)
        if match:
            code = int(match.group(1))
            command = command[: match.start()]
        run = subprocess.run(
            ["bash", "-c", command], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
        )
        output = run.stdout + run.stderr
        assert run.returncode == code, f"$ {command}\nexit {run.returncode}, wanted {code}\n{output}"
        for fragment in expected:
            assert fragment in output, f"$ {command}\nmissing {fragment!r} in:\n{output}"


def test_every_example_in_usage_md(docs_stack: Stack, api_url: str, tmp_path: Path) -> None:
    found = blocks()
    kinds = {kind for kind, _ in found}
    assert {"python", "console", "yaml"} <= kinds, kinds
    env = {
        **docs_stack.env,
        "MCPQ_API": api_url,
        "FLOWER_PORT": str(free_port()),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    namespace: dict[str, Any] = {}
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        for index, (kind, body) in enumerate(found):
            where = f"docs/usage.md block {index + 1} ({kind})"
            if kind == "python":
                exec(compile(body, where, "exec"), namespace)
            elif kind == "console":
                run_console(body, env, tmp_path)
            elif kind == "yaml":
                parse_config(body, source=where, env={"REMOTE_MCP_TOKEN": "t", "GITHUB_TOKEN": "g"})
            else:
                raise AssertionError(f"{where}: no runner for {kind!r} blocks")
    finally:
        os.environ.clear()
        os.environ.update(saved)
