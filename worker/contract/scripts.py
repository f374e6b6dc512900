"""The one loader of the Lua scripts in ``worker/lua/``."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import redis


@cache
def script_source(name: str) -> str:
    """The text of ``worker/lua/<name>``, read once per process."""
    return resources.files("mcpq.worker.lua").joinpath(name).read_text()


def load_script(client: redis.Redis, name: str) -> Any:
    """``worker/lua/<name>`` registered on ``client`` (EVALSHA, reloaded on NOSCRIPT)."""
    return client.register_script(script_source(name))
