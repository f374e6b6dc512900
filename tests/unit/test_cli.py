"""mcpq.producer.cli: argument parsing and the exit codes scripts rely on."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from mcpq.producer.cli import EXIT_UNREACHABLE, EXIT_USAGE, cli, parse_arguments

pytestmark = pytest.mark.timeout(30)

#: Keep the developer's own MCPQ_* settings out of the CLI runs.
CLEAN_ENV: dict[str, str | None] = {
    "MCPQ_CONFIG": None,
    "MCPQ_CONFIG_PATH": None,
    "MCPQ_REDIS_URL": None,
    "MCPQ_BROKER_URL": None,
    "MCPQ_RESULT_BACKEND": None,
    "MCPQ_KEY_PREFIX": None,
}


def run(*args: str, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=CLEAN_ENV | (env or {}), prog_name="mcpq")


def assert_no_traceback(result: Result) -> None:
    assert "Traceback" not in result.output
    assert "Traceback" not in result.stderr
    # Click exits through SystemExit; anything else escaping is a crash.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


# --------------------------------------------------------------------------- parse_arguments


def test_no_arguments() -> None:
    assert parse_arguments([]) == {}
    assert parse_arguments(()) == {}


def test_json_object() -> None:
    assert parse_arguments(['{"a": 1, "b": [2, 3], "c": {"d": null}}']) == {
        "a": 1,
        "b": [2, 3],
        "c": {"d": None},
    }
    assert parse_arguments(['  {"x": "y"}']) == {"x": "y"}


def test_key_value_with_json_typed_values() -> None:
    parsed = parse_arguments(["a=1", "b=2.5", "c=true", "d=null", "e=[1,2]", 'f={"k":"v"}', 'g="quoted"'])
    assert parsed == {
        "a": 1,
        "b": 2.5,
        "c": True,
        "d": None,
        "e": [1, 2],
        "f": {"k": "v"},
        "g": "quoted",
    }
    assert type(parsed["a"]) is int


def test_key_value_strings() -> None:
    assert parse_arguments(["name=Ada Lovelace", "empty=", "eq=a=b", "path=/tmp/x"]) == {
        "name": "Ada Lovelace",
        "empty": "",
        "eq": "a=b",
        "path": "/tmp/x",
    }


def test_later_key_wins() -> None:
    assert parse_arguments(["a=1", "a=2"]) == {"a": 2}


def test_bad_json_object() -> None:
    with pytest.raises(click.UsageError) as info:
        parse_arguments(['{"a": 1,}'])
    message = info.value.message
    assert message.startswith("arguments are not valid JSON: ")
    assert "at column 9" in message


@pytest.mark.parametrize("raw", ["[1, 2]", '"text"', "42"])
def test_json_that_is_not_an_object(raw: str) -> None:
    # A lone JSON value that is not an object is not key=value either.
    with pytest.raises(click.UsageError, match="neither a JSON object nor key=value"):
        parse_arguments([raw])


def test_brace_but_not_an_object_is_rejected() -> None:
    with pytest.raises(click.UsageError, match="not valid JSON"):
        parse_arguments(["{a=1}"])


@pytest.mark.parametrize("item", ["justtext", "=value"])
def test_item_without_key_or_equals(item: str) -> None:
    with pytest.raises(click.UsageError) as info:
        parse_arguments(["a=1", item])
    assert info.value.message == f"argument {item!r} is neither a JSON object nor key=value"


# --------------------------------------------------------------------------- the command line


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.exit_code == 0
    assert "Usage: mcpq" in result.output
    commands = result.output.split("Commands:", 1)[1]
    listed = {line.split()[0] for line in commands.splitlines() if line.strip()}
    assert {"servers", "tools", "call", "discover", "worker", "demo"} <= listed
    assert set(cli.commands) == listed


def test_short_help_flag() -> None:
    result = run("-h")
    assert result.exit_code == 0
    assert "Commands:" in result.output


def test_call_with_bad_json_is_a_usage_error() -> None:
    # Fails before any broker is contacted (none is running).
    result = run("call", "get_sum", '{"a": 1,', env={"MCPQ_BROKER_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code == EXIT_USAGE == 2
    assert "arguments are not valid JSON" in result.output
    assert_no_traceback(result)


def test_call_with_bad_key_value_is_a_usage_error() -> None:
    result = run("call", "get_sum", "a=1", "oops", env={"MCPQ_BROKER_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code == 2
    assert "'oops' is neither a JSON object nor key=value" in result.output
    assert_no_traceback(result)


def test_worker_with_malformed_config_exits_2_with_file_and_line(tmp_path: Path) -> None:
    config = tmp_path / "servers.yaml"
    config.write_text("mcp_servers:\n  a:\n    command: python\n    args: [unclosed\n")
    result = run("worker", env={"MCPQ_CONFIG": str(config)})
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, result.output
    assert lines[0].startswith(f"mcpq: {config}:")
    line_number = lines[0].removeprefix(f"mcpq: {config}:").split(":", 1)[0]
    assert line_number.isdigit()
    assert "invalid YAML" in result.stderr
    assert_no_traceback(result)


def test_worker_with_invalid_field_names_it(tmp_path: Path) -> None:
    config = tmp_path / "servers.yaml"
    config.write_text("mcp_servers:\n  a:\n    command: python\n    timeout: -1\n")
    result = run("worker", env={"MCPQ_CONFIG": str(config)})
    assert result.exit_code == 2
    assert f"{config}:4" in result.stderr
    assert "timeout" in result.stderr
    assert_no_traceback(result)


def test_worker_with_missing_config_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = run("worker", env={"MCPQ_CONFIG": str(missing)})
    assert result.exit_code == 2
    assert str(missing) in result.stderr
    assert "not found" in result.stderr
    assert_no_traceback(result)


def test_servers_with_unreachable_redis_exits_3() -> None:
    result = run("servers", env={"MCPQ_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code == EXIT_UNREACHABLE == 3
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mcpq: ")
    assert "127.0.0.1:1" in lines[0]
    assert result.stdout == ""
    assert_no_traceback(result)


def test_tools_with_unreachable_redis_exits_3() -> None:
    result = run("tools", "--json", env={"MCPQ_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code == 3
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
    assert_no_traceback(result)


def test_worker_execs_celery_without_mingle_and_with_two_malloc_arenas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "servers.yaml"
    config.write_text("mcp_servers:\n  a:\n    command: python\n")
    execs = capture_execs(monkeypatch)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)

    assert run("worker", "-c", "4", "--", "--without-gossip", env={"MCPQ_CONFIG": str(config)}).exit_code == 0
    _, argv, env = execs[-1]
    assert argv[1:6] == ["-m", "celery", "-A", "mcpq.worker", "worker"]
    assert argv[argv.index("-c") + 1] == "4"
    assert "--without-mingle" in argv and argv[-1] == "--without-gossip"
    assert env["MALLOC_ARENA_MAX"] == "2"

    assert run("worker", "--mingle", env={"MCPQ_CONFIG": str(config)}).exit_code == 0
    assert "--without-mingle" not in execs[-1][1]
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")  # the user's own choice is kept
    assert run("worker", env={"MCPQ_CONFIG": str(config)}).exit_code == 0
    assert execs[-1][2]["MALLOC_ARENA_MAX"] == "8"


def capture_execs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str], dict[str, str]]]:
    """Record what ``mcpq worker`` would exec instead of becoming Celery."""
    import mcpq.producer.cli as cli_module

    execs: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.setattr(cli_module.os, "execvpe", lambda f, argv, env: execs.append((f, argv, dict(env))))
    return execs


def test_worker_passes_celery_options_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "servers.yaml"
    config.write_text("mcp_servers:\n  a:\n    command: python\n")
    execs = capture_execs(monkeypatch)

    result = run(
        "worker", "-n", "w1@%h", "-c", "4", "-Q", "q", "--autoscale=8,2", env={"MCPQ_CONFIG": str(config)}
    )
    assert result.exit_code == 0, result.output
    argv = execs[-1][1]
    assert argv[argv.index("-n") + 1] == "w1@%h"
    assert argv[argv.index("-c") + 1] == "4"
    # The user's -Q replaces the configured queue instead of adding a second -Q.
    assert argv.count("-Q") == 1 and argv[argv.index("-Q") + 1] == "q"
    assert "--autoscale=8,2" in argv

    assert (
        run("worker", "-l", "debug", env={"MCPQ_CONFIG": str(config), "MCPQ_QUEUE": "tools"}).exit_code == 0
    )
    argv = execs[-1][1]
    assert argv[argv.index("-Q") + 1] == "tools"
    assert argv[argv.index("--loglevel") + 1] == "debug"


def test_call_accepts_json_flag() -> None:
    # --json is what every other command takes; on call it is the default output, not a usage error.
    result = run("call", "--json", "echo", "text=hi", env={"MCPQ_BROKER_URL": "redis://127.0.0.1:9/0"})
    assert result.exit_code == EXIT_UNREACHABLE, result.output
    assert_no_traceback(result)


@pytest.mark.parametrize(
    "argv",
    [
        ["call", "echo", "--timeout", "inf"],
        ["call", "echo", "--timeout", "nan"],
        ["call", "echo", "--timeout", "0"],
        ["call", "echo", "--timeout", "-1"],
        ["call", "echo", "--wait", "-5"],
        ["call", "echo", "--wait", "nan"],
        ["health", "--wait", "inf"],
        ["batch", "calls.jsonl", "--out", "out.jsonl", "--timeout", "nan"],
    ],
)
def test_bad_numbers_are_usage_errors(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "calls.jsonl").write_text('{"tool": "echo"}\n')
    result = run(*argv, env={"MCPQ_BROKER_URL": "redis://127.0.0.1:9/0"})
    assert result.exit_code == EXIT_USAGE, result.output
    assert "number of seconds" in result.output
    assert_no_traceback(result)


def test_call_with_nan_in_arguments_is_invalid_arguments_without_sending() -> None:
    # The broker is unreachable: an exit 1 with invalid_arguments proves nothing was sent.
    result = run("call", "echo", '{"x": NaN}', env={"MCPQ_BROKER_URL": "redis://127.0.0.1:9/0"})
    assert result.exit_code == 1, result.output
    assert '"error_code": "invalid_arguments"' in result.stdout
    assert "not a JSON number" in result.stdout


@pytest.mark.parametrize("command", [["servers"], ["call", "echo"], ["health"]])
def test_a_password_in_the_broker_url_query_is_a_usage_error(command: list[str]) -> None:
    result = run(*command, env={"MCPQ_BROKER_URL": "redis://h:6379/0?password=pw-secret-1"})
    assert result.exit_code == EXIT_USAGE, result.output
    assert "MCPQ_BROKER_URL" in result.stderr and "pw-secret-1" not in result.output
    assert_no_traceback(result)
