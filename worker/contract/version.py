"""The installed mcpq's version, for what reports it (the gateway's serverInfo, the tracer's scope)."""

from __future__ import annotations

import importlib.metadata


def package_version() -> str:
    """mcpq's version as installed; ``"0"`` when it runs from a source tree that is not installed."""
    try:
        return importlib.metadata.version("mcpq")
    except importlib.metadata.PackageNotFoundError:
        return "0"
