"""The MCP server config file: YAML (or a JSON ``mcpServers`` file) -> ``MCPQConfig``.

Three shapes are read by one loader, because JSON is valid YAML:

* mcpq's own: ``mcp_servers: {name: {...}}`` with optional ``defaults``,
  ``max_result_bytes`` and ``secret_patterns``;
* Claude Desktop / Cursor: ``{"mcpServers": {name: {"command": ...} | {"url": ...}}}``;
* VS Code: ``{"servers": {name: {"type": "stdio" | "http" | "sse", ...}}}``.

Every problem surfaces as :class:`~mcpq.worker.contract.errors.ConfigError` naming the file,
the line, the server and the field. Nothing here imports the MCP SDK, so the
CLI can read the file cheaply.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mcpq.worker.config import FieldError, MCPQConfig, MCPServerConfig, ToolOverride, Transport
from mcpq.worker.config_yaml import ConfigDocument, Loc, Problem, file_error, to_config_error
from mcpq.worker.contract.errors import ConfigError

__all__ = ["load_config", "parse_config"]

_VAR_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# The keys that hold the server mapping, in each supported file shape.
SERVER_KEYS = ("mcp_servers", "mcpServers", "servers")
_TOP_LEVEL_KEYS = ("mcp_servers", "defaults", "max_result_bytes", "secret_patterns")
# `type` values seen in mcpServers / VS Code files.
_TYPE_TO_TRANSPORT: dict[str, Transport] = {
    "stdio": "stdio",
    "sse": "sse",
    "http": "http",
    "streamable-http": "http",
    "streamableHttp": "http",
    "streamable_http": "http",
}


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> MCPQConfig:
    """Read and validate a config file (``.yaml``, ``.yml`` or ``.json``)."""
    source = os.fspath(path)
    hint = "set MCPQ_CONFIG to the path of your servers file"
    try:
        # utf-8-sig: editors on Windows save JSON with a BOM.
        text = Path(source).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise file_error(source, None, f"config file not found; {hint}") from None
    except IsADirectoryError:
        raise file_error(source, None, f"is a directory, not a config file; {hint}") from None
    except UnicodeDecodeError as exc:
        raise file_error(
            source, None, f"config file is not UTF-8 text (bad byte at offset {exc.start})"
        ) from None
    except OSError as exc:
        raise file_error(source, None, f"cannot read config file: {exc.strerror or exc}") from None
    return parse_config(text, source=source, env=env)


def parse_config(text: str, source: str = "<string>", env: Mapping[str, str] | None = None) -> MCPQConfig:
    """Validate config text; ``source`` is only used in error messages."""
    doc = ConfigDocument.parse(text, source)
    return _Builder(doc, os.environ if env is None else env).build()


class _Builder:
    """Turns the document's plain data into MCPQConfig, collecting every problem."""

    def __init__(self, doc: ConfigDocument, env: Mapping[str, str]) -> None:
        self.doc = doc
        self.env = env
        self.problems: list[Problem] = []

    def problem(
        self,
        path: Loc,
        text: str,
        *,
        server: str | None = None,
        field: str | None = None,
        inline: bool = False,
    ) -> Problem:
        p = Problem(self.doc.source, self.doc.line(path), text, server, field, inline)
        # A bad value in `defaults` fails the same way in every server that inherits it.
        if p not in self.problems:
            self.problems.append(p)
        return p

    def fatal(self, path: Loc, text: str) -> ConfigError:
        """Record a problem the build cannot continue past; the caller raises the result."""
        self.problem(path, text)
        return to_config_error(self.problems)

    def build(self) -> MCPQConfig:
        data = self.doc.data
        if data is None:
            return MCPQConfig()
        if not isinstance(data, dict):
            raise self.fatal(
                (),
                "the top level must be a mapping with 'mcp_servers' (or 'mcpServers' / 'servers'), "
                f"not {_kind(data)}",
            )
        present = [k for k in SERVER_KEYS if k in data]
        if len(present) > 1:
            raise self.fatal(
                (present[1],), f"use one of {', '.join(repr(k) for k in present)} at the top level, not both"
            )
        servers_key = present[0] if present else "mcp_servers"
        if servers_key == "mcp_servers":
            for key in data:
                if key not in _TOP_LEVEL_KEYS:
                    self.problem((key,), _unknown_field(key, (*_TOP_LEVEL_KEYS, "mcpServers", "servers")))
        # Other keys in a Claude Desktop / VS Code file (globalShortcut, inputs...) belong to that app.

        servers_raw = data.get(servers_key)
        if servers_raw is None:
            servers_raw = {}
        elif not isinstance(servers_raw, dict):
            raise self.fatal(
                (servers_key,),
                f"'{servers_key}' must be a mapping of server name to settings, not {_kind(servers_raw)}",
            )

        defaults, defaults_origin = self.defaults(data.get("defaults"))
        servers: dict[str, MCPServerConfig] = {}
        for name, entry in servers_raw.items():
            server = self.server(servers_key, name, entry, defaults, defaults_origin)
            if server is not None:
                servers[name] = server

        top: dict[str, Any] = {}
        for key in ("max_result_bytes", "secret_patterns"):
            if key in data:
                top[key] = self.expand(data[key], (key,))
        try:
            config = MCPQConfig.model_validate({"mcp_servers": servers, **top})
        except ValidationError as exc:
            for err in exc.errors():
                loc = tuple(err["loc"])
                self.problem(loc, _error_text(err), field=_fmt_path(loc))
            raise to_config_error(self.problems) from None
        if self.problems:
            raise to_config_error(self.problems)
        return config

    def defaults(self, raw: Any) -> tuple[dict[str, Any], dict[Loc, Loc]]:
        if raw is None:
            return {}, {}
        if not isinstance(raw, dict):
            raise self.fatal(
                ("defaults",), f"'defaults' must be a mapping of server settings, not {_kind(raw)}"
            )
        fields, origin = self.translate(raw, ("defaults",), None)
        known = set(MCPServerConfig.model_fields) - {"name"}
        for key in list(fields):
            if key == "name":
                self.problem(origin.get((key,), ("defaults", key)), "'defaults' cannot set a server's name")
                del fields[key]
            elif key not in known:
                self.problem(
                    origin.get((key,), ("defaults", key)),
                    _unknown_field(key, (*known, "type", "disabled")),
                    field="defaults",
                )
                del fields[key]
        return fields, origin

    def translate(
        self, raw: dict[str, Any], base: Loc, server: str | None
    ) -> tuple[dict[str, Any], dict[Loc, Loc]]:
        """Expand ${VARS} and map the mcpServers/VS Code spellings onto field names.

        ``origin`` maps a field's loc to where it was written, for error lines.
        """
        fields: dict[str, Any] = {}
        origin: dict[Loc, Loc] = {}
        for key, value in raw.items():
            path = (*base, key)
            value = self.expand(value, path)
            if key == "type":
                if "transport" in raw:
                    self.problem(path, "set 'transport' or 'type', not both", server=server, field="type")
                    continue
                transport = _TYPE_TO_TRANSPORT.get(value) if isinstance(value, str) else None
                if transport is None:
                    allowed = ", ".join(repr(t) for t in _TYPE_TO_TRANSPORT)
                    self.problem(
                        path, f"unknown type {value!r}; use one of {allowed}", server=server, field="type"
                    )
                    continue
                fields["transport"], origin[("transport",)] = transport, path
            elif key == "disabled":
                if "enabled" in raw:
                    self.problem(
                        path, "set 'enabled' or 'disabled', not both", server=server, field="disabled"
                    )
                    continue
                if not isinstance(value, bool):
                    self.problem(path, "must be true or false", server=server, field="disabled")
                    continue
                fields["enabled"], origin[("enabled",)] = not value, path
            else:
                fields[key] = value
                origin[(key,)] = path
        return fields, origin

    def server(
        self,
        servers_key: str,
        name: str,
        entry: Any,
        defaults: dict[str, Any],
        defaults_origin: dict[Loc, Loc],
    ) -> MCPServerConfig | None:
        base: Loc = (servers_key, name)
        if not isinstance(entry, dict):
            self.problem(
                base,
                f"expected a mapping of settings (command/url, ...), not {_kind(entry)}",
                server=name,
            )
            return None
        before = len(self.problems)
        fields, origin = self.translate(entry, base, name)
        if len(self.problems) > before:
            # An unset ${VAR} left an empty string behind; validating it would only add noise.
            return None
        if "name" in fields:
            if fields["name"] != name:
                self.problem(
                    origin[("name",)],
                    f"the name comes from the key ('{name}'); remove 'name' or rename the key",
                    server=name,
                    field="name",
                )
                return None
            del fields["name"]
        for key, value in defaults.items():
            mine = fields.get(key)
            if key not in fields:
                fields[key] = value
                origin.update({loc: where for loc, where in defaults_origin.items() if loc[0] == key})
            elif isinstance(mine, dict) and isinstance(value, dict):
                # Mappings merge key by key so a server can add one header to the defaults' set.
                fields[key] = {**value, **mine}
                for sub in value:
                    if sub not in mine:
                        origin[(key, sub)] = (*defaults_origin[(key,)], sub)
        fields["name"] = name
        origin[("name",)] = base
        origin[()] = base
        try:
            return MCPServerConfig.model_validate(fields)
        except ValidationError as exc:
            for err in exc.errors():
                self.pydantic_problem(err, name, base, origin)
            return None

    def pydantic_problem(self, err: Any, name: str, base: Loc, origin: dict[Loc, Loc]) -> None:
        loc: Loc = tuple(err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        if not loc and isinstance(cause, FieldError):
            loc = (cause.field,)
        for n in range(len(loc), -1, -1):
            if loc[:n] in origin:
                path = (*origin[loc[:n]], *loc[n:])
                break
        else:  # pragma: no cover - origin[()] always matches
            path = (*base, *loc)
        where = path[len(base) :] if path[: len(base)] == base else path
        if err["type"] == "extra_forbidden":
            known: tuple[str, ...]
            if len(loc) >= 3 and loc[0] == "tools":
                known = tuple(ToolOverride.model_fields)
            else:
                known = (*(set(MCPServerConfig.model_fields) - {"name"}), "type", "disabled")
            parent = where[:-1]
            self.problem(
                path, _unknown_field(str(loc[-1]), known), server=name, field=_fmt_path(parent) or None
            )
            return
        field = _fmt_path(where) or _fmt_path(loc) or None
        if path[0] == "defaults" and err["loc"]:
            # A field-level error in `defaults` is not this server's fault; report it once.
            self.problem(path, _error_text(err), field=field)
            return
        self.problem(path, _error_text(err), server=name, field=field)

    def expand(self, value: Any, path: Loc) -> Any:
        if isinstance(value, str):
            return self.expand_str(value, path)
        if isinstance(value, list):
            return [self.expand(v, (*path, i)) for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: self.expand(v, (*path, k)) for k, v in value.items()}
        return value

    def expand_str(self, text: str, path: Loc) -> str:
        """``$$`` -> ``$``; ``${NAME}``, ``${env:NAME}`` and ``${NAME:-default}`` from the
        environment, where a default may itself hold references (``${A:-${B}}``)."""
        if "$" not in text:
            return text
        out: list[str] = []
        i = 0
        while i < len(text):
            dollar = text.find("$", i)
            if dollar < 0:
                out.append(text[i:])
                break
            out.append(text[i:dollar])
            if text.startswith("$$", dollar):
                out.append("$")
                i = dollar + 2
            elif text.startswith("${", dollar):
                end = _closing_brace(text, dollar + 2)
                if end < 0:
                    self.var_problem(path, "has an unterminated '${'; write '$$' for a literal '$'")
                    return "".join(out)
                out.append(self.reference(text[dollar + 2 : end], path))
                i = end + 1
            else:
                out.append("$")
                i = dollar + 1
        return "".join(out)

    def reference(self, body: str, path: Loc) -> str:
        """The value of one ``${...}`` (``body`` is what stands between the braces)."""
        name, sep, default = body.partition(":-")
        # VS Code writes ${env:NAME}.
        name = name.removeprefix("env:")
        if not _VAR_NAME_RE.match(name):
            self.var_problem(
                path,
                f"has an invalid variable reference '${{{body}}}': use ${{NAME}} or ${{NAME:-default}}, "
                "and '$$' for a literal '$'",
            )
            return ""
        value = self.env.get(name)
        if value:
            return value
        if sep:
            return self.expand_str(default, path)
        state = "is not set" if value is None else "is set but empty"
        server, field = _where(path)
        context = f"server '{server}', field '{field}'" if server is not None else f"field '{field}'"
        self.problem(
            path,
            f"environment variable {name} {state} ({context}); set it or write ${{{name}:-default}}",
            server=server,
            field=field,
            inline=True,
        )
        return ""

    def var_problem(self, path: Loc, text: str) -> None:
        server, field = _where(path)
        self.problem(path, text, server=server, field=field)


# --------------------------------------------------------------------------- helpers


def _closing_brace(text: str, start: int) -> int:
    """Index of the ``}`` that closes a ``${`` whose body starts at ``start``, or -1;
    ``${`` inside the body (a nested default) opens a level of its own."""
    depth = 1
    i = start
    while i < len(text):
        if text.startswith("${", i):
            depth += 1
            i += 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _where(path: Loc) -> tuple[str | None, str]:
    if len(path) >= 2 and path[0] in SERVER_KEYS:
        return str(path[1]), _fmt_path(path[2:])
    return None, _fmt_path(path)


def _fmt_path(path: Loc) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _kind(value: Any) -> str:
    if value is None:
        return "empty (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})" if len(value) <= 40 else "a string"
    return f"a {type(value).__name__} ({value!r})"


def _unknown_field(key: str, known: tuple[str, ...] | list[str]) -> str:
    text = f"unknown field '{key}'"
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    if close:
        text += f"; did you mean '{close[0]}'?"
    return text


# Input values shown in messages only for fields that cannot hold a secret.
_SAFE_TO_ECHO = frozenset(
    set(MCPServerConfig.model_fields) - {"url", "command", "args", "env", "headers", "cwd", "description"}
) | {"max_result_bytes"}


def _error_text(err: Any) -> str:
    cause = (err.get("ctx") or {}).get("error")
    if err["type"] == "value_error" and isinstance(cause, Exception):
        return str(cause)
    text = str(err["msg"])
    loc = err["loc"]
    value = err.get("input")
    if (
        loc
        and loc[0] in _SAFE_TO_ECHO
        and err["type"] not in ("missing", "extra_forbidden")
        and isinstance(value, str | int | float | bool)
    ):
        shown = repr(value)
        text += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
    return text
