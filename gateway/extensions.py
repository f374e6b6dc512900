"""SEP-2133 extensions on the SDK's lowlevel ``Server``, as ``MCPServer(extensions=...)`` applies them.

``MCPServer`` applies an :class:`~mcp.server.extension.Extension` privately
(``_apply_extension``, ``_install_extension_interceptor``); the gateway is a
lowlevel ``Server``, so this module does the same through the public surface:
the extension's methods via ``add_request_handler``, its settings under
``server.extensions[identifier]`` (advertised in ``capabilities.extensions``),
and its ``tools/call`` interceptor folded around the gateway's handler with
:func:`~mcp.server.extension.compose_tool_call_handler`. Extensions that add
tools or resources are refused: the gateway's tools are the fleet's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mcp.server.context import ServerRequestContext
from mcp.server.extension import Extension, RequestHandler, compose_tool_call_handler
from mcp.server.lowlevel.server import Server
from mcp.shared.exceptions import MCPError
from mcp.shared.extension import validate_extension_identifier
from mcp_types import (
    MISSING_REQUIRED_CLIENT_CAPABILITY,
    CallToolRequestParams,
    ClientCapabilities,
    MissingRequiredClientCapabilityErrorData,
)


def apply_extensions(server: Server[Any], extensions: Sequence[Extension], call_tool: RequestHandler) -> None:
    """Apply ``extensions`` to ``server``, once, at construction.

    :param server: the lowlevel server.
    :param extensions: the extensions, outermost interceptor first.
    :param call_tool: the server's own ``tools/call`` handler, which the interceptors wrap.
    :raises ValueError: a bad or repeated identifier, a method already served, or tools/resources.
    """
    seen: set[str] = set()
    for extension in extensions:
        identifier = getattr(extension, "identifier", None)
        validate_extension_identifier(identifier, owner=type(extension).__name__)
        assert identifier is not None  # validated just above
        if identifier in seen:
            raise ValueError(f"extension {identifier!r} is already applied")
        seen.add(identifier)
        if extension.tools() or extension.resources():
            raise ValueError(
                f"extension {identifier!r} adds tools or resources; the gateway's are the fleet's"
            )
        for method in extension.methods():
            if server.get_request_handler(method.method) is not None:
                raise ValueError(f"extension {identifier!r} binds {method.method!r}, which is already served")
            if method.protocol_versions is not None:
                raise ValueError(f"extension {identifier!r}: version-gated methods are not supported here")
            server.add_request_handler(method.method, method.params_type, method.handler)
        server.extensions[identifier] = extension.settings()
    # Like MCPServer: only an extension that overrides the interceptor replaces the bare handler.
    if any(type(e).intercept_tool_call is not Extension.intercept_tool_call for e in extensions):
        server.add_request_handler(
            "tools/call", CallToolRequestParams, compose_tool_call_handler(extensions, call_tool)
        )


def client_declared(ctx: ServerRequestContext[Any, Any], identifier: str) -> bool:
    """Whether the client declared extension ``identifier``: in this request's
    ``_meta`` capabilities on 2026-07-28, in its ``initialize`` before."""
    capabilities = ctx.session.client_capabilities
    return bool(capabilities and capabilities.extensions and identifier in capabilities.extensions)


def require_declared(ctx: ServerRequestContext[Any, Any], identifier: str) -> None:
    """Refuse a request of extension ``identifier`` from a client that did not declare it.

    :raises MCPError: ``-32021`` (missing required client capability) with
        ``data.requiredCapabilities`` naming the extension (SEP-2133, SEP-2575).
    """
    if client_declared(ctx, identifier):
        return
    data = MissingRequiredClientCapabilityErrorData(
        required_capabilities=ClientCapabilities(extensions={identifier: {}})
    )
    raise MCPError(
        code=MISSING_REQUIRED_CLIENT_CAPABILITY,
        message=f"declare the {identifier!r} extension in the request's client capabilities to use it",
        data=data.model_dump(by_alias=True, mode="json", exclude_none=True),
    )
