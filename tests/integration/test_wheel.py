"""The built wheel, installed into a fresh venv, next to a user's own ``worker.py``
and ``producer/`` package: mcpq's names are its own, nothing else is shadowed.

Before the one-package layout, a ``worker.py`` in the working directory broke
``from producer import ToolQueue``, ``mcpq worker`` (Celery's app was the
top-level ``worker``) and every stdio server launch (the launcher module ran
in the server's cwd, where the user's ``worker.py`` won).
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

USER_WORKER = 'raise RuntimeError("the user\'s own worker.py was imported")\n'
USER_PRODUCER = 'raise RuntimeError("the user\'s own producer package was imported")\n'


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            ".",
        ],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    (built,) = out.glob("mcpq-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv holding only the wheel; its dependencies come from this
    interpreter's site-packages through a .pth file (no second download), which
    adds that directory without running its .pth files, so the repository's
    editable install is not visible there."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()
    deps = "\n".join(site.getsitepackages())
    Path(purelib, "zz_mcpq_test_deps.pth").write_text(deps + "\n")
    return venv


@pytest.fixture()
def user_project(tmp_path: Path) -> Path:
    """A Celery user's project: its own worker.py and producer/ package."""
    project = tmp_path / "app"
    (project / "producer").mkdir(parents=True)
    (project / "worker.py").write_text(USER_WORKER)
    (project / "producer" / "__init__.py").write_text(USER_PRODUCER)
    return project


def test_wheel_holds_only_the_mcpq_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert top == {"mcpq", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for expected in (
        "mcpq/__init__.py",
        "mcpq/py.typed",
        "mcpq/worker/contract/errors.py",
        "mcpq/worker/lua/admit.lua",
        "mcpq/producer/queue.py",
    ):
        assert expected in names
    assert not any(name.startswith(("mcpq/tests/", "mcpq/bench/", "mcpq/docs/")) for name in names)


def run(
    venv: Path, cwd: Path, *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=90, check=False
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MCPQ_", "PYTHON"))}
    return {**env, **extra}


def test_public_api_and_cli_next_to_a_users_worker_module(fresh_venv: Path, user_project: Path) -> None:
    python, mcpq = fresh_venv / "bin" / "python", fresh_venv / "bin" / "mcpq"
    probe = run(
        fresh_venv,
        user_project,
        str(python),
        "-c",
        "import json, mcpq; from mcpq import ToolQueue, ToolResult, MCPError; "
        "import mcpq.worker.launch; print(json.dumps([mcpq.__file__, mcpq.worker.launch.__file__]))",
        env=clean_env(),
    )
    assert probe.returncode == 0, probe.stderr
    for path in json.loads(probe.stdout):
        assert Path(path).is_relative_to(fresh_venv), path  # the wheel's copy, not the repository's
    helped = run(fresh_venv, user_project, str(mcpq), "--help", env=clean_env())
    assert helped.returncode == 0, helped.stderr
    assert "worker" in helped.stdout and "call" in helped.stdout


@pytest.fixture()
def worker_in_user_project(
    fresh_venv: Path, user_project: Path, redis_url: str, tmp_path: Path
) -> Iterator[dict[str, str]]:
    python = fresh_venv / "bin" / "python"
    prefix = f"wheel{os.getpid()}:"
    config = tmp_path / "servers.yaml"
    # The stdio server runs in the user's directory too: its launcher must be mcpq's.
    config.write_text(
        "mcp_servers:\n"
        "  demo:\n"
        f"    command: {python}\n"
        "    args: ['-m', 'mcpq.worker.demo_server', 'stdio']\n"
        f"    cwd: {user_project}\n"
    )
    env = clean_env(
        MCPQ_BROKER_URL=f"{redis_url}/0",
        MCPQ_RESULT_BACKEND=f"{redis_url}/1",
        MCPQ_REDIS_URL=f"{redis_url}/2",
        MCPQ_CONFIG=str(config),
        MCPQ_KEY_PREFIX=prefix,
        MCPQ_QUEUE=f"{prefix}q",
    )
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [str(fresh_venv / "bin" / "mcpq"), "worker", "-c", "2", "-n", f"wheel{os.getpid()}@%h"],
        cwd=user_project,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield env
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=10)
        log.close()


def test_real_call_through_mcpq_worker_in_a_users_project(
    fresh_venv: Path, user_project: Path, worker_in_user_project: dict[str, str], tmp_path: Path
) -> None:
    mcpq = fresh_venv / "bin" / "mcpq"
    called = run(
        fresh_venv,
        user_project,
        str(mcpq),
        "call",
        "add",
        "a=2",
        "b=40",
        "--server",
        "demo",
        "--timeout",
        "30",
        "--wait",
        "60",
        "--json",
        env=worker_in_user_project,
    )
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert called.returncode == 0, f"{called.stdout}\n{called.stderr}\n--- worker log ---\n{log[-4000:]}"
    result = json.loads(called.stdout)
    assert result["success"] is True
    assert result["data"]["structuredContent"] == {"result": 42.0}
    assert "user's own" not in log
