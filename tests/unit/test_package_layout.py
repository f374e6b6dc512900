"""One import package: no bare ``worker``/``producer`` imports, a contract layer that
is a boundary, and a producer that stays light."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
PY_DIRS = ("worker", "producer", "gateway", "tests", "bench")
#: The one worker module the producer may reach outside the contract: what
#: ``mcpq worker`` runs before it execs Celery (imported inside that command only).
WORKER_ENTRY = "mcpq.worker.start"


def python_files() -> Iterator[Path]:
    yield REPO / "__init__.py"
    for folder in PY_DIRS:
        yield from (p for p in (REPO / folder).rglob("*.py") if "node_modules" not in p.parts)


def imports(path: Path, top_level_only: bool = False) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            # `from mcpq.worker import config` imports mcpq.worker.config
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def test_no_bare_worker_or_producer_imports() -> None:
    bad = [
        f"{path.relative_to(REPO)}:{line}: import {name}"
        for path in python_files()
        for line, name in imports(path)
        if name.split(".")[0] in ("worker", "producer")
    ]
    assert bad == [], "import mcpq.worker / mcpq.producer instead:\n" + "\n".join(bad)


#: Module paths spelled inside strings and docs: a bare package after ``-m`` or ``-A``.
BARE_MODULE_IN_TEXT = re.compile(r"(-m\s+|-A\s+|\"-m\",\s*\"|\"-A\",\s*\")(worker|producer)\b(?!/)")


def test_no_bare_module_paths_in_commands_docs_or_config() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True, timeout=20
    ).stdout.split()
    suffixes = (".py", ".md", ".yml", ".yaml", ".toml", ".json", ".cfg")
    names = ("Makefile", "Dockerfile", "run")
    bad = []
    for rel in tracked:
        path = REPO / rel
        if not (rel.endswith(suffixes) or path.name in names) or "package-lock" in rel:
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if BARE_MODULE_IN_TEXT.search(line):
                bad.append(f"{rel}:{number}: {line.strip()}")
    assert bad == [], "use mcpq.worker / mcpq.producer:\n" + "\n".join(bad)


def test_contract_imports_nothing_else_of_the_worker() -> None:
    bad = [
        f"{path.relative_to(REPO)}:{line}: {name}"
        for path in (REPO / "worker" / "contract").glob("*.py")
        for line, name in imports(path)
        if name.startswith("mcpq.") and not name.startswith("mcpq.worker.contract")
    ]
    assert bad == [], "the contract layer must stand alone:\n" + "\n".join(bad)


def test_producer_imports_only_the_contract_of_the_worker() -> None:
    bad = []
    for path in (REPO / "producer").glob("*.py"):
        top_level = {line for line, _ in imports(path, top_level_only=True)}
        for line, name in imports(path):
            if not name.startswith("mcpq.worker") or name.startswith("mcpq.worker.contract"):
                continue
            if name == "mcpq.worker":  # `from mcpq.worker import contract`-style parents
                continue
            allowed_lazily = name.startswith(WORKER_ENTRY) and line not in top_level
            if not allowed_lazily:
                bad.append(f"{path.relative_to(REPO)}:{line}: {name}")
    assert bad == [], "the producer may import mcpq.worker.contract only:\n" + "\n".join(bad)


def test_gateway_imports_only_the_contract_of_the_worker_and_the_producer_only_lazily() -> None:
    """The gateway is a producer-side client of the queue: no worker internals; and the
    producer reaches it only inside ``mcpq gateway`` (it imports the SDK's server side)."""
    bad = [
        f"{path.relative_to(REPO)}:{line}: {name}"
        for path in (REPO / "gateway").glob("*.py")
        for line, name in imports(path)
        if name.startswith("mcpq.worker.") and not name.startswith("mcpq.worker.contract")
    ]
    for path in (REPO / "producer").glob("*.py"):
        bad += [
            f"{path.relative_to(REPO)}:{line}: {name} (at top level)"
            for line, name in imports(path, top_level_only=True)
            if name.startswith("mcpq.gateway")
        ]
    assert bad == [], "\n".join(bad)


def test_importing_the_producer_loads_no_sdk_no_yaml_loader_no_worker_signals() -> None:
    producer_modules = sorted(
        f"mcpq.producer.{p.stem}" for p in (REPO / "producer").glob("*.py") if p.stem != "__init__"
    )
    code = (
        "import json, sys; import mcpq, mcpq.producer; "
        + "".join(f"import {m}; " for m in producer_modules)
        + "print(json.dumps(sorted(sys.modules)))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=50, check=False
    )
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout))
    forbidden = {
        "mcp",
        "mcpq.worker.config_loader",
        "mcpq.worker.config_yaml",
        "mcpq.worker.signals",
        "mcpq.worker.celery",
        "mcpq.worker.tasks",
        "mcpq.worker.breaker",
    }
    found = sorted(m for m in loaded if m in forbidden or m.startswith("mcp."))
    assert found == []
    assert "mcpq.worker.contract.errors" in loaded  # the check sees the modules it should


def test_public_api_is_the_producers() -> None:
    import mcpq
    import mcpq.producer
    from mcpq.worker.contract.errors import MCPError
    from mcpq.worker.contract.result import ToolResult

    assert mcpq.ToolQueue is mcpq.producer.ToolQueue
    assert mcpq.ToolResult is ToolResult
    assert mcpq.MCPError is MCPError
    assert set(mcpq.__all__) == set(mcpq.producer.__all__)


def test_loggers_are_named_mcpq() -> None:
    import logging

    import mcpq.worker.registry

    assert mcpq.worker.registry.log is logging.getLogger("mcpq.worker.registry")
