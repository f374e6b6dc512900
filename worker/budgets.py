"""Start-up check of the time budgets that delivery guarantees depend on.

A call must end before Celery's soft limit, the soft limit before the hard
one, and the hard limit before the broker would redeliver the message
(the Redis transport's visibility timeout): otherwise a call still running
is handed to a second worker behind its back.
"""

from __future__ import annotations

import itertools

from mcpq.worker.config import MCPQConfig
from mcpq.worker.contract.errors import ConfigError
from mcpq.worker.contract.settings import Settings


def longest_call(config: MCPQConfig) -> tuple[float, str]:
    """The longest a single call may take (connect + deadline), and whose it is."""
    longest, who = 0.0, "no server"
    for name, server in config.mcp_servers.items():
        timeouts = [server.timeout] + [t.timeout for t in server.tools.values() if t.timeout]
        total = max(timeouts) + server.connect_timeout
        if total > longest:
            longest, who = total, f"server {name!r} (timeout + connect_timeout)"
    return longest, who


def check_time_budgets(settings: Settings, config: MCPQConfig) -> None:
    longest, who = longest_call(config)
    order = [
        (f"the longest call, {who}", longest),
        ("MCPQ_SOFT_TIME_LIMIT", settings.soft_time_limit),
        ("MCPQ_TIME_LIMIT", settings.time_limit),
        ("MCPQ_VISIBILITY_TIMEOUT", settings.visibility_timeout),
    ]
    for (low_name, low), (high_name, high) in itertools.pairwise(order):
        if not low < high:
            raise ConfigError(
                f"time budgets out of order: {low_name} = {low:g}s must be less than {high_name} = {high:g}s "
                "(needed: call deadline < MCPQ_SOFT_TIME_LIMIT < MCPQ_TIME_LIMIT < MCPQ_VISIBILITY_TIMEOUT, "
                "or a running call may be delivered to a second worker)",
                details={"settings": [low_name, high_name], "values": [low, high]},
            )
    if settings.claim_lease <= 0:
        raise ConfigError(f"MCPQ_CLAIM_LEASE must be positive, got {settings.claim_lease:g}")
