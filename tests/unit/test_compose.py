"""docker-compose.yml and the Dockerfile, checked against the code (no Docker needed).

Every command must be a real entry point with options that parse, every
MCPQ_* variable must be one the settings read, the config file must exist in
the image and load, the Redis URLs must reach the redis service with its
password, dependencies must wait for healthy services, the image must install
the extras the commands need, and Redis must never evict state.

Each check is a function returning a list of problems. The first tests run
them on the real files; the second set breaks the files one way at a time and
proves that the matching check notices.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import io
import re
import shlex
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Any

import click
import pytest
import yaml

from mcpq.producer.cli import cli
from mcpq.worker.budgets import check_time_budgets
from mcpq.worker.config_loader import load_config
from mcpq.worker.contract.errors import ConfigError
from mcpq.worker.contract.settings import Settings

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

#: The variables Settings.from_env reads: one per field, plus the friendly MCPQ_CONFIG.
ALLOWED_MCPQ = {f"MCPQ_{f.name.upper()}" for f in fields(Settings)} | {"MCPQ_CONFIG"}
REDIS_URL_VARS = ("MCPQ_BROKER_URL", "MCPQ_RESULT_BACKEND", "MCPQ_REDIS_URL")
#: Which pyproject extra a command needs at run time.
EXTRA_FOR = {("mcpq", "api"): "api", ("mcpq", "gateway"): "gateway", ("celery", "flower"): "flower"}
CELERY_SUBCOMMANDS = {"worker", "flower"}
CELERY_VALUE_OPTIONS = {"-A", "--app", "-b", "--broker", "--result-backend", "--workdir", "--config"}

Problems = list[str]


# --- reading the files ---------------------------------------------------------------

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: str, env: Mapping[str, str] | None = None) -> str:
    """Compose's variable substitution: ``${V}``, ``${V:-d}``, ``${V-d}``, ``${V:?e}``, ``$$``."""
    env = env or {}

    def sub(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg") or ""
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":-", "-"):
            return arg if unset else str(value)
        if op in (":?", "?") and unset:
            raise ValueError(f"${{{name}}} is required: {arg}")
        return "" if value is None else str(value)

    return _VAR.sub(sub, value)


def load_compose(text: str | None = None) -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text() if text is None else text)
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), "no services in the compose file"
    return doc


