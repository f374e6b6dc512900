"""What the gateway offers: the fleet's tool map, named for MCP clients.

The naming rule (docs/gateway.md, "Tool names"), the one place it lives:

- a tool offered by exactly one exposed server keeps its bare name;
- a tool offered by several is exposed once per server as ``{server}__{tool}``
  (``/``, mcpq's own qualifier, is not allowed in MCP tool names; ``__`` is,
  and server names never start with ``_``);
- a qualified name that would equal another tool's bare name, or exceed the
  spec's 128 characters, is left out (and logged) rather than shadowing it.

Every name maps to an explicit ``(server, tool)``: calls never parse names,
and a name that is not in the catalog is never sent to the fleet (so the
server filter cannot be bypassed).
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mcpq.worker.contract.errors import MCPError

log = logging.getLogger("mcpq.gateway")

#: Joins server and tool in a qualified name.
QUALIFIER = "__"
#: The spec's longest tool name (SEP-986).
MAX_NAME = 128
#: Fields of a discovered tool that mcpq added (not the server's): never shown to clients.
_MCPQ_FIELDS = frozenset({"server", "ambiguous"})


@dataclass(frozen=True, slots=True)
class Exposure:
    """Which of the fleet's tools a gateway offers (``--servers``, ``--tools``).

    :param servers: only these servers' tools (None: every server).
    :param tools: only tools matching one of these shell patterns, matched
        against the tool's own name and against ``server/tool`` (None: every tool).
    """

    servers: frozenset[str] | None = None
    tools: tuple[str, ...] | None = None

    def admits(self, server: str, tool: str) -> bool:
        """Whether ``tool`` of ``server`` is exposed."""
        if self.servers is not None and server not in self.servers:
            return False
        if self.tools is None:
            return True
        return any(fnmatch.fnmatchcase(n, p) for p in self.tools for n in (tool, f"{server}/{tool}"))


EVERYTHING = Exposure()


@dataclass(frozen=True, slots=True)
class Exposed:
    """One tool as the gateway offers it: its MCP definition and where calls go."""

    name: str
    server: str
    tool: str
    #: The server's tool definition, unchanged except for ``name``.
    definition: dict[str, Any]


def qualified_name(server: str, tool: str) -> str:
    """The name of ``tool`` of ``server`` when several servers offer it."""
    return f"{server}{QUALIFIER}{tool}"


def build_catalog(tools: Iterable[dict[str, Any]], exposure: Exposure = EVERYTHING) -> dict[str, Exposed]:
    """Name every tool of ``tools`` (rows of the fleet's tool map, each with ``server``).

    :param tools: the fleet's tools, as ``AsyncToolQueue.tools()`` returns them.
    :param exposure: which tools to offer (filtered before naming: a tool two
        servers offer keeps its bare name when only one of them is exposed).
    :returns: exposed name -> :class:`Exposed`, in a stable order (by name).
    """
    rows = [t for t in tools if exposure.admits(t["server"], t["name"])]
    offered: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda t: (t["name"], t["server"])):
        offered.setdefault(row["name"], []).append(row)
    catalog: dict[str, Exposed] = {}
    qualified: list[Exposed] = []
    for name, by in offered.items():
        if len(by) == 1:
            catalog[name] = _exposed(name, by[0])
        else:
            qualified += [_exposed(qualified_name(row["server"], name), row) for row in by]
    for entry in qualified:
        if entry.name in catalog or len(entry.name) > MAX_NAME:
            log.warning(
                "tool %r of server %r is not exposed: its qualified name %r %s",
                entry.tool,
                entry.server,
                entry.name,
                "is another tool's name" if entry.name in catalog else f"is over {MAX_NAME} characters",
            )
            continue
        catalog[entry.name] = entry
    return dict(sorted(catalog.items()))


def _exposed(name: str, row: dict[str, Any]) -> Exposed:
    definition = {k: v for k, v in row.items() if k not in _MCPQ_FIELDS}
    definition["name"] = name
    return Exposed(name=name, server=row["server"], tool=row["name"], definition=definition)


class Catalog:
    """The exposed tools, re-read from the fleet when its tool-map version moves.

    :param read_tools: returns the fleet's tools (``AsyncToolQueue.tools``).
    :param read_version: returns the fleet's tool-map version (``AsyncToolQueue.tools_version``).
    :param exposure: which tools to offer (default: all).
    :param recheck: seconds a version read is trusted for, so calls cost no Redis round trip.
    """

    def __init__(
        self,
        read_tools: Callable[[], Awaitable[list[dict[str, Any]]]],
        read_version: Callable[[], Awaitable[int]],
        exposure: Exposure = EVERYTHING,
        recheck: float = 1.0,
    ) -> None:
        self._read_tools = read_tools
        self._read_version = read_version
        self.exposure = exposure
        self.recheck = recheck
        self._entries: dict[str, Exposed] = {}
        self._version: int | None = None
        self._checked_at = 0.0
        self._lock = asyncio.Lock()
        #: The ``--servers`` names last found without tools (logged when this changes).
        self._unknown: list[str] = []

    @property
    def version(self) -> int | None:
        """The fleet tool-map version the entries were built from (None before the first read)."""
        return self._version

    async def entries(self, *, fresh: bool = False) -> dict[str, Exposed]:
        """The exposed tools; ``fresh`` re-checks the fleet's version now.

        :raises MCPConnectionError: the state Redis is unreachable and nothing was read before.
        """
        if fresh or self._version is None or time.monotonic() - self._checked_at >= self.recheck:
            try:
                await self.refresh()
            except MCPError:
                if self._version is None:
                    raise  # nothing read yet: no catalog to answer from
                # The state Redis is unreachable: the last catalog read is still the best answer.
        return self._entries

    async def refresh(self) -> bool:
        """Re-read the tools if the fleet's version moved; True if the catalog changed."""
        async with self._lock:
            version = await self._read_version()
            self._checked_at = time.monotonic()
            if version == self._version:
                return False
            before = self._entries
            tools = await self._read_tools()
            self._entries = build_catalog(tools, self.exposure)
            self._version = version
            self._say_unknown_servers(tools)
            return before != self._entries

    def _say_unknown_servers(self, tools: list[dict[str, Any]]) -> None:
        """Log, once per change, the ``--servers`` names no worker has published tools for
        (a typo, or a server no running worker serves): they expose nothing."""
        if self.exposure.servers is None:
            return
        unknown = sorted(self.exposure.servers - {t["server"] for t in tools})
        if unknown and unknown != self._unknown:
            log.warning(
                "--servers names %s, which no worker has published tools for: nothing of %s is exposed",
                ", ".join(unknown),
                "it" if len(unknown) == 1 else "them",
            )
        self._unknown = unknown

    def has(self, name: str) -> bool:
        """Whether ``name`` is exposed, as last read (no Redis round trip)."""
        return name in self._entries

    async def find(self, name: str) -> Exposed | None:
        """The exposed tool called ``name``; a miss re-checks the fleet once (a tool just discovered)."""
        entry = (await self.entries()).get(name)
        if entry is None:
            entry = (await self.entries(fresh=True)).get(name)
        return entry
