"""What the producer reads and changes of the fleet's shared state, once for both faces.

Each function here is a plan (``mcpq.worker.contract.plans``): ``ToolQueue``
runs it with a sync Redis client, ``AsyncToolQueue`` with an asyncio one, so
the two faces cannot drift apart. Every plan takes the deployment's
:class:`~mcpq.worker.contract.keys.Keys` and reads replies decoded to text.
"""

from __future__ import annotations

import json
from typing import Any

from mcpq.worker.contract.breaker_state import as_text, breaker_status_plan, reset_breaker_plan
from mcpq.worker.contract.errors import ServerNotFoundError
from mcpq.worker.contract.keys import Keys
from mcpq.worker.contract.plans import Plan


def servers_plan(keys: Keys) -> Plan[list[dict[str, Any]]]:
    """Every server the workers published: its summary, protocol, server info and tool count."""
    replies = yield [("hgetall", (keys.servers,))]
    raw = {as_text(k): as_text(v) for k, v in replies[0].items()}
    names = sorted(raw)
    commands = []
    for name in names:
        commands += [("get", (keys.server_info(name),)), ("get", (keys.server_tools(name),))]
    docs = yield commands
    out = []
    for i, name in enumerate(names):
        summary = json.loads(raw[name])
        info = json.loads(docs[2 * i]) if docs[2 * i] else {}
        tools = json.loads(docs[2 * i + 1]) if docs[2 * i + 1] else None
        summary["protocol_version"] = info.get("protocol_version")
        summary["server_info"] = info.get("server_info")
        summary["tools"] = len(tools["tools"]) if tools else None
        summary["discovered_at"] = tools.get("discovered_at") if tools else None
        out.append(summary)
    return out


def tools_plan(keys: Keys, server: str | None = None) -> Plan[list[dict[str, Any]]]:
    """Every tool of every server (or of ``server``), each with ``server`` and ``ambiguous``."""
    if server:
        names = [server]
    else:
        replies = yield [("hkeys", (keys.servers,))]
        names = sorted(as_text(n) for n in replies[0])
    if not names:
        return []
    docs, tool_map = yield [("mget", ([keys.server_tools(n) for n in names],)), ("hgetall", (keys.tool_map,))]
    offered = {as_text(k): as_text(v) for k, v in tool_map.items()}
    out = []
    for name, doc in zip(names, docs, strict=True):
        for tool in json.loads(doc)["tools"] if doc else []:
            offered_by = json.loads(offered.get(tool["name"], "[]"))
            out.append({"server": name, "ambiguous": len(offered_by) > 1, **tool})
    return out


def tools_version_plan(keys: Keys) -> Plan[int]:
    """The fleet's tool-map version: it changes whenever a worker publishes what it discovered."""
    replies = yield [("get", (keys.tools_version,))]
    return int(as_text(replies[0]) or 0) if replies[0] is not None else 0


def breakers_plan(keys: Keys) -> Plan[dict[str, dict[str, Any]]]:
    """Every known server's breaker: state, failures, opened_at, next_probe_at, in flight."""
    replies = yield [("hkeys", (keys.servers,))]
    names = sorted(as_text(n) for n in replies[0])
    return (yield from breaker_status_plan(keys, names))


def known_server_plan(keys: Keys, server: str) -> Plan[None]:
    """Raise :class:`ServerNotFoundError` unless a worker published ``server``."""
    replies = yield [("hexists", (keys.servers, server))]
    if not replies[0]:
        raise ServerNotFoundError(
            f"no server named {server!r} is known to the fleet", details={"server": server}
        )


def reset_plan(keys: Keys, server: str) -> Plan[bool]:
    """Close a known ``server``'s breaker fleet-wide; True if there was state to clear."""
    yield from known_server_plan(keys, server)
    return (yield from reset_breaker_plan(keys, server))


def reconnect_plan(keys: Keys, server: str) -> Plan[dict[str, Any]]:
    """Bump a known ``server``'s epoch: every worker reopens its sessions within about a second."""
    yield from known_server_plan(keys, server)
    replies = yield [("hincrby", (keys.epochs, server, 1))]
    return {"server": server, "epoch": int(replies[0])}