def env_of(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment (mapping or list form), interpolated with compose defaults."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {str(k): interpolate("" if v is None else str(v)) for k, v in raw.items()}


def argv_of(service: Mapping[str, Any]) -> list[str]:
    command = service.get("command")
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(interpolate(command))
    return [interpolate(str(part)) for part in command]


@dataclass
class Dockerfile:
    instructions: list[tuple[str, str]]

    @classmethod
    def parse(cls, text: str) -> Dockerfile:
        joined = re.sub(r"\\\n", " ", text)
        out = []
        for line in joined.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
        return cls(out)

    def all(self, word: str) -> list[str]:
        return [rest for w, rest in self.instructions if w == word]

    @property
    def workdir(self) -> PurePosixPath:
        dirs = self.all("WORKDIR")
        return PurePosixPath(dirs[-1]) if dirs else PurePosixPath("/")

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for rest in self.all("ENV"):
            for token in shlex.split(rest):
                if "=" in token:
                    key, _, value = token.partition("=")
                    out[key] = value
        return out

    def copied_paths(self) -> list[PurePosixPath]:
        """Repo paths COPY puts into the image (single-stage, sources only)."""
        out = []
        for rest in self.all("COPY"):
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            out += [PurePosixPath(p.rstrip("/")) for p in parts[:-1]]
        return out

    def pip_extras(self) -> set[str] | None:
        """The extras of the ``pip install .[...]`` of this package (None if it is never installed)."""
        found: set[str] | None = None
        for rest in self.all("RUN"):
            for m in re.finditer(
                r"pip install\b[^&;|]*?[\s\"'](\.|/\S*?)(?:\[([^\]]*)\])?[\"']?(?=\s|$)", rest
            ):
                found = (found or set()) | {e.strip() for e in (m.group(2) or "").split(",") if e.strip()}
        return found


def load_dockerfile(text: str | None = None) -> Dockerfile:
    return Dockerfile.parse(DOCKERFILE.read_text() if text is None else text)


def pyproject_extras() -> set[str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return set(data["project"].get("optional-dependencies", {}))


def package_folders() -> list[PurePosixPath]:
    """The repository folders pyproject.toml installs as packages (the root aside)."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    dirs = data["tool"]["setuptools"]["package-dir"].values()
    return sorted(PurePosixPath(d) for d in dirs if d != ".")


def services(compose: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def runs_mcpq_code(service: Mapping[str, Any]) -> bool:
    argv = argv_of(service)
    return bool(argv) and (argv[0] in ("mcpq", "celery") or argv[:2] == ["python", "-m"])


# --- the checks ------------------------------------------------------------------------


def _check_mcpq(argv: list[str]) -> Problems:
    if len(argv) < 2 or argv[1] not in cli.commands:
        return [f"`{shlex.join(argv)}`: no such mcpq command (known: {sorted(cli.commands)})"]
    parent = click.Context(cli, info_name="mcpq")
    command: click.Command = cli.commands[argv[1]]
    rest = argv[2:]
    name = argv[1]
    while isinstance(command, click.Group) and rest and rest[0] in command.commands:
        parent = click.Context(command, info_name=name, parent=parent)
        name, command, rest = rest[0], command.commands[rest[0]], rest[1:]
    try:
        command.make_context(name, list(rest), parent=parent)
    except click.ClickException as exc:
        return [f"`{shlex.join(argv)}`: {exc.format_message()}"]
    return []


def _flower_option_problems(argv: list[str], options: list[str]) -> Problems:
    from flower.options import options as flower_options

    known = flower_options._options
    problems = []
    for token in options:
        if not token.startswith("--"):
            problems.append(f"`{shlex.join(argv)}`: flower takes --name=value options, not {token!r}")
            continue
        name, eq, value = token[2:].partition("=")
        option = known.get(name.replace("_", "-"))
        if option is None:
            problems.append(f"`{shlex.join(argv)}`: flower has no option --{name}")
            continue
        if option.type is not bool and not eq:
            problems.append(f"`{shlex.join(argv)}`: --{name} needs a value (--{name}=...)")
            continue
        try:
            copy.deepcopy(option).parse(value if eq else "true")
        except Exception as exc:
            problems.append(f"`{shlex.join(argv)}`: --{name}={value!r}: {exc}")
    return problems


def _check_celery(argv: list[str]) -> Problems:
    app, i = None, 1
    while i < len(argv) and argv[i].startswith("-"):
        opt, eq, value = argv[i].partition("=")
        if opt not in CELERY_VALUE_OPTIONS:
            return [f"`{shlex.join(argv)}`: unexpected celery option {argv[i]!r} before the subcommand"]
        if not eq:
            i += 1
            value = argv[i] if i < len(argv) else ""
        if opt in ("-A", "--app"):
            app = value
        i += 1
    if app != "mcpq.worker":
        return [f"`{shlex.join(argv)}`: the Celery app is `-A mcpq.worker` (worker/celery.py), not {app!r}"]
    sub = argv[i] if i < len(argv) else None
    if sub not in CELERY_SUBCOMMANDS:
        return [f"`{shlex.join(argv)}`: subcommand {sub!r} is not one of {sorted(CELERY_SUBCOMMANDS)}"]
    from celery import Celery

    if not isinstance(getattr(importlib.import_module("mcpq.worker.celery"), "app", None), Celery):
        return ["worker/celery.py has no Celery `app` for `celery -A mcpq.worker`"]
    if sub == "flower":
        if importlib.util.find_spec("flower") is None:
            return ["`celery flower` needs the flower package (pip install .[flower])"]
        return _flower_option_problems(argv, argv[i + 1 :])
    return []


def _check_python_module(argv: list[str], where: str) -> Problems:
    if len(argv) < 3:
        return [f"{where}: `{shlex.join(argv)}` names no module"]
    module = argv[2]
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        spec = None
    if spec is None or spec.origin is None:
        return [f"{where}: `python -m {module}`: no such module"]
    source = Path(spec.origin).read_text()
    if spec.submodule_search_locations is not None:
        main_spec = importlib.util.find_spec(f"{module}.__main__")
        return [] if main_spec is not None else [f"{where}: package {module} has no __main__"]
    if "__name__ == " not in source or "__main__" not in source:
        return [f"{where}: `python -m {module}` does nothing: no `if __name__ == '__main__'` block"]
    parser_factory = getattr(importlib.import_module(module), "_parser", None)
    if parser_factory is not None:  # an argparse CLI: its arguments must parse
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                parser_factory().parse_args(argv[3:])
        except SystemExit:
            return [f"{where}: `{shlex.join(argv)}`: arguments rejected by {module}"]
    return []


def check_commands(compose: Mapping[str, Any], dockerfile: Dockerfile) -> Problems:
    problems = []
    image_cmd = dockerfile.all("CMD")
    for name, service in services(compose).items():
        if "build" not in service:
            continue  # a third-party image (redis) runs its own binary
        argv = argv_of(service)
        if not argv and image_cmd:
            argv = list(yaml.safe_load(image_cmd[-1]))
        if not argv:
            problems.append(f"{name}: no command")
        elif argv[0] == "mcpq":
            problems += [f"{name}: {p}" for p in _check_mcpq(argv)]
        elif argv[0] == "celery":
            problems += [f"{name}: {p}" for p in _check_celery(argv)]
        elif argv[:2] == ["python", "-m"]:
            problems += _check_python_module(argv, name)
        else:
            problems.append(f"{name}: `{shlex.join(argv)}` is not an mcpq, celery or python -m entry point")
    return problems


def check_mcpq_variables(compose: Mapping[str, Any], dockerfile: Dockerfile) -> Problems:
    sources = {name: env_of(s) for name, s in services(compose).items()}
    sources["Dockerfile ENV"] = dockerfile.env()
    return [
        f"{where}: {key} is not read by Settings.from_env (known: {sorted(ALLOWED_MCPQ)})"
        for where, env in sources.items()
        for key in env
        if key.startswith("MCPQ_") and key not in ALLOWED_MCPQ
    ]


def _repo_path(value: str, dockerfile: Dockerfile) -> PurePosixPath | None:
    path = PurePosixPath(value)
    if path.is_absolute():
        try:
            return path.relative_to(dockerfile.workdir)
        except ValueError:
            return None
    return path


def _ignored(path: PurePosixPath) -> bool:
    patterns = (
        [line.strip() for line in DOCKERIGNORE.read_text().splitlines()] if DOCKERIGNORE.exists() else []
    )
    parents = [path, *path.parents]
    return any(
        p and not p.startswith(("#", "!")) and any(PurePosixPath(q).match(p.rstrip("/")) for q in parents)
        for p in patterns
    )


def check_config_files(compose: Mapping[str, Any], dockerfile: Dockerfile) -> Problems:
    problems = []
    default = dockerfile.env().get("MCPQ_CONFIG")
    for name, service in services(compose).items():
        if not runs_mcpq_code(service) or argv_of(service)[:2] == ["python", "-m"]:
            continue
        env = {**dockerfile.env(), **env_of(service)}
        value = env.get("MCPQ_CONFIG") or env.get("MCPQ_CONFIG_PATH") or default
        if not value:
            problems.append(
                f"{name}: MCPQ_CONFIG is not set (the default config/servers.yaml is for development)"
            )
            continue
        rel = _repo_path(value, dockerfile)
        if rel is None:
            problems.append(
                f"{name}: MCPQ_CONFIG={value} is outside the image's WORKDIR {dockerfile.workdir}"
            )
            continue
        if not (REPO / rel).is_file():
            problems.append(f"{name}: MCPQ_CONFIG={value}: {rel} does not exist in the repository")
            continue
        if not any(rel == src or src in rel.parents for src in dockerfile.copied_paths()) or _ignored(rel):
            problems.append(f"{name}: MCPQ_CONFIG={value}: the Dockerfile does not copy {rel} into the image")
        try:
            config = load_config(REPO / rel, env=env)
            check_time_budgets(Settings.from_env(env), config)
        except ConfigError as exc:
            problems.append(f"{name}: MCPQ_CONFIG={value}: {exc.message}")
            continue
        for server, cfg in config.mcp_servers.items():
            if cfg.transport == "stdio" and cfg.command == "python" and cfg.args[:1] == ["-m"]:
                problems += _check_python_module(["python", *cfg.args], f"{name}: {rel} server {server!r}")
            if cfg.transport in ("http", "sse") and cfg.url:
                host = re.sub(r"^\w+://([^/:]+).*$", r"\1", cfg.url)
                if host not in services(compose) and host not in ("127.0.0.1", "localhost"):
                    problems.append(f"{name}: {rel} server {server!r}: {host!r} is no compose service")
    return problems


def _redis_service(compose: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    for name, service in services(compose).items():
        if str(service.get("image", "")).split(":")[0].split("/")[-1] == "redis":
            return name, service
    return None


def _redis_flag(argv: list[str], flag: str) -> str | None:
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            return argv[i + 1]
    return None


def check_redis_urls(compose: Mapping[str, Any]) -> Problems:
    found = _redis_service(compose)
    if found is None:
        return ["no redis service (image redis:*)"]
    redis_name, redis_service = found
    password = _redis_flag(argv_of(redis_service), "--requirepass")
    problems = []
    for name, service in services(compose).items():
        if not runs_mcpq_code(service) or argv_of(service)[:2] == ["python", "-m"]:
            continue
        env = env_of(service)
        for var in REDIS_URL_VARS:
            url = env.get(var)
            if not url:
                problems.append(f"{name}: {var} is not set, so it would use 127.0.0.1 inside the container")
                continue
            m = re.match(r"^rediss?://(?::(?P<pw>[^@]*)@)?(?P<host>[^:/]+)(?::\d+)?(?:/\d+)?$", url)
            if m is None:
                problems.append(f"{name}: {var}={url!r} is not a redis:// URL")
            elif m.group("host") != redis_name:
                problems.append(
                    f"{name}: {var} points at {m.group('host')!r}, not the {redis_name!r} service"
                )
            elif (m.group("pw") or None) != password:
                problems.append(f"{name}: {var} does not carry the password redis is started with")
    return problems


def check_depends_on(compose: Mapping[str, Any]) -> Problems:
    all_services = services(compose)
    problems = []
    for name, service in all_services.items():
        deps = service.get("depends_on") or {}
        if isinstance(deps, list):
            problems += [f"{name}: depends_on {d!r} without `condition: service_healthy`" for d in deps]
            continue
        for target, spec in deps.items():
            if target not in all_services:
                problems.append(f"{name}: depends_on {target!r}, which is not a service")
                continue
            if (spec or {}).get("condition") != "service_healthy":
                problems.append(f"{name}: depends_on {target!r} should wait for `condition: service_healthy`")
            health = all_services[target].get("healthcheck") or {}
            if not health.get("test") or health.get("disable"):
                problems.append(f"{name}: depends_on {target!r}, which has no healthcheck")
    return problems


def check_healthchecks(compose: Mapping[str, Any]) -> Problems:
    problems = []
    for name, service in services(compose).items():
        health = service.get("healthcheck") or {}
        test = health.get("test")
        if not test or health.get("disable") or (isinstance(test, list) and test[:1] == ["NONE"]):
            problems.append(f"{name}: no healthcheck")
    return problems


def check_worker_scales(compose: Mapping[str, Any]) -> Problems:
    workers = [n for n, s in services(compose).items() if argv_of(s)[:2] == ["mcpq", "worker"]]
    if not workers:
        return ["no service runs `mcpq worker`"]
    problems = []
    for name in workers:
        service = services(compose)[name]
        if "container_name" in service:
            problems.append(f"{name}: container_name prevents `--scale {name}=N`")
        if service.get("ports"):
            problems.append(f"{name}: published ports collide under `--scale {name}=N`")
    return problems


def check_dockerfile(compose: Mapping[str, Any], dockerfile: Dockerfile) -> Problems:
    problems = []
    base = dockerfile.all("FROM")
    if not base or not base[0].startswith("python:3.11-slim"):
        problems.append(f"Dockerfile: base image should be python:3.11-slim, not {base[:1]}")
    extras = dockerfile.pip_extras()
    if extras is None:
        return [*problems, "Dockerfile: never runs `pip install .[...]` of this package"]
    if unknown := extras - pyproject_extras():
        problems.append(f"Dockerfile: extras {sorted(unknown)} are not in pyproject.toml")
    for name, service in services(compose).items():
        if "build" not in service:
            continue
        argv = argv_of(service)
        for (program, sub), extra in EXTRA_FOR.items():
            if argv[:1] == [program] and sub in argv[1:] and extra not in extras:
                problems.append(f"{name}: `{shlex.join(argv)}` needs the {extra!r} extra, not installed")
    copied = dockerfile.copied_paths()
    for folder in package_folders():
        if not any(folder == src or src in folder.parents for src in copied):
            problems.append(f"Dockerfile: the package folder {folder}/ is never copied into the image")
    users = dockerfile.all("USER")
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("Dockerfile: the image must end with a non-root USER")
    return problems


def check_redis_settings(compose: Mapping[str, Any]) -> Problems:
    found = _redis_service(compose)
    if found is None:
        return ["no redis service (image redis:*)"]
    name, service = found
    argv = argv_of(service)
    problems = []
    if not str(service["image"]).startswith("redis:7"):
        problems.append(f"{name}: image should be redis:7, not {service['image']!r}")
    if _redis_flag(argv, "--maxmemory-policy") != "noeviction":
        problems.append(
            f"{name}: --maxmemory-policy noeviction missing: Redis could evict breaker and claim state"
        )
    if _redis_flag(argv, "--appendonly") != "yes":
        problems.append(f"{name}: --appendonly yes missing: queued calls are lost when Redis restarts")
    if not _redis_flag(argv, "--requirepass"):
        problems.append(f"{name}: --requirepass missing: anyone on the network could enqueue tool calls")
    return problems


def _flower_flag(argv: list[str], name: str) -> str | None:
    """The value of Flower option ``--name`` (``_`` or ``-`` spelling); the last one wins."""
    value = None
    for token in argv:
        key, eq, given = token.partition("=")
        if key.startswith("--") and key[2:].replace("_", "-") == name:
            value = given if eq else "true"
    return value


def check_flower_auth(compose: Mapping[str, Any]) -> Problems:
    problems = []
    flowers = 0
    for name, service in services(compose).items():
        env = env_of(service)
        if "FLOWER_UNAUTHENTICATED_API" in env:
            problems.append(f"{name}: FLOWER_UNAUTHENTICATED_API must stay unset (the API can run tools)")
        argv = argv_of(service)
        if argv[:1] == ["celery"] and "flower" in argv:
            flowers += 1
            # Command-line options override FLOWER_* variables in Flower.
            auth = _flower_flag(argv, "basic-auth") or env.get("FLOWER_BASIC_AUTH")
            if not auth or ":" not in auth or not auth.partition(":")[2]:
                problems.append(f"{name}: Flower runs without --basic-auth=user:password")
            read_only = _flower_flag(argv, "read-only") or env.get("FLOWER_READ_ONLY") or ""
            if read_only.lower() not in ("true", "1", "yes", "t"):
                problems.append(f"{name}: Flower without --read-only=True lets its API run tools")
    if not flowers:
        problems.append("no service runs `celery -A mcpq.worker flower`")
    return problems


def _raw_env(service: Mapping[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {str(k): "" if v is None else str(v) for k, v in raw.items()}


def check_secrets_from_env(compose: Mapping[str, Any]) -> Problems:
    """Passwords and tokens come from the operator's environment, never literals in the file."""
    problems = []
    for name, service in services(compose).items():
        token = _raw_env(service).get("MCPQ_ADMIN_TOKEN")
        if token is not None and "${" not in token:
            problems.append(f"{name}: MCPQ_ADMIN_TOKEN is a literal; use ${{MCPQ_ADMIN_TOKEN}}")
        command = service.get("command") or []
        raw = command if isinstance(command, str) else " ".join(str(p) for p in command)
        for flag in ("--requirepass", "--basic-auth"):
            for m in re.finditer(rf"{flag}[= ]+(\S+)", raw):
                if "${" not in m.group(1):
                    problems.append(f"{name}: {flag} is a literal; take it from the environment")
    return problems


ComposeCheck = Callable[[Mapping[str, Any]], Problems]
DockerCheck = Callable[[Mapping[str, Any], Dockerfile], Problems]

COMPOSE_CHECKS: dict[str, ComposeCheck] = {
    "redis_urls": check_redis_urls,
    "depends_on": check_depends_on,
    "healthchecks": check_healthchecks,
    "worker_scales": check_worker_scales,
    "redis_settings": check_redis_settings,
    "flower_auth": check_flower_auth,
    "secrets_from_env": check_secrets_from_env,
}
DOCKER_CHECKS: dict[str, DockerCheck] = {
    "commands": check_commands,
    "mcpq_variables": check_mcpq_variables,
    "config_files": check_config_files,
    "dockerfile": check_dockerfile,
}


def run_check(name: str, compose: Mapping[str, Any], dockerfile: Dockerfile) -> Problems:
    if name in COMPOSE_CHECKS:
        return COMPOSE_CHECKS[name](compose)
    return DOCKER_CHECKS[name](compose, dockerfile)


# --- the real files pass --------------------------------------------------------------------


@pytest.mark.parametrize("check", [*COMPOSE_CHECKS, *DOCKER_CHECKS])
def test_compose_file_matches_the_code(check: str) -> None:
    assert run_check(check, load_compose(), load_dockerfile()) == []


def test_expected_services_exist() -> None:
    assert {"redis", "worker", "flower", "api", "gateway", "mcp-demo"} <= set(services(load_compose()))


def test_interpolation_follows_compose() -> None:
    assert interpolate("${A:-x}") == "x"
    assert interpolate("${A:-x}", {"A": "y"}) == "y"
    assert interpolate("${A:-x}", {"A": ""}) == "x"
    assert interpolate("${A-x}", {"A": ""}) == ""
    assert interpolate("$$HOSTNAME ${B}") == "$HOSTNAME "
    with pytest.raises(ValueError, match="B"):
        interpolate("${B:?set B}")


# --- each check notices a broken file --------------------------------------------------------


def _set_command(service: str, command: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        doc["services"][service]["command"] = command

    return mutate


def _set_env(service: str, key: str, value: str | None) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        env = doc["services"][service].setdefault("environment", {})
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value

    return mutate


def _set(service: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        if value is None:
            doc["services"][service].pop(key, None)
        else:
            doc["services"][service][key] = value

    return mutate


def _redis_arg(old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        command = doc["services"]["redis"]["command"]
        if isinstance(command, str):
            doc["services"]["redis"]["command"] = command.replace(old, new)
        else:
            doc["services"]["redis"]["command"] = [new if part == old else part for part in command]

    return mutate


def _flower_without(flag: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        argv = argv_of(doc["services"]["flower"])
        doc["services"]["flower"]["command"] = [t for t in argv if not t.startswith(flag)]

    return mutate


def _flower_plus(token: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        doc["services"]["flower"]["command"] = [*argv_of(doc["services"]["flower"]), token]

    return mutate


BROKEN_COMPOSE: list[tuple[str, str, Callable[[dict[str, Any]], None]]] = [
    ("commands", "unknown mcpq subcommand", _set_command("worker", "mcpq wrker")),
    ("commands", "unknown mcpq option", _set_command("api", "mcpq api --hostname 0.0.0.0")),
    ("commands", "bad mcpq option value", _set_command("api", "mcpq api --port eighty")),
    ("commands", "celery without -A mcpq.worker", _set_command("flower", "celery flower")),
    ("commands", "celery app misspelt", _set_command("flower", "celery -A mcpq.workers flower")),
    ("commands", "unknown celery subcommand", _set_command("flower", "celery -A mcpq.worker flowers")),
    ("commands", "unknown flower option", _flower_plus("--no-such-option=1")),
    ("commands", "flower option without value", _flower_plus("--port")),
    ("commands", "flower option bad value", _flower_plus("--port=abc")),
    ("commands", "missing module", _set_command("mcp-demo", "python -m mcpq.worker.no_such_server http")),
    ("commands", "module without main", _set_command("mcp-demo", "python -m mcpq.worker.contract.settings")),
    ("commands", "module arguments", _set_command("mcp-demo", "python -m mcpq.worker.demo_server htp")),
    ("commands", "not an entry point", _set_command("api", "uvicorn mcpq.producer.api:app")),
    ("mcpq_variables", "misspelt variable", _set_env("worker", "MCPQ_BROKER", "redis://redis")),
    ("mcpq_variables", "unknown variable", _set_env("api", "MCPQ_API_TOKEN", "x")),
    ("config_files", "config missing", _set_env("worker", "MCPQ_CONFIG", "config/nope.yaml")),
    ("config_files", "config invalid", _set_env("worker", "MCPQ_CONFIG", "pyproject.toml")),
    ("config_files", "config not copied", _set_env("worker", "MCPQ_CONFIG", "tests/servers/README.md")),
    ("config_files", "config outside workdir", _set_env("worker", "MCPQ_CONFIG", "/etc/mcpq.yaml")),
    ("config_files", "time budgets", _set_env("worker", "MCPQ_SOFT_TIME_LIMIT", "5")),
    ("config_files", "demo url host", _set_env("worker", "MCP_DEMO_URL", "http://demo:8765/mcp")),
    (
        "redis_urls",
        "url on localhost",
        _set_env("worker", "MCPQ_BROKER_URL", "redis://:mcpq@localhost:6379/0"),
    ),
    ("redis_urls", "url without password", _set_env("flower", "MCPQ_RESULT_BACKEND", "redis://redis:6379/1")),
    ("redis_urls", "url wrong password", _set_env("api", "MCPQ_REDIS_URL", "redis://:nope@redis:6379/2")),
    ("redis_urls", "url missing", _set_env("api", "MCPQ_REDIS_URL", None)),
    (
        "depends_on",
        "unknown target",
        _set("worker", "depends_on", {"redis-db": {"condition": "service_healthy"}}),
    ),
    (
        "depends_on",
        "not waiting for health",
        _set("worker", "depends_on", {"redis": {"condition": "service_started"}}),
    ),
    ("depends_on", "list form", _set("api", "depends_on", ["redis"])),
    ("depends_on", "target without healthcheck", _set("redis", "healthcheck", None)),
    ("healthchecks", "service without healthcheck", _set("api", "healthcheck", None)),
    ("healthchecks", "healthcheck disabled", _set("worker", "healthcheck", {"disable": True})),
    ("worker_scales", "container_name", _set("worker", "container_name", "mcpq-worker")),
    ("worker_scales", "fixed port", _set("worker", "ports", ["9000:9000"])),
    ("worker_scales", "no worker", _set_command("worker", "mcpq tools")),
    ("redis_settings", "evicting policy", _redis_arg("noeviction", "allkeys-lru")),
    ("redis_settings", "no append-only file", _redis_arg("yes", "no")),
    ("redis_settings", "old image", _set("redis", "image", "redis:6")),
    ("flower_auth", "no basic auth", _flower_without("--basic-auth")),
    ("secrets_from_env", "literal admin token", _set_env("api", "MCPQ_ADMIN_TOKEN", "hunter22")),
    ("secrets_from_env", "literal redis password", _redis_arg("${REDIS_PASSWORD:-mcpq}", "hunter22")),
    (
        "secrets_from_env",
        "literal flower password",
        _set_command("flower", "celery -A mcpq.worker flower --basic-auth=admin:hunter22"),
    ),
    ("flower_auth", "not read-only", _flower_without("--read-only")),
    ("flower_auth", "read-only off", _flower_plus("--read-only=False")),
    ("flower_auth", "unauthenticated api", _set_env("flower", "FLOWER_UNAUTHENTICATED_API", "true")),
]


@pytest.mark.parametrize(
    ("check", "mutate"), [(c, m) for c, _, m in BROKEN_COMPOSE], ids=[d for _, d, _ in BROKEN_COMPOSE]
)
def test_check_notices_a_broken_compose_file(check: str, mutate: Callable[[dict[str, Any]], None]) -> None:
    real = load_compose()
    broken = copy.deepcopy(real)
    mutate(broken)
    assert broken != real
    assert run_check(check, broken, load_dockerfile()), f"{check} accepted the broken compose file"


BROKEN_DOCKERFILE: list[tuple[str, str, Callable[[str], str]]] = [
    ("dockerfile", "no api extra", lambda t: t.replace(".[api,flower,gateway]", ".[flower,gateway]")),
    ("dockerfile", "no flower extra", lambda t: t.replace(".[api,flower,gateway]", ".[api,gateway]")),
    ("dockerfile", "no gateway extra", lambda t: t.replace(".[api,flower,gateway]", ".[api,flower]")),
    ("dockerfile", "no extras", lambda t: t.replace('".[api,flower,gateway]"', ".")),
    ("dockerfile", "unknown extra", lambda t: t.replace("gateway]", "gateway,gui]")),
    ("dockerfile", "a package not copied", lambda t: re.sub(r"(?m)^COPY gateway .*$", "", t)),
    ("dockerfile", "never installed", lambda t: re.sub(r"RUN pip install[^\n]*", "RUN true", t)),
    ("dockerfile", "runs as root", lambda t: re.sub(r"(?m)^USER .*$", "USER root", t)),
    ("dockerfile", "no USER", lambda t: re.sub(r"(?m)^USER .*$", "", t)),
    ("dockerfile", "other base image", lambda t: t.replace("python:3.11-slim", "python:3.10")),
    ("config_files", "config not copied", lambda t: re.sub(r"(?m)^COPY config .*$", "", t)),
    ("mcpq_variables", "unknown ENV", lambda t: t.replace("ENV MCPQ_CONFIG=", "ENV MCPQ_CONF=")),
]


@pytest.mark.parametrize(
    ("check", "mutate"), [(c, m) for c, _, m in BROKEN_DOCKERFILE], ids=[d for _, d, _ in BROKEN_DOCKERFILE]
)
def test_check_notices_a_broken_dockerfile(check: str, mutate: Callable[[str], str]) -> None:
    text = DOCKERFILE.read_text()
    broken = mutate(text)
    assert broken != text, "the mutation no longer applies to the Dockerfile"
    assert run_check(check, load_compose(), load_dockerfile(broken)), (
        f"{check} accepted the broken Dockerfile"
    )
