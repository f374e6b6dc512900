"""The config file as a YAML document: plain data plus the node behind every path.

Every problem is reported with the file and line it is on, because the person
reading it is editing a file, not debugging a traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml

from mcpq.worker.contract.errors import ConfigError

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"

#: Deepest nesting of lists and mappings a config file may use (real ones use about 6).
MAX_DEPTH = 64
#: Most values a config file may expand to: aliases (``*name``) repeat what
#: they point to, so ~400 bytes of nested aliases can stand for billions.
MAX_VALUES = 100_000

#: A path into the document: mapping keys and list indexes.
Loc = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int | None
    text: str
    server: str | None = None
    field: str | None = None
    # The text already says which server and field (the env-var message wants them mid-sentence).
    inline: bool = False

    def render(self) -> str:
        prefix = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.inline:
            return f"{prefix}: {self.text}"
        where = []
        if self.server is not None:
            where.append(f"server '{self.server}'")
        if self.field:
            where.append(f"field '{self.field}'")
        if where:
            return f"{prefix}: {', '.join(where)}: {self.text}"
        return f"{prefix}: {self.text}"

    def details(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "field": self.field, "server": self.server}


def to_config_error(problems: list[Problem]) -> ConfigError:
    # File order reads best; pydantic reports in field-declaration order.
    problems = sorted(problems, key=lambda p: p.line if p.line is not None else 0)
    details = problems[0].details()
    if len(problems) > 1:
        details["problems"] = [p.details() | {"message": p.render()} for p in problems]
    return ConfigError("\n".join(p.render() for p in problems), details=details)


def file_error(source: str, line: int | None, text: str) -> ConfigError:
    return to_config_error([Problem(source, line, text)])


class ConfigDocument:
    """Plain data from the YAML plus the node behind every path, for line numbers."""

    def __init__(self, source: str, data: Any, nodes: dict[Loc, tuple[yaml.Node | None, yaml.Node]]) -> None:
        self.source = source
        self.data = data
        self.nodes = nodes

    @classmethod
    def parse(cls, text: str, source: str) -> ConfigDocument:
        try:
            return cls._compose(text, source)
        except RecursionError:
            # PyYAML composes recursively: far deeper than MAX_DEPTH ends here, before the walk.
            raise file_error(source, None, _too_deep()) from None
        except yaml.YAMLError as first:
            # Tab-indented JSON is valid JSON but not YAML; outside strings a
            # tab is only whitespace, so spaces keep the meaning and the lines.
            if "\t" in text and (source.endswith(".json") or text.lstrip().startswith("{")):
                try:
                    return cls._compose(text.replace("\t", " "), source)
                except (yaml.YAMLError, RecursionError):
                    pass
            raise cls._yaml_error(first, text, source) from None

    @classmethod
    def _compose(cls, text: str, source: str) -> ConfigDocument:
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
            nodes: dict[Loc, tuple[yaml.Node | None, yaml.Node]] = {}
            data = None if root is None else _Walker(loader, source, nodes).walk(root, (), None)
            return cls(source, data, nodes)
        finally:
            loader.dispose()

    @staticmethod
    def _yaml_error(exc: yaml.YAMLError, text: str, source: str) -> ConfigError:
        line: int | None = None
        problem = str(exc)
        if isinstance(exc, yaml.MarkedYAMLError):
            mark = exc.problem_mark or exc.context_mark
            if mark is not None:
                line = mark.line + 1
            problem = exc.problem or exc.context or problem
            if mark is not None:
                problem = f"{problem} (column {mark.column + 1})"
        language = "YAML"
        if source.endswith(".json"):
            # JSON's own parser names the problem in JSON terms (a missing brace, say).
            try:
                json.loads(text)
            except RecursionError:
                pass
            except json.JSONDecodeError as jexc:
                language, line, problem = "JSON", jexc.lineno, f"{jexc.msg} (column {jexc.colno})"
            except ValueError:
                pass
        return file_error(source, line, f"invalid {language}: {problem}")

    def line(self, path: Loc) -> int | None:
        """The line of ``path``, or of its nearest ancestor present in the file."""
        for n in range(len(path), -1, -1):
            entry = self.nodes.get(path[:n])
            if entry is None:
                continue
            key_node, node = entry
            # For a block mapping or list the key's line reads better than the first child's.
            mark = (
                node.start_mark
                if key_node is None or isinstance(node, yaml.ScalarNode)
                else key_node.start_mark
            )
            return int(mark.line) + 1
        return None


class _Walker:
    def __init__(
        self, loader: yaml.SafeLoader, source: str, nodes: dict[Loc, tuple[yaml.Node | None, yaml.Node]]
    ) -> None:
        self.loader = loader
        self.source = source
        self.nodes = nodes
        self.checked: set[int] = set()
        self.values = 0

    def fail(self, node: yaml.Node, text: str) -> ConfigError:
        return file_error(self.source, node.start_mark.line + 1, text)

    def walk(
        self, node: yaml.Node, path: Loc, key_node: yaml.Node | None, seen: frozenset[int] = frozenset()
    ) -> Any:
        self.values += 1
        if self.values > MAX_VALUES:
            raise self.fail(
                node,
                f"the file expands to more than {MAX_VALUES:,} values; YAML aliases (*name) repeat "
                "what they point to, so nested aliases multiply (an alias bomb?)",
            )
        if len(path) > MAX_DEPTH:
            raise self.fail(node, _too_deep())
        self.nodes[path] = (key_node, node)
        if isinstance(node, yaml.ScalarNode):
            value = self.loader.construct_object(node, deep=True)
            if isinstance(value, str) and any("\ud800" <= c <= "\udfff" for c in value):
                # JSON spells non-BMP characters as \\ud83d\\ude00 pairs; YAML leaves them split.
                value = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return value
        if node.tag not in (_MAP_TAG, _SEQ_TAG):
            raise self.fail(node, f"invalid YAML: unsupported tag '{node.tag}' on a mapping or list")
        if id(node) in seen:
            raise self.fail(node, "invalid YAML: an alias refers to a node that contains it")
        seen = seen | {id(node)}
        if isinstance(node, yaml.SequenceNode):
            return [self.walk(child, (*path, i), None, seen) for i, child in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode):
            return self.walk_mapping(node, path, seen)
        raise self.fail(node, f"invalid YAML: unexpected node {type(node).__name__}")

    def walk_mapping(self, node: yaml.MappingNode, path: Loc, seen: frozenset[int]) -> dict[str, Any]:
        if id(node) not in self.checked:
            # Merged (`<<`) keys may be overridden; only keys written twice are mistakes.
            first_line: dict[str, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                    continue
                if key_node.value in first_line:
                    raise self.fail(
                        key_node,
                        f"duplicate key '{key_node.value}' (first on line {first_line[key_node.value]})",
                    )
                first_line[key_node.value] = key_node.start_mark.line + 1
            self.loader.flatten_mapping(node)
            self.checked.add(id(node))
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.fail(key_node, "keys must be plain strings, not lists or mappings")
            # The key's text, so `8080:` or `yes:` stay what was written.
            key = str(key_node.value)
            out[key] = self.walk(value_node, (*path, key), key_node, seen)
        return out


def _too_deep() -> str:
    return f"lists and mappings are nested more than {MAX_DEPTH} levels deep"
