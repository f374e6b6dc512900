"""HTTP API (placeholder until the FastAPI app lands)."""

from __future__ import annotations


def serve(host: str, port: int) -> None:
    raise SystemExit("mcpq api is not implemented yet")
